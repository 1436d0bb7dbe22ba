import CNgtcp2

/// STOQ's version, its one home: `--version` of `stoq` and `stoq-node`, and `stoq_build_info`
/// on a node's `/metrics`.
public enum STOQVersion {
    /// This release.
    public static let number = "0.1.0"

    /// The QUIC, HTTP/3 and TLS libraries this process runs (not the headers it was built
    /// with), by name: `[("ngtcp2", "0.12.1"), ("nghttp3", "0.8.0"), ("GnuTLS", "3.7.9")]`.
    public static let libraries: [(name: String, version: String)] = {
        var out: [(name: String, version: String)] = []
        var name: UnsafePointer<CChar>?
        while let version = stoq_library_version(out.count, &name), let name {
            out.append((String(cString: name), String(cString: version)))
        }
        return out
    }()

    /// What `--version` prints: `0.1.0 (ngtcp2 0.12.1, nghttp3 0.8.0, GnuTLS 3.7.9)`.
    public static var line: String {
        "\(number) (\(libraries.map { "\($0.name) \($0.version)" }.joined(separator: ", ")))"
    }
}
