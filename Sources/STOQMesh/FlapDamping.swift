import Foundation

/// How a neighbour whose link keeps going down is held down (RFC 2439's route flap damping,
/// applied to a mesh link): the rules and all their arithmetic. `NeighbourLink` keeps the
/// penalty and asks this when it changes.
///
/// Every down adds `penaltyPerDown` to a penalty that halves every `halfLife`. Once a down
/// takes it above `suppressAbove`, the link is suppressed: down, whatever it answers, until the
/// penalty has decayed below `reuseBelow` (and `NeighbourLink.Settings.upAfterAnswers` answers
/// in a row have come). A down while suppressed adds to the penalty too, and moves the end on.
/// The penalty never exceeds `ceiling`, so a link that flapped for an hour is back at most
/// `maxSuppress` after its last down.
///
/// With the defaults, for downs t seconds apart (r = 2^(−t/15), the decay from one to the next):
/// - the penalty just after the n-th is 1000 · (1 − rⁿ) / (1 − r), at most 1000 / (1 − r);
/// - four downs at once make 4000, not above it: the fifth within a few seconds suppresses
///   (five 1 s apart: 4568; 2 s apart: 4192; 3 s apart: 3863, not);
/// - a link cut once every 10 s tends to 1000 / (1 − 2^(−2/3)) ≈ 2700 and is never suppressed
///   (scripts/bench-routing cuts the same links that often, and needs them back); once every
///   7 s tends to 3618, still not; every 6 s, suppressed at its 13th;
/// - suppressed at p, a link is reused 15 s · log₂(p / 750) after the last down: 36 s
///   just above 4000, 39 s at 4568 — and at most 60 s, from the ceiling 750 · 2⁴ = 12 000. A flap takes at
///   least two answers and `down_after` of silence (about 0.8 s by default), at which pace the
///   penalty tends to about 27 500: the ceiling binds on a link that flaps as fast as it can.
public struct FlapDamping: Hashable, Sendable {
    /// Added at each down.
    public var penaltyPerDown: Double
    /// The time in which the penalty halves. Nanoseconds.
    public var halfLife: UInt64
    /// A down that takes the penalty above this suppresses the link.
    public var suppressAbove: Double
    /// A suppressed link is reused once the penalty is below this.
    public var reuseBelow: Double
    /// The longest a link stays suppressed after its last down (it sets `ceiling`). Nanoseconds.
    public var maxSuppress: UInt64

    /// Defaults: 1000 a down, half-life 15 s, suppressed above 4000, reused below 750, at most
    /// 60 s (four half-lives, the ratio RFC 2439's usual settings have) after the last down.
    public init(
        penaltyPerDown: Double = 1_000, halfLife: UInt64 = 15_000_000_000, suppressAbove: Double = 4_000,
        reuseBelow: Double = 750, maxSuppress: UInt64 = 60_000_000_000
    ) {
        (self.penaltyPerDown, self.halfLife, self.suppressAbove) = (penaltyPerDown, halfLife, suppressAbove)
        (self.reuseBelow, self.maxSuppress) = (reuseBelow, maxSuppress)
    }

    /// The most the penalty can be: the value that decays to `reuseBelow` in `maxSuppress`.
    public var ceiling: Double { reuseBelow * exp2(Double(maxSuppress) / Double(halfLife)) }

    /// `penalty` after `nanos` of decay.
    public func decayed(_ penalty: Double, over nanos: UInt64) -> Double {
        penalty * exp2(-Double(nanos) / Double(halfLife))
    }

    /// The penalty just after a down, from `penalty` (already decayed to now) just before it.
    public func afterDown(_ penalty: Double) -> Double { min(penalty + penaltyPerDown, ceiling) }

    /// How long `penalty` takes to decay below `reuseBelow` (0 if it already is), rounded up to
    /// the nanosecond: halfLife · log₂(penalty / reuseBelow).
    public func timeToReuse(_ penalty: Double) -> UInt64 {
        guard penalty >= reuseBelow else { return 0 }
        return UInt64((Double(halfLife) * log2(penalty / reuseBelow)).rounded(.up))
    }
}
