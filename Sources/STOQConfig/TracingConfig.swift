import STOQCore
import TOMLKit

extension NodeConfig {
    /// `[tracing]`: distributed tracing of requests (docs/tracing.md). Spans of a request's life
    /// on the node (the request, its handler, store reads and writes, edge and mesh hops) are
    /// exported over OTLP/HTTP with protobuf bodies; W3C `traceparent` joins them to the caller's
    /// trace and carries it to the next hop. Off by default: then nothing is allocated per request.
    public struct Tracing: Sendable, Equatable {
        public var enabled = false
        /// The OTLP/HTTP traces URL, path included (an OpenTelemetry collector's `/v1/traces`).
        public var endpoint = "http://[::1]:4318/v1/traces"
        /// The `service.name` resource attribute the spans carry.
        public var serviceName = "stoq-node"
        /// The share of new traces recorded (0 … 1). A request whose `traceparent` says its
        /// trace is sampled is always recorded, one that says it is not never is (parent-based).
        public var sampleRatio = 1.0
        /// How long finished spans may wait before they are exported in a batch (nanoseconds).
        public var exportInterval: UInt64 = 5_000_000_000

        public init() {}
    }
}

extension Reader {
    /// Reads `[tracing]`.
    mutating func tracing(_ t: inout NodeConfig.Tracing) {
        section("tracing") { s in
            s.bool("enabled", &t.enabled)
            s.otlpEndpoint("endpoint", &t.endpoint)
            s.string("service_name", &t.serviceName, nonEmpty: true)
            s.fraction("sample_ratio", &t.sampleRatio, of: "the share of new traces recorded")
            s.duration("export_interval", &t.exportInterval, 10_000_000...60_000_000_000)
        }
    }
}

extension Section {
    /// An OTLP/HTTP URL: `http://` or `https://`, a host (an IPv6 address in brackets, or a name
    /// such as a collector's Service), an optional port and the path (`/v1/traces`). IPv4
    /// literals are refused like everywhere in STOQ.
    mutating func otlpEndpoint(_ key: String, _ out: inout String) {
        guard let v = value(key) else { return }
        let allowed = "an OTLP/HTTP traces URL with its path, e.g. \"http://[::1]:4318/v1/traces\" (IPv6 or a host name; no IPv4)"
        guard let s = v.string else { return fail(.badType, key, v, allowed) }
        guard let problem = Self.otlpURLProblem(s) else { out = s; return }
        fail(problem.hasPrefix("IPv4") ? .ipv4NotSupported : .badValue, key, v, "\(allowed) — \(problem)")
    }

    /// Why `s` is not an OTLP/HTTP URL STOQ accepts, or nil.
    static func otlpURLProblem(_ s: String) -> String? {
        let rest: Substring
        if s.hasPrefix("http://") {
            rest = s.dropFirst(7)
        } else if s.hasPrefix("https://") {
            rest = s.dropFirst(8)
        } else {
            return "the scheme must be http:// or https://"
        }
        let authority = rest.prefix { $0 != "/" }
        let path = rest.dropFirst(authority.count)
        if authority.isEmpty { return "no host" }
        if authority.contains("@") { return "no user info" }
        var host = authority, port: Substring?
        if authority.first == "[" {
            guard let close = authority.firstIndex(of: "]") else { return "an IPv6 address needs its closing ]" }
            host = authority[authority.index(after: authority.startIndex)..<close]
            if host.isEmpty { return "no host" }
            let after = authority[authority.index(after: close)...]
            if !after.isEmpty {
                guard after.first == ":" else { return "expected :port after the address" }
                port = after.dropFirst()
            }
            if IPv6Address(String(host)) == nil {
                if case .failure(let e) = IPv6Endpoint.parse("[\(host)]:1"), e.code == .ipv4Refused {
                    return "IPv4-mapped addresses are not supported (STOQ is IPv6 only)"
                }
                return "\(host) is not an IPv6 address"
            }
        } else {
            if let colon = authority.firstIndex(of: ":") {
                host = authority[..<colon]
                port = authority[authority.index(after: colon)...]
            }
            // Checked first: an empty host satisfies the IPv4 test below.
            if host.isEmpty { return "no host" }
            if host.allSatisfy({ $0.isNumber || $0 == "." }) { return "IPv4 addresses are not supported (STOQ is IPv6 only)" }
            if !host.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "." }) { return "\(host) is not a host name" }
        }
        if let port, UInt16(port).map({ $0 == 0 }) ?? true { return "the port must be 1-65535" }
        if path.isEmpty || path == "/" { return "the path is missing (an OTLP/HTTP collector takes traces at /v1/traces)" }
        return nil
    }
}
