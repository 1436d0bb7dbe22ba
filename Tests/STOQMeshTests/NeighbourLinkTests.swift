import Foundation
import STOQMesh
import Testing

/// Liveness and metrics of one neighbour on a manual clock: probes every 100 ms.
@Suite struct NeighbourLinkTests {
    static let ms: UInt64 = 1_000_000
    static let interval = 100 * ms

    /// Drives probes from `start` for `count` intervals; `answered(i)` says whether probe i comes
    /// back after `rtt`. Returns the state changes seen, with their times.
    static func drive(
        _ link: inout NeighbourLink, from start: UInt64, count: Int, seq: inout UInt64, rtt: UInt64 = 2 * ms,
        answered: (Int) -> Bool
    ) -> [(UInt64, NeighbourLink.State)] {
        var changes = [(UInt64, NeighbourLink.State)]()
        for i in 0..<count {
            let t = start + UInt64(i) * interval
            if let s = link.tick(now: t) { changes.append((t, s)) }
            seq += 1
            link.probeSent(sequence: seq, now: t)
            if answered(i), let s = link.probeAnswered(sequence: seq, peerLoad: 0.25, now: t + rtt) {
                changes.append((t + rtt, s))
            }
        }
        return changes
    }

    @Test func aSilentNeighbourIsDownWithinTheBoundAndComesBackAfterTwoAnswers() {
        var link = NeighbourLink(now: 0)
        var seq: UInt64 = 0
        var changes = Self.drive(&link, from: 0, count: 10, seq: &seq) { _ in true }
        #expect(changes.map(\.1) == [.up])
        #expect(link.metrics.srtt == 2 * Self.ms)
        #expect(link.metrics.peerLoad == 0.25)

        // Silence from 1.0 s: the last answer was at 0.902 s, so down at the first tick at or after 1.502 s.
        changes = Self.drive(&link, from: 10 * Self.interval, count: 10, seq: &seq) { _ in false }
        #expect(changes.map(\.1) == [.down])
        #expect(changes.first?.0 == 1_600 * Self.ms)
        #expect(link.metrics.loss > 0)

        // One answer is not enough; the second in a row brings it back.
        changes = Self.drive(&link, from: 20 * Self.interval, count: 2, seq: &seq) { _ in true }
        #expect(changes.map(\.1) == [.up])
        #expect(changes.first?.0 == 2_100 * Self.ms + 2 * Self.ms)
    }

    @Test func onePercentLossDoesNotFlap() {
        // 1 % of probes lost both ways (about 2 % round trip), deterministic pattern over an hour
        // of probes: never down.
        var link = NeighbourLink(now: 0)
        var seq: UInt64 = 0
        var rng: UInt64 = 42
        let changes = Self.drive(&link, from: 0, count: 36_000, seq: &seq) { _ in
            rng = rng &* 6364136223846793005 &+ 1442695040888963407
            return (rng >> 33) % 1000 >= 20
        }
        #expect(changes.map(\.1) == [.up])
        #expect(link.metrics.loss > 0.005 && link.metrics.loss < 0.05, "loss \(link.metrics.loss)")
    }

    @Test func aLateOrForeignAnswerDoesNotRevive() {
        var link = NeighbourLink(now: 0)
        #expect(link.probeAnswered(sequence: 99, peerLoad: 0, now: Self.ms) == nil)  // never sent
        link.probeSent(sequence: 1, now: 0)
        #expect(link.tick(now: 700 * Self.ms) == .down)  // timed out, then down
        #expect(link.probeAnswered(sequence: 1, peerLoad: 0, now: 701 * Self.ms) == nil)  // given up on already
        #expect(link.state == .down)
    }

    /// QUIC retransmits a lost probe, so it comes back late: counted as a loss, not as an RTT
    /// sample, and the link stays up.
    @Test func aLateAnswerIsALossNotAnRTT() throws {
        var link = NeighbourLink(now: 0)
        link.probeSent(sequence: 1, now: 0)
        #expect(link.probeAnswered(sequence: 1, peerLoad: 0, now: 4 * Self.ms) == .up)
        let srtt = link.metrics.srtt, rttvar = link.metrics.rttvar  // 4 ms, 2 ms
        #expect(link.metrics.loss == 0)
        // Later than srtt + 4·rttvar + 25 ms = 37 ms: retransmitted.
        link.probeSent(sequence: 2, now: 100 * Self.ms)
        #expect(link.probeAnswered(sequence: 2, peerLoad: 0, now: 140 * Self.ms) == nil)
        #expect(link.metrics.srtt == srtt && link.metrics.rttvar == rttvar)
        #expect(abs(link.metrics.loss - 0.01) < 1e-9)  // one loss sample at weight 0.01
        #expect(link.state == .up && link.lastAnswer == 140 * Self.ms)
        // Within the bound: an RTT sample.
        link.probeSent(sequence: 3, now: 200 * Self.ms)
        _ = link.probeAnswered(sequence: 3, peerLoad: 0, now: 230 * Self.ms)
        #expect(link.metrics.srtt > srtt)
    }

    /// A path that gets slower for good: the first late answers are losses, then the streak
    /// (with the QUIC connection's RTT risen too) is the path, and the RTT follows it up.
    /// Before, srtt froze at 10 ms and the loss estimate climbed towards 1 (0.63 after 100
    /// answers at 80 ms), which made the route look lossy and fast.
    @Test func aPathThatGetsSlowerIsFollowedNotCountedAsLoss() {
        var link = NeighbourLink(now: 0)
        var seq: UInt64 = 0
        _ = Self.drive(&link, from: 0, count: 20, seq: &seq, rtt: 10 * Self.ms) { _ in true }
        #expect(link.metrics.srtt == 10 * Self.ms)
        // The QUIC connection's smoothed RTT (one ACK sample a probe) moves towards 80 ms.
        var transport = 10.0
        for i in 0..<100 {
            transport = transport * 7 / 8 + 80.0 / 8
            link.transportRTT(srtt: UInt64(transport * Double(Self.ms)), rttvar: 5 * Self.ms)
            let changes = Self.drive(&link, from: (20 + UInt64(i)) * Self.interval, count: 1, seq: &seq, rtt: 80 * Self.ms) { _ in true }
            #expect(changes.isEmpty)
        }
        #expect(link.state == .up)
        #expect(link.metrics.srtt > 70 * Self.ms, "srtt \(link.metrics.srtt)")
        // The streak's first answers (before it was taken as a slower path) were losses.
        #expect(link.metrics.loss > 0 && link.metrics.loss < 0.1, "loss \(link.metrics.loss)")
    }

    /// A 400 ms outage on a 10 ms link: the probes sent into it come back together, late, and
    /// QUIC's own RTT stays at 10 ms. They are losses, not a slower path: srtt stays put.
    @Test func probesHeldUpByAnOutageAreLossesNotASlowerPath() {
        var link = NeighbourLink(now: 0)
        var seq: UInt64 = 0
        _ = Self.drive(&link, from: 0, count: 20, seq: &seq, rtt: 10 * Self.ms) { _ in true }
        link.transportRTT(srtt: 10 * Self.ms, rttvar: 2 * Self.ms)
        let start = 20 * Self.interval
        for k in 0..<4 { link.probeSent(sequence: 100 + UInt64(k), now: start + UInt64(k) * Self.interval) }
        for k in 0..<4 { _ = link.probeAnswered(sequence: 100 + UInt64(k), peerLoad: 0, now: start + 450 * Self.ms) }
        #expect(link.metrics.srtt < 12 * Self.ms, "srtt \(link.metrics.srtt)")
        #expect(link.state == .up)
    }

    /// A path slower than the probe timeout's 500 ms floor (a satellite hop): the QUIC
    /// connection's RTT seeds the link's and stretches the timeout, so its answers count. Before,
    /// every probe was given up on at 500 ms and the link never came up.
    @Test func aPathSlowerThanTheTimeoutFloorComesUp() {
        let settings = NeighbourLink.Settings(downAfter: 5_000 * Self.ms, probeTimeout: 500 * Self.ms)
        /// Probes every 100 ms for 3 s, each answered 610 ms later, in time order (10 ms steps).
        func run(_ link: inout NeighbourLink) -> [NeighbourLink.State] {
            var changes = [NeighbourLink.State]()
            for step in 0...300 {
                let t = UInt64(step) * 10 * Self.ms
                if t >= 610 * Self.ms, (t - 610 * Self.ms) % Self.interval == 0,
                    let s = link.probeAnswered(sequence: (t - 610 * Self.ms) / Self.interval, peerLoad: 0, now: t)
                {
                    changes.append(s)
                }
                if let s = link.tick(now: t) { changes.append(s) }
                if t % Self.interval == 0 { link.probeSent(sequence: t / Self.interval, now: t) }
            }
            return changes
        }
        var link = NeighbourLink(settings: settings, now: 0)
        link.transportRTT(srtt: 600 * Self.ms, rttvar: 30 * Self.ms)
        #expect(link.metrics.srtt == 600 * Self.ms)
        #expect(link.probeTimeout >= 600 * Self.ms + 4 * 30 * Self.ms)
        #expect(run(&link) == [.up])
        #expect(link.metrics.loss == 0 && link.metrics.srtt > 600 * Self.ms)
        // Without the transport's RTT every probe is given up on before its answer: never up.
        var blind = NeighbourLink(settings: settings, now: 0)
        #expect(run(&blind) == [])
        #expect(blind.state != .up)
    }

    @Test func rttFollowsRFC6298AndDeliveryRateAverages() {
        var link = NeighbourLink(now: 0)
        link.rttSample(8 * Self.ms)
        #expect(link.metrics.srtt == 8 * Self.ms && link.metrics.rttvar == 4 * Self.ms)
        link.rttSample(16 * Self.ms)
        #expect(link.metrics.srtt == 9 * Self.ms)  // 7/8 · 8 + 1/8 · 16
        #expect(link.metrics.rttvar == 5 * Self.ms)  // 3/4 · 4 + 1/4 · 8
        link.delivered(bytes: 1_000_000, interval: 1_000 * Self.ms)
        #expect(link.metrics.deliveryRate == 1_000_000)
        link.delivered(bytes: 2_000_000, interval: 1_000 * Self.ms)
        #expect(link.metrics.deliveryRate == 1_050_000)  // moving average, weight 0.05
    }

    // MARK: Flap damping

    /// One second of a flapping neighbour, `cycles` times from `start`: three probes answered,
    /// then seven not, so it is up (again) at 0.002 or 0.102 s into each second and down at 0.9 s
    /// (the first tick 600 ms after the answer at 0.202 s).
    static func flap(_ link: inout NeighbourLink, from start: UInt64, cycles: Int, seq: inout UInt64) -> [(UInt64, NeighbourLink.State)] {
        drive(&link, from: start, count: 10 * cycles, seq: &seq) { $0 % 10 < 3 }
    }

    /// The penalty just after downs `spacing` apart, the newest last: 1000 each, halved every 15 s.
    static func penalty(downs: Int, spacing: Double) -> Double {
        (0..<downs).reduce(0.0) { $0 + 1000 * exp2(-Double($1) * spacing / 15) }
    }

    /// The first probe interval's tick at or after `t`.
    static func tickAtOrAfter(_ t: UInt64) -> UInt64 { (t + interval - 1) / interval * interval }

    /// Five downs a second apart: four make 3737, not past 4000; the fifth makes 4568 and the
    /// link is suppressed. It answers every probe from then on, and stays down (its metrics
    /// still move) until 15 s · log₂(4568 / 750) = 39.1 s after that down, and up at the first
    /// tick after.
    @Test func fiveDownsInAFewSecondsSuppressUntilThePenaltyDecays() {
        var link = NeighbourLink(now: 0)
        var seq: UInt64 = 0
        var changes = Self.flap(&link, from: 0, cycles: 4, seq: &seq)
        #expect(changes.filter { $0.1 == .down }.map(\.0) == [900, 1_900, 2_900, 3_900].map { $0 * Self.ms })
        #expect(!link.suppressed && link.state == .down)
        #expect(abs(link.penalty(now: 3_900 * Self.ms) - Self.penalty(downs: 4, spacing: 1)) < 1e-6)
        changes = Self.flap(&link, from: 4_000 * Self.ms, cycles: 1, seq: &seq)
        #expect(changes.map(\.1) == [.up, .down] && changes.last?.0 == 4_900 * Self.ms)
        let p = Self.penalty(downs: 5, spacing: 1)
        #expect(abs(link.penalty(now: 4_900 * Self.ms) - p) < 1e-6 && p > 4_000 && p < 4_600)
        #expect(link.recentDowns == 5 && link.recentDownsSince == 900 * Self.ms)
        let reuse = 4_900 * Self.ms + UInt64((15e9 * log2(p / 750)).rounded(.up))
        #expect(link.suppressedUntil.map { max($0, reuse) - min($0, reuse) <= 1 } == true, "\(String(describing: link.suppressedUntil)) vs \(reuse)")
        #expect(reuse > 43_900 * Self.ms && reuse < 44_100 * Self.ms)

        // Every probe answered from 5 s on, 10 ms later than before: down all the same, but
        // alive underneath and measured.
        let srtt = link.metrics.srtt, loss = link.metrics.loss
        changes = Self.drive(&link, from: 5_000 * Self.ms, count: 300, seq: &seq, rtt: 10 * Self.ms) { _ in true }
        #expect(changes.isEmpty)
        #expect(link.state == .down && link.liveness == .up && link.suppressed)
        #expect(link.metrics.srtt > srtt && link.metrics.loss < loss)
        changes = Self.drive(&link, from: 35_000 * Self.ms, count: 150, seq: &seq, rtt: 10 * Self.ms) { _ in true }
        #expect(changes.count == 1 && changes.first?.1 == .up)
        #expect(changes.first?.0 == Self.tickAtOrAfter(reuse) && changes.first?.0 == 44_000 * Self.ms + Self.interval)
        #expect(!link.suppressed && link.penalty(now: 44_100 * Self.ms) < 750)
    }

    /// Suppressed and silent past its reuse time: the suppression ends with no change (still
    /// down), and the usual two answers in a row bring it up.
    @Test func aSuppressedLinkThatIsSilentAtItsReuseTimeNeedsTheUsualAnswers() throws {
        var link = NeighbourLink(now: 0)
        var seq: UInt64 = 0
        _ = Self.flap(&link, from: 0, cycles: 5, seq: &seq)
        let until = try #require(link.suppressedUntil)
        var changes = Self.drive(&link, from: 5_000 * Self.ms, count: 400, seq: &seq) { _ in false }
        #expect(changes.isEmpty && !link.suppressed && link.state == .down && until < 45_000 * Self.ms)
        changes = Self.drive(&link, from: 45_000 * Self.ms, count: 2, seq: &seq) { _ in true }
        #expect(changes.map(\.1) == [.up] && changes.first?.0 == 45_100 * Self.ms + 2 * Self.ms)
    }

    /// A link cut for 0.7 s every 10 s for five minutes (scripts/bench-routing's pace) goes down
    /// and up every time: its penalty tends to 1000 / (1 − 2^(−10/15)) ≈ 2702, under 4000.
    @Test func aDownEveryTenSecondsIsNeverSuppressed() {
        var link = NeighbourLink(now: 0)
        var seq: UInt64 = 0
        var highest = 0.0
        var changes = [(UInt64, NeighbourLink.State)]()
        for cut in 0..<30 {
            let start = UInt64(cut) * 10_000 * Self.ms
            changes += Self.drive(&link, from: start, count: 100, seq: &seq) { !(50..<57).contains($0) }
            #expect(!link.suppressed, "suppressed after cut \(cut + 1)")
            highest = max(highest, link.penalty(now: start + 5_600 * Self.ms))
        }
        #expect(changes.count == 61 && changes.filter { $0.1 == .down }.count == 30 && changes.last?.1 == .up)
        #expect(changes.filter { $0.1 == .down }.allSatisfy { $0.0 % (10_000 * Self.ms) == 5_600 * Self.ms })
        let limit = 1000 / (1 - exp2(-10.0 / 15))
        #expect(highest > 2_690 && highest < limit && limit < 2_703, "\(highest)")
    }

    /// `mesh.flap_damping = false`: fifty downs a second apart, and up again after each.
    @Test func withDampingOffAFlappingLinkIsNeverSuppressed() {
        var link = NeighbourLink(settings: .init(flapDamping: nil), now: 0)
        var seq: UInt64 = 0
        let changes = Self.flap(&link, from: 0, cycles: 50, seq: &seq)
        #expect(changes.count == 100 && changes.filter { $0.1 == .up }.count == 50)
        #expect(!link.suppressed && link.penalty(now: 50_000 * Self.ms) == 0 && link.recentDowns == 0)
    }

    /// Sixty downs a second apart, most of them while suppressed (each moves the end on): the
    /// penalty reaches the ceiling, 750 · 2⁴ = 12 000, from the 17th, so the link is reused 60 s
    /// after its last down (uncapped, 20 747 would hold it 72 s), and up at that tick.
    @Test func theCeilingBoundsTheTimeToReuse() {
        let rules = FlapDamping()
        #expect(rules.ceiling == 12_000 && rules.timeToReuse(rules.ceiling) == 60 * 1_000 * Self.ms)
        var link = NeighbourLink(now: 0)
        var seq: UInt64 = 0
        var changes = Self.flap(&link, from: 0, cycles: 16, seq: &seq)
        #expect(link.penalty(now: 15_900 * Self.ms) < 12_000)
        changes += Self.flap(&link, from: 16_000 * Self.ms, cycles: 44, seq: &seq)
        // Reported: up, then down and up four times, then down (suppressed) for good.
        #expect(changes.count == 10 && changes.last?.0 == 4_900 * Self.ms)
        #expect(link.recentDowns == 60 && link.penalty(now: 59_900 * Self.ms) == 12_000)
        let lastDown = 59_900 * Self.ms
        #expect(link.suppressedUntil == lastDown + 60_000 * Self.ms)
        let uncapped = Self.penalty(downs: 60, spacing: 1)
        #expect(uncapped > 20_000 && 15e9 * log2(uncapped / 750) > 70e9)
        changes = Self.drive(&link, from: 60_000 * Self.ms, count: 700, seq: &seq) { _ in true }
        #expect(changes.map(\.1) == [.up] && changes.first?.0 == lastDown + 60_000 * Self.ms)
    }
}
