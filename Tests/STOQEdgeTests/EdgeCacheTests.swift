import Crypto
import Foundation
import Logging
import STOQCache
import STOQChunking
import STOQStore
import STOQTransfer
import XCTest

@testable import STOQEdge

/// The edge cache's restart path without a network: what is on disk is reconciled with the
/// index snapshot (a crash can leave chunks the snapshot never saw, or a snapshot naming
/// chunks that are gone), and the bound holds on open — for chunks (which get fifteen
/// sixteenths of it) and manifests (one sixteenth) alike.
final class EdgeCacheTests: XCTestCase {
    var root = ""

    override func setUp() {
        root = FileManager.default.temporaryDirectory.appendingPathComponent("stoq-edge-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: root) }

    func open(capacity: UInt64) throws -> EdgeCache {
        try EdgeCache(root: root, capacity: capacity, ttlDefault: 3_600_000_000_000, origin: "https://[::1]:9",
                      trust: ClientTrust(), datapath: Self.noNetwork, maxChunkSize: 1 << 20, logger: Logger(label: "test"))
    }

    /// These tests never reach an origin: a connect fails at once.
    static let noNetwork = ClientDatapath { throw ClientError(.connect, "no network in EdgeCacheTests") }

    func chunk(_ i: Int, _ size: Int) -> (ChunkID, [UInt8]) {
        var bytes = [UInt8](repeating: 0, count: size)
        for j in 0..<size { bytes[j] = UInt8(truncatingIfNeeded: i &* 31 &+ j &* 7 &+ j >> 8) }
        return (ChunkID(digestOf: bytes), bytes)
    }

    func testChunksOnDiskAreAdoptedAndTheBoundHoldsOnOpen() throws {
        var ids: [ChunkID] = []
        do {
            let cache = try open(capacity: 1_200_000)
            XCTAssertEqual(cache.counters.cachedChunks, 0)
            // As if fetched just before a crash, before any snapshot was written.
            for i in 0..<10 {
                let (id, bytes) = chunk(i, 100_000)
                try cache.store.put(id: id, bytes: bytes)
                ids.append(id)
            }
        }
        do {
            let cache = try open(capacity: 1_200_000)
            XCTAssertEqual(cache.counters.cachedChunks, 10)
            XCTAssertEqual(cache.counters.cachedBytes, 1_000_000)
            XCTAssertNotNil(cache.readChunk(ids[3]))
            cache.persist()
            XCTAssertTrue(FileManager.default.fileExists(atPath: root + "/index"))
        }
        // A chunk deleted behind the cache's back is dropped from the index on open.
        let (shard, name) = (ids[5].hex.prefix(2) + "/" + ids[5].hex.dropFirst(2).prefix(2), ids[5].hex)
        XCTAssertEqual(unlink(root + "/chunks/\(shard)/\(name)"), 0)
        do {
            let cache = try open(capacity: 1_200_000)
            XCTAssertEqual(cache.counters.cachedChunks, 9)
            XCTAssertFalse(cache.holds(ids[5]))
            XCTAssertNil(cache.readChunk(ids[5]))
        }
        // Reopened with a smaller bound: it evicts down to it, on disk too.
        do {
            let cache = try open(capacity: 480_000)  // 450 000 for chunks
            let c = cache.counters
            XCTAssertLessThanOrEqual(c.cachedBytes, 450_000)
            XCTAssertEqual(c.cachedChunks, 4)
            XCTAssertEqual(c.evictions, 5)
            XCTAssertEqual(try cache.store.allChunkIDs().count, 4)
        }
    }

    func testACorruptIndexIsRebuiltFromTheChunks() throws {
        do {
            let cache = try open(capacity: 1_200_000)
            for i in 0..<3 { let (id, b) = chunk(i, 5000); try cache.store.put(id: id, bytes: b) }
        }
        try Data("not an index".utf8).write(to: URL(fileURLWithPath: root + "/index"))
        let cache = try open(capacity: 1_200_000)
        XCTAssertEqual(cache.counters.cachedChunks, 3)
    }

    func manifest(_ seed: Int, bytes count: Int) throws -> [UInt8] {
        let data = (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ seed &* 7919 &+ $0 >> 7) }
        let p = try ChunkingParameters(algorithm: .fixed, minSize: 64, avgSize: 256, maxSize: 1024)
        return try Manifest(chunking: BytesSource(data), parameters: p).encode()
    }

    /// Manifests have a budget of a sixteenth of the bound: the least recently used leave
    /// first (file and all), one larger than the budget is not kept, and on reopen the saved
    /// ones come back most recent last, within a budget that may have shrunk.
    func testManifestsStayWithinTheirShareLeastRecentlyUsedFirst() throws {
        let dir = root + "/manifests"
        let m = try manifest(1, bytes: 256 * 40)  // 40 chunks
        let entry = EdgeManifests.Entry(bytes: m, expires: 1e12)
        let budget = entry.size * 3  // room for three
        var names: [String] = []
        do {
            var ms = try EdgeManifests(dir: dir, capacity: budget, logger: Logger(label: "test"))
            for i in 0..<3 {
                names.append("m\(i)")
                try CacheIndexFile.write(EdgeManifests.encode(entry), to: ms.path(names[i]))
                XCTAssertEqual(ms.insert(names[i], entry).evicted, [])
                usleep(10_000)  // distinct modification times
            }
            XCTAssertNotNil(ms.get("m0"))  // m0 used: m1 is now the least recently used
            try CacheIndexFile.write(EdgeManifests.encode(entry), to: ms.path("m3"))
            let r = ms.insert("m3", entry)
            XCTAssertTrue(r.kept)
            XCTAssertEqual(r.evicted, ["m1"])
            unlink(ms.path("m1"))
            XCTAssertNil(ms.get("m1"))
            XCTAssertEqual(ms.count, 3)
            XCTAssertEqual(ms.usedBytes, budget)
            let big = EdgeManifests.Entry(bytes: try manifest(2, bytes: 256 * 200), expires: 1e12)
            XCTAssertFalse(ms.insert("big", big).kept)
            XCTAssertNil(ms.get("big"))
            XCTAssertEqual(ms.count, 3, "a manifest too large for the budget evicts nothing")
        }
        try Data("garbage".utf8).write(to: URL(fileURLWithPath: dir + "/bad"))
        do {
            // Reopened with room for two: the oldest file (m0, written first) goes.
            let ms = try EdgeManifests(dir: dir, capacity: entry.size * 2, logger: Logger(label: "test"))
            XCTAssertEqual(ms.count, 2)
            XCTAssertEqual(ms.evictedOnLoad, 1)
            XCTAssertEqual(Set(try FileManager.default.contentsOfDirectory(atPath: dir)), ["m2", "m3"],
                           "the evicted and the unreadable files are deleted")
        }
    }

    /// The edge cache reports manifests in its size, and the chunks' share leaves room for them.
    func testCachedBytesCountManifests() throws {
        let dir = root + "/manifests"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let entry = EdgeManifests.Entry(bytes: try manifest(3, bytes: 256 * 10), expires: 1e12)
        try CacheIndexFile.write(EdgeManifests.encode(entry), to: dir + "/obj")
        let cache = try open(capacity: 1_600_000)
        let c = cache.counters
        XCTAssertEqual(c.cachedManifests, 1)
        XCTAssertEqual(c.cachedBytes, entry.size)
        XCTAssertEqual(cache.manifest("obj")?.bytes, entry.bytes)
        XCTAssertEqual(cache.manifest("obj")?.fresh, true)
    }
}
