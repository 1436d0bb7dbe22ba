import Foundation
import STOQCore
import STOQQUIC
import STOQTransfer
import STOQWorker

/// What `STOQClient.bench` measured.
public struct BenchResult: Sendable, Codable {
    public var connections: Int
    public var streams: Int
    public var requests: Int
    /// Requests the node answered 2xx (counted as the head arrives: one whose body was then cut
    /// short is also `failed`).
    public var answered: Int
    /// Requests that failed, each once: a non-2xx answer, or a stream that ended with an error.
    public var failed: Int
    /// Why the first failed request failed (`HTTP 404`, or the stream's HTTP/3 error); nil when
    /// none did.
    public var firstFailure: String?
    /// Body bytes of 2xx answers: an error's body is no goodput.
    public var bytes: UInt64
    public var seconds: Double
    public var gbps: Double
    public var requestsPerSecond: Double
    /// Request latency (request sent → stream closed), milliseconds.
    public var latencyP50Ms: Double
    public var latencyP99Ms: Double
    /// 2xx body bytes received until the run's end (`duration` or `bytes` reached), counting the
    /// requests then in flight as far as they had got, and that time: the goodput of the load
    /// itself, without the requests still finishing after it.
    public var windowBytes: UInt64
    public var windowSeconds: Double
    public var windowGbps: Double
    /// Jain's fairness index of the body bytes each connection received by the run's end: 1 when
    /// all got the same, 1/connections when one got everything.
    public var fairness: Double
    /// The least any connection received, over the mean (0: one starved).
    public var minShare: Double
    /// Why the run ended before its `duration` or `bytes`: the first connection the server
    /// closed, and its reason (nil: it ran its course).
    public var endedEarly: String?
    /// The most requests in flight at once: `connections` × `streams` unless the server's
    /// stream limit held them back (those waited for its MAX_STREAMS).
    public var peakInFlight: Int
}

extension BenchResult {
    /// Why the run failed as a whole, nil when it did not: the node answered no request 2xx,
    /// so there was nothing to measure (`stoq bench` exits 1). Failures beside 2xx answers are
    /// the load's to report, not a failed run: a node stopping mid-run cuts every download
    /// short, and the goodput until then is still measured.
    public var failure: String? {
        guard answered == 0 else { return nil }
        guard requests > 0 else { return "no request completed" }
        return "no request was answered 2xx: \(failed) of \(requests) failed" + (firstFailure.map { " (the first: \($0))" } ?? "")
    }
}

/// The bench's requests' outcomes, each request counted once: it fails on a non-2xx answer or
/// on a stream that ends with an error code (a 2xx cut short); a non-2xx that is also reset is
/// one failure. Only a 2xx answer's body is goodput. Keyed by stream (generic, for the tests).
struct RequestTally<Stream: Hashable> {
    private(set) var answered = 0
    private(set) var failed = 0
    private(set) var firstFailure: String?
    /// Streams answered 2xx, until they close: their body bytes count.
    private var good: Set<Stream> = []
    /// Streams already counted failed, until they close.
    private var counted: Set<Stream> = []

    /// A response head with `status` arrived on `stream`.
    mutating func response(status: Int, on stream: Stream) {
        if status / 100 == 2 {
            if good.insert(stream).inserted { answered += 1 }
        } else {
            fail(stream, "HTTP \(status)")
        }
    }

    /// Whether `stream`'s body so far is goodput (it was answered 2xx).
    func isGood(_ stream: Stream) -> Bool { good.contains(stream) }

    /// `stream` closed with `errorCode`; `request`: it is a request still counted (not one
    /// already given up on). Returns whether its body was goodput. Forgets the stream: a
    /// handle may name a new stream after this.
    mutating func closed(_ stream: Stream, errorCode: UInt64, request: Bool = true) -> Bool {
        if request, errorCode != H3Error.noError { fail(stream, H3Error.Code(rawValue: errorCode).resetReason) }
        counted.remove(stream)
        return good.remove(stream) != nil
    }

    /// A request that failed before it had a stream (none could be opened).
    mutating func failUnopened(_ why: String) { count(why) }

    /// `stream`'s request is given up on (no answer in time): failed, unless it already was.
    mutating func giveUp(_ stream: Stream, _ why: String) { fail(stream, why) }

    private mutating func fail(_ stream: Stream, _ why: String) {
        if counted.insert(stream).inserted { count(why) }
    }

    private mutating func count(_ why: String) {
        failed += 1
        if firstFailure == nil { firstFailure = why }
    }
}

/// Jain's fairness index of `x`, (Σx)² / (n·Σx²): 1 for equal shares (and for none at all).
func jainIndex(_ x: [Double]) -> Double {
    let sum = x.reduce(0, +), squares = x.reduce(0) { $0 + $1 * $1 }
    return squares == 0 ? 1 : sum * sum / (Double(x.count) * squares)
}

/// The nearest-rank `p` percentile of nanosecond latencies, in milliseconds (0 when none):
/// what every `stoq bench` mode reports. The rank is ⌈n·p⌉ (of 100 samples, p99 is the 99th,
/// not the largest).
func percentileMs(sorted: [UInt64], _ p: Double) -> Double {
    guard !sorted.isEmpty else { return 0 }
    let rank = Int((Double(sorted.count) * p).rounded(.up))
    return Double(sorted[max(0, min(sorted.count - 1, rank - 1))]) / 1e6
}

final class BenchApp: QUICApplication {
    var started: [HTTPStream: Timestamp] = [:]
    var connectionOf: [HTTPStream: ObjectIdentifier] = [:]
    var latencies: [UInt64] = []
    var tally = RequestTally<HTTPStream>()
    var bytes: UInt64 = 0
    var bytesByConnection: [ObjectIdentifier: UInt64] = [:]
    var finished: [QUICConnection] = []
    var connectionErrors: [String] = []
    func response(_ head: HTTPResponseHead, stream: HTTPStream, connection: QUICConnection) {
        stream.setBodySink(fd: -1)
        tally.response(status: head.status, on: stream)
    }
    func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) {
        connectionOf.removeValue(forKey: stream)
        let t0 = started.removeValue(forKey: stream)
        if let t0 { latencies.append(monotonicNow() - t0) }
        if tally.closed(stream, errorCode: errorCode, request: t0 != nil) {
            bytes += stream.bytesReceived
            bytesByConnection[ObjectIdentifier(connection), default: 0] += stream.bytesReceived
        }
        finished.append(connection)
    }
    func connectionClosed(connection: QUICConnection, reason: String) {
        if !reason.isEmpty { connectionErrors.append(reason) }
    }
}

extension STOQClient {
    /// Keeps `connections` × `streams` GETs of `url` in flight until `duration` seconds pass
    /// or `bytes` have arrived, on one worker thread; reports goodput, requests/s and latency.
    public static func bench(
        _ url: STOQURL, connections: Int, streams: Int, duration: Double?, bytes: UInt64?,
        trust: ClientTrust, datapath: ClientDatapath
    ) throws(ClientError) -> BenchResult {
        let app = BenchApp()
        let rig = try ClientRig(trust: trust, datapath: datapath, application: app)
        defer { rig.queue.close() }
        let queue = rig.queue, endpoint = rig.endpoint, worker = rig.worker
        let source = IPv6Endpoint(address: sourceAddress(toward: url.endpoint), port: queue.localEndpoint.port)
        var conns: [QUICConnection] = []
        do {
            for _ in 0..<connections {
                conns.append(try endpoint.connect(to: url.endpoint, from: source, serverName: url.host, now: monotonicNow()))
            }
            try worker.run(timeout: 10_000_000_000) { conns.allSatisfy { $0.isEstablished } || !app.connectionErrors.isEmpty }
        } catch { throw ClientError(.connect, "\(error)") }
        guard conns.allSatisfy({ $0.isEstablished }) else {
            throw ClientError(.connect, "cannot connect to \(url.endpoint): \(app.connectionErrors.first ?? "timed out")")
        }
        func issue(on c: QUICConnection) -> Bool {
            guard let s = try? c.request(method: "GET", authority: url.authority, path: url.path) else { return false }
            app.started[s] = monotonicNow()
            app.connectionOf[s] = ObjectIdentifier(c)
            return true
        }
        // A request the server's stream limit refuses now is owed, and sent once MAX_STREAMS
        // allows it: dropped, it left the run with fewer in flight than it said.
        var owed: [ObjectIdentifier: (connection: QUICConnection, count: Int)] = [:]
        func issueOrOwe(_ c: QUICConnection) {
            if !issue(on: c) { owed[ObjectIdentifier(c), default: (c, 0)].count += 1 }
        }
        func payOwed() {
            for (k, o) in owed {
                var left = o.count
                while left > 0, !o.connection.isClosed, issue(on: o.connection) { left -= 1 }
                owed[k] = left > 0 && !o.connection.isClosed ? (o.connection, left) : nil
            }
        }
        for c in conns { for _ in 0..<streams { issueOrOwe(c) } }
        var peakInFlight = app.started.count
        let t0 = monotonicNow()
        let end = duration.map { t0 + UInt64($0 * 1e9) }
        var stopping = false
        var window: (bytes: UInt64, seconds: Double, byConnection: [ObjectIdentifier: UInt64]) = (0, 0, [:])
        func closeWindow(_ now: UInt64) {
            stopping = true
            var by = app.bytesByConnection
            for (s, c) in app.connectionOf where app.tally.isGood(s) { by[c, default: 0] += s.bytesReceived }
            window = (by.values.reduce(0, +), Double(now - t0) / 1e9, by)
        }
        do {
            try worker.run(timeout: UInt64((duration ?? 3600) * 1e9) + 60_000_000_000) {
                let now = monotonicNow()
                if !stopping, (end.map { now >= $0 } ?? false) || (bytes.map { app.bytes >= $0 } ?? false) || !app.connectionErrors.isEmpty {
                    // A connection the server closed ends the run too: the window is what came until then.
                    closeWindow(now)
                }
                if !stopping {
                    for c in app.finished where !c.isClosed { issueOrOwe(c) }
                    if !owed.isEmpty { payOwed() }
                    peakInFlight = max(peakInFlight, app.started.count)
                }
                app.finished.removeAll(keepingCapacity: true)
                return (stopping && app.started.isEmpty) || !app.connectionErrors.isEmpty
            }
        } catch { throw ClientError(.transfer, "\(error)") }
        let seconds = Double(monotonicNow() - t0) / 1e9
        for c in conns { c.close(now: monotonicNow()) }
        _ = try? worker.run(timeout: 200_000_000) { endpoint.connectionCount == 0 }
        if let e = app.connectionErrors.first, app.latencies.isEmpty { throw ClientError(.transfer, e) }
        let sorted = app.latencies.sorted()
        func pct(_ p: Double) -> Double { percentileMs(sorted: sorted, p) }
        let shares = conns.map { Double(window.byConnection[ObjectIdentifier($0)] ?? 0) }
        let mean = shares.reduce(0, +) / Double(max(shares.count, 1))
        return BenchResult(
            connections: connections, streams: streams, requests: sorted.count, answered: app.tally.answered, failed: app.tally.failed,
            firstFailure: app.tally.firstFailure,
            bytes: app.bytes, seconds: seconds, gbps: Double(app.bytes) * 8 / seconds / 1e9,
            requestsPerSecond: Double(sorted.count) / seconds, latencyP50Ms: pct(0.5), latencyP99Ms: pct(0.99),
            windowBytes: window.bytes, windowSeconds: window.seconds,
            windowGbps: window.seconds > 0 ? Double(window.bytes) * 8 / window.seconds / 1e9 : 0, fairness: jainIndex(shares),
            minShare: mean > 0 ? (shares.min() ?? 0) / mean : 0, endedEarly: app.connectionErrors.first, peakInFlight: peakInFlight)
    }
}
