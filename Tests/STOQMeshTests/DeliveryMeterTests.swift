import STOQCore
import Testing

@testable import STOQMesh

/// A neighbour's delivery rate: bytes over the time its chunk fetches were in flight.
@Suite struct DeliveryMeterTests {
    static let ms = Nanos.millisecond

    /// Four chunks of 1 MB fetched at once, all in one second: 4 MB/s, not the 1 MB/s that
    /// summing each fetch's second gave.
    @Test func fetchesAtOnceAreNotCountedOneAfterTheOther() throws {
        var m = DeliveryMeter()
        for _ in 0..<4 { m.started(now: 0) }
        for i in 0..<4 { m.ended(bytes: 1_000_000, now: 1_000 * Self.ms - UInt64(i)) }
        let taken = m.sample(now: 1_000 * Self.ms)
        let s = try #require(taken)
        #expect(s.bytes == 4_000_000 && s.nanos == 1_000 * Self.ms - 3)
        var link = NeighbourLink(now: 0)
        link.delivered(bytes: s.bytes, interval: s.nanos)
        #expect(abs(link.metrics.deliveryRate - 4_000_000) < 100)
        #expect(m.idle)
    }

    /// Time with nothing in flight is not the neighbour's; overlapping fetches count once.
    @Test func onlyTheTimeSomethingIsInFlightCounts() throws {
        var m = DeliveryMeter()
        m.started(now: 0)
        m.started(now: 100 * Self.ms)
        m.ended(bytes: 500, now: 200 * Self.ms)
        m.ended(bytes: 500, now: 300 * Self.ms)  // busy 0 … 300 ms
        m.started(now: 1_000 * Self.ms)  // idle 300 … 1000 ms
        m.ended(bytes: 1_000, now: 1_100 * Self.ms)
        let taken = m.sample(now: 2_000 * Self.ms)
        let s = try #require(taken)
        #expect(s.bytes == 2_000 && s.nanos == 400 * Self.ms)
        let none = m.sample(now: 3_000 * Self.ms)
        #expect(none == nil && m.idle)
    }

    /// A fetch still in flight at a sample counts up to it, and from it in the next; one that
    /// failed adds its time to the next delivery's sample, at most 10 s of it.
    @Test func inFlightAndFailedFetchesCarryTheirTime() throws {
        var m = DeliveryMeter()
        m.started(now: 0)
        m.started(now: 0)
        m.ended(bytes: 1_000, now: 100 * Self.ms)
        let taken1 = m.sample(now: 150 * Self.ms)
        let first = try #require(taken1)
        #expect(first.bytes == 1_000 && first.nanos == 150 * Self.ms)
        m.ended(bytes: 3_000, now: 250 * Self.ms)
        let taken2 = m.sample(now: 300 * Self.ms)
        let second = try #require(taken2)
        #expect(second.bytes == 3_000 && second.nanos == 100 * Self.ms)
        m.started(now: 1_000 * Self.ms)
        m.ended(bytes: 0, now: 30_000 * Self.ms)  // a 29 s failure
        let none = m.sample(now: 30_000 * Self.ms)
        #expect(none == nil && !m.idle)
        m.started(now: 31_000 * Self.ms)
        m.ended(bytes: 10_000, now: 31_100 * Self.ms)
        let taken3 = m.sample(now: 31_200 * Self.ms)
        let third = try #require(taken3)
        #expect(third.bytes == 10_000 && third.nanos == DeliveryMeter.carriedAtMost + 100 * Self.ms)
        // An end without a start changes nothing.
        m.ended(bytes: 5, now: 32_000 * Self.ms)
        #expect(m.idle)
    }
}
