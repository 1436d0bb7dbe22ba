import Testing

@testable import STOQ

/// `stoq bench` counts each request once, counts only 2xx bodies as goodput, and fails the run
/// (exit 1) only when there was nothing to measure: no 2xx answer, no connection.
@Suite struct BenchOutcomeTests {
    /// A 404 that is also reset was two failures.
    @Test func aNonSuccessAlsoResetFailsOnce() {
        var t = RequestTally<Int>()
        t.response(status: 404, on: 1)
        #expect(!t.isGood(1))
        #expect(t.closed(1, errorCode: H3Error.Code.requestCancelled.rawValue) == false)
        #expect((t.answered, t.failed) == (0, 1))
        #expect(t.firstFailure == "HTTP 404")
    }

    @Test func aSuccessCutShortFailsButItsBytesCame() {
        var t = RequestTally<Int>()
        t.response(status: 200, on: 1)
        #expect(t.isGood(1))
        #expect(t.closed(1, errorCode: H3Error.internalError) == true)
        #expect((t.answered, t.failed) == (1, 1))
        #expect(t.firstFailure == "HTTP/3 error 0x102, H3_INTERNAL_ERROR: the server could not finish the response (its log says why)")
        // The handle is forgotten: a new stream on it starts afresh.
        t.response(status: 200, on: 1)
        #expect(t.closed(1, errorCode: H3Error.noError) == true)
        #expect((t.answered, t.failed) == (2, 1))
    }

    @Test func aRequestGivenUpOnAfterItsErrorHeadFailsOnce() {
        var t = RequestTally<Int>()
        t.response(status: 503, on: 1)
        t.giveUp(1, "unanswered")
        t.giveUp(2, "unanswered")
        #expect(t.closed(1, errorCode: H3Error.requestCancelled, request: false) == false)
        #expect(t.closed(2, errorCode: H3Error.requestCancelled, request: false) == false)
        t.failUnopened("stream limit")
        #expect(t.failed == 3)
        #expect(t.firstFailure == "HTTP 503")
    }

    static func bench(requests: Int, answered: Int, failed: Int, first: String?) -> BenchResult {
        BenchResult(
            connections: 1, streams: 1, requests: requests, answered: answered, failed: failed, firstFailure: first, bytes: 0, seconds: 1, gbps: 0,
            requestsPerSecond: 0, latencyP50Ms: 0, latencyP99Ms: 0, windowBytes: 0, windowSeconds: 1, windowGbps: 0, fairness: 1,
            minShare: 0, endedEarly: nil, peakInFlight: 1)
    }

    @Test func aBenchFailsOnlyWhenNoRequestWasAnswered2xx() {
        #expect(Self.bench(requests: 10, answered: 1, failed: 9, first: "HTTP 503").failure == nil)
        #expect(Self.bench(requests: 10, answered: 10, failed: 0, first: nil).failure == nil)
        // A node stopping mid-run cut every download short: failed, but measured.
        #expect(Self.bench(requests: 40, answered: 40, failed: 40, first: "HTTP/3 error 0x10c").failure == nil)
        #expect(
            Self.bench(requests: 2612, answered: 0, failed: 2612, first: "HTTP 404").failure
                == "no request was answered 2xx: 2612 of 2612 failed (the first: HTTP 404)")
        #expect(Self.bench(requests: 0, answered: 0, failed: 0, first: nil).failure == "no request completed")
    }

    static func load(established: Int, failed: [String: Int]) -> LoadResult {
        LoadResult(
            connections: established + failed.values.reduce(0, +), established: established, failed: failed, lost: [:], peakOpen: 0,
            threads: 1, rampSeconds: 0, handshakesPerSecond: 0, handshakeP50Ms: 0, handshakeP99Ms: 0, holdSeconds: 0, requests: 0,
            requestsFailed: 0, requestP50Ms: 0, requestP99Ms: 0)
    }

    @Test func aLoadFailsOnlyWhenNoConnectionWasEstablished() {
        #expect(Self.load(established: 10, failed: ["refused": 15]).failure == nil)
        #expect(
            Self.load(established: 0, failed: ["handshake timed out": 1, "certificate not trusted": 2]).failure
                == "no connection was established: all 3 failed (2 of them: certificate not trusted)")
        #expect(Self.load(established: 0, failed: [:]).failure == "no connection was established")
    }
}
