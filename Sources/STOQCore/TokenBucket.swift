/// A token bucket on a monotonic clock (nanoseconds): `rate` tokens a second up to `burst`.
/// A plain value; whoever owns it serialises access.
package struct TokenBucket: Sendable, Equatable {
    /// Tokens added per second.
    package let rate: Double
    /// The most tokens it holds (what a client may spend at once after a quiet spell).
    package let burst: Double
    /// Tokens now (after the last `refill`); negative when charged into debt.
    package private(set) var tokens: Double
    private var updated: UInt64

    /// A full bucket at `now`.
    package init(rate: Double, burst: Double, now: UInt64) {
        (self.rate, self.burst, self.tokens, self.updated) = (rate, burst, burst, now)
    }

    private mutating func refill(_ now: UInt64) {
        guard now > updated else { return }
        tokens = min(burst, tokens + Double(now - updated) / 1e9 * rate)
        updated = now
    }

    /// Takes `n` tokens if the bucket holds them (returns 0), else takes nothing and returns
    /// the nanoseconds until it would hold them.
    package mutating func take(_ n: Double, now: UInt64) -> UInt64 {
        refill(now)
        if tokens >= n {
            tokens -= n
            return 0
        }
        return Self.nanoseconds((n - tokens) / rate)
    }

    /// Takes `n` tokens even into debt: bytes are charged once they are known, and the debt
    /// delays the client's next request.
    package mutating func charge(_ n: Double, now: UInt64) {
        refill(now)
        tokens -= n
    }

    /// Gives `n` tokens back (what was charged and not spent), never past `burst`.
    package mutating func refund(_ n: Double, now: UInt64) {
        refill(now)
        tokens = min(burst, tokens + n)
    }

    /// Nanoseconds until the bucket is out of debt (0 when it is not in debt).
    package mutating func debt(now: UInt64) -> UInt64 {
        refill(now)
        return tokens >= 0 ? 0 : Self.nanoseconds(-tokens / rate)
    }

    /// The longest wait reported, about 146 years: a debt of any size (an announced length
    /// near 2^63 bytes) converts to nanoseconds, with room to round up to seconds.
    package static let maxWait: UInt64 = 1 << 62

    /// `seconds` as nanoseconds, rounded up, at most `maxWait`.
    private static func nanoseconds(_ seconds: Double) -> UInt64 {
        let ns = (seconds * 1e9).rounded(.up)
        return ns < Double(maxWait) ? UInt64(ns) : maxWait
    }

    /// Whether the bucket holds `n` tokens at `now` (none taken).
    package func holds(_ n: Double, now: UInt64) -> Bool {
        (now > updated ? min(burst, tokens + Double(now - updated) / 1e9 * rate) : tokens) >= n
    }

    /// Whether the bucket is full at `now`: it is then the same as a new one, so forgetting
    /// it loses nothing.
    package func isFull(now: UInt64) -> Bool {
        now >= updated && tokens + Double(now - updated) / 1e9 * rate >= burst
    }
}
