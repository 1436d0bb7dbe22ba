import CSTOQSystem
import Foundation
import Logging
import STOQChunking
import STOQCore
import STOQQUIC
import STOQStore
import STOQTracing
import STOQTransfer
import Tracing

/// The edge cache's fetcher: the loop on the thread `EdgeCache.start` starts, and the state
/// only that thread touches. It takes the fetches workers asked for (`EdgeCache.fetch`), sends
/// them upstream over one `ConnectionPool` (up to `EdgeCache.maxInFlight` at once), and as
/// their requests end, stall or come late it stores what came, moves a fetch on to its next
/// attempt, hedges it, or gives up; each fetch ends in `EdgeCache.complete`. What it shares
/// with the workers (jobs, counters, the policy, manifests) is the cache's, under its lock.
final class EdgeFetcher {
    typealias Key = EdgeCache.Key
    typealias FetchKey = EdgeCache.FetchKey
    typealias Failure = EdgeCache.Failure

    /// One fetch in flight: what it is for, where its body goes, and the attempts made so far.
    private struct Active {
        var key: Key
        var hint: RelayHint?
        var revalidate = false
        var fetchKey: FetchKey { FetchKey(key, hint, revalidate: revalidate) }
        var fd: Int32
        var started: UInt64
        var attempt: UpstreamAttempt
        var tried: [UpstreamAttempt]
        /// Body bytes seen at the last check, and when they last grew.
        var seen: UInt64 = 0
        var progressAt: UInt64
        /// Whether every attempt so far answered 404, and the last failure's reason.
        var allNotFound = true
        var lastFailure: String?
        /// When the current attempt was sent.
        var submittedAt: UInt64 = 0
        /// A hedge: a second request for the same key on another route, started because the
        /// first was late (`FetchUpstream.hedgeDelay`). The two name each other; the first to
        /// deliver wins and the other is cancelled, and one that fails leaves the other alone.
        var partner: Int?
        var hedge = false
        /// Asks for the object whole: the upstream had no manifest of this name.
        var plain = false
        /// A chunk cut here from a plain object: asked for as this byte range of that object.
        var source: PlainSource?
        /// Attempts whose range came back with other bytes, or past the object's end (the object
        /// changed there), and attempts that failed for any reason but a 404.
        var changed = 0
        var failures = 0
        /// The trace of the request that started the fetch, and the current attempt's span.
        var trace: ServiceContext?
        var span: (any Span)?

        /// Ends the current attempt's span: answered with `status`, or failed with `failure`.
        func endSpan(status: Int = 0, errorCode: UInt64? = nil, failure: String? = nil) {
            if let span { RequestTracer.end(span, status: status, errorCode: errorCode, failure: failure) }
        }
    }

    private let cache: EdgeCache
    /// The connections to the upstreams: opened for the first fetch, closed after a while idle.
    private var pool: ConnectionPool?
    /// The fetches in flight, by the tag of their current request.
    private var active: [Int: Active] = [:]
    /// Fetches taken from the cache that wait for a free slot.
    private var backlog: [EdgeCache.Job] = []
    private var nextTag = 0
    private var lastPersist: UInt64
    private var lastUse: UInt64
    // Failover notices, at most one a second per upstream: a cut link fails every chunk in
    // flight through it at once (14 lines in one second for one cut); the rest are counted
    // (stoq_edge_failovers_total) and summed into the next notice.
    private var failoverNotices: [String: (at: UInt64, held: Int)] = [:]
    private var lastCheck: UInt64
    private var offsets = PlainOffsets()
    /// Stands in for an attempt never made (a fetch with no attempt at all).
    private let placeholderURL = try! STOQURL("https://[::1]:1/")

    private var upstream: FetchUpstream { cache.upstream }
    private var logger: Logger { cache.logger }

    /// A fetcher for `cache`, made on the thread that runs it.
    init(cache: EdgeCache) {
        self.cache = cache
        lastPersist = DispatchTime.now().uptimeNanoseconds
        lastUse = lastPersist
        lastCheck = lastPersist
    }

    /// Fetches until the cache stops, then fails what is still in flight.
    func run() {
        while !cache.stopFlag.load(ordering: .acquiring) {
            let now = DispatchTime.now().uptimeNanoseconds
            if now - lastPersist > 2_000_000_000 { cache.persist(); lastPersist = now }
            let retrusting = takeRequests()
            if backlog.isEmpty && active.isEmpty {
                idle(now)
                continue
            }
            lastUse = now
            if pool == nil { openPool() }
            guard let p = pool else { continue }
            startFetches(p, retrusting: retrusting)
            guard let done = drive(p) else { continue }
            handleCompletions(done, p)
            checkStalls(p)
        }
        stopAll()
    }

    // MARK: - The loop's steps

    /// Takes what was asked of the fetcher since the last turn: new fetches into the backlog,
    /// a reload's trust (applied between fetches), a renewed certificate. Returns whether a
    /// reload's trust still waits for the fetches in flight to finish (no new one starts).
    private func takeRequests() -> Bool {
        let (jobs, fresh) = cache.takeJobs(idle: active.isEmpty)
        backlog += jobs
        if let fresh {
            // Between fetches: connections verified under the old trust go.
            do {
                try pool?.retrust(fresh)
                cache.currentTrust = fresh
            } catch {
                logger.error("edge: the new [trust] does not load (\(error)); upstreams are still verified with the old one")
            }
        }
        // A renewal: the pool reads the files again for its next handshakes (a new pool
        // reads them anyway).
        if cache.takeRenewal() {
            pool?.renewCredentials()
        }
        return cache.retrustPending
    }

    /// Nothing to fetch: drives the pool's connections, or sleeps until woken.
    private func idle(_ now: UInt64) {
        if let p = pool {
            // Idle: keep the connections' timers going; close them after a while.
            if now - lastUse > 10_000_000_000 { p.close(); pool = nil; return }
            do { _ = try p.drive(forNanoseconds: 5_000_000) } catch { p.close(); pool = nil }
        } else {
            _ = cache.wake.wait(timeout: .now() + .milliseconds(500))
        }
    }

    /// Opens the pool; if it cannot, fails the backlog and waits a while.
    private func openPool() {
        do {
            pool = try ConnectionPool(
                trust: cache.currentTrust, datapath: cache.datapath, connectTimeout: UInt64(EdgeCache.connectTimeout * 1e9))
            pool?.holdUnreachable = UInt64(EdgeCache.holdUnreachable * 1e9)
            pool?.credentialsFailed = { [logger] error in
                logger.error("edge: the renewed certificate does not load (\(error)); new upstream connections present the old one until it does")
            }
        } catch {
            let why = "edge: cannot open a socket for \(upstream): \(error)"
            logger.error("\(why)")
            for j in backlog { cache.originFailed(FetchKey(j.key, j.hint, revalidate: j.revalidate), Failure(status: 502, reason: why)) }
            backlog.removeAll()
            _ = cache.wake.wait(timeout: .now() + .milliseconds(500))
            return
        }
        cache.onPoolWake = { [weak p = pool] in p?.wake() }
    }

    /// Starts fetches from the backlog while there is room in flight and no reload's trust waits.
    private func startFetches(_ p: ConnectionPool, retrusting: Bool) {
        while !backlog.isEmpty && active.count < EdgeCache.maxInFlight && !retrusting {
            start(backlog.removeFirst(), p)
        }
    }

    /// Sends `job` to its first attempt (or gives up on it: there is none).
    private func start(_ job: EdgeCache.Job, _ p: ConnectionPool) {
        let (key, hint, trace, revalidate) = job
        let fd = stoq_memfd("stoq-edge-fetch")
        guard fd >= 0 else {
            cache.originFailed(
                FetchKey(key, hint, revalidate: revalidate), Failure(status: 500, reason: "edge: memfd_create: \(String(cString: strerror(errno)))"))
            return
        }
        let t = DispatchTime.now().uptimeNanoseconds
        var source: PlainSource?
        if case .chunk(let id) = key, hint?.whole ?? true { source = cache.plainSource(id, &offsets) }
        guard let first = attempts(for: key, hint, source).first else {
            giveUp(
                Active(
                    key: key, hint: hint, revalidate: revalidate, fd: fd, started: t,
                    attempt: UpstreamAttempt(url: placeholderURL, path: "", label: ""), tried: [], progressAt: t, trace: trace))
            return
        }
        var a = Active(
            key: key, hint: hint, revalidate: revalidate, fd: fd, started: t, attempt: first, tried: [first], progressAt: t, trace: trace)
        a.source = source
        if case .manifest(let name) = key, a.fetchKey.whole, let whole = first.whole(name),
            let e = cache.peekManifest(name), e.plain, let cut = try? Manifest(decoding: e.bytes)
        {
            // Cut here from a plain object before: straight to the object, unless unchanged.
            askForPlain(a, whole, p, unless: cut.etag)
        } else {
            submit(a, p)
        }
    }

    /// Drives the pool for a millisecond: the requests that ended, or nil when the datapath
    /// failed (then so did every fetch in flight, and the pool is closed).
    private func drive(_ p: ConnectionPool) -> [ConnectionPool.Done]? {
        do { return try p.drive(forNanoseconds: 1_000_000) } catch {
            logger.error("edge: the fetcher's datapath failed: \(error)")
            for (_, a) in active {
                a.endSpan(failure: "\(error)")
                close(a.fd)
                upstream.cancelled(EdgeCache.resource(a.key), via: a.attempt)
                cache.originFailed(a.fetchKey, Failure(status: 502, reason: "edge: \(error)"))
            }
            active.removeAll()
            p.close()
            pool = nil
            return nil
        }
    }

    /// The requests that ended (`done`), the oldest fetch's first.
    private func handleCompletions(_ done: [ConnectionPool.Done], _ p: ConnectionPool) {
        // Oldest first, like stalls below: a relay that lost its link fails them all at once.
        for d in done.sorted(by: { (active[$0.tag]?.started ?? 0) < (active[$1.tag]?.started ?? 0) }) {
            handleCompletion(d, p)
        }
    }

    /// A request ended (`d`): its fetch is delivered, moves on to another attempt (or to the
    /// object whole), or fails.
    private func handleCompletion(_ d: ConnectionPool.Done, _ p: ConnectionPool) {
        guard var a = active.removeValue(forKey: d.tag) else { return }
        a.endSpan(status: d.status ?? 0, errorCode: d.errorCode, failure: d.failure)
        if d.sinkErrno == EFBIG, let status = d.status, status / 100 == 2 {
            // More than a chunk or a manifest can be: refused as it came, so no more than the
            // limit was held. The upstream's doing (an error status's body is only cut short).
            failed(a, "edge: \(a.attempt.label) sent more than \(bodyLimit(a)) bytes for \(tooLarge(a.key))", notFound: false, p)
            return
        }
        if d.sinkErrno != 0, let failure = d.failure {
            // This node could not keep what came (its fetch file's filesystem is full):
            // not the upstream's doing, so neither a verification failure nor a failover.
            let why = "edge: fetching \(a.attempt.path) from \(a.attempt.label): \(failure)"
            logger.error("\(why)")
            close(a.fd)
            upstream.cancelled(EdgeCache.resource(a.key), via: a.attempt)
            cache.complete(a.fetchKey, Failure(status: 503, reason: why))
            return
        }
        if let failure = d.failure {
            if d.status != nil {  // answered, but the body is not what its ETag names
                cache.count(\.verificationFailures)
                logger.error("edge cache: refused \(a.attempt.path) from \(a.attempt.label): \(failure)")
            }
            failed(a, "edge: \(a.attempt.label) sent \(a.attempt.path): \(failure)", notFound: false, p)
            return
        }
        guard let status = d.status else {
            failed(a, "\(a.attempt.label) reset \(a.attempt.path) (HTTP/3 error 0x\(String(d.errorCode, radix: 16)))", notFound: false, p)
            return
        }
        // A 404 to a request for an object whole is a search's miss, not a fetch.
        if a.plain && (status == 200 || status == 206 || status == 304) { cache.count(\.originObjectFetches) }
        if status == 304, a.plain, case .manifest(let name) = a.key {
            if notModified(a, name, maxAge: d.maxAge) { delivered(a, p) } else { askForPlain(a, a.attempt, p) }
            return
        }
        if status == 404, !a.plain, a.fetchKey.whole, case .manifest(let name) = a.key, let whole = a.attempt.whole(name) {
            askForPlain(a, whole, p)
            return
        }
        if status == 404 { failed(a, "", notFound: true, p); return }
        if let why = finish(&a, d, status: status) { failed(a, why, notFound: false, p); return }
        delivered(a, p)
    }

    /// Every 20 ms, the fetches in flight, oldest first: too large to cache, late (hedged), or
    /// stalled (moved on).
    private func checkStalls(_ p: ConnectionPool) {
        // Stalls: a link the upstream knows is down, or no byte for `stallTimeout`.
        let t = DispatchTime.now().uptimeNanoseconds
        guard t - lastCheck > 20_000_000 else { return }
        lastCheck = t
        var hedges = active.values.reduce(0) { $0 + ($1.hedge ? 1 : 0) }
        // Oldest first: when a link dies every fetch over it moves at once, and the next
        // route serves them in the order they arrive, so the chunk a reader waits on goes first.
        for tag in active.sorted(by: { $0.value.started < $1.value.started }).map(\.key) {
            // As it is now: a partner's fate above may have settled it, or changed it (its
            // partner gone, the attempts it tried merged in), which a copy taken before the
            // pass would undo when written back.
            guard let a = active[tag] else { continue }
            check(tag, a, at: t, hedges: &hedges, p)
        }
    }

    /// Checks fetch `a` (request `tag`) at `t`; `hedges`: the hedges in flight.
    private func check(_ tag: Int, _ a: Active, at t: UInt64, hedges: inout Int, _ p: ConnectionPool) {
        var a = a
        let got = p.received(tag)
        if a.plain && got > cache.chunkCapacity {
            // Could never be cached: stop the download rather than fill the disk.
            p.cancel(tag)
            active[tag] = nil
            a.endSpan(failure: "larger than the cache")
            close(a.fd)
            upstream.cancelled(EdgeCache.resource(a.key), via: a.attempt)
            cache.complete(
                a.fetchKey,
                Failure(
                    status: 502,
                    reason:
                        "edge: \(a.attempt.path) from \(a.attempt.label) is a plain object of more than \(cache.chunkCapacity) bytes, more than this edge's cache holds: not served"
                ))
            return
        }
        let seconds = cache.fetchDeadline / 1_000_000_000, took = t - a.started
        if took > cache.fetchDeadline, Double(got) < Double(EdgeCache.slowestFetchRate) * Double(took) / 1e9 {
            // An upstream that sends a byte every few seconds never stalls, and would hold
            // every request joined to the fetch for ever (a plain object's for as long as the
            // cache's share takes at that pace: days); one that keeps the least rate goes on.
            p.cancel(tag)
            active[tag] = nil
            let rate = UInt64(Double(got) * 1e9 / Double(took))
            let why =
                got == 0
                ? "edge: \(upstream) did not answer \(path(a.key)) within \(seconds) s"
                : "edge: \(a.attempt.label) was still sending \(a.attempt.path) after \(seconds) s at \(rate) bytes/s, "
                    + "under the \(EdgeCache.slowestFetchRate) a fetch must keep to go on (\(got) bytes received)"
            a.endSpan(failure: why)
            if a.partner != nil { return failed(a, why, notFound: false, p) }
            upstream.failed(EdgeCache.resource(a.key), via: a.attempt, notFound: false)
            a.allNotFound = false
            a.lastFailure = why
            return giveUp(a)
        }
        if got != a.seen { a.seen = got; a.progressAt = t; active[tag] = a; return }
        let down = upstream.isDown(a.attempt.url)
        let quiet = allowedQuiet(a, got: got)
        guard down || t - a.progressAt > quiet else {
            // Late but not stalled: hedge on another route, within the budget.
            hedgeIfLate(tag, a, at: t, got: got, hedges: &hedges, p)
            return
        }
        p.cancel(tag)
        active[tag] = nil
        let why = down ? "the link to \(a.attempt.url) is down" : "no byte for \(quiet / 1_000_000) ms"
        a.endSpan(failure: why)
        if a.partner != nil {
            failed(a, why, notFound: false, p)
        } else if t - a.started > cache.fetchDeadline {
            upstream.failed(EdgeCache.resource(a.key), via: a.attempt, notFound: false)
            a.allNotFound = false
            a.lastFailure = "edge: \(upstream) did not answer \(path(a.key)) within \(seconds) s"
            giveUp(a)
        } else {
            retry(a, why, notFound: false, p)
        }
    }

    /// How long `a`, which has received `got` bytes, may go without a byte before it stalls.
    private func allowedQuiet(_ a: Active, got: UInt64) -> UInt64 {
        // A relay sends a plain object's first byte (or its range's) only once it has
        // fetched and cut it whole: that wait is bounded by `requestTimeout`, not a
        // stall. A node (origin or holder) sends a plain file's manifest once it has
        // cut the file; an origin is given only the stall when its expired manifest
        // can be served instead, unless asked past its copy (`revalidate`: the copy
        // lists chunks the origin lacks, and it may be cutting again).
        var quiet = EdgeCache.stallTimeout
        if got == 0 {
            if a.attempt.holder != nil && (a.plain || a.source != nil) {
                quiet = EdgeCache.requestTimeout
            } else if !a.plain, a.source == nil, case .manifest(let name) = a.key,
                a.attempt.holder != nil || a.revalidate || cache.peekManifest(name) == nil
            {
                quiet = EdgeCache.manifestTimeout
            }
        }
        return quiet
    }

    /// Hedges fetch `a` (request `tag`, `got` bytes so far) on its next attempt if it is late
    /// and within the budget (`hedges` in flight).
    private func hedgeIfLate(_ tag: Int, _ a: Active, at t: UInt64, got: UInt64, hedges: inout Int, _ p: ConnectionPool) {
        var a = a
        if a.partner == nil, !a.hedge, !a.plain, a.source == nil, got == 0, hedges < max(2, active.count / 4),
            let delay = upstream.hedgeDelay(EdgeCache.resource(a.key), via: a.attempt), t - a.submittedAt > delay,
            let next = nextAttempt(a)
        {
            let fd = stoq_memfd("stoq-edge-hedge")
            guard fd >= 0 else { return }
            var h = a
            (h.fd, h.attempt, h.hedge, h.partner) = (fd, next, true, tag)
            h.tried.append(next)
            a.tried.append(next)
            a.partner = submit(h, p)
            active[tag] = a
            hedges += 1
            cache.count(\.hedges)
        }
    }

    /// The node is stopping: what is in flight fails, and the pool closes.
    private func stopAll() {
        for (_, a) in active {
            a.endSpan(failure: "the node is stopping")
            close(a.fd)
            cache.originFailed(a.fetchKey, Failure(status: 502, reason: "edge: the node is stopping"))
        }
        pool?.close()
    }

    // MARK: - A fetch's attempts

    /// Gives up on `a`: every attempt failed (or there was none).
    private func giveUp(_ a: Active) {
        close(a.fd)
        let p = path(a.key)
        if a.allNotFound {
            // Gone upstream: so is its manifest here. A relayed request, addressed to one
            // holder, learns only that that holder has none: the copy here may have come from
            // another (and anyone may address a relay to any node), so it stays. A relayed
            // manifest request (which never asks for the object whole) also learns only that
            // the holder has no manifest, which a plain object cut here never had.
            if case .manifest(let name) = a.key, a.hint == nil { _ = cache.dropManifest(name) { a.fetchKey.whole || !$0.plain } }
            if a.tried.isEmpty, let why = upstream.unreachable(EdgeCache.resource(a.key), hint: a.hint) {
                return cache.originFailed(a.fetchKey, Failure(status: 502, reason: "edge: \(why)"))
            }
            return cache.complete(a.fetchKey, Failure(status: 404, reason: "edge: no upstream has \(p) (\(upstream))"))
        }
        let why = a.lastFailure ?? "edge: \(p) failed"
        logger.warning("\(why)")
        cache.originFailed(a.fetchKey, Failure(status: 502, reason: why))
    }

    /// Sends `a` to its current attempt; returns its tag.
    @discardableResult
    private func submit(_ a: Active, _ p: ConnectionPool) -> Int {
        let tag = nextTag
        nextTag += 1
        ftruncate(a.fd, 0)
        var a = a
        a.seen = 0
        a.progressAt = DispatchTime.now().uptimeNanoseconds
        a.submittedAt = a.progressAt
        var headers = a.attempt.headers
        if a.revalidate { headers.append(EdgeCache.revalidateHeader) }
        a.span = nil
        if let tracer = cache.tracer, let trace = a.trace {
            let span = tracer.clientSpan(
                method: "GET", path: a.attempt.path, server: "\(a.attempt.url.endpoint)", label: a.attempt.label, parent: trace)
            if a.hedge { span.attributes["stoq.hedge"] = true }
            headers += tracer.headers(for: span.context)
            a.span = span
        }
        p.submit(
            to: a.attempt.url, "GET", a.attempt.path, headers: headers, sinkFD: a.fd, limit: bodyLimit(a), tag: tag, keepErrors: true,
            hash: a.plain)
        upstream.dispatched(EdgeCache.resource(a.key), via: a.attempt)
        if case .chunk = a.key {
            cache.count(\.originChunkFetches)
        } else if !a.plain {
            cache.count(\.originManifestFetches)
        }
        active[tag] = a
        return tag
    }

    /// The most body an attempt of `a` takes; more is refused as it arrives (the upstream's
    /// failure), so a fetch never holds more than this in its file (a memfd: memory). A chunk
    /// is at most the largest this node's store takes (`chunking.max_chunk_size`), a manifest
    /// the largest a node takes (`Manifest.maxListedSize`). A plain object whole goes to a file
    /// on disk, and stops at the cache's chunk share (`check`).
    private func bodyLimit(_ a: Active) -> UInt64 {
        if a.plain { return .max }
        switch a.key {
        case .chunk: return UInt64(cache.store.options.maxChunkSize)
        case .manifest: return UInt64(Manifest.maxListedSize)
        }
    }

    /// What a body past `bodyLimit` was too large for, and the bound's name.
    private func tooLarge(_ key: Key) -> String {
        switch key {
        case .chunk(let id): "chunk \(id.hex) (the most a chunk may be here, chunking.max_chunk_size)"
        case .manifest(let name): "the manifest of \(name) (the most a manifest may be: \(Manifest.maxListedChunks) chunks)"
        }
    }

    /// `a`'s request failed (`why`): its hedge partner, if still out, carries on alone;
    /// otherwise `a` moves to its next attempt.
    private func failed(_ a: Active, _ why: String, notFound: Bool, _ p: ConnectionPool) {
        guard let partner = a.partner, var b = active[partner] else { return retry(a, why, notFound: notFound, p) }
        upstream.failed(EdgeCache.resource(a.key), via: a.attempt, notFound: notFound)
        close(a.fd)
        b.partner = nil
        for t in a.tried where !b.tried.contains(where: { $0.same(as: t) }) { b.tried.append(t) }
        if !notFound {
            b.allNotFound = false
            b.lastFailure = why
        }
        active[partner] = b
    }

    /// `a` delivered: its hedge partner, if any, is cancelled.
    private func delivered(_ a: Active, _ p: ConnectionPool) {
        close(a.fd)
        if a.hedge { cache.count(\.hedgeWins) }
        guard let partner = a.partner, let b = active.removeValue(forKey: partner) else { return }
        b.endSpan(failure: "cancelled: the hedge partner delivered first")
        p.cancel(partner)
        close(b.fd)
        upstream.cancelled(EdgeCache.resource(b.key), via: b.attempt)
    }

    /// Moves `a` to its next attempt after `why` (a failover when the upstream had more
    /// than a 404 to say), or gives up.
    private func retry(_ a: Active, _ why: String, notFound: Bool, _ p: ConnectionPool) {
        upstream.failed(EdgeCache.resource(a.key), via: a.attempt, notFound: notFound)
        var a = a
        if !notFound { a.allNotFound = false; a.lastFailure = why; a.failures += 1 } else if a.allNotFound { a.lastFailure = nil }
        guard let next = nextAttempt(a) else {
            if byID(a, p) { return }
            return giveUp(a)
        }
        if !notFound {
            cache.count(\.failovers)
            let now = DispatchTime.now().uptimeNanoseconds, from = a.attempt.url.description
            if let last = failoverNotices[from], now &- last.at < 1_000_000_000 {
                failoverNotices[from]!.held += 1
            } else {
                let held = failoverNotices[from]?.held ?? 0
                let more = held > 0 ? "; \(held) more from it since the last such notice" : ""
                logger.notice("edge: \(path(a.key)) via \(a.attempt.label) failed (\(why)); trying \(next.label)\(more)")
                failoverNotices[from] = (now, 0)
            }
        }
        a.attempt = next
        a.plain = false
        a.tried.append(next)
        submit(a, p)
    }

    /// `a`, a range of a plain object cut here, got no bytes of it anywhere: the cut goes
    /// if its object is gone or changed (every attempt said 404 or showed the change; one
    /// that merely failed may still have it), and the chunk is asked for by its id (another
    /// object may hold it too). False when there is nothing to ask.
    private func byID(_ a: Active, _ p: ConnectionPool) -> Bool {
        guard let source = a.source else { return false }
        if a.allNotFound || (a.changed > 0 && a.changed == a.failures) { cache.dropCut(source.name, ifStill: source.cut) }
        var b = a
        b.source = nil
        guard let first = nextAttempt(b) else { return false }
        b.attempt = first
        b.tried.append(first)
        submit(b, p)
        return true
    }

    /// `a`'s upstream has no manifest of its name: asks it for the object whole (`whole`:
    /// the same attempt for `/objects/<name>`), into a file on disk (an object may be
    /// large). A name nobody has costs this round trip more. `unless`: the ETag of the
    /// version cut here before, which the upstream need not send again.
    private func askForPlain(_ a: Active, _ whole: UpstreamAttempt, _ p: ConnectionPool, unless etag: String? = nil) {
        let fd = stoq_tmpfile(cache.root)
        guard fd >= 0 else {
            close(a.fd)
            return cache.complete(
                a.fetchKey, Failure(status: 500, reason: "edge: cannot open a temp file in \(cache.root): \(String(cString: strerror(errno)))"))
        }
        close(a.fd)
        var a = a
        (a.fd, a.plain, a.attempt) = (fd, true, whole)
        a.attempt.headers.removeAll { $0.0 == "if-none-match" }
        if let etag { a.attempt.headers.append(("if-none-match", etag)) }
        submit(a, p)
    }

    /// The upstream says the plain object `a` asked for is the one cut here before: that
    /// manifest is fresh again. False when it has gone from the cache meanwhile.
    private func notModified(_ a: Active, _ name: String, maxAge: Int64?) -> Bool {
        guard let e = cache.peekManifest(name), e.plain, let cut = try? Manifest(decoding: e.bytes) else { return false }
        let bytes = cache.keep(name, e.bytes, maxAge: maxAge, plainChunks: cut.chunks.map { ChunkID(bytes: $0.id.bytes)! })
        cache.count(\.notModified)
        cache.complete(a.fetchKey, nil, manifest: bytes)
        return true
    }

    /// A response from the upstream: verified and cached (nil), or why the attempt failed so
    /// that the fetch moves on to the next one. A local failure completes the fetch itself.
    private func finish(_ a: inout Active, _ d: ConnectionPool.Done, status: Int) -> String? {
        let p = a.attempt.path
        let from = a.attempt.label
        let region = d.received > 0 ? BodyRegion.mapping(fd: a.fd, offset: 0, length: Int(d.received)) : nil
        let mapErrno = errno
        // `body` points into the mapping: it must outlive every use of `body`, which Swift
        // does not promise past the region's own last use.
        defer { withExtendedLifetime(region) {} }
        let body = region.map { UnsafeRawBufferPointer(start: $0.base, count: $0.count) } ?? UnsafeRawBufferPointer(start: nil, count: 0)
        guard status == (a.source == nil ? 200 : 206) else {
            if let source = a.source, status == 416 {
                a.changed += 1
                return
                    "edge: \(source.name) changed at \(from) since this edge cut it: it no longer holds bytes \(source.range.lowerBound)-\(source.range.upperBound) (416)"
            }
            let text = String(decoding: body.prefix(300), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            return "edge: \(from) answered HTTP \(status) for \(p)\(text.isEmpty ? "" : ": \(text)")"
        }
        guard d.errorCode == H3Error.noError else {
            return "edge: the response of \(from) to \(p) was cut off after \(d.received) bytes"
        }
        if d.received > 0, region == nil {
            // This node's failure (the SIGBUS guard full, no memory to map), not the upstream's:
            // read as empty, the body would not verify and the upstream would be blamed.
            let why = "edge: cannot map the \(d.received) bytes \(from) sent for \(p): \(String(cString: strerror(mapErrno)))"
            logger.error("\(why)")
            upstream.cancelled(EdgeCache.resource(a.key), via: a.attempt)
            cache.complete(a.fetchKey, Failure(status: 503, reason: why))
            return nil
        }
        cache.count(\.bytesFromOrigin, d.received)
        // This attempt's time, not the fetch's: an earlier attempt that stalled, or the wait
        // before a hedge, is not this route's doing.
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - a.submittedAt) / 1e9
        switch a.key {
        case .chunk(let id):
            let put: ChunkStore.PutResult
            do {
                put = try cache.store.put(id: id, bytes: body)
            } catch let e as StoreError where e.code == .digestMismatch || e.code == .chunkTooLarge {
                cache.count(\.verificationFailures)
                if let source = a.source {
                    // Not what was cut here any more (`byID` drops the cut if no one else has it).
                    a.changed += 1
                    let why =
                        "edge: \(source.name) changed at \(from) since this edge cut it: bytes \(source.range.lowerBound)-\(source.range.upperBound) are not chunk \(id.hex)"
                    logger.warning("\(why)")
                    return why
                }
                logger.error("edge cache: refused chunk \(id.hex) from \(from): \(e.message)")
                return "edge: \(from) sent chunk \(id.hex) with bytes that do not verify (\(e.message)); refused"
            } catch let e as StoreError where e.code == .noSpace {
                // Counted by the store. The bytes verified: the requests waiting get them, the
                // cache keeps nothing (a later request fetches the chunk again).
                logger.debug("edge cache: chunk \(id.hex) served uncached: \(e.message)")
                upstream.fetched(EdgeCache.resource(a.key), via: a.attempt, body: body, seconds: seconds)
                cache.complete(a.fetchKey, nil, chunk: body)
                return nil
            } catch {
                logger.error("edge cache: cannot store chunk \(id.hex): \(error)")
                upstream.cancelled(EdgeCache.resource(a.key), via: a.attempt)
                cache.complete(a.fetchKey, Failure(status: 500, reason: "edge: cannot store chunk \(id.hex): \(error)"))
                return nil
            }
            upstream.fetched(EdgeCache.resource(a.key), via: a.attempt, body: body, seconds: seconds)
            let admitted = cache.admit(id, body, put: put)
            if !admitted {
                // Larger than the whole cache: served once from the store copy, then dropped.
                logger.warning("edge cache: chunk \(id.hex) (\(body.count) bytes) is larger than edge.cache_size; not cached")
            }
            cache.complete(a.fetchKey, nil, chunk: body)
            if !admitted { _ = try? cache.store.remove(id) }
        case .manifest(let name) where a.plain:
            upstream.fetched(EdgeCache.resource(a.key), via: a.attempt, body: body, seconds: seconds)
            let fd = dup(a.fd)
            guard fd >= 0 else {
                cache.complete(a.fetchKey, Failure(status: 500, reason: "edge: cannot cut \(name): dup: \(String(cString: strerror(errno)))"))
                return nil
            }
            cache.cut(
                name, fd: fd, size: d.received, digest: d.sha256.flatMap { ContentDigest($0) }, maxAge: d.maxAge, from: from,
                completing: a.fetchKey)
        case .manifest(let name):
            do { _ = try Manifest(decoding: body) } catch {
                return "edge: the manifest of \(name) from \(from) is invalid: \(error)"
            }
            upstream.fetched(EdgeCache.resource(a.key), via: a.attempt, body: body, seconds: seconds)
            cache.complete(a.fetchKey, nil, manifest: cache.keep(name, Array(body), maxAge: d.maxAge))
        }
        return nil
    }

    /// The next attempt for `a` that was not tried yet (the upstream is asked again, so a route
    /// that changed since the last attempt counts), or nil when none is left.
    private func nextAttempt(_ a: Active) -> UpstreamAttempt? {
        attempts(for: a.key, a.hint, a.source).first { c in !a.tried.contains { $0.same(as: c) } }
    }

    /// Where to ask for `key`: the upstream's attempts, or for a chunk cut here from a plain
    /// object (`source`), those for that object whole with a `Range` of the chunk's bytes
    /// (for a relayed request, towards its holder, as the object itself was).
    private func attempts(for key: Key, _ hint: RelayHint?, _ source: PlainSource?) -> [UpstreamAttempt] {
        guard let source else {
            // A chunk of a relayed object that is not from a cut here: the manifest this node
            // serves it from may have come from another node than the request's holder, which
            // then lacks its chunks; so it is looked for as this node's own (still its own
            // fetch key, `FetchKey`, so it never waits on a fetch of this node's).
            if case .chunk = key, hint?.whole == true { return upstream.attempts(for: EdgeCache.resource(key), hint: nil) }
            return upstream.attempts(for: EdgeCache.resource(key), hint: hint)
        }
        return upstream.attempts(for: .manifest(name: source.name), hint: hint).compactMap { a in
            guard var whole = a.whole(source.name) else { return nil }
            whole.headers.append(("range", "bytes=\(source.range.lowerBound)-\(source.range.upperBound)"))
            return whole
        }
    }

    private func path(_ key: Key) -> String { EdgeCache.resource(key).path }
}

/// Where a chunk cut here from a plain object lies: the object's name, the chunk's bytes in
/// it, and the manifest of the cut (which a range that is not the chunk drops, if still held).
struct PlainSource {
    var name: String
    var range: ClosedRange<UInt64>
    var cut: [UInt8]
}

/// The chunk ranges of the last few manifests cut here that a fetcher looked a chunk up in
/// (`EdgeCache.plainSource`): the chunks of one object missed one after another decode its
/// manifest once.
struct PlainOffsets {
    private var recent: [(name: String, bytes: [UInt8], ranges: [ChunkID: ClosedRange<UInt64>])] = []

    /// Where chunk `id` lies in the object whose manifest is `bytes`, or nil if it lists no such chunk.
    mutating func lookup(_ name: String, _ bytes: [UInt8], _ id: ChunkID) -> ClosedRange<UInt64>? {
        if let r = recent.first(where: { $0.name == name && $0.bytes == bytes }) { return r.ranges[id] }
        guard let m = try? Manifest(decoding: bytes) else { return nil }
        var ranges: [ChunkID: ClosedRange<UInt64>] = [:]
        var at: UInt64 = 0
        for c in m.chunks where c.length > 0 {
            ranges[ChunkID(bytes: c.id.bytes)!] = at...(at + UInt64(c.length) - 1)
            at += UInt64(c.length)
        }
        recent.insert((name, bytes, ranges), at: 0)
        if recent.count > 4 { recent.removeLast() }
        return ranges[id]
    }
}
