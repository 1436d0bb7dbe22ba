import CNgtcp2
import Foundation
import STOQCore

/// Congestion controllers ngtcp2 0.12 offers.
public enum CongestionControl: String, Sendable, CaseIterable {
    case reno, cubic, bbr, bbr2

    var raw: UInt8 {
        switch self {
        case .reno: 0
        case .cubic: 1
        case .bbr: 2
        case .bbr2: 3
        }
    }
}

/// Transport settings for an endpoint's connections. Defaults suit a high
/// bandwidth-delay path on a 1500-byte MTU. They are the node's defaults too: its config
/// holds one of these (`NodeConfig.network.quic`), and a test holds config/node.toml to it.
public struct QUICSettings: Sendable, Equatable {
    public var congestionControl: CongestionControl = .cubic
    /// Send a stateless Retry before accepting (address validation under attack).
    public var retry = false
    /// Server without `retry`: once this many connections are mid-handshake (half-open), new
    /// Initials get a Retry first, until fewer are (as msquic does under a flood of spoofed
    /// Initials: a Retry costs no state). 0: never.
    public var retryThreshold: Int = 1000
    /// Server: stateless replies (Retry, Version Negotiation, Stateless Reset, refusals) an
    /// endpoint sends at most, a second; packets past it go unanswered. 0: no limit. A
    /// worker completes about 3,000 handshakes a second (Benchmarks/README.md), so 10,000
    /// leaves room for every real client while a flood of spoofed Initials costs little.
    public var statelessReplyRate: Int = 10_000
    /// Server: of those, at most this many a second to any one /64 (one site), so that a
    /// flood from one prefix leaves the rest of the budget to everyone else. 0: no share.
    public var statelessReplyRatePerPrefix: Int = 1_000
    public var idleTimeout: UInt64 = 30 * 1_000_000_000
    public var handshakeTimeout: UInt64 = 10 * 1_000_000_000
    /// Client, once the handshake is done: a PING after this long without traffic, in ns (0: never, the default: an idle
    /// connection ends). It keeps an idle connection past the peer's idle timeout, and a client
    /// that only receives is silent once cut off (a NAT that forgot its mapping, its own address
    /// gone): the PING makes the new mapping, or shows the address is gone.
    public var keepAlive: UInt64 = 0
    public var initialMaxData: UInt64 = 16 << 20
    public var initialMaxStreamData: UInt64 = 8 << 20
    public var maxWindow: UInt64 = 64 << 20
    public var maxStreamWindow: UInt64 = 32 << 20
    public var maxStreamsBidi: UInt64 = 256
    /// UDP payload per packet: 1452 fills a 1500-byte Ethernet MTU over IPv6.
    public var maxUDPPayloadSize: Int = 1452
    /// Packets received before an ACK is owed.
    public var ackThreshold: Int = 2
    /// ngtcp2's debug log on stderr.
    public var debugLog = ProcessInfo.processInfo.environment["STOQ_NGTCP2_LOG"] != nil
    /// The most connections the endpoint keeps; further Initials are refused.
    public var maxConnections: Int = 10_000
    /// Server: the most established connections the endpoint keeps from one /64 (0: no
    /// limit); further Initials from it are refused like those past `maxConnections`.
    public var maxConnectionsPerClient: Int = 0
    /// Server: issue TLS 1.3 session tickets, so a returning client resumes without a full
    /// handshake (`tls.session_tickets`).
    public var sessionTickets = true
    /// How long a ticket resumes, in ns (`tls.ticket_lifetime`, 1 s … 7 days: GnuTLS's
    /// bound); the key sealing tickets also changes this often (see `stoq_settings`).
    public var ticketLifetime: UInt64 = 24 * 3600 * 1_000_000_000
    /// Server, with `sessionTickets`: accept 0-RTT from resuming clients (`tls.early_data`).
    /// Only GET and HEAD are served from early data; anything else gets 425 Too Early.
    /// Client: offer 0-RTT when resuming; requests go in it once the server's kept limits are
    /// given (`QUICConnection.offerEarlyParameters`).
    public var earlyData = true
    /// Server: the address sent as QUIC's preferred_address transport parameter
    /// (`network.preferred_address`); clients move there once the handshake is confirmed.
    /// The endpoint must receive on it. nil = none.
    public var preferredAddress: IPv6Endpoint? = nil
    /// Server: a request whose body has received no byte for this long, in ns, is answered
    /// 408 and its body dropped (`limits.body_timeout`); 0: never (the default here; the node
    /// sets it from its config). Swept about once a second (`QUICEndpoint.sweepInterval`).
    public var bodyTimeout: UInt64 = 0
    /// Server: a response of which the peer has acknowledged no body byte for this long, in ns,
    /// while it gives no credit or acknowledges nothing of the connection's responses, is reset
    /// (`limits.send_timeout`); 0: never (the default here; the node sets it from its config).
    public var sendTimeout: UInt64 = 0
    /// Server: a response the peer holds (as for `sendTimeout`) while acknowledging its body at
    /// under this many bytes a second over a window of `sendTimeout` is reset
    /// (`limits.min_send_rate`); 0: never (the default here; the node sets it from its config).
    public var minSendRate: UInt64 = 0

    public init() {}

    func raw(workerID: UInt8, secret: [UInt8]) -> stoq_settings {
        var s = stoq_settings()
        s.cc_algo = congestionControl.raw
        s.worker_id = workerID
        s.log = debugLog ? 1 : 0
        s.idle_timeout = idleTimeout
        s.handshake_timeout = handshakeTimeout
        s.keep_alive = keepAlive
        s.initial_max_data = initialMaxData
        s.initial_max_stream_data = initialMaxStreamData
        s.max_window = maxWindow
        s.max_stream_window = maxStreamWindow
        s.max_streams_bidi = maxStreamsBidi
        s.max_udp_payload_size = maxUDPPayloadSize
        s.ack_thresh = ackThreshold
        s.ticket_lifetime = sessionTickets ? UInt32(max(1, ticketLifetime / 1_000_000_000)) : 0
        s.early_data = earlyData ? 1 : 0
        if let preferredAddress { s.preferred_address = preferredAddress.sockaddr }
        withUnsafeMutableBytes(of: &s.static_secret) { dst in
            for i in 0..<min(dst.count, secret.count) { dst[i] = secret[i] }
        }
        return s
    }
}

/// A 32-byte secret that makes Retry tokens and stateless reset tokens. Every
/// worker of a node shares one, so that any of them can answer for the others.
public struct StaticSecret: Sendable {
    public let bytes: [UInt8]
    /// A fresh random secret.
    public static func random() -> StaticSecret {
        var b = [UInt8](repeating: 0, count: Int(STOQ_SECRETLEN))
        _ = b.withUnsafeMutableBytes { stoq_random($0.baseAddress!.assumingMemoryBound(to: UInt8.self), $0.count) }
        return StaticSecret(bytes: b)
    }
    public init(bytes: [UInt8]) { self.bytes = bytes }
}
