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
}
