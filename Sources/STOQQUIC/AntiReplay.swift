import CNgtcp2
import STOQCore

/// The node's 0-RTT anti-replay table (`stoq_tls.c`): one per process, shared by every server
/// endpoint and worker. A ClientHello with early data gets 0-RTT only if the table has not seen
/// it within GnuTLS's 10 s window (from any address) and can remember it: its /64 holds fewer
/// than `perPrefix` live entries and the table fewer than `slots`. Otherwise the handshake
/// goes on in 1-RTT.
public enum AntiReplay {
    /// ClientHellos the process remembers at once.
    public static let slots = Int(STOQ_ANTI_REPLAY_SLOTS)
    /// The most of them one /64 holds: its share.
    public static let perPrefix = Int(STOQ_ANTI_REPLAY_PER_PREFIX)

    /// What the table said of one ClientHello.
    public enum Verdict: Int32, Sendable {
        /// Not seen in the window: remembered; its early data is accepted.
        case new = 0
        /// Seen in the window: a replay, refused 0-RTT.
        case seen = 1
        /// Its /64 already holds `perPrefix` live entries: refused 0-RTT.
        case overShare = 2
        /// All `slots` entries are live: refused 0-RTT.
        case full = 3
    }

    /// The table's verdicts since the process started, by kind, and its live entries now.
    public struct Counters: Sendable, Equatable {
        public var accepted: UInt64
        public var replays: UInt64
        public var overShare: UInt64
        public var full: UInt64
        public var live: UInt64
    }

    public static var counters: Counters {
        var s = stoq_anti_replay_stats()
        stoq_anti_replay_stats_get(&s)
        return Counters(accepted: s.accepted, replays: s.replays, overShare: s.over_share, full: s.full, live: s.live)
    }

    /// Puts a ClientHello identity from `source` to the table, as a handshake with early data
    /// does (for tests: thousands of them without thousands of handshakes).
    package static func record(_ id: [UInt8], from source: IPv6Address) -> Verdict {
        var b = source.bytes
        let rc = withUnsafeBytes(of: &b) { a in
            id.withUnsafeBufferPointer { stoq_anti_replay_record(a.bindMemory(to: UInt8.self).baseAddress, $0.baseAddress, $0.count) }
        }
        return Verdict(rawValue: rc) ?? .full
    }
}
