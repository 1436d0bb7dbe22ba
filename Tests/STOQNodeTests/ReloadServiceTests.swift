import Foundation
import ServiceLifecycleTestKit
import Synchronization
import STOQTestSupport
import Testing
import UnixSignals

@testable import STOQNode

/// The daemon's reload triggers: a changed config file and SIGHUP each reload once, in
/// order, and graceful shutdown ends the service.
@Suite struct ReloadServiceTests {
    final class Reasons: Sendable {
        let list = Mutex<[String]>([])
        func append(_ s: String) { list.withLock { $0.append(s) } }
        var value: [String] { list.withLock { $0 } }
        /// Waits (bounded by a number of polls, not by a clock assertion) until `n` reasons came.
        func await(_ n: Int) async throws {
            for _ in 0..<2_000 where value.count < n { try await Task.sleep(for: .milliseconds(5)) }
        }
    }

    @Test func aChangedFileThenSIGHUPReloadEachOnceAndShutdownEndsTheService() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("stoq-reload-\(getpid()).toml").path
        defer { unlink(path) }
        try Data("[log]\nlevel = \"info\"\n".utf8).write(to: URL(fileURLWithPath: path))
        signal(SIGHUP, SIG_IGN)
        let hangups = await UnixSignalsSequence(trapping: .sighup)
        let reasons = Reasons()
        let service = ReloadService(hangups: hangups, watching: path, every: .milliseconds(10)) {
            reasons.append($0)
            return true
        }
        try await testGracefulShutdown { shutdown in
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await service.run() }
                // A new modification time (set explicitly: a rewrite within the clock's
                // granularity could keep the old one).
                var times = [timespec(tv_sec: 1_000_000, tv_nsec: 0), timespec(tv_sec: 1_000_000, tv_nsec: 0)]
                #expect(utimensat(AT_FDCWD, path, &times, 0) == 0)
                try await reasons.await(1)
                #expect(reasons.value == ["config file changed"])
                kill(getpid(), SIGHUP)
                try await reasons.await(2)
                #expect(reasons.value == ["config file changed", "SIGHUP"])
                shutdown.triggerGracefulShutdown()
                try await group.waitForAll()
            }
        }
        #expect(reasons.value == ["config file changed", "SIGHUP"])
    }

    /// An edit while the node is still starting is held until it has started, then reloads
    /// once (before, the reload read what the node's start was still setting). The file, not
    /// SIGHUP: one process traps SIGHUP for one sequence at a time, and the test above has it.
    @Test func anEditWhileTheNodeStartsReloadsOnceItHasStarted() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("stoq-reload-start-\(getpid()).toml").path
        defer { unlink(path) }
        try Data("[log]\nlevel = \"info\"\n".utf8).write(to: URL(fileURLWithPath: path))
        let hangups = await UnixSignalsSequence(trapping: .sigusr2)
        let reasons = Reasons(), started = Atomic<Bool>(false)
        let service = ReloadService(
            hangups: hangups, watching: path, every: .milliseconds(10), ready: { started.load(ordering: .acquiring) }
        ) {
            reasons.append($0)
            return true
        }
        try await testGracefulShutdown { shutdown in
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await service.run() }
                var times = [timespec(tv_sec: 1_000_000, tv_nsec: 0), timespec(tv_sec: 1_000_000, tv_nsec: 0)]
                #expect(utimensat(AT_FDCWD, path, &times, 0) == 0)
                // Not started: nothing reloads however long it waits (bounded polls).
                for _ in 0..<40 { try await Task.sleep(for: .milliseconds(5)) }
                #expect(reasons.value.isEmpty)
                started.store(true, ordering: .releasing)
                try await reasons.await(1)
                #expect(reasons.value == ["config file changed"])
                shutdown.triggerGracefulShutdown()
                try await group.waitForAll()
            }
        }
        #expect(reasons.value == ["config file changed"], "one reload, not one per poll while it waited")
    }

    /// The node reads its CA's revoked serials again at each reload: a change to that file
    /// reloads too, named. Made where there was none, then appended to with its modification
    /// time put back (a write within one tick of the clock): its size tells.
    @Test func aChangeToAnotherFileAReloadReadsReloadsNamingIt() async throws {
        let dir = try TemporaryDirectory("stoq-reload-files")
        defer { dir.remove() }
        let path = dir.path + "/node.toml", revoked = dir.path + "/revoked.txt"
        try Data("[log]\nlevel = \"info\"\n".utf8).write(to: URL(fileURLWithPath: path))
        let hangups = await UnixSignalsSequence(trapping: .sigusr1)
        let reasons = Reasons()
        let service = ReloadService(hangups: hangups, watching: path, andFiles: [revoked], every: .milliseconds(10)) {
            reasons.append($0)
            return true
        }
        try await testGracefulShutdown { shutdown in
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await service.run() }
                try Data("01\n".utf8).write(to: URL(fileURLWithPath: revoked))
                try await reasons.await(1)
                #expect(reasons.value == ["\(revoked) changed"])
                let written = try #require(ReloadService.stamp(revoked))
                let handle = try #require(FileHandle(forWritingAtPath: revoked))
                try handle.seekToEnd()
                try handle.write(contentsOf: Data("02\n".utf8))
                try handle.close()
                let seconds = written.modified / 1_000_000_000, nanoseconds = written.modified % 1_000_000_000
                var times = [timespec(tv_sec: seconds, tv_nsec: nanoseconds), timespec(tv_sec: seconds, tv_nsec: nanoseconds)]
                #expect(utimensat(AT_FDCWD, revoked, &times, 0) == 0)
                #expect(ReloadService.stamp(revoked)?.modified == written.modified)
                try await reasons.await(2)
                #expect(reasons.value == ["\(revoked) changed", "\(revoked) changed"])
                shutdown.triggerGracefulShutdown()
                try await group.waitForAll()
            }
        }
    }

    /// A reload that fails is tried again every `retryInterval` until one applies, then no
    /// more: a refused reload waited for the next edit or SIGHUP, though what it lacked (a file
    /// it names, being written) may have come meanwhile.
    @Test func aFailedReloadIsTriedAgainUntilItApplies() async throws {
        let dir = try TemporaryDirectory("stoq-reload-retry")
        defer { dir.remove() }
        let path = dir.path + "/node.toml"
        try Data("[log]\nlevel = \"info\"\n".utf8).write(to: URL(fileURLWithPath: path))
        let hangups = await UnixSignalsSequence(trapping: .sigwinch)
        let reasons = Reasons()
        // The first two reloads fail, the third applies.
        let service = ReloadService(hangups: hangups, watching: path, every: .milliseconds(10), retryEvery: .milliseconds(20)) {
            reasons.append($0)
            return reasons.value.count >= 3
        }
        try await testGracefulShutdown { shutdown in
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await service.run() }
                var times = [timespec(tv_sec: 1_000_000, tv_nsec: 0), timespec(tv_sec: 1_000_000, tv_nsec: 0)]
                #expect(utimensat(AT_FDCWD, path, &times, 0) == 0)
                try await reasons.await(3)
                #expect(reasons.value == ["config file changed", "retry", "retry"])
                // Applied: no more retries (bounded polls, ten retry intervals).
                for _ in 0..<40 { try await Task.sleep(for: .milliseconds(5)) }
                #expect(reasons.value.count == 3)
                shutdown.triggerGracefulShutdown()
                try await group.waitForAll()
            }
        }
    }

    @Test func anUnreadableFileHasNoStamp() {
        #expect(ReloadService.stamp("/nonexistent/stoq-\(getpid())") == nil)
    }
}
