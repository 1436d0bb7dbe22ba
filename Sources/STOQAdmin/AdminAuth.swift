import Foundation
import STOQCore
import NIOCore
import NIOSSL
import STOQAccess

/// What the admin API's `authorize` closure decided about one request.
package enum AdminAuthResult: Sendable, Equatable {
    /// Serve it.
    case allow
    /// Answer 401 with `www-authenticate: Bearer`; the reason goes into the body and the log.
    case deny(String)
}

/// How the admin API checks who asks (`admin.auth`). The config loader has already refused
/// `.none` on anything but loopback.
package enum AdminProtection: Sendable {
    /// Nothing is checked.
    case none
    /// Each request's `Authorization` header (`""` when absent) goes through `authorize`. The
    /// node assembly supplies it, so the admin API knows nothing of how tokens are made.
    case token(authorize: @Sendable (String) -> AdminAuthResult)
    /// HTTPS, with a client certificate that `tls` accepts.
    case mtls(AdminTLS)
}

/// A fixed bearer token read from a file (`admin.token_file`): the verifier the node wires in
/// until tokens signed by the node's key can be checked here.
package struct AdminBearerToken: Sendable {
    private let token: [UInt8]

    /// Reads the token from `path` (surrounding whitespace trimmed); throws a sentence naming
    /// the file when it cannot be read or is empty.
    package init(file path: String) throws(AdminAuthError) {
        let data: [UInt8]
        switch FileContents.read(path) {
        case .success(let bytes): data = bytes
        case .failure(let why): throw AdminAuthError("admin.token_file = \"\(path)\": cannot read the file: \(why)")
        }
        let text = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard !text.isEmpty else { throw AdminAuthError("admin.token_file = \"\(path)\": the file is empty") }
        token = Array(text.utf8)
    }

    /// A token given directly (tests).
    package init(token: String) { self.token = Array(token.utf8) }

    /// Allows `Bearer <the token>` (scheme in any case); the comparison takes the same time
    /// wherever the first difference is, so timing does not reveal a prefix of the token.
    package func authorize(_ header: String) -> AdminAuthResult {
        let h = header.trimmingCharacters(in: .whitespaces)
        guard !h.isEmpty else { return .deny("no Authorization header: send Authorization: Bearer <token>") }
        guard let bearer = AccessToken.bearer(h) else { return .deny("the Authorization header is not a Bearer token") }
        let given = Array(bearer.utf8)
        var diff: UInt8 = given.count == token.count ? 0 : 1
        for i in 0..<token.count { diff |= (i < given.count ? given[i] : 0) ^ token[i] }
        return diff == 0 ? .allow : .deny("wrong bearer token")
    }
}

/// Why the admin API's authentication could not be set up (a file missing, a certificate
/// unreadable): a sentence naming the file.
package struct AdminAuthError: Error, Sendable, CustomStringConvertible {
    package var description: String
    package init(_ d: String) { description = d }
}

/// The TLS side of `admin.auth = "mtls"`: the node's identity certificate and key (files that
/// certificate renewal replaces, every 24 h by default) and the check of a client's chain.
///
/// The files are stat'ed for each new connection and the TLS context rebuilt when either
/// changed, so a rotated certificate is served from the next connection on without a restart;
/// a pair that does not load (caught between the two renames) keeps the previous context.
package final class AdminTLS: @unchecked Sendable {
    /// The node's certificate chain and key (PEM).
    package let certificateFile: String
    package let keyFile: String
    /// The client's chain (DER, leaf first) → nil to accept, else why not: the same check the
    /// QUIC listener applies to client certificates (roots, revocation, clientAuth usage).
    let verify: @Sendable ([[UInt8]]) -> String?
    private let lock = NSLock()
    private var cached: (stamp: [Int], context: NIOSSLContext)?

    /// Checks client chains with `verify`; presents `certificateFile`/`keyFile`. Loads them
    /// once now, so a bad pair fails the start.
    package init(certificateFile: String, keyFile: String, verify: @escaping @Sendable ([[UInt8]]) -> String?) throws(AdminAuthError) {
        self.certificateFile = certificateFile
        self.keyFile = keyFile
        self.verify = verify
        do { _ = try context() } catch { throw AdminAuthError("admin.auth = \"mtls\": \(error)") }
    }

    /// The context new connections use: rebuilt when the files changed since the last one.
    func context() throws -> NIOSSLContext {
        let stamp = Self.stamp(certificateFile) + Self.stamp(keyFile)
        if let c = lock.withLock({ cached }), c.stamp == stamp { return c.context }
        do {
            let chain = try NIOSSLCertificate.fromPEMFile(certificateFile)
            let key = try NIOSSLPrivateKey(file: keyFile, format: .pem)
            var tls = TLSConfiguration.makeServerConfiguration(certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key))
            // Asks for a client certificate and fails the handshake without one; the chain
            // itself is checked by `verify` (NIOSSLServerHandler's custom callback).
            tls.certificateVerification = .noHostnameVerification
            tls.minimumTLSVersion = .tlsv12
            let context = try NIOSSLContext(configuration: tls)
            lock.withLock { cached = (stamp, context) }
            return context
        } catch {
            if let c = lock.withLock({ cached }) { return c.context }
            throw AdminAuthError("cannot load \(certificateFile) / \(keyFile): \(error)")
        }
    }

    /// Inode, size and modification time: what changes when renewal replaces the file.
    private static func stamp(_ path: String) -> [Int] {
        var st = stat()
        guard stat(path, &st) == 0 else { return [0, 0, 0, 0] }
        return [Int(st.st_ino), Int(st.st_size), st.st_mtim.tv_sec, st.st_mtim.tv_nsec]
    }
}
