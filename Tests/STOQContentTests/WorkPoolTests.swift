import Foundation
import Testing

@testable import STOQContent

/// The threads that take blocking work off the workers.
struct WorkPoolTests {
    final class Log: @unchecked Sendable {
        let lock = NSLock()
        var items: [Int] = []
        func add(_ i: Int) { lock.withLock { items.append(i) } }
    }

    @Test func oneThreadRunsJobsInOrderAndStopFinishesThemAll() {
        let pool = WorkPool(name: "test-pool", threads: 1)
        let log = Log()
        for i in 0..<1000 { pool.submit { log.add(i) } }
        pool.stop()
        #expect(log.items == Array(0..<1000))
    }

    /// Three threads: three jobs that each wait for the other two to start all finish.
    @Test func threadsRunJobsAtTheSameTime() {
        let pool = WorkPool(name: "test-pool", threads: 3)
        let started = DispatchSemaphore(value: 0), metAll = Log()
        let go = DispatchSemaphore(value: 0)
        for i in 0..<3 {
            pool.submit {
                started.signal()
                if go.wait(timeout: .now() + 10) == .success { metAll.add(i) }
            }
        }
        var seen = 0
        for _ in 0..<3 where started.wait(timeout: .now() + 10) == .success { seen += 1 }
        #expect(seen == 3)
        for _ in 0..<3 { go.signal() }
        pool.stop()
        #expect(metAll.items.sorted() == [0, 1, 2])
    }

    /// A job submitted while the queue drains, and after a stretch of idleness, still runs.
    @Test func jobsSubmittedLaterStillRun() {
        let pool = WorkPool(name: "test-pool", threads: 2)
        let log = Log()
        let done = DispatchSemaphore(value: 0)
        pool.submit {
            log.add(1)
            done.signal()
        }
        #expect(done.wait(timeout: .now() + 10) == .success)
        usleep(20_000)
        pool.submit { log.add(2) }
        pool.stop()
        #expect(log.items == [1, 2])
    }
}
