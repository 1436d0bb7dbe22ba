import Testing

@testable import STOQ

/// `stoq bench`'s percentiles are nearest-rank: rank ⌈n·p⌉. They were one rank high (of 100
/// samples, p99 was the largest; of two, p50 the larger).
@Suite struct PercentileTests {
    @Test func nearestRank() {
        let hundred = (1...100).map { UInt64($0) * 1_000_000 }
        #expect(percentileMs(sorted: hundred, 0.99) == 99)
        #expect(percentileMs(sorted: hundred, 0.5) == 50)
        #expect(percentileMs(sorted: [1_000_000, 2_000_000], 0.5) == 1)
        #expect(percentileMs(sorted: [3_000_000], 0.99) == 3)
        #expect(percentileMs(sorted: [], 0.5) == 0)
    }
}
