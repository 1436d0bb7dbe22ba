import Foundation
import STOQStore
import Testing

/// SIGKILLs a process that is writing to the store (`stoq-store-crash`) at random moments
/// and checks what it left: every object listed is complete and self-consistent, every chunk
/// verifies or is absent, no temp file survives an open. SIGKILL tests the write ordering
/// (temp → rename, chunks before records, GC under its lock), not power loss: the page
/// cache survives a killed process, so the fsyncs are not exercised here.
@Suite final class ChunkStoreCrashTests: StoreTestCase {
    /// The helper sits next to the test bundle (both are products of this package);
    /// `STOQ_STORE_CRASH_HELPER` overrides.
    private func helperPath() throws -> String {
        if let p = ProcessInfo.processInfo.environment["STOQ_STORE_CRASH_HELPER"] { return p }
        var dirs = [URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()]
        if let exe = Bundle.main.executableURL { dirs.append(exe.deletingLastPathComponent()) }
        dirs += Bundle.allBundles.map { $0.bundleURL.deletingLastPathComponent() }
        for d in dirs {
            let p = d.appendingPathComponent("stoq-store-crash").path
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        throw StoreError(.io, "stoq-store-crash not found next to the tests (looked in \(dirs.map(\.path)))")
    }

    @Test func sigkillAtRandomMomentsLeavesAConsistentStore() throws {
        let helper = try helperPath()
        let kills = 10
        var objects = Set<String>()
        var tempFilesLeftByKills = 0
        var staleRemoved = 0
        for iteration in 0..<kills {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: helper)
            process.arguments = [root]
            process.standardOutput = FileHandle.nullDevice
            let stderr = Pipe()
            process.standardError = stderr
            try process.run()
            usleep(UInt32.random(in: 150_000...800_000))
            let diedByItself = !process.isRunning
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            let said = String(decoding: stderr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            #expect(!diedByItself, "iteration \(iteration): the helper exited on its own: \(said)")
            #expect(process.terminationReason == .uncaughtSignal, Comment(rawValue: said))
            #expect(process.terminationStatus == SIGKILL, Comment(rawValue: said))

            tempFilesLeftByKills += tempFiles().count
            let (names, removed) = try checkStore(iteration)
            objects.formUnion(names)
            staleRemoved += removed
        }
        // The kills really landed mid-work: objects were written across runs.
        #expect(objects.count > kills)
        print(
            "crash test: \(objects.count) objects written over \(kills) kills; temp files left by kills \(tempFilesLeftByKills), removed on open \(staleRemoved)"
        )
    }

    /// Opens the store as a restarted node would and checks it; returns the objects and the
    /// number of temp files recovery removed.
    private func checkStore(_ iteration: Int) throws -> ([String], Int) {
        let store = try ChunkStore(root: root)
        let index = try ObjectIndex(chunks: store)
        #expect(tempFiles() == [], "iteration \(iteration): temp files survived the open")
        #expect(index.recovery.incompleteObjects == [:], "iteration \(iteration)")
        #expect(index.recovery.unreadableObjects == [:], "iteration \(iteration)")
        let names = try index.listObjects()
        for name in names {
            let record = try index.object(name)
            #expect(!record.chunkIDs.isEmpty, Comment(rawValue: name))
            #expect(
                String(decoding: record.manifest, as: UTF8.self) == record.chunkIDs.map(\.hex).joined(separator: "\n"),
                "iteration \(iteration): \(name)'s record does not match its own manifest")
            for id in record.chunkIDs {
                #expect(throws: Never.self, "iteration \(iteration): \(name) chunk \(id)") { try store.read(id) }
            }
        }
        let scrub = try store.verifyAll()
        #expect(scrub.corrupt == [], "iteration \(iteration)")
        #expect(quarantined() == [], "iteration \(iteration)")
        #expect(store.counters.corruptQuarantined == 0)
        return (names, store.recovery.tempFilesRemoved + index.recovery.tempFilesRemoved)
    }
}
