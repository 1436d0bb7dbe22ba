import CSTOQSystem
import Logging
import STOQCore
import STOQDatapath
import STOQQUIC
import Synchronization

/// The stop signal a worker checks between batches (set from any thread).
public final class StopFlag: Sendable {
    private let flag = Atomic<Bool>(false)
    public init() {}
    public func stop() { flag.store(true, ordering: .releasing) }
    public var isStopped: Bool { flag.load(ordering: .acquiring) }
}

/// One worker: a datapath queue and a QUIC endpoint, run to completion on one
/// thread: receive a batch → feed the endpoint → run timers → send a batch. No locks,
/// no async, no allocation per datagram (the endpoint and the queue own every buffer).
public final class Worker {
    /// The datapath queue this worker owns (replaced only by `fallback`).
    public private(set) var queue: DatapathQueue
    /// Called when the queue reports `.detached` (AF_XDP lost its XDP program): returns
    /// the queue to carry on with (the QUIC endpoint and its connections stay), or nil
    /// to stop the worker.
    public var fallback: ((DatapathError) -> DatapathQueue?)?
    public let endpoint: QUICEndpoint
    /// Longest sleep when no timer is due, so that stop is noticed promptly.
    public var idleWait: UInt64 = 50_000_000
    /// Called on the worker thread about every `tickInterval` between batches: where the
    /// worker publishes its counters for the control plane (it never waits on it).
    public var onTick: (() -> Void)?
    public var tickInterval: UInt64 = 1_000_000_000
    /// When this many connections have ended since the most the worker held (sampled each
    /// tick), or none is left, the heap's free memory goes back to the kernel
    /// (`stoq_release_free_memory`).
    public var releaseAfterClosing = 1_000
    /// free() gives a malloc arena's top back to the kernel past this many bytes
    /// (`stoq_set_heap_thresholds`). With glibc's moving threshold a worker's arena kept up to
    /// 64 MiB of top after a wave of closes, out of malloc_trim's reach: 1.31× the starting RSS
    /// once 100,000 connections had closed.
    public static let heapTrimThreshold = 1 << 20
    /// Blocks below this come from the arenas: chunk buffers (at most 1 MiB by default) are reused
    /// rather than mapped and faulted in per chunk, as glibc's moving threshold had them.
    public static let heapMmapThreshold = 4 << 20
    /// Applies both thresholds (process-wide); every worker does on creation.
    public static func adoptHeapPolicy() { stoq_set_heap_thresholds(heapTrimThreshold, heapMmapThreshold) }
    private var connectionPeak = 0
    /// Times the worker gave the heap's free memory back.
    public private(set) var memoryReleases: UInt64 = 0
    /// Datagrams handled between transmit passes within one receive batch.
    public var flushBudget = 64
    /// A transmit pass hands the datapath what it wrote once this many bytes are waiting, so
    /// that the kernel copies them out of the transmit slots while they are still in this
    /// core's cache. Flushing only when all slots were full (4 MiB on io_uring) let them fall
    /// out of it: with 512 connections the kernel's copy was 15–18 % of the worker against 7.5 %
    /// with one (perf, 2026-12-04).
    public var transmitFlushBytes = 256 << 10
    /// Called on the worker thread at the start of every turn: where handlers pick up work
    /// finished elsewhere (an edge cache's origin fetches) and complete their responses.
    /// Whoever finishes such work wakes the worker with `WorkerMesh.wake`.
    public var onTurn: (() -> Void)?
    private var nextTick: Timestamp = 0
    /// Sheds Initial floods in the datapath, checked each tick (`InitialShedding`); nil: off,
    /// or the datapath cannot.
    public var initialShedding: InitialShedding? = InitialShedding()
    /// What that shedding did.
    public private(set) var shedding = SheddingCounters()
    private var lastKernelDrops: UInt32?
    /// `EndpointCounters.bodiesCutShort` as last logged.
    private var bodiesCutShort: UInt64 = 0
    /// `EndpointCounters.requestsTimedOutHead`, `requestsTimedOutBody` and `requestsTimedOutSend`
    /// as last logged.
    private var stalls: (UInt64, UInt64, UInt64) = (0, 0, 0)
    /// Whether the last tick found the endpoint answering Initials with Retry under load.
    private var retryingUnderLoad = false
    private let maxPayload: Int
    /// The node's hand-off mesh and this worker's place in it (nil: a lone worker).
    public private(set) var mesh: WorkerMesh?
    public private(set) var index = 0
    /// Datagrams passed to and taken from other workers.
    public private(set) var handoff = HandoffCounters()
    /// Workers this one handed datagrams to during the current receive batch.
    private var toWake: [Bool] = []

    public init(queue: DatapathQueue, endpoint: QUICEndpoint) {
        self.queue = queue
        self.endpoint = endpoint
        self.maxPayload = max(endpoint.settings.maxUDPPayloadSize, 1200)
        Worker.adoptHeapPolicy()
        // The body writer wakes the loop when written bytes give credit back to a peer.
        queue.setWakeup(fileDescriptor: endpoint.sinkWakeFileDescriptor)
    }

    /// Makes this worker worker `index` of `mesh`: datagrams for connections of other
    /// workers go to them, and theirs for this one wake it up.
    public func join(_ mesh: WorkerMesh, as index: Int) {
        self.mesh = mesh
        self.index = index
        toWake = [Bool](repeating: false, count: mesh.count)
        // One eventfd per loop: the mesh's, which the body writer then signals too.
        queue.setWakeup(fileDescriptor: mesh.wakeFileDescriptor(of: index))
        endpoint.setSinkWakeup(fileDescriptor: mesh.wakeFileDescriptor(of: index))
    }

    /// Pins the calling thread to `cpu` (best effort; returns whether it worked).
    @discardableResult
    public static func pinCurrentThread(to cpu: Int) -> Bool { stoq_pin_current_thread(Int32(cpu)) == 0 }

    /// CPUs this process may use.
    public static var availableCPUs: Int { Int(stoq_allowed_cpus()) }

    /// One turn of the loop: timers, transmit, then wait up to the next timer for datagrams.
    public func turn() throws {
        onTurn?()
        var now = monotonicNow()
        endpoint.handleTimeouts(now: now)
        takeHandedOff()
        try transmit(now: now)
        var wait = idleWait
        if let next = endpoint.nextTimeout() { wait = next > now ? min(next - now, idleWait) : 0 }
        let ep = endpoint
        var sinceFlush = 0
        var flushError: Error?
        _ = try queue.receive(timeoutNanoseconds: wait) { batch in
            let peer = batch.peer, local = batch.local, ecn = batch.ecn
            // A fresh clock per buffer: one batch can take a millisecond to decrypt, and
            // stale receive times would inflate the RTT samples ngtcp2 takes.
            let t = monotonicNow()
            batch.forEachDatagram {
                if let mesh, mesh.count > 1, let owner = mesh.owner(of: $0), owner != index {
                    if mesh.push($0, into: owner, peer: peer, local: local, ecn: ecn) {
                        handoff.sent += 1
                        toWake[owner] = true
                    } else {
                        handoff.dropped += 1
                    }
                    return
                }
                ep.handle(datagram: $0, from: peer, to: local, ecn: ecn, now: t)
                sinceFlush += 1
            }
            // Work budget: ACKs (and data) go out every `flushBudget` datagrams, not only after
            // a whole batch; otherwise a large GRO batch delays ACKs past ngtcp2's loss-time
            // threshold and the sender sees spurious losses.
            if sinceFlush >= flushBudget {
                sinceFlush = 0
                do { try transmit(now: monotonicNow()) } catch { flushError = error }
            }
        }
        if let flushError { throw flushError }
        if let mesh {
            for w in toWake.indices where toWake[w] {
                toWake[w] = false
                mesh.wake(w)
            }
        }
        takeHandedOff()
        now = monotonicNow()
        endpoint.handleTimeouts(now: now)
        try transmit(now: now)
    }

    /// Feeds the endpoint what other workers handed this one.
    @inline(__always)
    private func takeHandedOff() {
        guard let mesh else { return }
        let ep = endpoint
        let t = monotonicNow()
        handoff.received &+= UInt64(mesh.drain(index) { ep.handle(datagram: $0, from: $1, to: $2, ecn: $3, now: t) })
    }

    /// Writes everything the endpoint owes into transmit slots and hands them to the kernel.
    public func transmit(now: Timestamp) throws {
        let stride = queue.transmitStride
        let segments =
            stride > 0
            ? queue.maxSegmentsPerSlot
            : max(1, min(queue.maxSegmentsPerSlot, queue.slotCapacity / maxPayload))
        var waiting = 0
        while true {
            var slot = queue.reserveTransmit()
            if slot == nil {
                try queue.flush()
                waiting = 0
                slot = queue.reserveTransmit()
            }
            guard let slot else { break }
            guard let t = endpoint.pollTransmit(into: slot, maxSegments: segments, stride: stride, now: now) else { break }
            queue.commitTransmit(
                length: t.length, segmentSize: t.segmentSize, to: t.destination, from: t.source, ecn: t.ecn)
            waiting += t.length
            if waiting >= transmitFlushBytes {
                try queue.flush()
                waiting = 0
            }
        }
        try queue.flush()
    }

    /// Returns freed memory to the kernel once `releaseAfterClosing` connections have ended
    /// since the peak, or the last one has: one malloc_trim per wave of closes, not per connection.
    private func releaseFreedMemory() {
        let open = endpoint.connectionCount
        connectionPeak = max(connectionPeak, open)
        guard connectionPeak - open >= releaseAfterClosing || (open == 0 && connectionPeak > 0) else { return }
        connectionPeak = open
        endpoint.compactTables()
        endpoint.releaseLibraryPages()
        stoq_release_free_memory()
        memoryReleases &+= 1
    }

    /// Runs until `stop` is set, then drains: the requests open run to their end, for at most
    /// `drainTimeout` (`drain`), every connection is closed, and the worker keeps running (at
    /// most `closeTimeout`) until they are gone.
    public func run(stop: StopFlag, drainTimeout: UInt64 = 0, closeTimeout: UInt64 = 3_000_000_000, logger: Logger? = nil) {
        while !stop.isStopped {
            let now = monotonicNow()
            if now >= nextTick {
                nextTick = now + tickInterval
                releaseFreedMemory()
                onTick?()
                let report = endpoint.isServer ? endpoint.takeInitialReport(limit: InitialShedPlan.maxRules) : InitialReport()
                holdRetry(report)
                noteRetryUnderLoad(report, logger)
                shedInitialFloods(report, logger)
                noteBodiesCutShort(logger)
                noteStalls(logger)
            }
            do { try turn() } catch let e as DatapathError where e.code == .detached {
                guard let next = fallback?(e) else {
                    logger?.error("worker: \(e); no fallback datapath, stopping")
                    break
                }
                logger?.warning("worker: \(e); moved to \(next.backendName) on \(next.localEndpoint), connections kept")
                queue.close()
                queue = next
                lastKernelDrops = nil
                initialShedding = InitialShedding()
                (shedding.prefixes, shedding.everyone) = (0, false)
                queue.setWakeup(fileDescriptor: mesh?.wakeFileDescriptor(of: index) ?? endpoint.sinkWakeFileDescriptor)
            } catch { logger?.error("worker: \(error)") }
        }
        drain(for: drainTimeout, logger: logger)
        endpoint.closeAll(now: monotonicNow())
        let deadline = monotonicNow() + closeTimeout
        while endpoint.connectionCount > 0 && monotonicNow() < deadline {
            do { try turn() } catch { break }
        }
    }

    /// A server's graceful shutdown (`QUICEndpoint.beginDrain`): new connections are refused,
    /// open ones get a GOAWAY and are closed as their last request ends, for at most `timeout`
    /// (0: not at all). Uploads finishing meanwhile are stored and answered as usual.
    private func drain(for timeout: UInt64, logger: Logger?) {
        guard timeout > 0, endpoint.isServer else { return }
        let start = monotonicNow()
        endpoint.beginDrain(now: start)
        var busy = endpoint.closeFinished(now: start), checked = start
        if busy > 0 { logger?.info("worker \(index): draining: \(busy) connections have requests open") }
        while busy > 0 {
            let now = monotonicNow()
            if now - start >= timeout {
                logger?.notice(
                    "worker \(index): network.drain_timeout (\(timeout / Nanos.millisecond) ms) passed with requests open on \(busy) connections: closing them"
                )
                return
            }
            do { try turn() } catch { return }
            if now - checked >= Self.drainCheckInterval {
                checked = now
                busy = endpoint.closeFinished(now: now)
            }
        }
    }

    /// How often a draining worker looks for connections whose requests have all ended.
    static let drainCheckInterval: UInt64 = 10 * Nanos.millisecond

    /// Warns (once a tick at most) of responses reset because their file shrank under them.
    private func noteBodiesCutShort(_ logger: Logger?) {
        let now = endpoint.counters.bodiesCutShort
        guard now != bodiesCutShort else { return }
        logger?.warning(
            "worker \(index): \(now - bodiesCutShort) responses reset: the file each was sent from shrank while it was sent (replace an object by writing a new file and renaming it over the old one, as stoq put does, not in place)"
        )
        bodiesCutShort = now
    }

    /// Logs the stalled requests and responses the endpoint timed out since the last tick, at
    /// most once a tick, naming the last one's peer (`StallTimeouts`).
    private func noteStalls(_ logger: Logger?) {
        let c = endpoint.counters
        let now = (c.requestsTimedOutHead, c.requestsTimedOutBody, c.requestsTimedOutSend)
        guard now != stalls, let last = endpoint.takeStallNote() else { return }
        let (head, body, send) = (now.0 - stalls.0, now.1 - stalls.1, now.2 - stalls.2)
        stalls = now
        logger?.warning(
            "worker \(index): \(body) request bodies and \(send) responses stalled (limits.body_timeout, limits.send_timeout), \(head) request heads unfinished after \(StallTimeouts.duration(StallTimeouts.headTimeout)): the request answered 408, the response or the head's stream reset; the last, from \(last)"
        )
    }

    /// Logs when the endpoint starts or stops answering new Initials with Retry because of its
    /// half-open connections (`QUICSettings.retryThreshold`), as seen each tick.
    private func noteRetryUnderLoad(_ report: InitialReport, _ logger: Logger?) {
        let now = endpoint.retryingUnderLoad
        guard now != retryingUnderLoad else { return }
        retryingUnderLoad = now
        let threshold = endpoint.settings.retryThreshold, halfOpen = endpoint.halfOpen
        if now {
            logger?.notice(
                "worker \(index): \(halfOpen) connections mid-handshake (retry_threshold \(threshold)): new ones get a Retry first")
        } else {
            logger?.notice(
                "worker \(index): \(halfOpen) connections mid-handshake and \(initialsPerSecond(report)) new Initials a second, both under retry_threshold \(threshold): Retry off"
            )
        }
    }

    /// Tokenless Initials a second that reached the endpoint over the last tick.
    private func initialsPerSecond(_ report: InitialReport) -> Int {
        Int(Double(report.used + report.withheld) * 1e9 / Double(max(tickInterval, 1)))
    }

    /// Holds a Retry the half-open connections started while new Initials without a token
    /// still arrive at `retryThreshold` a second or more (`QUICEndpoint.retryHeld`).
    private func holdRetry(_ report: InitialReport) {
        guard endpoint.isServer else { return }
        endpoint.retryHeld = endpoint.retryingUnderLoad && initialsPerSecond(report) >= endpoint.settings.retryThreshold
    }

    /// Counts what the kernel dropped for the socket, and changes what the datapath sheds
    /// when the endpoint's Initials say so (`InitialShedding`), logging when a flood starts
    /// and ends being shed.
    private func shedInitialFloods(_ report: InitialReport, _ logger: Logger?) {
        if let drops = queue.kernelDrops {
            if let last = lastKernelDrops { shedding.kernelDrops &+= UInt64(drops &- last) }
            lastKernelDrops = drops
        }
        guard endpoint.isServer, var policy = initialShedding else { return }
        let changed = policy.update(report)
        initialShedding = policy  // it counts quiet ticks even when the plan stays
        guard let plan = changed else { return }
        do {
            guard try queue.shedInitials(plan) else {
                initialShedding = nil
                logger?.notice("worker \(index): \(queue.backendName) cannot shed Initial floods; the reply budget alone holds them")
                return
            }
        } catch {
            initialShedding = nil
            logger?.warning("worker \(index): cannot shed Initial floods, the reply budget alone holds them: \(error)")
            return
        }
        let was = shedding.prefixes > 0 || shedding.everyone
        (shedding.prefixes, shedding.everyone) = (plan.rules.count, plan.shift > 0)
        if plan.isEmpty {
            logger?.notice("worker \(index): Initial flood over: no Initials shed")
            return
        }
        let seen = report.used + report.withheld
        let message: Logger.Message =
            "worker \(index): Initial flood: \(seen) Initials without a token in a tick, \(report.withheld) of them withheld (reply budget spent); the kernel now keeps \(plan.summary)"
        if was {
            logger?.info(message)
        } else {
            shedding.episodes &+= 1
            logger?.notice(message)
        }
    }

    /// Runs until `done` returns true or `timeout` passes. Returns whether `done` held.
    @discardableResult
    public func run(timeout: UInt64, until done: () -> Bool) throws -> Bool {
        let deadline = monotonicNow() + timeout
        while !done() {
            if monotonicNow() > deadline { return false }
            try turn()
        }
        try transmit(now: monotonicNow())
        return true
    }
}
