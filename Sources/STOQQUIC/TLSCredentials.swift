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
    /// certificate (mutual TLS) and refused, with the reason, unless it verifies.
    public init(certificateFile: String, keyFile: String, clientAuth: ClientAuthentication? = nil) throws(TLSError) {
        var err = [CChar](repeating: 0, count: 512)
        guard let p = stoq_tls_server_new(certificateFile, keyFile, &err, err.count) else {
            throw TLSError(.serverCredentials, String(cBuffer: err))
        }
        raw = p
        isServer = true
        if let a = clientAuth, a.mode != .none {
            if let check = a.peerCheck {
                peerCheck = check
                stoq_tls_set_peer_check(p, peerCheckThunk, Unmanaged.passUnretained(check).toOpaque())
            }
            let files = a.trustFiles.map { strdup($0) }
            defer { files.forEach { free($0) } }
            let serials = a.revokedSerials.map { s in
                let b = UnsafeMutablePointer<UInt8>.allocate(capacity: max(s.count, 1))
                b.initialize(from: s, count: s.count)
                return b
            }
            defer { serials.forEach { $0.deallocate() } }
            let lengths = a.revokedSerials.map(\.count)
            let rc = files.map { UnsafePointer($0) }.withUnsafeBufferPointer { f in
                serials.map { UnsafePointer($0) }.withUnsafeBufferPointer { r in
                    lengths.withUnsafeBufferPointer { l in
                        stoq_tls_server_set_client_auth(p, a.mode.raw, f.baseAddress, f.count, UInt32(a.maxChainLength),
                                                        r.baseAddress, l.baseAddress, r.count, &err, err.count)
                    }
                }
            }
            if rc != 0 {
                stoq_tls_free(p)
                throw TLSError(.clientAuthentication, String(cBuffer: err))
            }
        }
    }

    /// Client credentials: trust `caFile` (PEM), the system store when nil, or nothing when
    /// `insecure`; with `certificateFile`/`keyFile`, present that chain when a server asks.
    /// With `peerCheck`, the server's certificate must also pass it (certificate transparency).
    public init(trusting caFile: String?, insecure: Bool = false, certificateFile: String? = nil,
                keyFile: String? = nil, peerCheck: PeerCertificateCheck? = nil) throws(TLSError) {
        var err = [CChar](repeating: 0, count: 512)
        guard let p = stoq_tls_client_new(caFile, insecure ? 1 : 0, &err, err.count) else {
            throw TLSError(.trustStore, String(cBuffer: err))
        }
        raw = p
        isServer = false
        if let peerCheck {
            self.peerCheck = peerCheck
            stoq_tls_set_peer_check(p, peerCheckThunk, Unmanaged.passUnretained(peerCheck).toOpaque())
        }
        if let certificateFile, let keyFile, stoq_tls_client_set_certificate(p, certificateFile, keyFile, &err, err.count) != 0 {
            stoq_tls_free(p)
            throw TLSError(.clientCertificate, String(cBuffer: err))
        }
    }

    deinit { stoq_tls_free(raw) }
}

/// An extra check of a peer's leaf certificate, run inside the TLS handshake once GnuTLS has
/// accepted the chain (STOQ uses it for certificate transparency). It runs on the worker
/// thread, once per handshake: it may allocate, but must not block.
public final class PeerCertificateCheck: Sendable, Equatable {
    /// Returns nil to accept `leaf` (DER), or the reason to refuse it. `issuer` is the DER of
    /// its issuer (sent by the peer, or found among the trusted roots), nil if neither.
    public let check: @Sendable (_ leaf: [UInt8], _ issuer: [UInt8]?) -> String?
    /// What the check enforces, e.g. the trusted log ids: equal identities are the same rule
    /// (a configuration reload compares them).
    public let identity: String

    /// Creates a check.
    public init(identity: String, _ check: @escaping @Sendable (_ leaf: [UInt8], _ issuer: [UInt8]?) -> String?) {
        self.identity = identity
        self.check = check
    }

    public static func == (a: PeerCertificateCheck, b: PeerCertificateCheck) -> Bool { a.identity == b.identity }
}

/// The C side calls this with the `PeerCertificateCheck` registered on the credentials.
private let peerCheckThunk: stoq_peer_check_fn = { ctx, leaf, leafLen, issuer, issuerLen, why, whyLen in
    guard let ctx, let leaf, let why else { return -1 }
    let check = Unmanaged<PeerCertificateCheck>.fromOpaque(ctx).takeUnretainedValue()
    let leafDER = Array(UnsafeBufferPointer(start: leaf, count: leafLen))
    let issuerDER = issuer.map { Array(UnsafeBufferPointer(start: $0, count: issuerLen)) }
    guard let reason = check.check(leafDER, issuerDER) else { return 0 }
    let bytes = Array(reason.utf8.prefix(max(0, whyLen - 1)))
    for (i, b) in bytes.enumerated() { why[i] = CChar(bitPattern: b) }
    why[bytes.count] = 0
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
    public enum Mode: String, Sendable {
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
    /// PEM files of the roots client certificates must chain to.
    public var trustFiles: [String]
    /// Longest chain accepted (leaf included).
    public var maxChainLength: Int
    /// Serial numbers (big-endian bytes) that are refused as revoked.
    public var revokedSerials: [[UInt8]]
    /// An extra check client certificates must pass (certificate transparency), if any.
    public var peerCheck: PeerCertificateCheck?

    public init(mode: Mode, trustFiles: [String], maxChainLength: Int = 4, revokedSerials: [[UInt8]] = [],
                peerCheck: PeerCertificateCheck? = nil) {
        self.peerCheck = peerCheck
        self.mode = mode
        self.trustFiles = trustFiles
        self.maxChainLength = maxChainLength
        self.revokedSerials = revokedSerials
    }
}
