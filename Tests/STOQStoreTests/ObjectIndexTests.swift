import Foundation
import STOQStore
import XCTest

final class ObjectIndexTests: StoreTestCase {
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

    func testPutReadListDeleteObject() throws {
        let store = try ChunkStore(root: root)
        let index = try ObjectIndex(chunks: store)
        let ids = try putChunks(store, ["one", "two", "one"])
        try index.putObject("movie.mkv", manifest: bytes("manifest v1"), chunkIDs: ids)
        try index.putObject("a_b-c.1", manifest: [], chunkIDs: [])
        XCTAssertEqual(try index.listObjects(), ["a_b-c.1", "movie.mkv"])
        let record = try index.object("movie.mkv")
        XCTAssertEqual(record, ObjectRecord(name: "movie.mkv", manifest: bytes("manifest v1"), chunkIDs: ids))
        XCTAssertEqual(try index.object("a_b-c.1").chunkIDs, [])

        // Replacing is atomic and complete.
        try index.putObject("movie.mkv", manifest: bytes("manifest v2"), chunkIDs: [ids[1]])
        XCTAssertEqual(try index.object("movie.mkv").manifest, bytes("manifest v2"))
        XCTAssertEqual(try index.object("movie.mkv").chunkIDs, [ids[1]])
        XCTAssertEqual(tempFiles(), [])

        try index.deleteObject("movie.mkv")
        XCTAssertEqual(try index.listObjects(), ["a_b-c.1"])
        XCTAssertEqual(assertStoreError(.objectNotFound) { try index.object("movie.mkv") }, "no object named movie.mkv")
        XCTAssertEqual(assertStoreError(.objectNotFound) { try index.deleteObject("movie.mkv") }, "no object named movie.mkv")
        // Chunks stay until garbage collection.
        XCTAssertTrue(try store.has(ids[0]))
    }

    func testObjectNamesAreOneSafeSegment() throws {
        let index = try ObjectIndex(chunks: try ChunkStore(root: root))
        let cases: [(String, String)] = [
            ("", "object name \"\" is not allowed: it is empty"),
            (".hidden", "object name \".hidden\" is not allowed: it starts with a dot"),
            ("..", "object name \"..\" is not allowed: it starts with a dot"),
            ("a/b", "object name \"a/b\" is not allowed: it contains \"/\"; only A-Z a-z 0-9 . _ - are allowed"),
            ("/etc/passwd", "object name \"/etc/passwd\" is not allowed: it contains \"/\"; only A-Z a-z 0-9 . _ - are allowed"),
            ("caf\u{e9}", "object name \"caf\u{e9}\" is not allowed: it contains \"\u{e9}\"; only A-Z a-z 0-9 . _ - are allowed"),
            ("a b", "object name \"a b\" is not allowed: it contains \" \"; only A-Z a-z 0-9 . _ - are allowed"),
            (String(repeating: "x", count: 256), "object name \"\(String(repeating: "x", count: 256))\" is not allowed: it is 256 bytes long, the limit is 255"),
        ]
        for (name, expected) in cases {
            XCTAssertEqual(assertStoreError(.invalidObjectName) { try index.putObject(name, manifest: [], chunkIDs: []) }, expected)
            assertStoreError(.invalidObjectName) { try index.object(name) }
            assertStoreError(.invalidObjectName) { try index.deleteObject(name) }
        }
        XCTAssertNoThrow(try index.putObject(String(repeating: "x", count: 255), manifest: [], chunkIDs: []))
        XCTAssertEqual(try index.listObjects().count, 1)
    }

    func testPutObjectNeedsAllItsChunks() throws {
        let store = try ChunkStore(root: root)
        let index = try ObjectIndex(chunks: store)
        let have = try putChunks(store, ["present"])
        let absent1 = ChunkID(digestOf: bytes("absent 1")), absent2 = ChunkID(digestOf: bytes("absent 2"))
        let message = assertStoreError(.missingChunks) {
            try index.putObject("obj", manifest: [], chunkIDs: [absent1, have[0], absent2, absent1])
        }
        XCTAssertEqual(message, "object obj refers to 2 chunk(s) the store does not have: \(absent1.hex), \(absent2.hex)")
        XCTAssertEqual(try index.listObjects(), [])
    }

    func testCollectRemovesUnsharedChunksAndKeepsShared() throws {
        let store = try ChunkStore(root: root, options: .init(collectGracePeriod: .zero))
        let index = try ObjectIndex(chunks: store)
        let ids = try putChunks(store, ["only in A", "in A and B", "only in B"])
        try index.putObject("A", manifest: [], chunkIDs: [ids[0], ids[1]])
        try index.putObject("B", manifest: [], chunkIDs: [ids[1], ids[2]])

        var result = try index.collect()
        XCTAssertEqual(result, .init(objectsScanned: 2, chunksReferenced: 3, chunksInGracePeriod: 0, chunksRemoved: 0, bytesFreed: 0))

        try index.deleteObject("A")
        result = try index.collect()
        XCTAssertEqual(result, .init(objectsScanned: 1, chunksReferenced: 2, chunksInGracePeriod: 0, chunksRemoved: 1,
                                     bytesFreed: UInt64("only in A".utf8.count)))
        XCTAssertFalse(try store.has(ids[0]))
        XCTAssertTrue(try store.has(ids[1]))
        XCTAssertTrue(try store.has(ids[2]))
        XCTAssertEqual(store.counters.chunksCollected, 1)
        XCTAssertEqual(store.counters.bytesCollected, UInt64("only in A".utf8.count))

        try index.deleteObject("B")
        result = try index.collect()
        XCTAssertEqual(result.chunksRemoved, 2)
        XCTAssertEqual(try store.allChunkIDs(), [])
    }

    func testCollectSparesYoungUnreferencedChunks() throws {
        let store = try ChunkStore(root: root)  // default grace: 1 h
        let index = try ObjectIndex(chunks: store)
        let ids = try putChunks(store, ["uploaded, object not yet put", "orphan from long ago"])
        age(path(of: ids[1]), secondsAgo: 7200)
        let result = try index.collect()
        XCTAssertEqual(result.chunksInGracePeriod, 1)
        XCTAssertEqual(result.chunksRemoved, 1)
        XCTAssertTrue(try store.has(ids[0]))
        XCTAssertFalse(try store.has(ids[1]))
        // The upload finishes after the collection: its object is complete.
        XCTAssertNoThrow(try index.putObject("late", manifest: [], chunkIDs: [ids[0]]))
        // A grace period given to one collection overrides the option.
        age(path(of: ids[0]), secondsAgo: 7200)
        XCTAssertEqual(try index.collect(gracePeriod: .seconds(1)).chunksRemoved, 0, "referenced now")
    }

    func testPutOfAnOldChunkRestartsItsGracePeriod() throws {
        let store = try ChunkStore(root: root)
        let index = try ObjectIndex(chunks: store)
        let ids = try putChunks(store, ["old orphan, uploaded again"])
        age(path(of: ids[0]), secondsAgo: 7200)
        XCTAssertEqual(try store.put(id: ids[0], bytes: bytes("old orphan, uploaded again")), .alreadyPresent)
        XCTAssertEqual(try index.collect().chunksRemoved, 0)
        XCTAssertTrue(try store.has(ids[0]))
    }

    func testCollectRacingPutsNeverBreaksAnObject() throws {
        let store = try ChunkStore(root: root)  // default grace
        let index = try ObjectIndex(chunks: store)
        let failures = Failures()
        let done = Counter()
        let collections = Counter()
        let group = DispatchGroup()
        DispatchQueue.global().async(group: group) {
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
        }
        DispatchQueue.global().async(group: group) {
            while done.value == 0 {
                do { _ = try index.collect(gracePeriod: .seconds(60)); collections.bump() } catch { failures.add("collect: \(error)") }
                usleep(2_000)
            }
        }
        group.wait()
        XCTAssertEqual(failures.all, [])
        XCTAssertGreaterThan(collections.value, 0)
        XCTAssertEqual(try index.incompleteObjects(), [:])
        XCTAssertEqual(try index.listObjects().count, 40)
    }

    func testOpenReportsObjectsWithMissingChunksAndRemovesTempRecords() throws {
        let ids: [ChunkID]
        do {
            let store = try ChunkStore(root: root)
            let index = try ObjectIndex(chunks: store)
            ids = try putChunks(store, ["c0", "c1", "c2"])
            try index.putObject("whole", manifest: [], chunkIDs: [ids[0]])
            try index.putObject("broken", manifest: [], chunkIDs: [ids[1], ids[2]])
        }
        XCTAssertEqual(unlink(path(of: ids[2])), 0)
        XCTAssertTrue(FileManager.default.createFile(atPath: root + "/objects/.tmp-half-written-1", contents: Data([0])))
        let store = try ChunkStore(root: root)
        let index = try ObjectIndex(chunks: store)
        XCTAssertEqual(index.recovery.tempFilesRemoved, 1)
        XCTAssertEqual(index.recovery.incompleteObjects, ["broken": [ids[2]]])
        XCTAssertEqual(index.recovery.unreadableObjects, [:])
        XCTAssertEqual(try index.incompleteObjects(), ["broken": [ids[2]]])
        XCTAssertEqual(tempFiles(), [])
        XCTAssertEqual(try index.listObjects(), ["broken", "whole"], "reported, not dropped")
    }

    func testDamagedRecordIsReportedAndStopsCollection() throws {
        let store = try ChunkStore(root: root, options: .init(collectGracePeriod: .zero))
        let ids = try putChunks(store, ["needed by the damaged object"])
        try ObjectIndex(chunks: store).putObject("obj", manifest: bytes("m"), chunkIDs: ids)
        try flipByte(root + "/objects/obj", at: 30)
        let index = try ObjectIndex(chunks: store)
        XCTAssertEqual(index.recovery.unreadableObjects, ["obj": "object record \(root)/objects/obj is damaged: checksum mismatch"])
        assertStoreError(.corruptRecord) { try index.object("obj") }
        let message = assertStoreError(.corruptRecord) { try index.collect() }
        XCTAssertEqual(message, "garbage collection refused: object record \(root)/objects/obj is damaged: checksum mismatch")
        XCTAssertTrue(try store.has(ids[0]), "nothing swept")

        XCTAssertEqual(truncate(root + "/objects/obj", 5), 0)
        XCTAssertEqual(assertStoreError(.corruptRecord) { try index.object("obj") },
                       "object record \(root)/objects/obj is damaged: 5 bytes is shorter than any record")
    }
}
