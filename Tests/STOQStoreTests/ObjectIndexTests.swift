import Foundation
import Testing

@testable import STOQStore

@Suite final class ObjectIndexTests: StoreTestCase {
    private func putChunks(_ store: ChunkStore, _ texts: [String]) throws -> [ChunkID] {
        try Self.putChunks(store, texts)
    }

    private static func putChunks(_ store: ChunkStore, _ texts: [String]) throws -> [ChunkID] {
        try texts.map { t in
            let id = ChunkID(digestOf: Array(t.utf8))
            try store.put(id: id, bytes: Array(t.utf8))
            return id
        }
    }

    @Test func putReadListDeleteObject() throws {
        let store = try ChunkStore(root: root)
        let index = try ObjectIndex(chunks: store)
        let ids = try putChunks(store, ["one", "two", "one"])
        try index.putObject("movie.mkv", manifest: bytes("manifest v1"), chunkIDs: ids)
        try index.putObject("a_b-c.1", manifest: [], chunkIDs: [])
        #expect(try index.listObjects() == ["a_b-c.1", "movie.mkv"])
        let record = try index.object("movie.mkv")
        #expect(record == ObjectRecord(name: "movie.mkv", manifest: bytes("manifest v1"), chunkIDs: ids))
        #expect(try index.object("a_b-c.1").chunkIDs == [])

        // Replacing is atomic and complete.
        try index.putObject("movie.mkv", manifest: bytes("manifest v2"), chunkIDs: [ids[1]])
        #expect(try index.object("movie.mkv").manifest == bytes("manifest v2"))
        #expect(try index.object("movie.mkv").chunkIDs == [ids[1]])
        #expect(tempFiles() == [])

        try index.deleteObject("movie.mkv")
        #expect(try index.listObjects() == ["a_b-c.1"])
        #expect(assertStoreError(.objectNotFound) { try index.object("movie.mkv") } == "no object named movie.mkv")
        #expect(assertStoreError(.objectNotFound) { try index.deleteObject("movie.mkv") } == "no object named movie.mkv")
        // Chunks stay until garbage collection.
        #expect(try store.has(ids[0]))
    }

    @Test func objectNamesAreOneSafeSegment() throws {
        let index = try ObjectIndex(chunks: try ChunkStore(root: root))
        let cases: [(String, String)] = [
            ("", "object name \"\" is not allowed: it is empty"),
            (".hidden", "object name \".hidden\" is not allowed: it starts with a dot"),
            ("..", "object name \"..\" is not allowed: it starts with a dot"),
            ("a/b", "object name \"a/b\" is not allowed: it contains \"/\"; only A-Z a-z 0-9 . _ - are allowed"),
            ("/etc/passwd", "object name \"/etc/passwd\" is not allowed: it contains \"/\"; only A-Z a-z 0-9 . _ - are allowed"),
            ("caf\u{e9}", "object name \"caf\u{e9}\" is not allowed: it contains \"\u{e9}\"; only A-Z a-z 0-9 . _ - are allowed"),
            ("a b", "object name \"a b\" is not allowed: it contains \" \"; only A-Z a-z 0-9 . _ - are allowed"),
            (
                String(repeating: "x", count: 256),
                "object name \"\(String(repeating: "x", count: 256))\" is not allowed: it is 256 bytes long, the limit is 255"
            ),
        ]
        for (name, expected) in cases {
            #expect(assertStoreError(.invalidObjectName) { try index.putObject(name, manifest: [], chunkIDs: []) } == expected)
            assertStoreError(.invalidObjectName) { try index.object(name) }
            assertStoreError(.invalidObjectName) { try index.deleteObject(name) }
        }
        #expect(throws: Never.self) { try index.putObject(String(repeating: "x", count: 255), manifest: [], chunkIDs: []) }
        #expect(try index.listObjects().count == 1)
    }

    @Test func putObjectNeedsAllItsChunks() throws {
        let store = try ChunkStore(root: root)
        let index = try ObjectIndex(chunks: store)
        let have = try putChunks(store, ["present"])
        let absent1 = ChunkID(digestOf: bytes("absent 1")), absent2 = ChunkID(digestOf: bytes("absent 2"))
        let message = assertStoreError(.missingChunks) {
            try index.putObject("obj", manifest: [], chunkIDs: [absent1, have[0], absent2, absent1])
        }
        #expect(message == "object obj refers to 2 chunk(s) the store does not have: \(absent1.hex), \(absent2.hex)")
        #expect(try index.listObjects() == [])
    }

    @Test func missingChunksMessageStaysSmallWhateverTheManifest() throws {
        let index = try ObjectIndex(chunks: ChunkStore(root: root))
        let absent = (0..<100_000).map { ChunkID(digestOf: bytes("absent \($0)")) }
        let message = assertStoreError(.missingChunks) { try index.putObject("big", manifest: [], chunkIDs: absent) }
        #expect(message.utf8.count < 8 << 10)
        let named = absent.prefix(ObjectIndex.missingChunksNamed).map(\.hex).joined(separator: ", ")
        #expect(message == "object big refers to 100000 chunk(s) the store does not have: \(named) and 99968 more")
        #expect(try index.listObjects() == [])
    }

    @Test func collectRemovesUnsharedChunksAndKeepsShared() throws {
        let store = try ChunkStore(root: root, options: .init(collectGracePeriod: .zero))
        let index = try ObjectIndex(chunks: store)
        let ids = try putChunks(store, ["only in A", "in A and B", "only in B"])
        try index.putObject("A", manifest: [], chunkIDs: [ids[0], ids[1]])
        try index.putObject("B", manifest: [], chunkIDs: [ids[1], ids[2]])

        var result = try index.collect()
        #expect(result == .init(objectsScanned: 2, chunksReferenced: 3, chunksInGracePeriod: 0, chunksRemoved: 0, bytesFreed: 0))

        try index.deleteObject("A")
        result = try index.collect()
        #expect(
            result
                == .init(
                    objectsScanned: 1, chunksReferenced: 2, chunksInGracePeriod: 0, chunksRemoved: 1,
                    bytesFreed: UInt64("only in A".utf8.count)))
        #expect(try !store.has(ids[0]))
        #expect(try store.has(ids[1]))
        #expect(try store.has(ids[2]))
        #expect(store.counters.chunksCollected == 1)
        #expect(store.counters.bytesCollected == UInt64("only in A".utf8.count))

        try index.deleteObject("B")
        result = try index.collect()
        #expect(result.chunksRemoved == 2)
        #expect(try store.allChunkIDs() == [])
    }

    /// A record written, or a chunk pinned, while a collection runs keeps the chunks it names,
    /// though they are old and the mark saw no object naming them: `collect` records what
    /// `putObject` writes and takes the pins again under the exclusive lock. Driven through
    /// `phaseHook`, at each point between the phases.
    @Test(arguments: [ObjectIndex.CollectPhase.marked, .walked])
    func aRecordWrittenDuringACollectionKeepsItsOldChunks(at phase: ObjectIndex.CollectPhase) throws {
        let store = try ChunkStore(root: root)  // default grace: 1 h
        let index = try ObjectIndex(chunks: store)
        let ids = try putChunks(store, ["named by a record written mid-run", "pinned mid-run", "garbage"])
        for id in ids { age(path(of: id), secondsAgo: 7200) }
        let pin = index.pinChunks()
        defer { index.unpin(pin) }
        let ran = Flag()
        defer { index.phaseHook = nil }
        index.phaseHook = { p in
            guard p == phase else { return }
            #expect(throws: Never.self) { try index.putObject("late", manifest: [], chunkIDs: [ids[0]]) }
            pin.add(ids[1])
            ran.set()
        }
        let result = try index.collect()
        #expect(ran.isSet)
        #expect(result.chunksRemoved == 1 && result.chunksReferenced == 2)
        #expect(try store.has(ids[0]) && store.has(ids[1]) && !store.has(ids[2]))
        #expect(try index.incompleteObjects() == [:])
    }

    /// The mark and the walk hold no lock a put takes: a chunk put and an object put made while
    /// a collection is paused between its phases complete (on another thread, so that a put
    /// that waited would time out here instead of deadlocking the test).
    @Test(arguments: [ObjectIndex.CollectPhase.marked, .walked])
    func putsGoOnWhileACollectionWalks(at phase: ObjectIndex.CollectPhase) throws {
        let store = try ChunkStore(root: root)
        let index = try ObjectIndex(chunks: store)
        _ = try putChunks(store, ["something to walk"])
        let done = Flag()
        defer { index.phaseHook = nil }
        index.phaseHook = { p in
            guard p == phase else { return }
            let finished = DispatchSemaphore(value: 0)
            Thread {
                #expect(throws: Never.self) {
                    let id = try Self.putChunks(store, ["put mid-collection"])
                    try index.putObject("mid", manifest: [], chunkIDs: id)
                }
                finished.signal()
            }.start()
            #expect(finished.wait(timeout: .now() + 10) == .success, "the puts waited for the collection")
            done.set()
        }
        _ = try index.collect()
        #expect(done.isSet)
        #expect(try index.object("mid").chunkIDs.count == 1)
    }

    @Test func collectSparesYoungUnreferencedChunks() throws {
        let store = try ChunkStore(root: root)  // default grace: 1 h
        let index = try ObjectIndex(chunks: store)
        let ids = try putChunks(store, ["uploaded, object not yet put", "orphan from long ago"])
        age(path(of: ids[1]), secondsAgo: 7200)
        let result = try index.collect()
        #expect(result.chunksInGracePeriod == 1)
        #expect(result.chunksRemoved == 1)
        #expect(try store.has(ids[0]))
        #expect(try !store.has(ids[1]))
        // The upload finishes after the collection: its object is complete.
        #expect(throws: Never.self) { try index.putObject("late", manifest: [], chunkIDs: [ids[0]]) }
        // A grace period given to one collection overrides the option.
        age(path(of: ids[0]), secondsAgo: 7200)
        #expect(try index.collect(gracePeriod: .seconds(1)).chunksRemoved == 0, "referenced now")
    }

    @Test func putOfAnOldChunkRestartsItsGracePeriod() throws {
        let store = try ChunkStore(root: root)
        let index = try ObjectIndex(chunks: store)
        let ids = try putChunks(store, ["old orphan, uploaded again"])
        age(path(of: ids[0]), secondsAgo: 7200)
        #expect(try store.put(id: ids[0], bytes: bytes("old orphan, uploaded again")) == .alreadyPresent)
        #expect(try index.collect().chunksRemoved == 0)
        #expect(try store.has(ids[0]))
    }

    @Test func collectRacingPutsNeverBreaksAnObject() throws {
        let store = try ChunkStore(root: root)  // default grace
        let index = try ObjectIndex(chunks: store)
        let failures = Failures()
        let done = Counter()
        let collections = Counter()
        let group = DispatchGroup()
        // Two threads of their own: swift-testing runs suites in parallel, and on a busy pool a
        // queued block can start after the other has finished. The putter also waits for the
        // collector's first pass, so that puts and collections really overlap.
        group.enter()
        Thread {
            defer { group.leave() }
            while collections.value == 0 && failures.all.isEmpty { usleep(1_000) }
            for i in 0..<60 {
                do {
                    let ids = try Self.putChunks(store, ["shared", "object \(i) a", "object \(i) b"])
                    try index.putObject("o\(i)", manifest: [], chunkIDs: ids)
                    if i % 3 == 0 { try index.deleteObject("o\(i)") }
                } catch {
                    failures.add("put o\(i): \(error)")
                }
            }
            done.bump()
        }.start()
        group.enter()
        Thread {
            defer { group.leave() }
            while done.value == 0 {
                do { _ = try index.collect(gracePeriod: .seconds(60)); collections.bump() } catch { failures.add("collect: \(error)") }
                usleep(2_000)
            }
        }.start()
        group.wait()
        #expect(failures.all == [])
        #expect(collections.value > 0)
        #expect(try index.incompleteObjects() == [:])
        #expect(try index.listObjects().count == 40)
    }

    @Test func openReportsObjectsWithMissingChunksAndRemovesTempRecords() throws {
        let ids: [ChunkID]
        do {
            let store = try ChunkStore(root: root)
            let index = try ObjectIndex(chunks: store)
            ids = try putChunks(store, ["c0", "c1", "c2"])
            try index.putObject("whole", manifest: [], chunkIDs: [ids[0]])
            try index.putObject("broken", manifest: [], chunkIDs: [ids[1], ids[2]])
        }
        #expect(unlink(path(of: ids[2])) == 0)
        #expect(FileManager.default.createFile(atPath: root + "/objects/.tmp-half-written-1", contents: Data([0])))
        let store = try ChunkStore(root: root)
        let index = try ObjectIndex(chunks: store)
        #expect(index.recovery.tempFilesRemoved == 1)
        #expect(index.recovery.incompleteObjects == ["broken": [ids[2]]])
        #expect(index.recovery.unreadableObjects == [:])
        #expect(try index.incompleteObjects() == ["broken": [ids[2]]])
        #expect(tempFiles() == [])
        #expect(try index.listObjects() == ["broken", "whole"], "reported, not dropped")
    }

    @Test func damagedRecordIsReportedAndStopsCollection() throws {
        let store = try ChunkStore(root: root, options: .init(collectGracePeriod: .zero))
        let ids = try putChunks(store, ["needed by the damaged object"])
        try ObjectIndex(chunks: store).putObject("obj", manifest: bytes("m"), chunkIDs: ids)
        try flipByte(root + "/objects/obj", at: 30)
        let index = try ObjectIndex(chunks: store)
        #expect(index.recovery.unreadableObjects == (["obj": "object record \(root)/objects/obj is damaged: checksum mismatch"]))
        assertStoreError(.corruptRecord) { try index.object("obj") }
        let message = assertStoreError(.corruptRecord) { try index.collect() }
        #expect(message == ("garbage collection refused: object record \(root)/objects/obj is damaged: checksum mismatch"))
        #expect(try store.has(ids[0]), "nothing swept")

        #expect((truncate(root + "/objects/obj", 5)) == 0)
        #expect(
            assertStoreError(.corruptRecord) { try index.object("obj") } == ("object record \(root)/objects/obj is damaged: 5 bytes is shorter than any record")
        )
    }

    /// A FIFO with an object's name under objects/ is refused at once as a damaged record: its
    /// open must not wait for a writer (a worker serving a GET would wait forever), and garbage
    /// collection, which cannot know what it names, refuses to sweep.
    @Test func aFIFOInPlaceOfARecordIsRefusedWithoutBlocking() throws {
        let store = try ChunkStore(root: root, options: .init(collectGracePeriod: .zero))
        let index = try ObjectIndex(chunks: store)
        let ids = try putChunks(store, ["kept while the FIFO is there"])
        let fifo = root + "/objects/pipe"
        #expect(mkfifo(fifo, 0o644) == 0)
        let answered = DispatchSemaphore(value: 0)
        let outcome = Failures()
        Thread {
            do { _ = try index.object("pipe") } catch { outcome.add("\(error)") }
            answered.signal()
        }.start()
        if answered.wait(timeout: .now() + 5) == .timedOut {
            // Release the blocked open (a writer arrives), so that the thread ends.
            let w = open(fifo, O_WRONLY | O_NONBLOCK)
            answered.wait()
            if w >= 0 { close(w) }
            Issue.record("object(\"pipe\") blocked in open(2) on a FIFO")
            return  // collect would block the same way
        }
        #expect(outcome.all.count == 1 && outcome.all[0].contains("object record \(fifo) is damaged: it is a FIFO, not a regular file"), "\(outcome.all)")
        #expect(assertStoreError(.corruptRecord) { try index.collect() }.contains("it is a FIFO"))
        #expect(try store.has(ids[0]), "nothing swept")
    }

    /// A record file past the largest record (every field at its limit: `Manifest.maxChunkCount`
    /// ids and entries, the longest owner) is refused before a byte is read; one whose header
    /// lists more chunk ids, or a longer manifest, than any object may have is refused naming
    /// the field. Only that record: the index opens, reports it, and serves the others.
    @Test func aRecordPastTheLimitsIsRefusedAndTheRestStayUsable() throws {
        let store = try ChunkStore(root: root)
        let ids = try putChunks(store, ["kept"])
        try ObjectIndex(chunks: store).putObject("good", manifest: bytes("m"), chunkIDs: ids)
        let huge = root + "/objects/huge"
        #expect(FileManager.default.createFile(atPath: huge, contents: Data("STOQOBJ1".utf8)))
        #expect(truncate(huge, off_t(ObjectRecord.maxEncodedSize) + 1) == 0)  // sparse
        let hugeWhy =
            "object record \(huge) is damaged: it is \(ObjectRecord.maxEncodedSize + 1) bytes, larger than any record may be (\(ObjectRecord.maxEncodedSize) bytes)"

        func header(chunks n: UInt32, manifest m: UInt64) -> [UInt8] {
            var b = Array("STOQOBJ1".utf8)
            for s in stride(from: 24, through: 0, by: -8) { b.append(UInt8(truncatingIfNeeded: n >> UInt32(s))) }
            for s in stride(from: 56, through: 0, by: -8) { b.append(UInt8(truncatingIfNeeded: m >> UInt64(s))) }
            return b + [UInt8](repeating: 0, count: 64)
        }
        let many = UInt32(ObjectRecord.maxChunkCount + 1)
        try Data(header(chunks: many, manifest: 0)).write(to: URL(fileURLWithPath: root + "/objects/many"))
        try Data(header(chunks: 1, manifest: .max)).write(to: URL(fileURLWithPath: root + "/objects/long"))
        let manyWhy = "object record \(root)/objects/many is damaged: it lists \(many) chunk ids, more than any object may have (\(ObjectRecord.maxChunkCount))"
        let longWhy =
            "object record \(root)/objects/long is damaged: its manifest is \(UInt64.max) bytes, longer than any manifest may be (\(ObjectRecord.maxManifestSize) bytes)"

        let index = try ObjectIndex(chunks: store)
        #expect(index.recovery.unreadableObjects == ["huge": hugeWhy, "many": manyWhy, "long": longWhy])
        #expect(assertStoreError(.corruptRecord) { try index.object("huge") } == hugeWhy)
        #expect(assertStoreError(.corruptRecord) { try index.object("many") } == manyWhy)
        #expect(assertStoreError(.corruptRecord) { try index.object("long") } == longWhy)
        #expect(try index.object("good").chunkIDs == ids)
        #expect(try index.listObjects() == ["good", "huge", "long", "many"])
    }

    @Test func ownerIsKeptAndRecordsWithoutOneStayVersion1() throws {
        let store = try ChunkStore(root: root)
        let index = try ObjectIndex(chunks: store)
        let ids = try putChunks(store, ["one"])
        try index.putObject("owned", manifest: bytes("m"), chunkIDs: ids, owner: "token:alice")
        try index.putObject("legacy", manifest: bytes("m"), chunkIDs: ids)
        #expect(try index.object("owned").owner == "token:alice")
        #expect(try index.object("legacy").owner == "")
        let owned = try #require(FileManager.default.contents(atPath: root + "/objects/owned"))
        let legacy = try #require(FileManager.default.contents(atPath: root + "/objects/legacy"))
        #expect(String(decoding: owned.prefix(8), as: UTF8.self) == "STOQOBJ2")
        #expect(String(decoding: legacy.prefix(8), as: UTF8.self) == "STOQOBJ1")
        // A damaged owner length is caught like any other damage.
        var bad = [UInt8](owned)
        bad[21] &+= 1
        try Data(bad).write(to: URL(fileURLWithPath: root + "/objects/owned"))
        #expect(assertStoreError(.corruptRecord) { try index.object("owned") }.contains("do not fill"))
    }
}

/// Set once, read from another thread.
private final class Flag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func set() { lock.withLock { value = true } }
    var isSet: Bool { lock.withLock { value } }
}
