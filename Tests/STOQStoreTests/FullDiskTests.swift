import Foundation
import Logging
import STOQStore
import Synchronization
import STOQTestSupport
import Testing

/// A write(2) that takes `room` bytes in all, then fails with ENOSPC, as a full filesystem
/// does; `room` can be raised (space returns) at any time.
final class FillingDisk: Sendable {
    let room: Atomic<Int>
    init(room: Int) { self.room = Atomic(room) }

    var write: @Sendable (Int32, UnsafeRawPointer, Int) -> Int {
        { [self] fd, p, n in
            let left = room.load(ordering: .relaxed)
            guard left > 0 else {
                errno = ENOSPC
                return -1
            }
            let w = Glibc.write(fd, p, min(n, left))
            if w > 0 { room.subtract(w, ordering: .relaxed) }
            return w
        }
    }
}

@Suite final class FullDiskTests: StoreTestCase {
    @Test func aChunkPutOnAFullDiskLeavesNothingAndSaysHowFarItGot() throws {
        let disk = FillingDisk(room: 1000)
        let store = try ChunkStore(root: root, options: .init(write: disk.write))
        let small = [UInt8](repeating: 1, count: 600), big = [UInt8](repeating: 2, count: 4096)
        #expect(try store.put(id: ChunkID(digestOf: small), bytes: small) == .stored)
        let id = ChunkID(digestOf: big)
        #expect {
            try store.put(id: id, bytes: big)
        } throws: { error in
            let e = error as! StoreError
            return e.code == .noSpace && e.message == "no space left on device while storing chunk \(id.hex) (400 bytes written)"
        }
        // The temp file is gone, the chunk is not there, the first one still reads.
        #expect(tempFiles() == [])
        #expect(try !store.has(id))
        #expect(try store.read(ChunkID(digestOf: small)) == small)
        #expect(store.diskFull.refusals == 1 && store.diskFull.full)
        // Space returns: the same put succeeds, no state to clear.
        disk.room.store(1 << 20, ordering: .relaxed)
        #expect(try store.put(id: id, bytes: big) == .stored)
        #expect(try store.read(id) == big)
        #expect(!store.diskFull.full && store.diskFull.refusals == 1)
    }

    @Test func anObjectRecordOnAFullDiskKeepsThePreviousVersion() throws {
        let disk = FillingDisk(room: 1 << 20)
        let store = try ChunkStore(root: root, options: .init(write: disk.write))
        let index = try ObjectIndex(chunks: store)
        let data = [UInt8](repeating: 3, count: 5000)
        let id = ChunkID(digestOf: data)
        try store.put(id: id, bytes: data)
        try index.putObject("a.bin", manifest: [1, 2, 3], chunkIDs: [id])
        disk.room.store(10, ordering: .relaxed)
        #expect {
            try index.putObject("a.bin", manifest: [UInt8](repeating: 9, count: 100), chunkIDs: [id])
        } throws: { error in
            let e = error as! StoreError
            return e.code == .noSpace && e.message == "no space left on device while storing the record of object a.bin (10 bytes written)"
        }
        #expect(try index.object("a.bin").manifest == [1, 2, 3])
        #expect {
            try index.putObject("b.bin", manifest: [4], chunkIDs: [id])
        } throws: { ($0 as! StoreError).code == .noSpace }
        #expect(try index.listObjects() == ["a.bin"])
        #expect(tempFiles() == [])
        #expect(store.diskFull.refusals == 2)
    }

    @Test func aRefetchThatCannotBeKeptIsStillServed() throws {
        let data = [UInt8](repeating: 4, count: 3000)
        let id = ChunkID(digestOf: data)
        let disk = FillingDisk(room: 0)
        let store = try ChunkStore(root: root, options: .init(write: disk.write), source: ClosureChunkSource { _ in data })
        #expect(try store.read(id) == data)
        #expect(try !store.has(id))
        #expect(store.diskFull.refusals == 1)
        #expect(tempFiles() == [])
    }
}

@Suite struct DiskFullMonitorTests {
    final class Clock: Sendable {
        let t = Atomic<UInt64>(1_000_000_000)
        func advance(seconds: UInt64) { t.add(seconds * 1_000_000_000, ordering: .relaxed) }
    }

    @Test func oneWarningPerEpisodeAndItEndsByItself() {
        let lines = LogCapture(), clock = Clock()
        let m = DiskFullMonitor(logger: Logger(label: "t") { _ in lines }, quietPeriod: .seconds(30)) { clock.t.load(ordering: .relaxed) }
        for _ in 0..<100 { m.refused("chunk x") }
        #expect(m.refusals == 100 && m.episodes == 1 && m.full)
        #expect(lines.count(.warning) == 1)
        // A small write getting through between refusals does not end the episode…
        clock.advance(seconds: 5)
        m.stored()
        #expect(!m.full)
        m.refused("chunk y")
        #expect(lines.count(.warning) == 1 && m.episodes == 1)
        // …a success after a quiet period does, once; the next refusal is a new episode.
        clock.advance(seconds: 31)
        m.stored()
        m.stored()
        #expect(lines.count(.notice) == 1)
        m.refused("chunk z")
        #expect(m.episodes == 2 && lines.count(.warning) == 2)
    }

    @Test func recognisesNoSpaceErrorsByCodeOrText() {
        let m = DiskFullMonitor()
        #expect(m.refusedIfNoSpace(StoreError(.noSpace, "no space left on device while storing x (0 bytes written)")))
        #expect(!m.refusedIfNoSpace(StoreError(.io, "read x: Input/output error (errno 5)")))
        struct Other: Error, CustomStringConvertible { var description: String }
        #expect(m.refusedIfNoSpace(Other(description: "index.tmp: \(String(cString: strerror(ENOSPC)))")))
        #expect(m.refusals == 2)
    }
}
