import Foundation
import STOQCore
import STOQQUIC
import STOQTransfer
import STOQWorker
import Synchronization

/// How `STOQClient.load` loads a node: `connections` handshakes at `rate` per second (all at
/// once, `maxHandshakesInFlight` per thread at a time, when nil), every one then held open for
/// `hold` seconds, idle or sending `streams` GETs every `interval` seconds, then closed.
public struct LoadPlan: Sendable {
    public var connections: Int
    public var rate: Double?
    public var hold: Double
    public var streams: Int
    public var interval: Double
    /// Threads, each with its own socket (source port) and sans-IO endpoint, each taking an
    /// equal share of the connections and of the rate.
    public var threads: Int
    public var maxHandshakesInFlight = 512
    /// How long one handshake may take before it counts as failed (ERR_HANDSHAKE_TIMEOUT).
    public var handshakeTimeout: Double = 10
    /// A PING after this many seconds without traffic, so held connections outlive the node's
    /// idle timeout (30 s by default) however long the ramp and the hold take. Every held
    /// connection's PING and its ACK cost both ends: at 20,000 connections every 10 s, about a
    /// tenth of a core each. A node with a longer idle timeout allows a longer interval.
    public var keepAlive = LoadPlan.defaultKeepAlive
    public static let defaultKeepAlive: Double = 10
    /// Connections closed a second at the end, per thread.
    public var closeRate: Double = 20_000

    public init(connections: Int, rate: Double?, hold: Double, streams: Int, interval: Double, threads: Int) {
        self.connections = connections
        self.rate = rate
        self.hold = hold
        self.streams = streams
        self.interval = interval
        self.threads = threads
    }
}

/// What `STOQClient.load` measured.
public struct LoadResult: Sendable, Codable {
    public var connections: Int
    public var established: Int
    /// Connections that never completed their handshake, by reason (the QUIC or TLS error, or
    /// the peer's CONNECTION_CLOSE with its reason phrase).
    public var failed: [String: Int]
    /// Established connections that ended before the hold did, by reason.
    public var lost: [String: Int]
    /// The most connections open at once (established, summed over threads at each thread's peak).
    public var peakOpen: Int
    public var threads: Int
    /// From the first handshake started to the last one finished.
    public var rampSeconds: Double
    public var handshakesPerSecond: Double
    public var handshakeP50Ms: Double
    public var handshakeP99Ms: Double
    public var holdSeconds: Double
    public var requests: Int
    public var requestsFailed: Int
    public var requestP50Ms: Double
    public var requestP99Ms: Double
}

extension LoadResult {
    /// Why the run failed as a whole, nil when it did not: no connection was established
    /// (`stoq bench` exits 1). Some failed or lost among established ones are the load's to
    /// report (a node's `max_connections` refusing the rest), not a failed run.
    public var failure: String? {
        guard established == 0 else { return nil }
        let total = failed.values.reduce(0, +)
        guard let (reason, n) = failed.max(by: { ($0.value, $1.key) < ($1.value, $0.key) }) else {
            return "no connection was established"
        }
        return "no connection was established: all \(total) failed (\(n) of them: \(reason))"
    }
}

/// One thread's view of its share of the connections.
final class LoadApp: QUICApplication {
    var handshakeStarted: [ObjectIdentifier: Timestamp] = [:]
    var handshakeLatencies: [UInt64] = []
    var established: [ObjectIdentifier: QUICConnection] = [:]
    var peakOpen = 0
    var failed: [String: Int] = [:]
    var lost: [String: Int] = [:]
    var holding = false
    var requestStarted: [HTTPStream: Timestamp] = [:]
    var requestLatencies: [UInt64] = []
    var requests = RequestTally<HTTPStream>()

    func handshakeCompleted(connection: QUICConnection) {
        let id = ObjectIdentifier(connection)
        guard let t0 = handshakeStarted.removeValue(forKey: id) else { return }
        handshakeLatencies.append(monotonicNow() - t0)
        established[id] = connection
        peakOpen = max(peakOpen, established.count)
    }
    func connectionClosed(connection: QUICConnection, reason: String) {
        let id = ObjectIdentifier(connection)
        if handshakeStarted.removeValue(forKey: id) != nil {
            failed[Self.key(reason), default: 0] += 1
        } else if established.removeValue(forKey: id) != nil, holding {
            lost[Self.key(reason), default: 0] += 1
        }
    }
    func response(_ head: HTTPResponseHead, stream: HTTPStream, connection: QUICConnection) {
        stream.setBodySink(fd: -1)
        requests.response(status: head.status, on: stream)
    }
    func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) {
        let t0 = requestStarted.removeValue(forKey: stream)
        _ = requests.closed(stream, errorCode: errorCode, request: t0 != nil)
        if let t0 { requestLatencies.append(monotonicNow() - t0) }
    }

    /// A reason as a counter key: the message as it is, cut at 160 characters ("closed" for a
    /// clean close).
    static func key(_ reason: String) -> String {
        reason.isEmpty ? "closed" : String(reason.prefix(160))
    }
}

/// A thread's measurements, merged into a `LoadResult` when every thread is done.
struct LoadShare: Sendable {
    var established = 0
    var failed: [String: Int] = [:]
    var lost: [String: Int] = [:]
    var peakOpen = 0
    var firstStart: Timestamp = .max
    var lastHandshake: Timestamp = 0
    var handshakeLatencies: [UInt64] = []
    var requestLatencies: [UInt64] = []
    var requests = 0
    var requestsFailed = 0
    var holdSeconds = 0.0
    var error: String?
}

extension STOQClient {
    /// Opens `plan.connections` connections to `url`'s node, holds them, then closes them, from
    /// `plan.threads` threads; reports handshake and request latency and every failure by reason.
    public static func load(_ url: STOQURL, plan: LoadPlan, trust: ClientTrust, datapath: ClientDatapath) throws(ClientError)
        -> LoadResult
    {
        let threads = max(1, min(plan.threads, plan.connections))
        let shares = Mutex([LoadShare?](repeating: nil, count: threads))
        let done = DispatchGroup()
        for i in 0..<threads {
            let n = plan.connections / threads + (i < plan.connections % threads ? 1 : 0)
            done.enter()
            let thread = Thread {
                let share: LoadShare
                do { share = try runShare(url, count: n, rate: plan.rate.map { $0 / Double(threads) }, plan: plan, trust: trust, datapath: datapath) } catch {
                    share = LoadShare(error: "\(error)")
                }
                shares.withLock { $0[i] = share }
                done.leave()
            }
            thread.name = "stoq-load-\(i)"
            thread.start()
        }
        done.wait()
        let all = shares.withLock { $0.compactMap { $0 } }
        if let e = all.first(where: { $0.error != nil })?.error { throw ClientError(.connect, e) }
        var r = LoadResult(
            connections: plan.connections, established: 0, failed: [:], lost: [:], peakOpen: 0, threads: threads, rampSeconds: 0,
            handshakesPerSecond: 0, handshakeP50Ms: 0, handshakeP99Ms: 0, holdSeconds: 0, requests: 0, requestsFailed: 0,
            requestP50Ms: 0, requestP99Ms: 0)
        var handshakes: [UInt64] = [], requests: [UInt64] = []
        var first: Timestamp = .max, last: Timestamp = 0
        for s in all {
            r.established += s.established
            r.failed.merge(s.failed, uniquingKeysWith: +)
            r.lost.merge(s.lost, uniquingKeysWith: +)
            r.peakOpen += s.peakOpen
            r.requests += s.requests
            r.requestsFailed += s.requestsFailed
            r.holdSeconds = max(r.holdSeconds, s.holdSeconds)
            handshakes += s.handshakeLatencies
            requests += s.requestLatencies
            first = min(first, s.firstStart)
            last = max(last, s.lastHandshake)
        }
        if last > first {
            r.rampSeconds = Double(last - first) / 1e9
            r.handshakesPerSecond = Double(r.established) / r.rampSeconds
        }
        handshakes.sort()
        requests.sort()
        (r.handshakeP50Ms, r.handshakeP99Ms) = (percentileMs(sorted: handshakes, 0.5), percentileMs(sorted: handshakes, 0.99))
        (r.requestP50Ms, r.requestP99Ms) = (percentileMs(sorted: requests, 0.5), percentileMs(sorted: requests, 0.99))
        return r
    }

    /// One thread: its socket, endpoint and share of the connections, through all three phases.
    private static func runShare(
        _ url: STOQURL, count: Int, rate: Double?, plan: LoadPlan, trust: ClientTrust, datapath: ClientDatapath
    ) throws(ClientError) -> LoadShare {
        let app = LoadApp()
        let rig = try ClientRig(
            trust: trust, datapath: datapath, application: app, handshakeTimeout: plan.handshakeTimeout, keepAlive: UInt64(plan.keepAlive * 1e9))
        defer { rig.queue.close() }
        let endpoint = rig.endpoint, worker = rig.worker
        // Handshakes are started between turns: a turn must not sleep past the next one due.
        worker.idleWait = 1_000_000
        let source = IPv6Endpoint(address: sourceAddress(toward: url.endpoint), port: rig.queue.localEndpoint.port)
        var share = LoadShare()
        var started = 0
        var conns: [QUICConnection] = []
        conns.reserveCapacity(count)

        // Ramp: start handshakes on schedule until all have ended one way or the other.
        let t0 = monotonicNow()
        share.firstStart = t0
        do {
            try worker.run(timeout: UInt64.max / 2) {
                let now = monotonicNow()
                let due = rate.map { min(count, Int(Double(now - t0) / 1e9 * $0) + 1) } ?? count
                var room = rate == nil ? plan.maxHandshakesInFlight - app.handshakeStarted.count : 256
                while started < due && room > 0 {
                    do {
                        let c = try endpoint.connect(to: url.endpoint, from: source, serverName: url.host, now: now)
                        app.handshakeStarted[ObjectIdentifier(c)] = now
                        conns.append(c)
                    } catch {
                        share.failed["cannot start: \(error)", default: 0] += 1
                    }
                    started += 1
                    room -= 1
                }
                return started == count && app.handshakeStarted.isEmpty
            }
        } catch { throw ClientError(.connect, "\(error)") }
        share.lastHandshake = monotonicNow()

        // Hold: every established connection stays open, idle or asking on schedule.
        app.holding = true
        let holdStart = monotonicNow()
        let holdEnd = holdStart + UInt64(plan.hold * 1e9), grace = UInt64(max(plan.interval, 10) * 1e9)
        var nextRound = holdStart
        do {
            try worker.run(timeout: UInt64.max / 2) {
                let now = monotonicNow()
                if plan.streams > 0 && now >= nextRound && now < holdEnd {
                    nextRound = now + UInt64(plan.interval * 1e9)
                    for c in app.established.values {
                        for _ in 0..<plan.streams {
                            let s: HTTPStream
                            do { s = try c.request(method: "GET", authority: url.authority, path: url.path) } catch {
                                app.requests.failUnopened("\(error)")
                                continue
                            }
                            app.requestStarted[s] = now
                        }
                    }
                }
                // Past the hold, the GETs still out get a grace of one interval (at least 10 s),
                // not forever: a peer that never answers, kept alive by the PINGs, hung the run.
                return now >= holdEnd && (app.requestStarted.isEmpty || now >= holdEnd + grace)
            }
        } catch { throw ClientError(.transfer, "\(error)") }
        // Unanswered when the grace ran out: failed (the close resets them).
        for s in app.requestStarted.keys { app.requests.giveUp(s, "unanswered at the hold's end and its grace") }
        app.requestStarted.removeAll()
        share.holdSeconds = Double(monotonicNow() - holdStart) / 1e9
        app.holding = false

        // Close: every connection, `plan.closeRate` a second (100,000 CONNECTION_CLOSEs at once
        // overflow the node's socket buffer, and each one lost leaves its connection to the idle
        // timeout), then wait briefly until the endpoint holds none.
        share.established = app.handshakeLatencies.count
        let closeStart = monotonicNow()
        var closed = 0
        _ = try? worker.run(timeout: UInt64(Double(conns.count) / plan.closeRate * 1e9) + 2_000_000_000) {
            let now = monotonicNow()
            let due = min(conns.count, Int(Double(now - closeStart) / 1e9 * plan.closeRate) + 1)
            while closed < due {
                if !conns[closed].isClosed { conns[closed].close(now: now) }
                closed += 1
            }
            return closed == conns.count && endpoint.connectionCount == 0
        }

        share.failed.merge(app.failed, uniquingKeysWith: +)
        share.lost = app.lost
        share.peakOpen = app.peakOpen
        share.handshakeLatencies = app.handshakeLatencies
        share.requestLatencies = app.requestLatencies
        share.requests = app.requestLatencies.count
        share.requestsFailed = app.requests.failed
        return share
    }
}
