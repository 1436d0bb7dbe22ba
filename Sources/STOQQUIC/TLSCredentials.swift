import CNgtcp2
import STOQCore

/// Certificates and keys for one TLS role, loaded once and shared (read-only) by
/// every worker. A new instance replaces an old one on rotation.
public final class TLSCredentials: @unchecked Sendable {
    let raw: OpaquePointer
    /// Whether these serve (server) or verify (client).
    public let isServer: Bool

    /// Server credentials from PEM files.
    public init(certificateFile: String, keyFile: String) throws(TLSError) {
        var err = [CChar](repeating: 0, count: 512)
        guard let p = stoq_tls_server_new(certificateFile, keyFile, &err, err.count) else {
            throw TLSError(message: String(cBuffer: err))
        }
        raw = p
        isServer = true
    }

    /// Client credentials: trust `caFile` (PEM), the system store when nil, or nothing when `insecure`.
    public init(trusting caFile: String?, insecure: Bool = false) throws(TLSError) {
        var err = [CChar](repeating: 0, count: 512)
        guard let p = stoq_tls_client_new(caFile, insecure ? 1 : 0, &err, err.count) else {
            throw TLSError(message: String(cBuffer: err))
        }
        raw = p
        isServer = false
    }

    deinit { stoq_tls_free(raw) }
}

/// A certificate, key or trust store could not be used.
public struct TLSError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}
