import Glibc
import STOQCore
import STOQDatapath
import STOQQUIC

/// Sheds an Initial flood in the kernel, before each datagram costs the worker a copy, a
/// wakeup and a parse. Once a tick it reads where the endpoint's v1 Initials without a token
/// came from and how many it withheld because its stateless reply budget was spent
/// (`QUICEndpoint.takeInitialReport`): those were read for nothing.
///
/// - A /64 that had at least `minimumWithheld` withheld (its share of the budget spent) gets
///   a rule: one in 2^k of its Initials kept, k chosen so that about twice what the endpoint
///   used (at least twice `minimumWithheld`) still gets through, and the budget stays the
///   limit. A client in another /64 keeps getting its Retry at the first try.
/// - What was withheld beyond those /64s (the whole budget spent: a flood spoofed across
///   prefixes) sets the same for everyone else.
/// - A rule goes when its /64 has had fewer than half `minimumWithheld` withheld for
///   `holdTicks` ticks in a row (everyone's shift likewise); shedding stops when nothing is.
///   Until then it keeps its k: a flood whose rate dips for a tick (a flooder's jitter, a
///   worker that was descheduled) goes on being shed, instead of ending the episode and
///   starting another.
///
/// Initials with a token (clients answering a Retry), every other packet and every
/// established connection pass. A client whose Initial was shed sends it again, as after a loss.
public struct InitialShedding: Sendable {
    /// Withheld Initials in one tick below which no rule starts.
    public var minimumWithheld: UInt64 = 256
    /// The most one rule sheds: one kept in 2^maxShift.
    public var maxShift = 16
    /// Ticks in a row under the floor before a rule (or everyone's shift) goes.
    public var holdTicks = 3
    public private(set) var plan = InitialShedPlan()
    /// Ticks in a row each held rule (by /64) has not been needed, and everyone's shift.
    private var quiet: [UInt64: Int] = [:]
    private var everyoneQuiet = 0

    public init() {}

    /// Takes one tick's report and returns the new plan when it changed.
    public mutating func update(_ report: InitialReport) -> InitialShedPlan? {
        var rules: [InitialShedPlan.Rule] = []
        var otherUsed = report.used, otherWithheld = report.withheld
        for source in report.busiest.prefix(InitialShedPlan.maxRules) {
            let rule = plan.rules.first { $0.prefix == source.prefix }
            guard source.withheld > 0, source.withheld >= (rule == nil ? minimumWithheld : minimumWithheld / 2) else { continue }
            let k = shift(used: source.used, withheld: source.withheld, was: rule?.shift ?? plan.shift)
            guard k > 0 else { continue }
            rules.append(.init(prefix: source.prefix, shift: k))
            otherUsed -= min(otherUsed, source.used)
            otherWithheld -= min(otherWithheld, source.withheld)
        }
        // Rules no longer needed this tick stay, unchanged, until they have not been for `holdTicks`.
        var held: [UInt64: Int] = [:]
        for old in plan.rules where rules.count < InitialShedPlan.maxRules && !rules.contains(where: { $0.prefix == old.prefix }) {
            let ticks = quiet[old.prefix, default: 0] + 1
            if ticks < holdTicks {
                rules.append(old)
                held[old.prefix] = ticks
            }
        }
        quiet = held
        let floor = plan.shift > 0 ? minimumWithheld / 2 : minimumWithheld
        var shift = otherWithheld > 0 && otherWithheld >= floor ? self.shift(used: otherUsed, withheld: otherWithheld, was: plan.shift) : 0
        if shift == 0 && plan.shift > 0 && everyoneQuiet + 1 < holdTicks {
            everyoneQuiet += 1
            shift = plan.shift
        } else {
            everyoneQuiet = 0
        }
        let next = InitialShedPlan(rules: rules, shift: shift)
        guard next != plan else { return nil }
        plan = next
        return next
    }

    /// k for Initials of which `used + withheld` arrived while one in 2^`was` was kept.
    private func shift(used: UInt64, withheld: UInt64, was: Int) -> Int {
        let arrived = Double(used + withheld) * Double(UInt64(1) << UInt64(min(was, 62)))
        let keep = 2 * Double(max(used, minimumWithheld))
        guard arrived > keep else { return 0 }
        return min(Int(Glibc.log2(arrived / keep).rounded(.down)), maxShift)
    }
}

/// What a worker's Initial shedding did.
public struct SheddingCounters: Sendable {
    /// /64s singled out now, and whether everyone else's Initials are shed too (gauges).
    public var prefixes = 0
    public var everyone = false
    /// Times shedding started.
    public var episodes: UInt64 = 0
    /// Datagrams the kernel dropped for the worker's socket: shed, or its receive buffer full.
    public var kernelDrops: UInt64 = 0
    public init() {}
}

extension InitialShedPlan {
    /// For logs: "1 in 16 from fd00:5705::/64, 1 in 2 from everyone else".
    var summary: String {
        var parts = rules.map { "1 in \(UInt64(1) << UInt64($0.shift)) from \(Self.describe($0.prefix))" }
        if shift > 0 { parts.append("1 in \(UInt64(1) << UInt64(shift)) from \(rules.isEmpty ? "anyone" : "everyone else")") }
        return parts.joined(separator: ", ")
    }

    static func describe(_ prefix: UInt64) -> String {
        let b = (0..<8).map { UInt8(truncatingIfNeeded: prefix >> (56 - 8 * UInt64($0))) }
        let a = IPv6Address(bytes: (b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], 0, 0, 0, 0, 0, 0, 0, 0))
        return "\(a)/64"
    }
}
