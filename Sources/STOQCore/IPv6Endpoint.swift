#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// An IPv6 address, stored inline (16 bytes, network order) so that it never allocates.
///
/// STOQ is IPv6 only: parsing refuses IPv4 and IPv4-mapped (`::ffff:a.b.c.d`) addresses.
public struct IPv6Address: Hashable, Sendable, CustomStringConvertible {
    /// The 16 address bytes in network order.
    public var bytes:
        (
            UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
            UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8
        )

    /// The most UDP payload one IPv6 datagram carries: its payload length is 16 bits, less the
    /// 8-byte UDP header (no jumbograms). Also the most one GSO send or GRO batch carries; the
    /// io_uring engine's `STOQ_URING_UDP_PAYLOAD_MAX` is the same number (a test checks).
    public static let largestUDPPayload = 65_527

    /// `::` — the unspecified address.
    public static let any = IPv6Address(bytes: (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    /// `::1` — the loopback address.
    public static let loopback = IPv6Address(bytes: (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1))

    /// The address with its interface identifier zeroed: the /64 that one site (or one host
    /// with rotating privacy addresses) usually owns whole, so STOQ counts a /64 as one client.
    public var slash64: IPv6Address {
        var b = bytes
        (b.8, b.9, b.10, b.11, b.12, b.13, b.14, b.15) = (0, 0, 0, 0, 0, 0, 0, 0)
        return IPv6Address(bytes: b)
    }

    /// The same /64 as one number (the first 64 bits), for tables keyed by it.
    public var prefix64: UInt64 {
        let b = bytes
        return (UInt64(b.0) << 56) | (UInt64(b.1) << 48) | (UInt64(b.2) << 40) | (UInt64(b.3) << 32)
            | (UInt64(b.4) << 24) | (UInt64(b.5) << 16) | (UInt64(b.6) << 8) | UInt64(b.7)
    }

    /// Creates an address from its 16 network-order bytes.
    public init(
        bytes: (
            UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
            UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8
        )
    ) {
        self.bytes = bytes
    }

    /// Parses textual IPv6 (`2001:db8::1`, `::1`). Returns `nil` for anything that is not
    /// IPv6, and for IPv4-mapped addresses, which STOQ refuses.
    public init?(_ text: String) {
        var raw = in6_addr()
        let ok = text.withCString { inet_pton(AF_INET6, $0, &raw) }
        guard ok == 1 else { return nil }
        self.init(raw)
        if isIPv4Mapped { return nil }
    }

    /// Creates an address from the C representation.
    public init(_ raw: in6_addr) {
        var copy = raw
        self.bytes = withUnsafeBytes(of: &copy) { p in
            (p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12], p[13], p[14], p[15])
        }
    }

    /// The C representation.
    public var in6: in6_addr {
        var raw = in6_addr()
        withUnsafeMutableBytes(of: &raw) { dst in
            withUnsafeBytes(of: bytes) { dst.copyMemory(from: $0) }
        }
        return raw
    }

    /// True for `::ffff:0:0/96`, which would smuggle IPv4 into an IPv6 socket.
    public var isIPv4Mapped: Bool {
        withUnsafeBytes(of: bytes) { p in
            p[0..<10].allSatisfy { $0 == 0 } && p[10] == 0xff && p[11] == 0xff
        }
    }

    /// True for `::`.
    public var isUnspecified: Bool { self == .any }

    /// True for `ff00::/8`: a group, not one host (QUIC connections are unicast).
    public var isMulticast: Bool { bytes.0 == 0xff }

    public static func == (a: IPv6Address, b: IPv6Address) -> Bool {
        withUnsafeBytes(of: a.bytes) { pa in withUnsafeBytes(of: b.bytes) { pb in pa.elementsEqual(pb) } }
    }

    public func hash(into hasher: inout Hasher) {
        withUnsafeBytes(of: bytes) { hasher.combine(bytes: $0) }
    }

    /// Canonical text form (RFC 5952).
    public var description: String {
        var raw = in6
        var buf = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        _ = inet_ntop(AF_INET6, &raw, &buf, socklen_t(buf.count))
        return String(cBuffer: buf)
    }
}

/// An IPv6 socket address: address, UDP port and (for link-local addresses) scope.
public struct IPv6Endpoint: Hashable, Sendable, CustomStringConvertible {
    /// The address.
    public var address: IPv6Address
    /// The port, host order.
    public var port: UInt16
    /// The interface index for link-local addresses; 0 otherwise.
    public var scopeID: UInt32

    /// Creates an endpoint.
    public init(address: IPv6Address, port: UInt16, scopeID: UInt32 = 0) {
        self.address = address
        self.port = port
        self.scopeID = scopeID
    }

    /// Parses `[addr]:port` (the only form STOQ accepts, because a bare IPv6 address
    /// is ambiguous with a port). Fails with a message saying what was wrong.
    public static func parse(_ text: String) -> Result<IPv6Endpoint, AddressError> {
        guard text.first == "[", let close = text.lastIndex(of: "]") else {
            if text.contains(".") && !text.contains(":") || text.split(separator: ":").count == 2 && text.contains(".") {
                return .failure(AddressError(.ipv4Refused, text: text, reason: "IPv4 is not supported; STOQ is IPv6 only (use [addr]:port)"))
            }
            return .failure(AddressError(.syntax, text: text, reason: "expected [ipv6-address]:port"))
        }
        var host = String(text[text.index(after: text.startIndex)..<close])
        var scope: UInt32 = 0
        if let pct = host.firstIndex(of: "%") {
            let name = String(host[host.index(after: pct)...])
            host = String(host[..<pct])
            scope = UInt32(name) ?? if_nametoindex(name)
            if scope == 0 { return .failure(AddressError(.unknownInterface, text: text, reason: "unknown interface '\(name)'")) }
        }
        let rest = text[text.index(after: close)...]
        guard rest.first == ":", let port = UInt16(rest.dropFirst()) else {
            return .failure(AddressError(.invalidPort, text: text, reason: "expected a port 0-65535 after ']:'"))
        }
        if host.contains(".") && host.lowercased().hasPrefix("::ffff:") {
            return .failure(AddressError(.ipv4Refused, text: text, reason: "IPv4-mapped addresses are not supported; STOQ is IPv6 only"))
        }
        guard let addr = IPv6Address(host) else {
            var probe = in6_addr()
            if host.withCString({ inet_pton(AF_INET6, $0, &probe) }) == 1 {
                return .failure(AddressError(.ipv4Refused, text: text, reason: "IPv4-mapped addresses are not supported; STOQ is IPv6 only"))
            }
            return .failure(AddressError(.syntax, text: text, reason: "'\(host)' is not an IPv6 address"))
        }
        return .success(IPv6Endpoint(address: addr, port: port, scopeID: scope))
    }

    /// Creates an endpoint from a C `sockaddr_in6`.
    public init(_ sa: sockaddr_in6) {
        self.address = IPv6Address(sa.sin6_addr)
        self.port = UInt16(bigEndian: sa.sin6_port)
        self.scopeID = sa.sin6_scope_id
    }

    /// The C representation.
    public var sockaddr: sockaddr_in6 {
        var sa = sockaddr_in6()
        sa.sin6_family = sa_family_t(AF_INET6)
        sa.sin6_port = port.bigEndian
        sa.sin6_addr = address.in6
        sa.sin6_scope_id = scopeID
        return sa
    }

    /// `[addr]:port`.
    public var description: String {
        "[\(address)\(scopeID != 0 ? "%\(scopeID)" : "")]:\(port)"
    }
}

/// Why an address was refused.
///
/// A struct with a nested `Code` (static members) so codes can be added without breaking
/// callers that switch on them.
public struct AddressError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The kind of refusal; `reason` says what exactly.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// A short name for logs.
        public let name: String
        /// Creates a code; STOQ's own are the static members.
        public init(name: String) { self.name = name }
        /// An IPv4 or IPv4-mapped address: STOQ is IPv6 only.
        public static let ipv4Refused = Code(name: "IPv4 refused")
        /// Not of the form `[ipv6-address]:port`, or not an IPv6 address.
        public static let syntax = Code(name: "syntax")
        /// The port is missing or outside 0-65535.
        public static let invalidPort = Code(name: "invalid port")
        /// The `%interface` scope names no interface on this host.
        public static let unknownInterface = Code(name: "unknown interface")
        public var description: String { name }
    }

    /// The kind of refusal.
    public var code: Code
    /// The text that was given.
    public var text: String
    /// What was wrong with it.
    public var reason: String
    /// Creates an error.
    public init(_ code: Code, text: String, reason: String) { self.code = code; self.text = text; self.reason = reason }
    /// The message: the text given and the reason.
    public var message: String { description }
    public var description: String { "'\(text)': \(reason)" }
}
