import Foundation
import STOQStore
import STOQTestSupport
import Testing

@Suite final class ChunkStoreTests: StoreTestCase {
    @Test func putThenReadLaysOutByDigest() throws {
        let store = try ChunkStore(root: root)
        let data = bytes("hello, chunk")
        let id = ChunkID(digestOf: data)
        #expect(try store.put(id: id, bytes: data) == .stored)
        #expect(FileManager.default.fileExists(atPath: path(of: id)))
        #expect(try store.has(id))
        #expect(try store.size(id) == data.count)
        #expect(try store.read(id) == data)
        #expect(tempFiles() == [])
        let c = store.counters
        #expect(c.chunksWritten == 1)
        #expect(c.bytesWritten == UInt64(data.count))
        #expect(c.chunksRead == 1)
        #expect(c.bytesRead == UInt64(data.count))
        #expect(c.dedupHits == 0)
    }

    @Test func emptyChunk() throws {
        let store = try ChunkStore(root: root)
        let id = ChunkID(digestOf: [UInt8]())
        #expect(id.hex == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        try store.put(id: id, bytes: [UInt8]())
        #expect(try store.read(id) == [])
        #expect(try store.size(id) == 0)
    }

    @Test func secondPutIsDedupHitAndRefreshesMtime() throws {
        let store = try ChunkStore(root: root)
        let data = bytes("stored once")
        let id = ChunkID(digestOf: data)
        try store.put(id: id, bytes: data)
        let ino = inode(path(of: id))
        age(path(of: id), secondsAgo: 7200)
        #expect(try store.put(id: id, bytes: data) == .alreadyPresent)
        #expect(inode(path(of: id)) == ino, "not rewritten")
        #expect(mtime(path(of: id)) > (Int(Date().timeIntervalSince1970) - 60), "grace period restarted")
        #expect(store.counters.chunksWritten == 1)
        #expect(store.counters.dedupHits == 1)
    }

    @Test func dedupOffRewritesEveryPut() throws {
        let store = try ChunkStore(root: root, options: .init(dedup: false))
        let data = bytes("stored twice")
        let id = ChunkID(digestOf: data)
        #expect(try store.put(id: id, bytes: data) == .stored)
        let ino = inode(path(of: id))
        #expect(try store.put(id: id, bytes: data) == .stored)
        #expect(inode(path(of: id)) != ino, "a new file renamed over the old one")
        #expect(store.counters.chunksWritten == 2)
        #expect(store.counters.dedupHits == 0)
        #expect(try store.read(id) == data)
    }

    @Test func putRefusesBytesThatDoNotHashToTheID() throws {
        let store = try ChunkStore(root: root)
        let claimed = ChunkID(digestOf: bytes("what the id says"))
        let actual = ChunkID(digestOf: bytes("what was sent"))
        let message = assertStoreError(.digestMismatch) { try store.put(id: claimed, bytes: self.bytes("what was sent")) }
        #expect(message == "chunk bytes do not match their id: expected digest \(claimed.hex), actual digest \(actual.hex)")
        #expect(try !store.has(claimed))
        #expect(try !store.has(actual))
        #expect(store.counters.chunksWritten == 0)
    }

    @Test func readOfAbsentChunk() throws {
        let store = try ChunkStore(root: root)
        let id = ChunkID(digestOf: bytes("never stored"))
        let message = assertStoreError(.chunkNotFound) { try store.read(id) }
        #expect(message == ("chunk \(id.hex) is not in the store"))
        #expect(try !store.has(id))
        #expect(try store.size(id) == nil)
    }

    @Test func missingKeepsOrderAndDropsDuplicates() throws {
        let store = try ChunkStore(root: root)
        let have = ChunkID(digestOf: bytes("have"))
        try store.put(id: have, bytes: bytes("have"))
        let a = ChunkID(digestOf: bytes("a")), b = ChunkID(digestOf: bytes("b"))
        #expect(try store.missing([b, have, a, b, have]) == [b, a])
        #expect(try store.missing([have]) == [])
        #expect(try store.missing([]) == [])
    }

    @Test func corruptChunkIsQuarantinedNeverReturned() throws {
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
        #expect(q.count == 1)
        #expect(q[0].hasPrefix(id.hex + "."), Comment(rawValue: q[0]))
        #expect(message == ("chunk \(id.hex) is corrupt on disk: its bytes hash to \(actual.hex); moved to quarantine/\(q[0])"))
        #expect(try (Data(contentsOf: URL(fileURLWithPath: root + "/quarantine/" + q[0]))) == Data(damaged), "kept for inspection")
        #expect(!FileManager.default.fileExists(atPath: path(of: id)))
        #expect(try !store.has(id))
        #expect(store.counters.corruptQuarantined == 1)
        #expect(store.counters.chunksRead == 0)
        // Gone now, not corrupt: the next read says so.
        assertStoreError(.chunkNotFound) { try store.read(id) }
        #expect(store.counters.corruptQuarantined == 1)
    }

    /// A caller that hashed the bytes itself (ingest) stores them without a second hash; the
    /// size limit and dedup still apply, and what is stored reads back verified.
    @Test func putOfBytesTheCallerHashed() throws {
        let store = try ChunkStore(root: root, options: .init(maxChunkSize: 1000))
        let data = [UInt8](repeating: 9, count: 1000)
        let id = ChunkID(digestOf: data)
        let (first, again) = try data.withUnsafeBytes { b in
            (try store.put(id: id, hashedBytes: b), try store.put(id: id, hashedBytes: b))
        }
        #expect(first == .stored && again == .alreadyPresent)
        #expect(try store.read(id) == data)
        let big = [UInt8](repeating: 1, count: 1001)
        #expect(
            assertStoreError(.chunkTooLarge) { _ = try big.withUnsafeBytes { try store.put(id: ChunkID(digestOf: big), hashedBytes: $0) } }
                == "chunk \(ChunkID(digestOf: big).hex) is 1001 bytes, over the store's limit of 1000 bytes")
    }

    @Test func truncatedChunkIsCorrupt() throws {
        let store = try ChunkStore(root: root)
        let data = [UInt8](repeating: 7, count: 1000)
        let id = ChunkID(digestOf: data)
        try store.put(id: id, bytes: data)
        #expect(truncate(path(of: id), 10) == 0)
        assertStoreError(.corrupt) { try store.read(id) }
        #expect(store.counters.corruptQuarantined == 1)
    }

    @Test func chunksOverTheSizeLimit() throws {
        let store = try ChunkStore(root: root, options: .init(maxChunkSize: 1000))
        let big = [UInt8](repeating: 1, count: 1001)
        let id = ChunkID(digestOf: big)
        #expect(
            assertStoreError(.chunkTooLarge) { try store.put(id: id, bytes: big) } == ("chunk \(id.hex) is 1001 bytes, over the store's limit of 1000 bytes"))
        #expect(throws: Never.self) { try store.put(id: ChunkID(digestOf: big.dropLast()), bytes: Array(big.dropLast())) }
        // A file larger than any chunk may be is not read into memory: it is damage. (Sparse:
        // the test writes no gigabyte.)
        let small = bytes("small")
        let sid = ChunkID(digestOf: small)
        try store.put(id: sid, bytes: small)
        #expect(truncate(path(of: sid), off_t(ChunkStore.largestChunkFile) + 1) == 0)
        let message = assertStoreError(.corrupt) { try store.read(sid) }
        #expect(
            message.hasPrefix(
                "chunk \(sid.hex) is corrupt on disk: it is \(ChunkStore.largestChunkFile + 1) bytes, larger than any chunk this store takes (1000 bytes); moved to quarantine/"
            ),
            Comment(rawValue: message))
        #expect(store.counters.corruptQuarantined == 1)
    }

    /// A chunk file grown on disk (here 64 MiB, sparse) is not the chunk a caller knows the
    /// length of: a read given the length, and a put (whose bytes say it), quarantine it after
    /// the fstat of the open file, without reading or hashing what it holds.
    @Test func aChunkFileGrownOnDiskIsQuarantinedUnreadWhenItsLengthIsKnown() throws {
        let lines = LogCapture()
        let store = try ChunkStore(root: root, logger: lines.logger)
        let data = [UInt8](repeating: 0x3c, count: 4000)
        let id = ChunkID(digestOf: data)
        let grown = 64 << 20
        try store.put(id: id, bytes: data)
        #expect(truncate(path(of: id), off_t(grown)) == 0)
        let message = assertStoreError(.corrupt) { try store.read(id, length: data.count) }
        let q = quarantined()
        #expect(q.count == 1)
        #expect(message == "chunk \(id.hex) is corrupt on disk: it is \(grown) bytes, and the chunk is 4000 bytes; moved to quarantine/\(q.first ?? "")")
        #expect(store.counters.corruptQuarantined == 1 && store.counters.bytesRead == 0)

        // A put finds the file grown again: quarantined unread, and replaced by the good copy.
        try store.put(id: id, bytes: data)
        #expect(truncate(path(of: id), off_t(grown)) == 0)
        #expect(try store.put(id: id, bytes: data) == .stored)
        #expect(store.counters.corruptQuarantined == 2 && store.counters.dedupHits == 0)
        #expect(lines.metadata("problem", of: "corrupt chunk quarantined") == Array(repeating: "it is \(grown) bytes, and the chunk is 4000 bytes", count: 2))
        #expect(try store.read(id, length: data.count) == data)
        // Without a length only the store's largest chunk applies (and the digest decides).
        #expect(try store.read(id) == data)
    }

    /// A chunk file grown on disk past the largest chunk the store takes (`largestChunk`, here
    /// 1 MiB) is quarantined unread also where no length is known: a read (`GET /chunks/<id>`)
    /// and the scrub, at its `fstat`, counted and logged like any corrupt chunk — not read and
    /// hashed whole (64 MiB here, up to 1 GiB).
    @Test func aChunkFileGrownPastTheLargestChunkIsQuarantinedUnreadByReadAndScrub() throws {
        let lines = LogCapture()
        let store = try ChunkStore(root: root, options: .init(maxChunkSize: 1 << 20), logger: lines.logger)
        #expect(store.largestChunk == 1 << 20)
        let data = [UInt8](repeating: 0x4d, count: 4000)
        let id = ChunkID(digestOf: data)
        let grown = 64 << 20
        let why = "it is \(grown) bytes, larger than any chunk this store takes (\(1 << 20) bytes)"
        try store.put(id: id, bytes: data)
        #expect(truncate(path(of: id), off_t(grown)) == 0)
        let message = assertStoreError(.corrupt) { try store.read(id) }
        #expect(message == "chunk \(id.hex) is corrupt on disk: \(why); moved to quarantine/\(quarantined().first ?? "")")
        #expect(store.counters.corruptQuarantined == 1 && store.counters.bytesRead == 0)

        try store.put(id: id, bytes: data)
        #expect(truncate(path(of: id), off_t(grown)) == 0)
        let scrub = try store.verifyAll()
        #expect(scrub.checked == 1 && scrub.corrupt == [id])
        #expect(quarantined().count == 2 && !FileManager.default.fileExists(atPath: path(of: id)))
        #expect(store.counters.corruptQuarantined == 2 && store.counters.bytesRead == 0)
        #expect(lines.metadata("problem", of: "corrupt chunk quarantined") == [why, why])
    }

    /// `largest_chunk` keeps the largest limit a store was opened with: raised with the
    /// limit, never lowered; a store with chunks but no such file (older) cannot know, and
    /// takes the format's largest.
    @Test func theLargestChunkIsTheLargestLimitTheStoreEverHad() throws {
        let file = root + "/largest_chunk"
        do { #expect(try ChunkStore(root: root, options: .init(maxChunkSize: 2000)).largestChunk == 2000) }
        #expect(try String(contentsOfFile: file, encoding: .utf8) == "2000\n")
        do { #expect(try ChunkStore(root: root, options: .init(maxChunkSize: 5000)).largestChunk == 5000) }
        do { #expect(try ChunkStore(root: root, options: .init(maxChunkSize: 1000)).largestChunk == 5000) }
        do {
            let store = try ChunkStore(root: root, options: .init(maxChunkSize: 1000))
            try store.put(id: ChunkID(digestOf: bytes("kept")), bytes: bytes("kept"))
        }
        try FileManager.default.removeItem(atPath: file)
        do { #expect(try ChunkStore(root: root, options: .init(maxChunkSize: 1000)).largestChunk == ChunkStore.largestChunkFile) }
        #expect(try String(contentsOfFile: file, encoding: .utf8) == "\(ChunkStore.largestChunkFile)\n")
        #expect(tempFiles() == [])
    }

    /// `chunking.max_chunk_size` lowered: the chunks stored under the old limit are still good
    /// (their digests say so), read and served, not quarantined; only puts are held to the new one.
    @Test func chunksStoredUnderALargerLimitAreStillRead() throws {
        let big = [UInt8](repeating: 7, count: 4000)
        let id = ChunkID(digestOf: big)
        do {
            let store = try ChunkStore(root: root, options: .init(maxChunkSize: 4096))
            try store.put(id: id, bytes: big)
        }
        let store = try ChunkStore(root: root, options: .init(maxChunkSize: 1000))
        #expect(store.largestChunk == 4096)
        #expect(try store.read(id) == big)
        #expect(store.counters.corruptQuarantined == 0 && quarantined().isEmpty)
        let scrub = try store.verifyAll()
        #expect(scrub.checked == 1 && scrub.corrupt == [])
        #expect(!assertStoreError(.chunkTooLarge) { try store.put(id: id, bytes: big) }.isEmpty)
    }

    /// A FIFO where a chunk belongs is refused at once as not a regular file and moved to
    /// quarantine: opened without O_NONBLOCK it blocked the reading thread until a writer came
    /// (here: the test, forever).
    @Test func aFIFOInPlaceOfAChunkIsCorruptNotABlockedRead() throws {
        let data = [UInt8](repeating: 0x5a, count: 3000)
        let id = ChunkID(digestOf: data)
        let store = try ChunkStore(root: root)
        try store.put(id: id, bytes: data)
        #expect(unlink(path(of: id)) == 0 && mkfifo(path(of: id), 0o600) == 0)
        let thrown = assertStoreError(.corrupt) { _ = try store.read(id) }
        #expect(thrown.contains("is not a regular file"), "\(thrown)")
        #expect(quarantined().count == 1 && store.counters.corruptQuarantined == 1)
    }

    @Test func corruptChunkIsRefetchedFromSource() throws {
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

        #expect(try store.read(id) == data)
        #expect(asked.value == 1)
        #expect(quarantined().count == 1)
        let c = store.counters
        #expect(c.corruptQuarantined == 1)
        #expect(c.refetched == 1)
        #expect(c.refetchFailed == 0)
        #expect(c.chunksWritten == 2, "the refetched copy is stored again")
        // The stored copy is good again: read locally, no second fetch.
        #expect(try Data(contentsOf: URL(fileURLWithPath: path(of: id))) == Data(data))
        #expect(try store.read(id) == data)
        #expect(asked.value == 1)
    }

    @Test func missingChunkIsFetchedFromSource() throws {
        let data = bytes("only the origin has it")
        let id = ChunkID(digestOf: data)
        let store = try ChunkStore(root: root, source: ClosureChunkSource { $0 == id ? data : nil })
        #expect(try store.read(id) == data)
        #expect(try store.has(id))
        #expect(store.counters.refetched == 1)
        let other = ChunkID(digestOf: bytes("nobody has it"))
        let message = assertStoreError(.chunkNotFound) { try store.read(other) }
        #expect(message == ("chunk \(other.hex) is not in the store, and the chunk source did not supply it"))
        #expect(store.counters.refetchFailed == 1)
    }

    @Test func sourceSendingWrongBytesIsRejected() throws {
        let data = bytes("the real chunk")
        let id = ChunkID(digestOf: data)
        let store = try ChunkStore(root: root, source: ClosureChunkSource { _ in Array("a lie".utf8) })
        try store.put(id: id, bytes: data)
        try flipByte(path(of: id))
        let message = assertStoreError(.corrupt) { try store.read(id) }
        #expect(message.hasSuffix("; the chunk source did not supply a good copy"), Comment(rawValue: message))
        #expect(try !store.has(id), "the lie was not stored")
        #expect(store.counters.refetchFailed == 1)
        #expect(store.counters.refetched == 0)
    }

    @Test func sourceThatThrowsCountsAsFailedRefetch() throws {
        struct Down: Error {}
        let id = ChunkID(digestOf: bytes("x"))
        let store = try ChunkStore(root: root, source: ClosureChunkSource { _ in throw Down() })
        assertStoreError(.chunkNotFound) { try store.read(id) }
        #expect(store.counters.refetchFailed == 1)
    }

    @Test func putReplacesACorruptCopyInsteadOfDeduplicating() throws {
        let store = try ChunkStore(root: root)
        let data = bytes("replace me")
        let id = ChunkID(digestOf: data)
        try store.put(id: id, bytes: data)
        try flipByte(path(of: id))
        #expect(try store.put(id: id, bytes: data) == .stored)
        #expect(store.counters.corruptQuarantined == 1)
        #expect(store.counters.dedupHits == 0)
        #expect(try store.read(id) == data)
    }

    @Test func openRemovesTempFilesOfInterruptedWrites() throws {
        let data = bytes("kept")
        let id = ChunkID(digestOf: data)
        do {
            let store = try ChunkStore(root: root)
            try store.put(id: id, bytes: data)
        }
        let shard = (path(of: id) as NSString).deletingLastPathComponent
        #expect(FileManager.default.createFile(atPath: shard + "/.tmp-\(id.hex)-1234", contents: Data([1, 2, 3])))
        #expect(FileManager.default.createFile(atPath: shard + "/.tmp-\(id.hex)-5678", contents: Data()))
        let store = try ChunkStore(root: root)
        #expect(store.recovery.tempFilesRemoved == 2)
        #expect(store.counters.staleTempFilesRemoved == 2)
        #expect(tempFiles() == [])
        #expect(try store.read(id) == data)
    }

    @Test func oneOpenStorePerDirectory() throws {
        do {
            let store = try ChunkStore(root: root)
            let message = assertStoreError(.locked) { try ChunkStore(root: root) }
            #expect(message == ("store \(root) is already open (by another process, or by another ChunkStore in this one): \(root)/lock is locked"))
            withExtendedLifetime(store) {}
        }
        // Closed, it opens again.
        #expect(throws: Never.self) { try ChunkStore(root: root) }
    }

    @Test func verifyAllFindsAndQuarantinesCorruptChunks() throws {
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
        #expect(report.checked == 20)
        #expect(Set(report.corrupt) == [ids[3], ids[11]])
        #expect(quarantined().count == 2)
        #expect(Set(try store.allChunkIDs()).count == 18)
    }

    @Test func concurrentPutsOfTheSameChunks() throws {
        let store = try ChunkStore(root: root)
        let chunks = (0..<50).map { i in [UInt8](repeating: UInt8(i), count: 100 + i) }
        let failures = Counter()
        DispatchQueue.concurrentPerform(iterations: 4) { _ in
            for c in chunks {
                do { try store.put(id: ChunkID(digestOf: c), bytes: c) } catch { failures.bump() }
            }
        }
        #expect(failures.value == 0)
        #expect(try store.allChunkIDs().count == 50)
        #expect(try store.verifyAll().corrupt == [])
        #expect(tempFiles() == [])
        #expect((store.counters.chunksWritten + store.counters.dedupHits) == 200)
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
