import Foundation
import STOQStore
import XCTest

final class ChunkStoreTests: StoreTestCase {
    func testPutThenReadLaysOutByDigest() throws {
        let store = try ChunkStore(root: root)
        let data = bytes("hello, chunk")
        let id = ChunkID(digestOf: data)
        XCTAssertEqual(try store.put(id: id, bytes: data), .stored)
        XCTAssertTrue(FileManager.default.fileExists(atPath: path(of: id)))
        XCTAssertTrue(try store.has(id))
        XCTAssertEqual(try store.size(id), data.count)
        XCTAssertEqual(try store.read(id), data)
        XCTAssertEqual(tempFiles(), [])
        let c = store.counters
        XCTAssertEqual(c.chunksWritten, 1)
        XCTAssertEqual(c.bytesWritten, UInt64(data.count))
        XCTAssertEqual(c.chunksRead, 1)
        XCTAssertEqual(c.bytesRead, UInt64(data.count))
        XCTAssertEqual(c.dedupHits, 0)
    }

    func testEmptyChunk() throws {
        let store = try ChunkStore(root: root)
        let id = ChunkID(digestOf: [UInt8]())
        XCTAssertEqual(id.hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        try store.put(id: id, bytes: [UInt8]())
        XCTAssertEqual(try store.read(id), [])
        XCTAssertEqual(try store.size(id), 0)
    }

    func testSecondPutIsDedupHitAndRefreshesMtime() throws {
        let store = try ChunkStore(root: root)
        let data = bytes("stored once")
        let id = ChunkID(digestOf: data)
        try store.put(id: id, bytes: data)
        let ino = inode(path(of: id))
        age(path(of: id), secondsAgo: 7200)
        XCTAssertEqual(try store.put(id: id, bytes: data), .alreadyPresent)
        XCTAssertEqual(inode(path(of: id)), ino, "not rewritten")
        XCTAssertGreaterThan(mtime(path(of: id)), Int(Date().timeIntervalSince1970) - 60, "grace period restarted")
        XCTAssertEqual(store.counters.chunksWritten, 1)
        XCTAssertEqual(store.counters.dedupHits, 1)
    }

    func testDedupOffRewritesEveryPut() throws {
        let store = try ChunkStore(root: root, options: .init(dedup: false))
        let data = bytes("stored twice")
        let id = ChunkID(digestOf: data)
        XCTAssertEqual(try store.put(id: id, bytes: data), .stored)
        let ino = inode(path(of: id))
        XCTAssertEqual(try store.put(id: id, bytes: data), .stored)
        XCTAssertNotEqual(inode(path(of: id)), ino, "a new file renamed over the old one")
        XCTAssertEqual(store.counters.chunksWritten, 2)
        XCTAssertEqual(store.counters.dedupHits, 0)
        XCTAssertEqual(try store.read(id), data)
    }

    func testPutRefusesBytesThatDoNotHashToTheID() throws {
        let store = try ChunkStore(root: root)
        let claimed = ChunkID(digestOf: bytes("what the id says"))
        let actual = ChunkID(digestOf: bytes("what was sent"))
        let message = assertStoreError(.digestMismatch) { try store.put(id: claimed, bytes: self.bytes("what was sent")) }
        XCTAssertEqual(message, "chunk bytes do not match their id: expected digest \(claimed.hex), actual digest \(actual.hex)")
        XCTAssertFalse(try store.has(claimed))
        XCTAssertFalse(try store.has(actual))
        XCTAssertEqual(store.counters.chunksWritten, 0)
    }

    func testReadOfAbsentChunk() throws {
        let store = try ChunkStore(root: root)
        let id = ChunkID(digestOf: bytes("never stored"))
        let message = assertStoreError(.chunkNotFound) { try store.read(id) }
        XCTAssertEqual(message, "chunk \(id.hex) is not in the store")
        XCTAssertFalse(try store.has(id))
        XCTAssertNil(try store.size(id))
    }

    func testMissingKeepsOrderAndDropsDuplicates() throws {
        let store = try ChunkStore(root: root)
        let have = ChunkID(digestOf: bytes("have"))
        try store.put(id: have, bytes: bytes("have"))
        let a = ChunkID(digestOf: bytes("a")), b = ChunkID(digestOf: bytes("b"))
        XCTAssertEqual(try store.missing([b, have, a, b, have]), [b, a])
        XCTAssertEqual(try store.missing([have]), [])
        XCTAssertEqual(try store.missing([]), [])
    }

    func testCorruptChunkIsQuarantinedNeverReturned() throws {
        let store = try ChunkStore(root: root)
        let data = [UInt8](repeating: 0x5a, count: 4096)
        let id = ChunkID(digestOf: data)
        try store.put(id: id, bytes: data)
        try flipByte(path(of: id), at: 100)
        var damaged = data
        damaged[100] ^= 0x01
        let actual = ChunkID(digestOf: damaged)

        let message = assertStoreError(.corrupt) { try store.read(id) }
        let q = quarantined()
        XCTAssertEqual(q.count, 1)
        XCTAssertTrue(q[0].hasPrefix(id.hex + "."), q[0])
        XCTAssertEqual(message, "chunk \(id.hex) is corrupt on disk: its bytes hash to \(actual.hex); moved to quarantine/\(q[0])")
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: root + "/quarantine/" + q[0])), Data(damaged), "kept for inspection")
        XCTAssertFalse(FileManager.default.fileExists(atPath: path(of: id)))
        XCTAssertFalse(try store.has(id))
        XCTAssertEqual(store.counters.corruptQuarantined, 1)
        XCTAssertEqual(store.counters.chunksRead, 0)
        // Gone now, not corrupt: the next read says so.
        assertStoreError(.chunkNotFound) { try store.read(id) }
        XCTAssertEqual(store.counters.corruptQuarantined, 1)
    }

    func testTruncatedChunkIsCorrupt() throws {
        let store = try ChunkStore(root: root)
        let data = [UInt8](repeating: 7, count: 1000)
        let id = ChunkID(digestOf: data)
        try store.put(id: id, bytes: data)
        XCTAssertEqual(truncate(path(of: id), 10), 0)
        assertStoreError(.corrupt) { try store.read(id) }
        XCTAssertEqual(store.counters.corruptQuarantined, 1)
    }

    func testChunksOverTheSizeLimit() throws {
        let store = try ChunkStore(root: root, options: .init(maxChunkSize: 1000))
        let big = [UInt8](repeating: 1, count: 1001)
        let id = ChunkID(digestOf: big)
        XCTAssertEqual(assertStoreError(.chunkTooLarge) { try store.put(id: id, bytes: big) },
                       "chunk \(id.hex) is 1001 bytes, over the store's limit of 1000 bytes")
        XCTAssertNoThrow(try store.put(id: ChunkID(digestOf: big.dropLast()), bytes: Array(big.dropLast())))
        // A file that big in the chunk tree is not read into memory: it is damage.
        let small = bytes("small")
        let sid = ChunkID(digestOf: small)
        try store.put(id: sid, bytes: small)
        try Data(big).write(to: URL(fileURLWithPath: path(of: sid)))
        let message = assertStoreError(.corrupt) { try store.read(sid) }
        XCTAssertTrue(message.hasPrefix("chunk \(sid.hex) is corrupt on disk: it is 1001 bytes, over the store's limit of 1000 bytes; moved to quarantine/"), message)
        XCTAssertEqual(store.counters.corruptQuarantined, 1)
    }

    func testCorruptChunkIsRefetchedFromSource() throws {
        let data = [UInt8](repeating: 0xa5, count: 10_000)
        let id = ChunkID(digestOf: data)
        let asked = Counter()
        let source = ClosureChunkSource { want in
            asked.bump()
            return want == id ? data : nil
        }
        let store = try ChunkStore(root: root, source: source)
        try store.put(id: id, bytes: data)
        try flipByte(path(of: id), at: 9_999)

        XCTAssertEqual(try store.read(id), data)
        XCTAssertEqual(asked.value, 1)
        XCTAssertEqual(quarantined().count, 1)
        let c = store.counters
        XCTAssertEqual(c.corruptQuarantined, 1)
        XCTAssertEqual(c.refetched, 1)
        XCTAssertEqual(c.refetchFailed, 0)
        XCTAssertEqual(c.chunksWritten, 2, "the refetched copy is stored again")
        // The stored copy is good again: read locally, no second fetch.
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path(of: id))), Data(data))
        XCTAssertEqual(try store.read(id), data)
        XCTAssertEqual(asked.value, 1)
    }

    func testMissingChunkIsFetchedFromSource() throws {
        let data = bytes("only the origin has it")
        let id = ChunkID(digestOf: data)
        let store = try ChunkStore(root: root, source: ClosureChunkSource { $0 == id ? data : nil })
        XCTAssertEqual(try store.read(id), data)
        XCTAssertTrue(try store.has(id))
        XCTAssertEqual(store.counters.refetched, 1)
        let other = ChunkID(digestOf: bytes("nobody has it"))
        let message = assertStoreError(.chunkNotFound) { try store.read(other) }
        XCTAssertEqual(message, "chunk \(other.hex) is not in the store, and the chunk source did not supply it")
        XCTAssertEqual(store.counters.refetchFailed, 1)
    }

    func testSourceSendingWrongBytesIsRejected() throws {
        let data = bytes("the real chunk")
        let id = ChunkID(digestOf: data)
        let store = try ChunkStore(root: root, source: ClosureChunkSource { _ in Array("a lie".utf8) })
        try store.put(id: id, bytes: data)
        try flipByte(path(of: id))
        let message = assertStoreError(.corrupt) { try store.read(id) }
        XCTAssertTrue(message.hasSuffix("; the chunk source did not supply a good copy"), message)
        XCTAssertFalse(try store.has(id), "the lie was not stored")
        XCTAssertEqual(store.counters.refetchFailed, 1)
        XCTAssertEqual(store.counters.refetched, 0)
    }

    func testSourceThatThrowsCountsAsFailedRefetch() throws {
        struct Down: Error {}
        let id = ChunkID(digestOf: bytes("x"))
        let store = try ChunkStore(root: root, source: ClosureChunkSource { _ in throw Down() })
        assertStoreError(.chunkNotFound) { try store.read(id) }
        XCTAssertEqual(store.counters.refetchFailed, 1)
    }

    func testPutReplacesACorruptCopyInsteadOfDeduplicating() throws {
        let store = try ChunkStore(root: root)
        let data = bytes("replace me")
        let id = ChunkID(digestOf: data)
        try store.put(id: id, bytes: data)
        try flipByte(path(of: id))
        XCTAssertEqual(try store.put(id: id, bytes: data), .stored)
        XCTAssertEqual(store.counters.corruptQuarantined, 1)
        XCTAssertEqual(store.counters.dedupHits, 0)
        XCTAssertEqual(try store.read(id), data)
    }

    func testOpenRemovesTempFilesOfInterruptedWrites() throws {
        let data = bytes("kept")
        let id = ChunkID(digestOf: data)
        do {
            let store = try ChunkStore(root: root)
            try store.put(id: id, bytes: data)
        }
        let shard = (path(of: id) as NSString).deletingLastPathComponent
        XCTAssertTrue(FileManager.default.createFile(atPath: shard + "/.tmp-\(id.hex)-1234", contents: Data([1, 2, 3])))
        XCTAssertTrue(FileManager.default.createFile(atPath: shard + "/.tmp-\(id.hex)-5678", contents: Data()))
        let store = try ChunkStore(root: root)
        XCTAssertEqual(store.recovery.tempFilesRemoved, 2)
        XCTAssertEqual(store.counters.staleTempFilesRemoved, 2)
        XCTAssertEqual(tempFiles(), [])
        XCTAssertEqual(try store.read(id), data)
    }

    func testOneOpenStorePerDirectory() throws {
        do {
            let store = try ChunkStore(root: root)
            let message = assertStoreError(.locked) { try ChunkStore(root: root) }
            XCTAssertEqual(message, "store \(root) is already open (by another process, or by another ChunkStore in this one): \(root)/lock is locked")
            withExtendedLifetime(store) {}
        }
        // Closed, it opens again.
        XCTAssertNoThrow(try ChunkStore(root: root))
    }

    func testVerifyAllFindsAndQuarantinesCorruptChunks() throws {
        let store = try ChunkStore(root: root)
        var ids: [ChunkID] = []
        for i in 0..<20 {
            let data = bytes("chunk \(i)")
            ids.append(ChunkID(digestOf: data))
            try store.put(id: ids.last!, bytes: data)
        }
        try flipByte(path(of: ids[3]))
        try flipByte(path(of: ids[11]))
        let report = try store.verifyAll()
        XCTAssertEqual(report.checked, 20)
        XCTAssertEqual(Set(report.corrupt), [ids[3], ids[11]])
        XCTAssertEqual(quarantined().count, 2)
        XCTAssertEqual(Set(try store.allChunkIDs()).count, 18)
    }

    func testConcurrentPutsOfTheSameChunks() throws {
        let store = try ChunkStore(root: root)
        let chunks = (0..<50).map { i in [UInt8](repeating: UInt8(i), count: 100 + i) }
        let failures = Counter()
        DispatchQueue.concurrentPerform(iterations: 4) { _ in
            for c in chunks {
                do { try store.put(id: ChunkID(digestOf: c), bytes: c) } catch { failures.bump() }
            }
        }
        XCTAssertEqual(failures.value, 0)
        XCTAssertEqual(try store.allChunkIDs().count, 50)
        XCTAssertEqual(try store.verifyAll().corrupt, [])
        XCTAssertEqual(tempFiles(), [])
        XCTAssertEqual(store.counters.chunksWritten + store.counters.dedupHits, 200)
    }
}

/// A thread-safe count for closures the store calls.
final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var n = 0
    func bump() { lock.withLock { n += 1 } }
    var value: Int { lock.withLock { n } }
}

/// Thread-safe list of what went wrong in background threads.
final class Failures: @unchecked Sendable {
    private let lock = NSLock()
    private var list: [String] = []
    func add(_ s: String) { lock.withLock { list.append(s) } }
    var all: [String] { lock.withLock { list } }
}
