/// At most one log line per key every `interval`, saying how many were held back since: what
/// anyone may send (mesh adverts, requests the access policy refuses) must not write the log as
/// fast as it arrives. Not locked: one per thread (a worker's, the mesh thread's) or behind the
/// owner's lock.
public struct LogThrottle: Sendable {
    public static let interval: UInt64 = 10 * Nanos.second

    private var last: [String: (at: UInt64, held: UInt64)] = [:]

    public init() {}

    /// Whether the line for `key` would be said now (`allow` would not hold it back).
    public func wouldAllow(_ key: String, now: UInt64) -> Bool {
        guard let l = last[key] else { return true }
        return now &- l.at >= Self.interval
    }

    /// Nil when the line for `key` is held back; else what to append to it (the count held back
    /// since the last one, if any).
    public mutating func allow(_ key: String, now: UInt64) -> String? {
        if let l = last[key], now &- l.at < Self.interval {
            last[key] = (l.at, l.held + 1)
            return nil
        }
        let held = last[key]?.held ?? 0
        last[key] = (now, 0)
        if last.count > 1024 { last = last.filter { now &- $0.value.at < Self.interval } }
        return held > 0 ? " (and \(held) more like it in the last \(Self.interval / Nanos.second) s)" : ""
    }
}
