import DequeModule
import Foundation

/// Threads for the blocking work a worker must not do itself: writing and fsyncing what it
/// received, chunking an upload. Jobs run in the order they were submitted, each on one of
/// the pool's threads (`<name>-0`, `<name>-1`, …); a job reports back however its submitter
/// arranged (a worker's `CompletionInbox`). Thread-safe.
public final class WorkPool: @unchecked Sendable {
    private let cond = NSCondition()
    private var jobs = Deque<() -> Void>()
    private var stopping = false
    private var running = 0

    /// Starts `threads` threads (at least one) named after `name`.
    public init(name: String, threads: Int) {
        running = max(1, threads)
        for i in 0..<running {
            let t = Thread { [self] in work() }
            t.name = "\(name)-\(i)"
            t.start()
        }
    }

    /// Queues `job` (any thread; returns at once).
    public func submit(_ job: @escaping () -> Void) {
        cond.withLock {
            jobs.append(job)
            cond.signal()
        }
    }

    /// Lets the threads finish every job submitted, then ends them (tests, and a node's
    /// orderly stop).
    public func stop() {
        cond.withLock {
            stopping = true
            cond.broadcast()
            while running > 0 { cond.wait() }
        }
    }

    /// Lets the threads finish every job submitted, then end, without waiting for them: for an
    /// owner that may be released on one of the pool's own threads.
    public func finish() {
        cond.withLock {
            stopping = true
            cond.broadcast()
        }
    }

    private func work() {
        while true {
            cond.lock()
            while jobs.isEmpty && !stopping { cond.wait() }
            if jobs.isEmpty {
                running -= 1
                cond.broadcast()
                cond.unlock()
                return
            }
            let job = jobs.removeFirst()
            cond.unlock()
            job()
        }
    }
}
