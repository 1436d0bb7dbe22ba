import Foundation
import Logging

/// Runs the object index's garbage collection (`ObjectIndex.collect`) every `interval` on a
/// thread of its own (`storage.gc_interval` on a node), and on request (`collectNow`; the admin
/// API's `POST /store/collect`).
///
/// Never on a worker's thread: a collection reads every object record and walks the whole chunk
/// tree, so it takes as long as the store is large. Chunk puts and object records go on
/// meanwhile and wait only for the short turns of its sweep under the store's exclusive lock
/// (`ObjectIndex.collect`). It is safe against uploads in progress as `ObjectIndex` says:
/// unreferenced chunks younger than the store's grace period stay, and so do those an ingest has
/// pinned and those a record written during the run names.
///
/// What a run freed is logged (by `collect`) and counted in the store's counters
/// (`chunksCollected`, `bytesCollected`), which `ObjectGate` reads for `limits.storage_cap`: the
/// freed bytes leave the stored total as soon as the sweep has removed them. Failures (a damaged
/// record refuses the whole run, so that no chunk it names is lost) are logged and counted here,
/// and the next run tries again.
///
/// Thread-safe; one collection at a time.
public final class GarbageCollector: @unchecked Sendable {
    /// What the collector did since it was made.
    public struct Counters: Sendable, Equatable {
        /// Collections that completed, and that failed.
        public var runs: UInt64 = 0
        public var failures: UInt64 = 0
        /// The last completed collection's result (nil before the first).
        public var last: ObjectIndex.CollectResult?

        /// None yet.
        public init() {}
    }

    /// The index collected.
    public let index: ObjectIndex
    /// Time between scheduled collections; zero: none (only `collectNow`).
    public let interval: Duration
    private let logger: Logger
    private let cond = NSCondition()
    private var stopping = false
    private var thread: Thread?
    private var threadEnded = false
    /// Held for a whole collection: the scheduled one and `collectNow` take turns.
    private let running = NSLock()
    private let state = NSLock()
    private var counterValues = Counters()

    /// A collector of `index` every `interval` (zero: on request only). `start` begins the schedule.
    public init(index: ObjectIndex, interval: Duration, logger: Logger = Logger(label: "stoq.store.gc")) {
        self.index = index
        self.interval = interval
        self.logger = logger
    }

    /// A snapshot of what it counted.
    public var counters: Counters { state.withLock { counterValues } }

    /// Whether `start` started the schedule's thread (it does not for a zero interval): what
    /// a test can check, where waiting to see no run proves nothing.
    var isScheduled: Bool { cond.withLock { thread != nil } }

    /// Starts the schedule (nothing when `interval` is zero): the first collection one interval
    /// from now, then one interval after each ends.
    public func start() {
        guard interval > .zero else { return }
        cond.withLock {
            guard thread == nil, !stopping else { return }
            let t = Thread { [self] in loop() }
            t.name = "stoq-gc"
            thread = t
            t.start()
        }
    }

    /// Ends the schedule and waits for its thread: a collection under way finishes first.
    public func stop() {
        cond.withLock {
            stopping = true
            cond.broadcast()
            while thread != nil && !threadEnded { cond.wait() }
        }
    }

    /// Collects now, on the caller's thread (after a collection under way, if any): its result,
    /// or the error that refused it (logged and counted).
    @discardableResult
    public func collectNow() throws -> ObjectIndex.CollectResult {
        try running.withLock {
            do {
                let result = try index.collect()
                state.withLock {
                    counterValues.runs += 1
                    counterValues.last = result
                }
                return result
            } catch {
                state.withLock { counterValues.failures += 1 }
                logger.error("garbage collection failed; the next run tries again", metadata: ["error": "\(error)"])
                throw error
            }
        }
    }

    private func loop() {
        let seconds = Double(interval.components.seconds) + Double(interval.components.attoseconds) / 1e18
        while true {
            let due = Date(timeIntervalSinceNow: seconds)
            let stop = cond.withLock {
                while !stopping && Date() < due { _ = cond.wait(until: due) }
                return stopping
            }
            if stop { break }
            _ = try? collectNow()  // logged and counted there
        }
        cond.withLock {
            threadEnded = true
            cond.broadcast()
        }
    }
}
