import CSTOQSystem
import Foundation
import STOQCore
import STOQQUIC

/// Many client connections, one per upstream, on one endpoint and one socket, driven by the
/// thread that owns the pool: what the mesh service keeps to its neighbours and the edge
/// fetcher to the nodes it fetches through. Connecting never blocks the thread: requests for
/// an upstream whose handshake is still running wait in its queue, and a handshake that fails
/// or times out fails them.
///
/// Every request ends in exactly one `Done`: answered (`status` set), reset, or failed with the
/// reason (`failure`: the connection was lost, refused or timed out, or the caller dropped it).
package final class ConnectionPool {
    /// How one request ended.
    package struct Done: Sendable {
        package var tag: Int
        /// The response's status; nil when it never came.
        package var status: Int?
        /// The stream's HTTP/3 error code (`H3Error.noError` when it ended cleanly).
        package var errorCode: UInt64
        /// Body bytes received.
        package var received: UInt64
        /// The response's `Cache-Control: max-age` (seconds), if it had one.
        package var maxAge: Int64?
        /// Why the request failed without an answer (the connection's fate); nil otherwise.
        package var failure: String?
        /// The body's SHA-256, for a request submitted with `hash` that was answered 2xx.
        package var sha256: [UInt8]? = nil
        /// What became of the server's preferred address on the connection that answered
        /// ("none", "validating", "used", "failed"); nil when no stream was answered.
        package var preferredAddress: String? = nil
        /// errno of a failed write of the body where it was to go (0: none). EFBIG: the server
        /// sent more body than the request's limit (an error status's, `errorBodyLimit`), and
        /// the rest was refused (`errorCode` H3_EXCESSIVE_LOAD): the server's doing, which the
        /// caller names. Any other: this side's failure, named in `failure`, not the server's.
        package var sinkErrno: Int32 = 0
        /// What the trust's `identifyServer` said the answering server is ("" without one).
        package var peer = ""
        /// How the request's connection failed it, when it did (`failure` says more).
        package var connectionFailure: ConnectionFailure? = nil
        /// When its stream ended (monotonic nanoseconds), read as the datagram that ended it
        /// was handled; 0 for a request that failed without one. What a caller that does other
        /// work between drives times an answer by (the mesh's probe RTT).
        package var endedAt: UInt64 = 0
    }

    /// How a connection failed the requests it held: what a caller backs off on or counts,
    /// without reading `failure`'s words.
    package enum ConnectionFailure: Sendable, Equatable {
        /// Never connected: it could not be made, or nothing answered within `connectTimeout`.
        case unreachable
        /// Refused: closed before its handshake was confirmed, or by the peer with a TLS alert
        /// (a certificate either side would not take) or CONNECTION_REFUSED (its limits, its drain).
        case refused
        /// Lost after its handshake was confirmed, for another reason.
        case lost
        /// Dropped by this side (`drop`, `close`).
        case dropped

        /// How `c`, closed, failed: refused before its handshake was confirmed (the server had
        /// not taken this end's certificate yet: a client's handshake completes first) or by
        /// the peer with a TLS alert or CONNECTION_REFUSED, which may come after; else lost.
        init(closed c: QUICConnection) {
            self = c.isConfirmed && !c.wasRefusedByPeer ? .lost : .refused
        }
    }

    struct Request {
        var method: String
        var path: String
        var headers: [(String, String)]
        var body: BodyRegion?
        var sinkFD: Int32
        var limit: UInt64
        var tag: Int
        var keepErrors: Bool
        var hash: Bool
        /// Sent again once already, after a server going away rejected it.
        var resent = false
    }

    final class Upstream {
        let url: STOQURL
        let connection: QUICConnection
        let startedAt: Timestamp
        var pending: [Request] = []
        var streams: Set<Int> = []
        init(url: STOQURL, connection: QUICConnection, startedAt: Timestamp) {
            (self.url, self.connection, self.startedAt) = (url, connection, startedAt)
        }
    }

    final class App: QUICApplication {
        struct Sink { var fd: Int32; var limit: UInt64; var tag: Int; var keepErrors: Bool; var hash: Bool }
        var sinks: [HTTPStream: Sink] = [:]
        var heads: [HTTPStream: HTTPResponseHead] = [:]
        var done: [Done] = []
        var closed: [(QUICConnection, String)] = []
        var handshakes = 0

        func response(_ head: HTTPResponseHead, stream: HTTPStream, connection: QUICConnection) {
            let status = head.status
            heads[stream] = head
            let s = sinks[stream]
            let ok = status / 100 == 2
            let keep = ok || s?.keepErrors == true
            // An error body kept is read for its message only: its first bytes are kept, and
            // an endless one is refused there instead of filling the (often RAM-backed) file.
            // One discarded costs nothing and is read to its end, as before.
            let limit = keep && !ok ? min(s?.limit ?? .max, ConnectionPool.errorBodyLimit) : s?.limit ?? .max
            stream.setBodySink(fd: keep ? (s?.fd ?? -1) : -1, offset: 0, limit: limit, hash: s?.hash == true && ok)
        }

        func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) {
            guard let s = sinks.removeValue(forKey: stream) else { return }
            let head = heads.removeValue(forKey: stream)
            let sha256 = s.hash ? stream.bodySHA256() : nil
            // A body the sink could not write (a full disk) is short wherever it went: this
            // node's failure, said before any mismatch it causes is blamed on the server. A body
            // past its limit (EFBIG) is the server's, left to the caller, which knows the limit.
            let unwritten =
                stream.sinkErrno != 0 && stream.sinkErrno != EFBIG
                ? "writing the body failed after \(stream.bytesReceived) bytes received: \(String(cString: strerror(stream.sinkErrno)))" : nil
            // Cut unanswered by its connection's end (a peer that refuses this end's certificate
            // closes after the handshake completed here, and the streams end before the
            // connection is reported): the connection's failure is the request's.
            let cut = head == nil && connection.isClosed
            done.append(
                Done(
                    tag: s.tag, status: head?.status, errorCode: errorCode, received: stream.bytesReceived, maxAge: stream.maxAge,
                    failure: cut
                        ? "connection to \(connection.peer) lost: \(connection.closeReason.isEmpty ? "closed" : connection.closeReason)"
                        : errorCode == H3Error.noError ? unwritten ?? head?.bodyMismatch(sha256: sha256) : nil,
                    sha256: sha256, preferredAddress: connection.preferredAddress.rawValue, sinkErrno: stream.sinkErrno,
                    peer: connection.peerIdentity, connectionFailure: cut ? ConnectionFailure(closed: connection) : nil,
                    endedAt: monotonicNow()))
        }

        func handshakeCompleted(connection: QUICConnection) { handshakes += 1 }

        func connectionClosed(connection: QUICConnection, reason: String) {
            closed.append((connection, reason.isEmpty ? "connection closed by the peer" : reason))
        }
    }

    /// The most of an error response's body (a status other than 2xx) that is kept, with
    /// `keepErrors`: enough for its message. The rest is refused as a body past its limit is
    /// (`Done.sinkErrno` EFBIG), so an upstream's endless 404 costs this node 4 KiB.
    package static let errorBodyLimit: UInt64 = 4096

    /// How long a handshake may take before its requests fail.
    package let connectTimeout: UInt64
    let app = App()
    package let rig: ClientRig
    private var upstreams: [IPv6Endpoint: Upstream] = [:]
    /// Connections whose server is going away (its GOAWAY came): new requests to it go on a
    /// new connection, in `upstreams`; these finish what they carry, then close.
    private var retiring: [Upstream] = []
    /// Where each request in flight is: its upstream and, once sent, its stream; and the
    /// request, to send again if a server going away rejects it.
    private var requests: [Int: (upstream: Upstream, stream: HTTPStream?, request: Request)] = [:]
    /// Wakes the pool's `drive` from another thread.
    package let waker: Waker
    private var seenHandshakes = 0
    /// What new handshakes present and verify with (`retrust` replaces it).
    private var trust: ClientTrust
    /// A renewal whose files have not loaded yet, when they were last tried, and how often.
    private var credentialsDue = false
    private var lastCredentialsTry: UInt64 = 0
    private var credentialsTries = 0
    /// Told why a renewal's files do not load, once per renewal (they are read again each
    /// second until they do).
    package var credentialsFailed: ((ClientError) -> Void)?
    /// Where sessions are resumed from and kept (per server), if anywhere: offered when a
    /// connection starts, the server's latest kept when the pool closes.
    package var sessionCache: SessionCache?
    /// With `sessionCache`: send GETs and HEADs in 0-RTT to servers whose parameters were kept.
    package var earlyData = true
    /// After a handshake to an upstream timed out, requests to it fail at once, with that
    /// reason, for this long (nanoseconds; 0: each waits out its own connect timeout). An
    /// edge whose origin is down answers its clients' misses in turn, not 3 s each.
    package var holdUnreachable: UInt64 = 0
    private var unreachable: [IPv6Endpoint: (since: UInt64, why: String)] = [:]
    /// Handshakes completed, and how many of them resumed a session.
    package var handshakes: Int { app.handshakes }
    package private(set) var resumed = 0
    /// Connections whose requests went in 0-RTT, by what the server made of them.
    package private(set) var earlyAccepted = 0
    package private(set) var earlyRejected = 0

    /// A pool whose connections present `trust`'s client certificate and verify upstreams
    /// against it, on a queue `datapath` opens.
    /// `keepAlive` as `QUICSettings.keepAlive` (0: a connection waiting for nothing stays silent
    /// and idles out); `handshakeTimeout` in seconds as `QUICSettings.handshakeTimeout` (nil: its
    /// default). With `updatesKeys`, each connection starts one key update once confirmed.
    package init(
        trust: ClientTrust, datapath: ClientDatapath, connectTimeout: UInt64 = 3_000_000_000, handshakeTimeout: Double? = nil,
        keepAlive: UInt64 = 0, updatesKeys: Bool = false
    ) throws(ClientError) {
        self.connectTimeout = connectTimeout
        self.trust = trust
        rig = try ClientRig(
            trust: trust, datapath: datapath, application: app, handshakeTimeout: handshakeTimeout, keepAlive: keepAlive,
            updatesKeys: updatesKeys)
        waker = Waker()
        if waker.fd >= 0 { rig.queue.setWakeup(fileDescriptor: waker.fd) }
    }

    /// An eventfd the pool's datapath also waits on; it lives as long as anyone holds it.
    package final class Waker: Sendable {
        let fd = stoq_eventfd()
        deinit { if fd >= 0 { Glibc.close(fd) } }

        /// Makes a `drive` waiting on another thread return now (new work). Any thread.
        package func wake() {
            guard fd >= 0 else { return }
            var one: UInt64 = 1
            _ = Glibc.write(fd, &one, 8)
        }
    }

    /// Verifies upstreams with `trust` from now on (a reload changed the node's): new
    /// handshakes use it, and every connection made under the old one is closed, its requests
    /// in flight failing with the reason. Throws, changing nothing, when `trust`'s files do not
    /// load. The pool's thread.
    package func retrust(_ trust: ClientTrust) throws(ClientError) {
        rig.endpoint.replaceCredentials(try ClientRig.credentials(trust))
        self.trust = trust
        credentialsDue = false
        for ep in Array(upstreams.keys) { drop(ep, reason: "the node's trust changed") }
    }

    /// The node's certificate was renewed: from the next handshake on, connections present
    /// it, its files read again now (and at each `drive` a second apart while they do not
    /// load: a file being rewritten, no descriptors left; `credentialsFailed` hears why once).
    /// Connections made keep theirs. The pool's thread.
    package func renewCredentials() {
        credentialsDue = true
        credentialsTries = 0
        // Now, before anything this turn connects: a connection made with the old certificate
        // would present it for as long as it lives.
        readRenewedCredentials(now: monotonicNow())
    }

    private func readRenewedCredentials(now: UInt64) {
        guard credentialsDue, credentialsTries == 0 || now &- lastCredentialsTry >= 1_000_000_000 else { return }
        lastCredentialsTry = now
        credentialsTries += 1
        do {
            rig.endpoint.replaceCredentials(try ClientRig.credentials(trust))
            credentialsDue = false
        } catch {
            if credentialsTries == 1 { credentialsFailed?(error) }
        }
    }

    /// Same as `waker.wake()`.
    package func wake() { waker.wake() }

    /// Sends a request to `url`'s upstream, connecting first if needed; its body goes to
    /// `sinkFD` (-1: discarded; error bodies only with `keepErrors`, at most `errorBodyLimit`
    /// of each), hashed with `hash`. A body longer than `limit` is not written past it: the
    /// stream is refused and its `Done` says `sinkErrno` EFBIG. Its end comes back from `drive`
    /// as a `Done` carrying `tag` (unique among the requests in flight).
    package func submit(
        to url: STOQURL, _ method: String, _ path: String, headers: [(String, String)] = [], body: BodyRegion? = nil,
        sinkFD: Int32 = -1, limit: UInt64 = .max, tag: Int, keepErrors: Bool = false, hash: Bool = false
    ) {
        place(
            Request(
                method: method, path: path, headers: headers, body: body, sinkFD: sinkFD, limit: limit, tag: tag,
                keepErrors: keepErrors, hash: hash), to: url)
    }

    /// Sends `request` on `url`'s connection, or queues it there, connecting first if there is
    /// none or its server is going away.
    private func place(_ request: Request, to url: STOQURL) {
        let tag = request.tag
        if let u = upstreams[url.endpoint], u.connection.peerIsGoingAway { retire(u) }
        let up: Upstream
        if let u = upstreams[url.endpoint] {
            up = u
        } else {
            let now = monotonicNow()
            if let down = unreachable[url.endpoint] {
                if now &- down.since < holdUnreachable {
                    let ago = (now &- down.since) / 1_000_000
                    app.done.append(
                        Done(
                            tag: tag, status: nil, errorCode: 0, received: 0,
                            failure: "\(down.why) (\(ago) ms ago; tried again \(holdUnreachable / 1_000_000) ms after)",
                            connectionFailure: .unreachable))
                    return
                }
                unreachable[url.endpoint] = nil
            }
            do {
                let source = IPv6Endpoint(address: STOQClient.sourceAddress(toward: url.endpoint), port: rig.queue.localEndpoint.port)
                let c = try rig.endpoint.connect(to: url.endpoint, from: source, serverName: url.host, now: now)
                // With a kept session, GETs and HEADs go at once, in 0-RTT; the rest waits.
                _ = sessionCache?.offer(for: url, to: c, early: earlyData)
                up = Upstream(url: url, connection: c, startedAt: now)
                upstreams[url.endpoint] = up
            } catch {
                app.done.append(
                    Done(
                        tag: tag, status: nil, errorCode: 0, received: 0, failure: "cannot connect to \(url.endpoint): \(error)",
                        connectionFailure: .unreachable))
                return
            }
        }
        requests[tag] = (up, nil, request)
        if up.connection.isEstablished || canSendEarly(request, on: up) {
            send(request, on: up)
        } else {
            up.pending.append(request)
        }
    }

    /// Whether `r` may go before the handshake completes, in 0-RTT: a safe method with no
    /// body, on a connection that resumed with the server's kept parameters, behind nothing
    /// that waits (requests go in the order submitted).
    private func canSendEarly(_ r: Request, on up: Upstream) -> Bool {
        up.connection.canSendEarly && up.pending.isEmpty && EarlyData.allows(r.method) && r.body == nil
    }

    private func send(_ r: Request, on up: Upstream) {
        // Past the server's stream limit a request waits for its MAX_STREAMS (settle sends
        // it then), as a browser's would; failing it lost every URL past the limit.
        if up.connection.bidiStreamsLeft == 0 {
            up.pending.append(r)
            return
        }
        do {
            let stream = try up.connection.request(
                method: r.method, authority: up.url.authority, path: r.path,
                headers: r.headers + [("content-length", "\(r.body?.count ?? 0)")], body: r.body)
            app.sinks[stream] = App.Sink(fd: r.sinkFD, limit: r.limit, tag: r.tag, keepErrors: r.keepErrors, hash: r.hash)
            requests[r.tag] = (up, stream, r)
            up.streams.insert(r.tag)
        } catch {
            requests[r.tag] = nil
            app.done.append(Done(tag: r.tag, status: nil, errorCode: 0, received: 0, failure: "\(r.method) \(r.path): \(error)"))
        }
    }

    /// Body bytes received so far for request `tag` (0 before its response).
    package func received(_ tag: Int) -> UInt64 {
        requests[tag]?.stream?.bytesReceived ?? 0
    }

    /// Abandons request `tag` (resets its stream); no `Done` comes for it. Nothing more is
    /// written to its sink: the caller may close that file as soon as this returns.
    package func cancel(_ tag: Int) {
        guard let r = requests.removeValue(forKey: tag) else { return }
        let up = r.upstream
        up.pending.removeAll { $0.tag == tag }
        up.streams.remove(tag)
        if let s = r.stream {
            app.sinks[s] = nil
            app.heads[s] = nil
            up.connection.reset(s, errorCode: H3Error.requestCancelled)
        }
    }

    /// Whether the connection to `endpoint` is established.
    package func isConnected(_ endpoint: IPv6Endpoint) -> Bool { upstreams[endpoint]?.connection.isEstablished == true }

    /// The established connection to `endpoint`'s RTT estimate (nanoseconds), if there is one.
    package func rtt(_ endpoint: IPv6Endpoint) -> (srtt: UInt64, rttvar: UInt64)? {
        guard let c = upstreams[endpoint]?.connection, c.isEstablished else { return nil }
        let s = c.stats
        return (s.smoothed_rtt_ns, s.rttvar_ns)
    }

    /// Closes the connection to `endpoint`, failing its requests with `reason`. Their sinks
    /// get nothing more (each stream is reset first): their files may be closed at once.
    package func drop(_ endpoint: IPv6Endpoint, reason: String) {
        var ups = retiring.filter { $0.url.endpoint == endpoint }
        retiring.removeAll { $0.url.endpoint == endpoint }
        if let up = upstreams.removeValue(forKey: endpoint) { ups.append(up) }
        for up in ups {
            for tag in up.streams {
                if let s = requests[tag]?.stream { up.connection.reset(s, errorCode: H3Error.requestCancelled) }
            }
            fail(up, reason, .dropped)
            up.connection.close(now: monotonicNow())
        }
    }

    /// Takes `up`, whose server is going away, out of `upstreams`: what it carries finishes
    /// there (it closes when nothing is left); what waited to be sent goes on a new connection.
    private func retire(_ up: Upstream) {
        upstreams[up.url.endpoint] = nil
        retiring.append(up)
        let waiting = up.pending
        up.pending.removeAll()
        for r in waiting { place(r, to: up.url) }
    }

    private func fail(_ up: Upstream, _ reason: String, _ kind: ConnectionFailure) {
        for r in up.pending {
            requests[r.tag] = nil
            app.done.append(Done(tag: r.tag, status: nil, errorCode: 0, received: 0, failure: reason, connectionFailure: kind))
        }
        up.pending.removeAll()
        for tag in up.streams {
            guard let r = requests.removeValue(forKey: tag) else { continue }
            if let s = r.stream {
                app.sinks[s] = nil
                app.heads[s] = nil
            }
            app.done.append(Done(tag: tag, status: nil, errorCode: 0, received: 0, failure: reason, connectionFailure: kind))
        }
        up.streams.removeAll()
    }

    /// Drives every connection for at most `nanoseconds` (less when a request ends, a
    /// handshake completes, a connection is lost or `wake` is called), and returns the
    /// requests that ended. Throws only when the datapath fails.
    package func drive(forNanoseconds nanoseconds: UInt64) throws(ClientError) -> [Done] {
        readRenewedCredentials(now: monotonicNow())
        rig.worker.idleWait = nanoseconds
        do { try rig.worker.turn() } catch { throw ClientError(.transfer, "\(error)") }
        rig.tend(now: monotonicNow())
        settle()
        let out = app.done
        app.done.removeAll(keepingCapacity: true)
        // A request that ended on its stream still names its upstream; one failed with its
        // connection was already taken off both.
        var ended: [Done] = []
        for d in out {
            guard let r = requests.removeValue(forKey: d.tag) else {
                ended.append(d)
                continue
            }
            r.upstream.streams.remove(d.tag)
            // Rejected unprocessed by a server going away (its GOAWAY named an earlier stream):
            // sent again, once, on a new connection.
            if d.status == nil && d.errorCode == H3Error.requestRejected && r.upstream.connection.peerIsGoingAway
                && !r.request.resent
            {
                var again = r.request
                again.resent = true
                place(again, to: r.upstream.url)
                continue
            }
            ended.append(d)
        }
        return ended
    }

    /// Sends what waited for a handshake, fails what a lost or slow connection held.
    private func settle() {
        for (c, reason) in app.closed {
            if let (ep, up) = upstreams.first(where: { $0.value.connection === c }) {
                upstreams[ep] = nil
                fail(up, "connection to \(ep) lost: \(reason)", ConnectionFailure(closed: c))
            } else if let i = retiring.firstIndex(where: { $0.connection === c }) {
                let up = retiring.remove(at: i)
                fail(up, "connection to \(up.url.endpoint) lost: \(reason)", ConnectionFailure(closed: c))
            }
        }
        app.closed.removeAll()
        let now = monotonicNow()
        for up in upstreams.values where up.connection.peerIsGoingAway { retire(up) }
        // A connection going away closes once what it carried has ended.
        retiring.removeAll { up in
            guard up.streams.isEmpty else { return false }
            up.connection.close(now: now)
            return true
        }
        for (ep, up) in upstreams {
            if up.connection.isEstablished {
                // As many as the server's stream limit takes now; the rest wait for MAX_STREAMS
                // without being looked at again each turn.
                let room = Int(min(UInt64(up.pending.count), up.connection.bidiStreamsLeft))
                if room > 0 {
                    let ready = up.pending.prefix(room)
                    up.pending.removeFirst(room)
                    for r in ready { send(r, on: up) }
                }
            } else if now &- up.startedAt > connectTimeout {
                upstreams[ep] = nil
                let why = "cannot connect to \(ep): unreachable, no handshake within \(connectTimeout / 1_000_000) ms"
                if holdUnreachable > 0 { unreachable[ep] = (now, why) }
                fail(up, why, .unreachable)
                up.connection.close(now: now)
            }
        }
    }

    /// Closes every connection (failing what is in flight) and the socket, keeping each
    /// server's session first when there is a cache.
    package func close() {
        for up in upstreams.values where up.connection.isEstablished {
            if up.connection.isResumed { resumed += 1 }
            switch up.connection.earlyData {
            case .accepted: earlyAccepted += 1
            case .rejected: earlyRejected += 1
            case .none: break
            }
            sessionCache?.keep(from: up.connection, for: up.url)
        }
        for ep in Set(upstreams.keys).union(retiring.map(\.url.endpoint)) { drop(ep, reason: "the pool is closing") }
        _ = try? rig.worker.run(timeout: 200_000_000) { rig.endpoint.connectionCount == 0 }
        rig.queue.close()
    }
}
