import Crypto
import Foundation
import Logging
import STOQCache
import STOQStore
import STOQTransfer
import XCTest

@testable import STOQNode

/// The edge cache's restart path without a network: what is on disk is reconciled with the
/// index snapshot (a crash can leave chunks the snapshot never saw, or a snapshot naming
/// chunks that are gone), and the bound holds on open.
final class EdgeCacheTests: XCTestCase {
    var root = ""

    override func setUp() {
        root = FileManager.default.temporaryDirectory.appendingPathComponent("stoq-edge-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: root) }

    func open(capacity: UInt64) throws -> EdgeCache {
        try EdgeCache(root: root, capacity: capacity, ttlDefault: 3_600_000_000_000, origin: "https://[::1]:9",
                      trust: ClientTrust(), maxChunkSize: 1 << 20, logger: Logger(label: "test"))
    }

    func chunk(_ i: Int, _ size: Int) -> (ChunkID, [UInt8]) {
        var bytes = [UInt8](repeating: 0, count: size)
        for j in 0..<size { bytes[j] = UInt8(truncatingIfNeeded: i &* 31 &+ j &* 7 &+ j >> 8) }
        return (ChunkID(digestOf: bytes), bytes)
    }

    func testChunksOnDiskAreAdoptedAndTheBoundHoldsOnOpen() throws {
        var ids: [ChunkID] = []
        do {
            let cache = try open(capacity: 1 << 20)
            XCTAssertEqual(cache.counters.cachedChunks, 0)
            // As if fetched just before a crash, before any snapshot was written.
            for i in 0..<10 {
                let (id, bytes) = chunk(i, 100_000)
                try cache.store.put(id: id, bytes: bytes)
                ids.append(id)
            }
        }
        do {
            let cache = try open(capacity: 1 << 20)
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
            let cache = try open(capacity: 1 << 20)
            XCTAssertEqual(cache.counters.cachedChunks, 9)
            XCTAssertFalse(cache.holds(ids[5]))
            XCTAssertNil(cache.readChunk(ids[5]))
        }
        // Reopened with a smaller bound: it evicts down to it, on disk too.
        do {
            let cache = try open(capacity: 450_000)
            let c = cache.counters
            XCTAssertLessThanOrEqual(c.cachedBytes, 450_000)
            XCTAssertEqual(c.cachedChunks, 4)
            XCTAssertEqual(c.evictions, 5)
            XCTAssertEqual(try cache.store.allChunkIDs().count, 4)
        }
    }

    func testACorruptIndexIsRebuiltFromTheChunks() throws {
        do {
            let cache = try open(capacity: 1 << 20)
            for i in 0..<3 { let (id, b) = chunk(i, 5000); try cache.store.put(id: id, bytes: b) }
        }
        try Data("not an index".utf8).write(to: URL(fileURLWithPath: root + "/index"))
        let cache = try open(capacity: 1 << 20)
        XCTAssertEqual(cache.counters.cachedChunks, 3)
    }
}
