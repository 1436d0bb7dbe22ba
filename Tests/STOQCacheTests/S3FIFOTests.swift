import Foundation
import STOQCache
import Testing

@Suite struct S3FIFOTests {
    @Test func oneHitWondersLeaveFromSmallWithoutTouchingMain() {
        var c = S3FIFO<Int>(capacity: 10)  // small: 1 entry of size 1
        var evicted: [Int] = []
        // Key 1 is hit while in small, so it moves to main when small overflows.
        c.insert(1, size: 1) { evicted.append($0) }
        c.touch(1)
        for k in 2...10 { c.insert(k, size: 1) { evicted.append($0) } }
        #expect(c.usedBytes == 10)
        #expect(evicted.isEmpty)
        // A scan of one-time keys: each evicts from small, and 1 (in main) survives it.
        for k in 100..<200 { c.insert(k, size: 1) { evicted.append($0) } }
        #expect(c.contains(1), "a key hit in small must be promoted to main and survive a scan")
        #expect(!evicted.contains(1))
        #expect(evicted.count == 100)
        #expect(c.usedBytes <= c.capacity)
    }

    @Test func ghostHitGoesStraightToMain() {
        var c = S3FIFO<Int>(capacity: 10)
        var evicted: [Int] = []
        for k in 0..<12 { c.insert(k, size: 1) { evicted.append($0) } }
        #expect(evicted == [0, 1])  // filtered out of small into the ghost queue
        c.insert(0, size: 1) { _ in }  // remembered by the ghost queue
        #expect((c.entries().first { $0.key == 0 }?.queue) == .main)
        c.insert(1000, size: 1) { _ in }  // never seen: small
        #expect((c.entries().first { $0.key == 1000 }?.queue) == .small)
    }

    /// A restart keeps the ghost queue: a key filtered out of small before it still goes
    /// straight to main after, through the index file's bytes.
    @Test func theGhostQueueSurvivesASnapshotAndRestore() throws {
        var c = S3FIFO<Int>(capacity: 10)
        for k in 0..<12 { c.insert(k, size: 1) { _ in } }
        let snap = c.snapshot()
        #expect((snap.filter { $0.queue == .ghost }.map(\.key)) == [0, 1])
        #expect(snap.count == (c.entries().count + 2))
        let bytes = CacheIndexFile.encode(snap, keyLength: 8) { k in withUnsafeBytes(of: UInt64(k).littleEndian) { Array($0) } }
        let back: [S3FIFO<Int>.Entry] = try CacheIndexFile.decode(bytes) { b in
            Int(b.reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) })
        }
        var d = S3FIFO<Int>(capacity: 10)
        d.restore(back) { _ in Issue.record("nothing to evict") }
        #expect(d.entries().map(\.key) == c.entries().map(\.key))
        #expect(d.usedBytes == 10)
        d.insert(0, size: 1) { _ in }
        #expect((d.entries().first { $0.key == 0 }?.queue) == .main, "remembered across the restart")
        // Without the ghosts (an older index file), the same key starts in small.
        var e = S3FIFO<Int>(capacity: 10)
        e.restore(back.filter { $0.queue != .ghost }) { _ in }
        e.insert(0, size: 1) { _ in }
        #expect((e.entries().first { $0.key == 0 }?.queue) == .small)
    }

    @Test func mainGivesHitEntriesAnotherRound() {
        var c = S3FIFO<Int>(capacity: 3, smallFraction: 0.34)  // small target: 1
        c.restore([0, 1, 2].map { .init(key: $0, size: 1, frequency: 0, queue: .main) }) { _ in Issue.record() }
        c.touch(0)
        var evicted: [Int] = []
        c.insert(10, size: 1) { evicted.append($0) }  // small is empty: main's tail goes
        #expect(evicted == [1], "main's tail (0) was hit: it gets another round and 1 leaves")
        #expect(c.contains(0))
        #expect((c.entries().first { $0.key == 0 }?.frequency) == 0)
        #expect((c.entries().filter { $0.queue == .main }.map(\.key)) == [2, 0])
        // Ghost too small to remember anything past its bound: a far older key comes back to small.
        var d = S3FIFO<Int>(capacity: 10)
        for k in 0..<30 { d.insert(k, size: 1) { _ in } }
        d.insert(0, size: 1) { _ in }
        #expect((d.entries().first { $0.key == 0 }?.queue) == .small)
    }

    @Test func byteBoundHoldsWithMixedSizesAndLargeEntriesAreDeclined() {
        var c = S3FIFO<Int>(capacity: 1000)
        var rng = SystemRandomNumberGenerator()
        var evictedBytes: UInt64 = 0, insertedBytes: UInt64 = 0
        var sizes: [Int: UInt64] = [:]
        for i in 0..<5000 {
            let k = Int.random(in: 0..<400, using: &rng)
            if c.touch(k) { continue }
            let size = UInt64.random(in: 1...120, using: &rng)
            sizes[k] = size
            c.insert(k, size: size) { evictedBytes += sizes[$0]! }
            insertedBytes += size
            #expect(c.usedBytes <= 1000, "bound broken at request \(i)")
        }
        #expect((insertedBytes - evictedBytes) == c.usedBytes)
        #expect((c.entries().reduce(0) { $0 + $1.size }) == c.usedBytes)
        #expect(!c.insert(-1, size: 1001) { _ in Issue.record("nothing may be evicted for an entry that cannot fit") })
        #expect(!c.contains(-1))
    }

    @Test func removeForgetsWithoutReportingEviction() {
        var c = S3FIFO<Int>(capacity: 10)
        for k in 0..<5 { c.insert(k, size: 2) { _ in } }
        c.remove(3)
        #expect(!c.contains(3))
        #expect(c.usedBytes == 8)
        var evicted: [Int] = []
        for k in 10..<20 { c.insert(k, size: 2) { evicted.append($0) } }
        #expect(!evicted.contains(3), "a removed key must not come back as an eviction")
        #expect(c.usedBytes <= 10)
    }

    @Test func beatsLRUUnderScanPollution() {
        // A hot set that fits, hit repeatedly, interleaved with long scans of one-time keys.
        var s3 = S3FIFO<Int>(capacity: 100), lru = LRU<Int>(capacity: 100)
        var hitsS3 = 0, hitsLRU = 0, scanKey = 1_000_000
        for round in 0..<200 {
            for k in 0..<50 {
                if s3.request(k, size: 1) { hitsS3 += 1 }
                if lru.request(k, size: 1) { hitsLRU += 1 }
            }
            if round % 2 == 0 {
                for _ in 0..<150 {
                    scanKey += 1
                    _ = s3.request(scanKey, size: 1)
                    _ = lru.request(scanKey, size: 1)
                }
            }
        }
        #expect(hitsS3 > (hitsLRU + 1000), "S3-FIFO \(hitsS3) vs LRU \(hitsLRU)")
    }

    @Test func indexFileRoundTripAndCorruptionIsDetected() throws {
        var c = S3FIFO<UInt64>(capacity: 1 << 20)
        for k in UInt64(0)..<300 { c.insert(k, size: 1000 + k) { _ in } }
        for k in UInt64(0)..<300 where k % 3 == 0 { c.touch(k) }
        for k in UInt64(300)..<1200 { c.insert(k, size: 1000) { _ in } }
        let entries = c.entries()
        func keyBytes(_ k: UInt64) -> [UInt8] { withUnsafeBytes(of: k.littleEndian) { Array($0) } }
        func key(_ b: ArraySlice<UInt8>) -> UInt64? { b.count == 8 ? b.reversed().reduce(0) { $0 << 8 | UInt64($1) } : nil }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("stoq-cache-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.path + "/index"
        try CacheIndexFile.write(CacheIndexFile.encode(entries, keyLength: 8, keyBytes: keyBytes), to: path)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path) == ["index"], "no temp file left")
        let back = try CacheIndexFile.decode(try #require(try CacheIndexFile.read(path)), key: key)
        #expect(back.map(\.key) == entries.map(\.key))
        #expect(back.map(\.size) == entries.map(\.size))
        #expect(back.map(\.frequency) == entries.map(\.frequency))
        #expect(back.map(\.queue) == entries.map(\.queue))

        var restored = S3FIFO<UInt64>(capacity: 1 << 20)
        restored.restore(back) { _ in Issue.record("everything fits") }
        #expect(restored.usedBytes == c.usedBytes)
        #expect(restored.entries().map(\.key) == entries.map(\.key))
        // The restored policy evicts what the original would have.
        var e1: [UInt64] = [], e2: [UInt64] = []
        for k in UInt64(5000)..<5400 {
            c.insert(k, size: 1000) { e1.append($0) }
            restored.insert(k, size: 1000) { e2.append($0) }
        }
        #expect(e1 == e2)

        // Restoring into a smaller cache keeps the bound by evicting.
        var small = S3FIFO<UInt64>(capacity: 100_000)
        var dropped = 0
        small.restore(back) { _ in dropped += 1 }
        #expect(small.usedBytes <= 100_000)
        #expect(dropped > 0)

        var bytes = try #require(try CacheIndexFile.read(path))
        bytes[40] ^= 1
        #expect(throws: CacheIndexFile.Error.self) { try CacheIndexFile.decode(bytes, key: key) }
        #expect(throws: CacheIndexFile.Error.self) { try CacheIndexFile.decode(Array(bytes.prefix(30)), key: key) }
        #expect(try (CacheIndexFile.read(dir.path + "/absent")) == nil)
    }
}

@Suite struct LRUTests {
    @Test func evictsLeastRecentlyUsed() {
        var c = LRU<Int>(capacity: 3)
        var evicted: [Int] = []
        for k in 0..<3 { c.insert(k, size: 1) { evicted.append($0) } }
        c.touch(0)
        c.insert(3, size: 1) { evicted.append($0) }
        #expect(evicted == [1])
        c.remove(2)
        c.insert(4, size: 1) { evicted.append($0) }
        #expect(evicted == [1])
        c.insert(5, size: 2) { evicted.append($0) }
        #expect(evicted == [1, 0, 3])
        #expect(c.usedBytes == 3)
    }
}

@Suite struct WTinyLFUTests {
    @Test func frequentKeysWinAdmissionAndTheBoundHolds() {
        var c = WTinyLFU<Int>(capacity: 100, expectedEntries: 100)
        // A hot set asked often, still asked during a long scan of one-time keys: the scan's
        // candidates lose the frequency contest against the hot entries in main.
        for _ in 0..<20 { for k in 0..<50 { _ = c.request(k, size: 1) } }
        var scanEvictedHot = 0
        for k in 1000..<5000 {
            _ = c.request(k, size: 1) { if $0 < 50 { scanEvictedHot += 1 } }
            _ = c.request(k % 50, size: 1) { if $0 < 50 { scanEvictedHot += 1 } }
            #expect(c.usedBytes <= 100)
        }
        #expect(scanEvictedHot == 0, "a scan must not push the hot set out")
        var hits = 0
        for k in 0..<50 where c.touch(k) { hits += 1 }
        #expect(hits == 50)
    }

    @Test func mixedSizesRemoveAndDecline() {
        var c = WTinyLFU<Int>(capacity: 1000, expectedEntries: 64)
        func size(_ k: Int) -> UInt64 { UInt64(1 + (k * 37) % 150) }
        for i in 0..<3000 {
            let k = (i * 7919 + i / 7) % 300
            if c.touch(k) { continue }
            var evicted: [Int] = []
            c.insert(k, size: size(k)) { evicted.append($0) }
            #expect(evicted.allSatisfy { !c.contains($0) })
            #expect(c.usedBytes <= 1000)
            #expect(c.usedBytes == ((0..<300).filter { c.contains($0) }.reduce(0) { $0 + size($1) }))
        }
        let some = (0..<300).first { c.contains($0) }!
        c.remove(some)
        #expect(!c.contains(some))
        #expect(!c.insert(-1, size: 1001) { _ in Issue.record("nothing may be evicted") })
    }
}
