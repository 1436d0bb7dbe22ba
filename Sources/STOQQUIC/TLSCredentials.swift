import CNgtcp2
import STOQCore
#if canImport(Glibc)
import Glibc
#endif

/// Certificates and keys for one TLS role, loaded once and shared (read-only) by
/// every worker. A new instance replaces an old one on rotation.
public final class TLSCredentials: @unchecked Sendable {
    let raw: OpaquePointer
    /// Whether these serve (server) or verify (client).
    public let isServer: Bool
    /// Kept alive as long as the C credentials point at it.
    private var peerCheck: PeerCertificateCheck?

    /// Server credentials from PEM files; with `clientAuth`, clients are asked for a
    /// certificate (mutual TLS) and its policy judges it: a refused client fails the handshake
    /// with the policy's reason.
    /// With `cipherSuites`, only those are accepted (see `restrict(cipherSuites:)`).
    public init(
        certificateFile: String, keyFile: String, clientAuth: ClientAuthentication? = nil, cipherSuites: [String]? = nil
    ) throws(TLSError) {
        var err = [CChar](repeating: 0, count: 512)
        guard let p = stoq_tls_server_new(certificateFile, keyFile, &err, err.count) else {
            throw TLSError(.serverCredentials, String(cBuffer: err))
        }
        raw = p
        isServer = true
        if let a = clientAuth, a.mode != .none {
            peerCheck = a.policy
            stoq_tls_set_peer_check(p, peerCheckThunk, Unmanaged.passUnretained(a.policy).toOpaque())
            stoq_tls_server_set_client_auth(p, a.mode.raw)
        }
        if let cipherSuites { try restrict(cipherSuites: cipherSuites) }
    }

    /// Client credentials: `policy` judges the server's certificate chain and the name it was
    /// dialled by (STOQ's is `PeerVerifier`, through `PeerCertificateCheck`). Only `insecure`
    /// may omit it, and then nothing is checked. With `certificateFile`/`keyFile`, present that
    /// chain when a server asks. With `cipherSuites`, only those are offered (see
    /// `restrict(cipherSuites:)`).
    public init(
        policy: PeerCertificateCheck?, insecure: Bool = false, certificateFile: String? = nil,
        keyFile: String? = nil, cipherSuites: [String]? = nil
    ) throws(TLSError) {
        guard policy != nil || insecure else {
            throw TLSError(.trustStore, "client credentials need a certificate policy (or insecure)")
        }
        var err = [CChar](repeating: 0, count: 512)
        guard let p = stoq_tls_client_new(insecure ? 1 : 0, &err, err.count) else {
            throw TLSError(.trustStore, String(cBuffer: err))
        }
        raw = p
        isServer = false
        if let policy, !insecure {
            self.peerCheck = policy
            stoq_tls_set_peer_check(p, peerCheckThunk, Unmanaged.passUnretained(policy).toOpaque())
        }
        if let certificateFile, let keyFile, stoq_tls_client_set_certificate(p, certificateFile, keyFile, &err, err.count) != 0 {
            // Every property is set: deinit runs and frees `raw`.
            throw TLSError(.clientCertificate, String(cBuffer: err))
        }
        if let cipherSuites { try restrict(cipherSuites: cipherSuites) }
    }

    /// Offers (client) or accepts (server) only `cipherSuites`, in this order: QUIC's TLS 1.3
    /// suites by their GnuTLS names (`AES-128-GCM`, `AES-256-GCM`, `CHACHA20-POLY1305`,
    /// `AES-128-CCM`) or their IANA ones (`TLS_CHACHA20_POLY1305_SHA256`, ...), any case; an
    /// element may itself list several, separated by ':', ',' or spaces. By default all four,
    /// AES-128-GCM first.
    private func restrict(cipherSuites: [String]) throws(TLSError) {
        let suites = try Self.cipherSuiteIndices(cipherSuites)
        var err = [CChar](repeating: 0, count: 256)
        guard stoq_tls_set_cipher_suites(raw, suites, suites.count, &err, err.count) == 0 else {
            // Every property is set: deinit runs and frees `raw`.
            throw TLSError(.cipherSuites, String(cBuffer: err))
        }
    }

    /// The shim's table of suites, by GnuTLS and IANA name.
    package static let cipherSuiteTable: [(gnutls: String, iana: String)] = (0..<stoq_tls_cipher_suite_count()).map {
        (String(cString: stoq_tls_cipher_suite_name($0, 0)), String(cString: stoq_tls_cipher_suite_name($0, 1)))
    }

    /// `names` as indices into the shim's table, each suite once, in the order first named.
    package static func cipherSuiteIndices(_ names: [String]) throws(TLSError) -> [UInt8] {
        var suites: [UInt8] = []
        for name in names.flatMap({ $0.split(whereSeparator: { ":, ".contains($0) }) }) {
            guard
                let i = cipherSuiteTable.firstIndex(where: {
                    name.caseInsensitiveCompare($0.gnutls) == .orderedSame
                        || name.caseInsensitiveCompare($0.iana) == .orderedSame
                })
            else {
                let known = cipherSuiteTable.map(\.gnutls).joined(separator: ", ")
                throw TLSError(
                    .cipherSuites, "cipher suites: unknown suite '\(name)' (QUIC's are \(known), or their IANA names)")
            }
            if !suites.contains(UInt8(i)) { suites.append(UInt8(i)) }
        }
        if suites.isEmpty { throw TLSError(.cipherSuites, "cipher suites: the list is empty") }
        return suites
    }

    deinit { stoq_tls_free(raw) }
}

/// The certificate policy the TLS handshake asks, in either role: STOQ's is `PeerVerifier`
/// (`PeerCertificateCheck(identity: v.fingerprint, v.refusal)`), the same code `stoq trust
/// verify` runs. The C shim only extracts the chain and fails the handshake with the reason.
/// It runs on the worker thread, once per handshake: it may allocate, but must not block.
public final class PeerCertificateCheck: Sendable, Equatable {
    /// Returns nil to accept `chain` (DER, leaf first, as the peer sent it), or the reason to
    /// refuse it. `serverName` is the name or IPv6 literal the client dialled when judging a
    /// server; nil when judging a client.
    public let check: @Sendable (_ chain: [[UInt8]], _ serverName: String?) -> String?
    /// What the check enforces (the verifier's fingerprint): equal identities are the same
    /// rule (a configuration reload compares them).
    public let identity: String
    /// What an accepted certificate says its holder is, kept on the connection as
    /// `QUICConnection.peerIdentity`: on a server, a client's roles, key id and subject (the access
    /// policy's); on a client, the server's node id (a mesh neighbour). Cut to
    /// `STOQ_PEER_IDENTITY_MAX` - 1 bytes, between Unicode scalars.
    public let identify: (@Sendable (_ chain: [[UInt8]]) -> String)?

    /// Creates a check.
    public init(
        identity: String, identify: (@Sendable (_ chain: [[UInt8]]) -> String)? = nil,
        _ check: @escaping @Sendable (_ chain: [[UInt8]], _ serverName: String?) -> String?
    ) {
        self.identity = identity
        self.identify = identify
        self.check = check
    }

    public static func == (a: PeerCertificateCheck, b: PeerCertificateCheck) -> Bool { a.identity == b.identity }
}

/// The C side calls this with the `PeerCertificateCheck` registered on the credentials.
private let peerCheckThunk: stoq_peer_check_fn = { ctx, certs, lens, n, serverName, why, whyLen in
    guard let ctx, let certs, let lens, let why, whyLen > 0 else { return -1 }
    let check = Unmanaged<PeerCertificateCheck>.fromOpaque(ctx).takeUnretainedValue()
    var chain: [[UInt8]] = []
    chain.reserveCapacity(n)
    for i in 0..<n {
        guard let p = certs[i] else { return -1 }
        chain.append(Array(UnsafeBufferPointer(start: p, count: lens[i])))
    }
    /// `text`, NUL-terminated, cut to `limit` bytes between Unicode scalars (a cut UTF-8
    /// sequence would read back as U+FFFD).
    func write(_ text: String, limit: Int) {
        let cap = max(0, min(limit, whyLen - 1))
        var kept = 0
        for s in text.unicodeScalars {
            guard kept + UTF8.width(s) <= cap else { break }
            kept += UTF8.width(s)
        }
        let bytes = Array(text.utf8.prefix(kept))
        for (i, b) in bytes.enumerated() { why[i] = CChar(bitPattern: b) }
        why[bytes.count] = 0
    }
    guard let reason = check.check(chain, serverName.map { String(cString: $0) }) else {
        // Accepted: `why` carries the peer's identity back to the connection.
        if let identify = check.identify { write(identify(chain), limit: Int(STOQ_PEER_IDENTITY_MAX) - 1) }
        return 0
    }
    write(reason, limit: whyLen - 1)
    return 1
}

/// A certificate, key or trust store could not be used.
///
/// A struct with a nested `Code` (static members, not enum cases) so codes can be added
/// without breaking callers that switch on them.
public struct TLSError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Which credentials could not be set up; `message` says what exactly.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// A short name for logs.
        public let name: String
        /// Creates a code; STOQ's own are the static members.
        public init(name: String) { self.name = name }
        /// The server's certificate chain or key does not load or do not match.
        public static let serverCredentials = Code(name: "server credentials")
        /// The client's trust store (CA file or system store) does not load.
        public static let trustStore = Code(name: "trust store")
        /// The client's own certificate chain or key (mutual TLS) does not load.
        public static let clientCertificate = Code(name: "client certificate")
        /// The client-authentication policy (trust files, revocation list, depth) is refused.
        public static let clientAuthentication = Code(name: "client authentication")
        /// A cipher suite named is not one of QUIC's TLS 1.3 suites, or the list is empty.
        public static let cipherSuites = Code(name: "cipher suites")
        public var description: String { name }
    }

    /// The kind of failure.
    public var code: Code
    /// GnuTLS's or the shim's sentence naming the file and the problem.
    public var message: String

    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// Creates an error about the server's credentials (the form used before codes existed).
    public init(message: String) { self.init(.serverCredentials, message) }

    public var description: String { message }
}

/// What a server asks of clients' certificates (mutual TLS).
public struct ClientAuthentication: Sendable, Equatable {
    public enum Mode: String, Sendable, CaseIterable {
        case none, optional, required
        var raw: Int32 {
            switch self {
            case .none: Int32(STOQ_CLIENT_AUTH_NONE)
            case .optional: Int32(STOQ_CLIENT_AUTH_OPTIONAL)
            case .required: Int32(STOQ_CLIENT_AUTH_REQUIRED)
            }
        }
    }
    public var mode: Mode
    /// The policy client certificates must pass (STOQ's `PeerVerifier`, role client).
    public var policy: PeerCertificateCheck

    public init(mode: Mode, policy: PeerCertificateCheck) {
        self.mode = mode
        self.policy = policy
    }
}
