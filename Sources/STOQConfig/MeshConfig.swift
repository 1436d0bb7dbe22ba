import STOQCore
import TOMLKit

/// `scheme://[ipv6]:port`, parsed: how the mesh names a node (`https`) or an etcd endpoint
/// (`http`). Nothing else is accepted — no host names (a mesh link is an address), no path, no
/// user info, no IPv4.
public struct MeshURL: Hashable, Sendable, CustomStringConvertible {
    /// "https" (a node) or "http" (an etcd endpoint).
    public var scheme: String
    /// The address and port.
    public var endpoint: IPv6Endpoint

    /// A URL for `endpoint`.
    public init(scheme: String = "https", endpoint: IPv6Endpoint) {
        self.scheme = scheme
        self.endpoint = endpoint
    }

    /// The canonical text: `scheme://[addr]:port`.
    public var description: String { "\(scheme)://\(endpoint)" }

    /// Parses `scheme://[addr]:port` (one trailing "/" is tolerated). The failure's reason says
    /// what was wrong; its code is `.ipv4Refused` when an IPv4 address was given.
    public static func parse(_ text: String, scheme: String = "https") -> Result<MeshURL, AddressError> {
        let head = scheme + "://"
        guard text.hasPrefix(head) else {
            return .failure(AddressError(.syntax, text: text, reason: "expected a \(head)[ipv6]:port URL"))
        }
        var rest = Substring(text.dropFirst(head.count))
        if rest.last == "/" { rest = rest.dropLast() }
        if rest.contains("/") || rest.contains("?") || rest.contains("#") {
            return .failure(AddressError(.syntax, text: text, reason: "a mesh URL has no path, query or fragment"))
        }
        if rest.contains("@") { return .failure(AddressError(.syntax, text: text, reason: "a mesh URL has no user info")) }
        if rest.first != "[" && rest.contains(where: { $0.isLetter }) {
            return .failure(AddressError(.syntax, text: text, reason: "a mesh URL names an address, not a host name (expected [ipv6]:port)"))
        }
        switch IPv6Endpoint.parse(String(rest)) {
        case .failure(let e): return .failure(AddressError(e.code, text: text, reason: e.reason))
        case .success(let ep):
            if ep.port == 0 { return .failure(AddressError(.invalidPort, text: text, reason: "port 0 is not a port a node listens on")) }
            if ep.address.isUnspecified {
                return .failure(AddressError(.syntax, text: text, reason: "[::] is not an address a node can be reached at"))
            }
            if ep.address.isMulticast {
                return .failure(AddressError(.syntax, text: text, reason: "\(ep.address) is a multicast group (ff00::/8), not a node's address"))
            }
            return .success(MeshURL(scheme: scheme, endpoint: ep))
        }
    }
}

extension NodeConfig {
    /// The `[mesh]` section: who this node's neighbours are, how members are discovered, and how
    /// fast a silent neighbour is declared down. See docs/mesh.md "Membership".
    public struct Mesh: Sendable, Equatable {
        /// Where the member list comes from.
        public enum Discovery: String, Sendable, CaseIterable {
            /// The `peers` list.
            case `static`
            /// AAAA and SRV records of `dnsName` (a Kubernetes headless Service).
            case dns
            /// Leased registrations under `etcdPrefix` in an etcd v3 cluster.
            case etcd
        }
        /// This node's neighbours (`discovery = "static"`).
        public var peers: [MeshURL] = []
        public var discovery: Discovery = .static
        /// Whether `[mesh]` asks for a mesh: neighbours listed, or a discovery backend other
        /// than the (empty) static list.
        public var enabled: Bool { !peers.isEmpty || discovery != .static }
        /// The name whose AAAA and SRV records list the members (`discovery = "dns"`).
        public var dnsName = ""
        /// The DNS server asked; nil = the nameservers of /etc/resolv.conf.
        public var dnsServer: IPv6Endpoint? = nil
        /// How often `dnsName` is resolved again (nanoseconds).
        public var dnsInterval: UInt64 = 30_000_000_000
        /// The etcd cluster's client URLs (`discovery = "etcd"`).
        public var etcdEndpoints: [MeshURL] = []
        /// The key prefix every member registers under; ends with "/".
        public var etcdPrefix = "/stoq/mesh/"
        /// The registration's lease TTL (nanoseconds, whole seconds): how long a dead node stays listed.
        public var etcdLeaseTTL: UInt64 = 10_000_000_000
        /// How often each neighbour is probed (nanoseconds).
        public var probeInterval: UInt64 = 100_000_000
        /// A neighbour with no probe answered for this long is down (nanoseconds; > probeInterval).
        public var downAfter: UInt64 = 600_000_000
        /// Whether a neighbour whose link keeps going down is held down for a while (RFC 2439
        /// style flap damping: `FlapDamping` in STOQMesh), so that routes do not follow every flap.
        public var flapDamping = true

        public init() {}

    }
}

extension Reader {
    /// Reads `[mesh]` and checks the rules between its keys.
    mutating func mesh(_ m: inout NodeConfig.Mesh) {
        let present = root["mesh"] != nil
        section("mesh") { s in
            s.meshURLs("peers", &m.peers, scheme: "https")
            s.choice("discovery", &m.discovery)
            s.dnsName("dns_name", &m.dnsName)
            var server = IPv6Endpoint(address: .any, port: 0)
            var given = false
            s.optionalEndpoint("dns_server", &server, given: &given)
            m.dnsServer = given ? server : nil
            s.duration("dns_interval", &m.dnsInterval, 1_000_000_000...3_600_000_000_000)
            s.meshURLs("etcd_endpoints", &m.etcdEndpoints, scheme: "http")
            s.etcdPrefix("etcd_prefix", &m.etcdPrefix)
            s.duration("etcd_lease_ttl", &m.etcdLeaseTTL, 2_000_000_000...3_600_000_000_000)
            s.duration("probe_interval", &m.probeInterval, 10_000_000...10_000_000_000)
            s.duration("down_after", &m.downAfter, 20_000_000...60_000_000_000)
            s.bool("flap_damping", &m.flapDamping)
        }
        guard present else { return }
        if let server = m.dnsServer, server.port == 0 || server.address.isUnspecified {
            errors.append(
                ConfigError(
                    code: .badValue, key: "mesh.dns_server", value: "\"\(server)\"",
                    allowed: "\"\" (the nameservers of /etc/resolv.conf) or \"[ipv6]:port\" of a server: an address other than [::], a port 1-65535"))
        }
        if m.etcdLeaseTTL % 1_000_000_000 != 0 {
            errors.append(
                ConfigError(
                    code: .badValue, key: "mesh.etcd_lease_ttl", value: "\(m.etcdLeaseTTL / 1_000_000)ms",
                    allowed: "whole seconds (etcd leases are granted in seconds), 2s to 1h"))
        }
        if m.downAfter <= m.probeInterval {
            errors.append(
                ConfigError(
                    code: .outOfRange, key: "mesh.down_after", value: "\(m.downAfter / 1_000_000)ms",
                    allowed: "more than mesh.probe_interval (\(m.probeInterval / 1_000_000)ms): a neighbour is down only after unanswered probes"))
        }
        switch m.discovery {
        case .static:
            break
        case .dns:
            // A name refused on its own already says what is wrong with it.
            if m.dnsName.isEmpty && !errors.contains(where: { $0.key == "mesh.dns_name" }) {
                errors.append(
                    ConfigError(
                        code: .badValue, key: "mesh.dns_name", value: "\"\"",
                        allowed: "the DNS name whose AAAA or SRV records list the members, when mesh.discovery = \"dns\""))
            }
        case .etcd:
            if m.etcdEndpoints.isEmpty {
                errors.append(
                    ConfigError(
                        code: .badValue, key: "mesh.etcd_endpoints", value: "[]",
                        allowed: "at least one http://[ipv6]:port client URL of the etcd cluster, when mesh.discovery = \"etcd\""))
            }
        }
        if m.discovery != .static && !m.peers.isEmpty {
            errors.append(
                ConfigError(
                    code: .badValue, key: "mesh.peers",
                    value: "[" + m.peers.map { "\"\($0)\"" }.joined(separator: ", ") + "]",
                    allowed:
                        "[] when mesh.discovery = \"\(m.discovery.rawValue)\": the members then come from \(m.discovery == .dns ? "mesh.dns_name" : "etcd"), and peers is the \"static\" backend's list"
                ))
        }
    }
}

extension Section {
    /// A list of `scheme://[ipv6]:port` URLs, each named in its own error; repeats refused.
    mutating func meshURLs(_ key: String, _ out: inout [MeshURL], scheme: String) {
        guard let v = value(key) else { return }
        let allowed = "a list of \(scheme)://[ipv6]:port URLs, e.g. [\"\(scheme)://[2001:db8::1]:\(scheme == "http" ? 2379 : 4433)\"] (STOQ is IPv6 only)"
        guard let a = v.array else { return fail(.badType, key, v, allowed) }
        var urls: [MeshURL] = []
        var ok = true
        for (i, e) in a.enumerated() {
            guard let s = e.string else {
                fail(.badType, "\(key)[\(i)]", e, allowed)
                ok = false
                continue
            }
            switch MeshURL.parse(s, scheme: scheme) {
            case .success(let u):
                if urls.contains(u) {
                    fail(.badValue, "\(key)[\(i)]", shown: "\"\(s)\"", "each URL once (\(u) is listed twice)")
                    ok = false
                } else {
                    urls.append(u)
                }
            case .failure(let err):
                fail(
                    err.code == .ipv4Refused ? .ipv4NotSupported : .badValue, "\(key)[\(i)]", shown: "\"\(s)\"",
                    "\(allowed) — \(err.reason)")
                ok = false
            }
        }
        if ok { out = urls }
    }

    /// "" or a DNS name: dot-separated labels of letters, digits, "-" and "_" (SRV owner names
    /// start with "_"), each 1-63 bytes, 253 in all; one trailing dot allowed.
    mutating func dnsName(_ key: String, _ out: inout String) {
        guard let v = value(key) else { return }
        let allowed =
            "\"\" or a DNS name such as \"stoq.mesh.svc.cluster.local\" or \"_stoq._udp.stoq.mesh.svc.cluster.local\" (labels of letters, digits, '-' and '_', 1-63 bytes each, 253 in all)"
        guard let s = v.string else { return fail(.badType, key, v, allowed) }
        if s.isEmpty { out = s; return }
        if let problem = Self.dnsNameProblem(s) { return fail(.badValue, key, shown: "\"\(s)\"", "\(allowed) — \(problem)") }
        out = s
    }

    /// Why `name` is not a DNS name the mesh can ask for, or nil.
    static func dnsNameProblem(_ name: String) -> String? {
        var n = Substring(name)
        if n.last == "." { n = n.dropLast() }
        if n.utf8.count > 253 { return "longer than 253 bytes" }
        let labels = n.split(separator: ".", omittingEmptySubsequences: false)
        for l in labels {
            if l.isEmpty { return "an empty label" }
            if l.utf8.count > 63 { return "label '\(l)' is longer than 63 bytes" }
            for c in l.utf8 where !(c >= 0x30 && c <= 0x39 || c >= 0x41 && c <= 0x5A || c >= 0x61 && c <= 0x7A || c == 0x2D || c == 0x5F) {
                return "label '\(l)' has a character other than a letter, digit, '-' or '_'"
            }
        }
        return nil
    }

    /// A key prefix: printable ASCII, no spaces, ending with "/" (so "/stoq/mesh/" never
    /// matches "/stoq/mesh2/…").
    mutating func etcdPrefix(_ key: String, _ out: inout String) {
        guard let v = value(key) else { return }
        let allowed = "a key prefix of printable ASCII without spaces, ending with \"/\", e.g. \"/stoq/mesh/\""
        guard let s = v.string else { return fail(.badType, key, v, allowed) }
        guard s.count >= 1, s.count <= 256, s.hasSuffix("/"), s.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
            return fail(.badValue, key, shown: "\"\(s)\"", allowed)
        }
        out = s
    }
}
