import Testing

@testable import stoq

/// `stoq get`'s progress line on a terminal, whatever the server announced.
@Suite struct ProgressTests {
    @Test func barShareAndTimeLeft() {
        #expect(
            progressLine(got: 1 << 20, total: 4 << 20, seconds: 1)
                == "\r1.0 MiB / 4.0 MiB [███████                       ] 25%  ETA 3s  1.0 MiB/s   ")
        #expect(progressLine(got: 512, total: nil, seconds: 2) == "\r512.0 B  256.0 B/s   ")
    }

    /// A content-length of 2^63 − 1 with one byte a second is a time left no Int holds: the
    /// line says `?` (it trapped, and the download died, leaving its part file).
    @Test func anAnnouncedLengthPastAnyTimeLeftIsDrawn() {
        #expect(
            progressLine(got: 1, total: UInt64(Int64.max), seconds: 10)
                == "\r1.0 B / 8388608.0 TiB [                              ] 0%  ETA ?  0.1 B/s   ")
        #expect(progressLine(got: 0, total: 100, seconds: 1).hasSuffix("0%  ETA ?  0.0 B/s   "))
        // More than announced: the bar stays full.
        #expect(progressLine(got: 200, total: 100, seconds: 1).contains("[██████████████████████████████] 100%  ETA 0s"))
    }
}
