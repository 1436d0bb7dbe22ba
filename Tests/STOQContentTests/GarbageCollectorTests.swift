import Foundation
import Testing

@testable import STOQContent
@testable import STOQStore

/// Garbage collection on its schedule, as a node runs it: what a replaced chunked object left
/// is removed once past the grace period, `limits.storage_cap` sees the bytes freed, and the
/// chunks of uploads in progress stay.
@Suite final class GarbageCollectorTests {
    let dir: String

    init() throws {
        var template = Array((NSTemporaryDirectory() + "/stoq-gc-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else { throw StoreError(.io, "mkdtemp failed") }
        dir = String(cString: made)
    }

    deinit { try? FileManager.default.removeItem(atPath: dir) }

    /// Puts a chunk of 1000 bytes of `fill` the way a chunk PUT does: room under the cap
    /// reserved, written, released.
    func putChunk(_ gate: ObjectGate, _ store: ChunkStore, _ fill: UInt8) throws -> ChunkID {
        let bytes = [UInt8](repeating: fill, count: 1000)
        let id = ChunkID(digestOf: bytes)
        #expect(gate.reserve(1000) == nil)
        defer { gate.release(1000) }
        try store.put(id: id, bytes: bytes)
        return id
    }

    func commit(_ gate: ObjectGate, _ index: ObjectIndex, _ name: String, _ ids: [ChunkID]) throws {
        let alice = ObjectGate.Writer(identity: "token:alice")
        let refusal = try gate.commit(name, by: alice, size: UInt64(1000 * ids.count), physical: 0, chunked: true) {
            try index.putObject(name, manifest: [], chunkIDs: ids, owner: alice.identity)
        }
        #expect(refusal == nil)
    }

    /// Sets the mtime of chunk `id`'s file an hour back: past any grace period here.
    func age(_ id: ChunkID) {
        let hex = id.hex
        var times = [timespec(tv_sec: time(nil) - 3600, tv_nsec: 0), timespec(tv_sec: time(nil) - 3600, tv_nsec: 0)]
        #expect(utimensat(AT_FDCWD, "\(dir)/content/chunks/\(hex.prefix(2))/\(hex.dropFirst(2).prefix(2))/\(hex)", &times, 0) == 0)
    }

    @Test func aReplacedObjectsChunksAreCollectedOnScheduleAndTheCapAdmitsAgain() throws {
        let store = try ChunkStore(root: dir + "/content", options: .init(collectGracePeriod: .milliseconds(300)))
        let index = try ObjectIndex(chunks: store)
        let gate = try ObjectGate(settings: .init(storageCap: 3000), storagePath: dir + "/objects", index: index)
        let a = try putChunk(gate, store, 1), b = try putChunk(gate, store, 2)
        try commit(gate, index, "o", [a, b])
        let c = try putChunk(gate, store, 3)
        try commit(gate, index, "o", [c])  // replaced: a and b are garbage now
        #expect(gate.counters.storedBytes == 3000)
        #expect(gate.reserve(1000)?.status == 507, "at the cap: the old version's chunks still count")

        let collector = GarbageCollector(index: index, interval: .milliseconds(100))
        collector.start()
        defer { collector.stop() }
        let deadline = Date(timeIntervalSinceNow: 10)
        while store.counters.chunksCollected < 2 && Date() < deadline { usleep(20_000) }
        #expect(store.counters.chunksCollected == 2 && store.counters.bytesCollected == 2000)
        #expect(try !store.has(a) && !store.has(b) && store.has(c))
        #expect(collector.counters.runs >= 1 && collector.counters.failures == 0)
        #expect(gate.counters.storedBytes == 1000)
        #expect(gate.reserve(1000) == nil, "the cap admits a write again")
        gate.release(1000)
        // From here each collection is the test's own: a scheduled one could remove d as soon
        // as it is unpinned, before the `collectNow` that is to show it.
        collector.stop()

        // An ingest in progress: its pinned chunk stays whatever its age, until it ends.
        let d = try putChunk(gate, store, 4)
        let pin = index.pinChunks()
        pin.add(d)
        age(d)
        #expect(try collector.collectNow().chunksRemoved == 0)
        #expect(try store.has(d))
        index.unpin(pin)
        #expect(try collector.collectNow().chunksRemoved == 1, "abandoned: collected like any chunk no object names")
        #expect(try !store.has(d))
    }

    @Test func stopEndsTheScheduleAndZeroRunsNone() throws {
        let store = try ChunkStore(root: dir + "/content")
        let index = try ObjectIndex(chunks: store)
        // Zero: `start` starts no thread, so nothing runs but `collectNow`.
        let off = GarbageCollector(index: index, interval: .zero)
        off.start()
        #expect(!off.isScheduled, "no schedule for a zero interval")
        off.stop()
        #expect(off.counters.runs == 0)
        #expect(throws: Never.self) { try off.collectNow() }
        #expect(off.counters.runs == 1, "collectNow runs with no schedule")
        let on = GarbageCollector(index: index, interval: .milliseconds(10))
        on.start()
        #expect(on.isScheduled)
        let deadline = Date(timeIntervalSinceNow: 10)
        while on.counters.runs == 0 && Date() < deadline { usleep(5_000) }
        on.stop()
        let runs = on.counters.runs
        #expect(runs > 0)
        usleep(50_000)
        #expect(on.counters.runs == runs, "no run after stop")
    }
}
