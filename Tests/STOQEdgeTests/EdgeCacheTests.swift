import Crypto
import Foundation
import Logging
import STOQCache
import STOQChunking
import STOQQUIC
import STOQStore
import STOQTransfer
import STOQTestSupport
import Testing

@testable import STOQEdge

/// The edge cache's restart path without a network: what is on disk is reconciled with the
/// index snapshot (a crash can leave chunks the snapshot never saw, or a snapshot naming
/// chunks that are gone), and the bound holds on open — for chunks (which get fifteen
/// sixteenths of it) and manifests (one sixteenth) alike.
@Suite final class EdgeCacheTests {
    let root: String

    init() {
        root = FileManager.default.temporaryDirectory.appendingPathComponent("stoq-edge-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
    }

    deinit { try? FileManager.default.removeItem(atPath: root) }

    func open(capacity: UInt64, logger: Logger = Logger(label: "test")) throws -> EdgeCache {
        try EdgeCache(
            root: root, capacity: capacity, ttlDefault: 3_600_000_000_000, upstream: OriginUpstream(try STOQURL("https://[::1]:9")),
            trust: ClientTrust(), datapath: Self.noNetwork, chunking: try ChunkingParameters(minSize: 1 << 16, avgSize: 1 << 18, maxSize: 1 << 20),
            logger: logger)
    }

    /// These tests never reach an origin: a connect fails at once.
    static let noNetwork = ClientDatapath { throw ClientError(.connect, "no network in EdgeCacheTests") }

    func chunk(_ i: Int, _ size: Int) -> (ChunkID, [UInt8]) {
        var bytes = [UInt8](repeating: 0, count: size)
        for j in 0..<size { bytes[j] = UInt8(truncatingIfNeeded: i &* 31 &+ j &* 7 &+ j >> 8) }
        return (ChunkID(digestOf: bytes), bytes)
    }

    /// The header a revalidating fetch sends is the one every node's request parser honours.
    @Test func theRevalidateHeaderIsTheNoCacheTheParserReads() {
        let (name, value) = EdgeCache.revalidateHeader
        let fields = [
            HTTPField(":method", "GET"), HTTPField(":scheme", "https"), HTTPField(":path", "/manifests/x"), HTTPField(name, value),
        ]
        #expect(HTTPRequestHead.parse(fields, sectionSize: 0, hasBody: false).noCache)
    }

    @Test func chunksOnDiskAreAdoptedAndTheBoundHoldsOnOpen() throws {
        var ids: [ChunkID] = []
        do {
            let cache = try open(capacity: 1_200_000)
            #expect(cache.counters.cachedChunks == 0)
            // As if fetched just before a crash, before any snapshot was written.
            for i in 0..<10 {
                let (id, bytes) = chunk(i, 100_000)
                try cache.store.put(id: id, bytes: bytes)
                ids.append(id)
            }
        }
        do {
            let cache = try open(capacity: 1_200_000)
            #expect(cache.counters.cachedChunks == 10)
            #expect(cache.counters.cachedBytes == 1_000_000)
            #expect(cache.readChunk(ids[3]) != nil)
            cache.persist()
            #expect(FileManager.default.fileExists(atPath: root + "/index"))
        }
        // A chunk deleted behind the cache's back is dropped from the index on open.
        let (shard, name) = (ids[5].hex.prefix(2) + "/" + ids[5].hex.dropFirst(2).prefix(2), ids[5].hex)
        #expect((unlink(root + "/chunks/\(shard)/\(name)")) == 0)
        do {
            let cache = try open(capacity: 1_200_000)
            #expect(cache.counters.cachedChunks == 9)
            #expect(!cache.holds(ids[5]))
            #expect(cache.readChunk(ids[5]) == nil)
        }
        // Reopened with a smaller bound: it evicts down to it, on disk too.
        do {
            let cache = try open(capacity: 480_000)  // 450 000 for chunks
            let c = cache.counters
            #expect(c.cachedBytes <= 450_000)
            #expect(c.cachedChunks == 4)
            #expect(c.evictions == 5)
            #expect(try cache.store.allChunkIDs().count == 4)
        }
    }

    @Test func aCorruptIndexIsRebuiltFromTheChunks() throws {
        do {
            let cache = try open(capacity: 1_200_000)
            for i in 0..<3 { let (id, b) = chunk(i, 5000); try cache.store.put(id: id, bytes: b) }
        }
        try Data("not an index".utf8).write(to: URL(fileURLWithPath: root + "/index"))
        let cache = try open(capacity: 1_200_000)
        #expect(cache.counters.cachedChunks == 3)
    }

    func manifest(_ seed: Int, bytes count: Int) throws -> [UInt8] {
        let data = (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ seed &* 7919 &+ $0 >> 7) }
        let p = try ChunkingParameters(algorithm: .fixed, minSize: 64, avgSize: 256, maxSize: 1024)
        return try Manifest(chunking: BytesSource(data), parameters: p).encode()
    }

    /// A manifest cut here from a plain object says so on disk (its chunks exist nowhere
    /// upstream); one saved before that flag existed reads as fetched.
    @Test func aManifestCutFromAPlainObjectKeepsThatOnDisk() throws {
        let bytes = try manifest(3, bytes: 5000)
        let plain = EdgeManifests.Entry(bytes: bytes, expires: 1_700_000_000, plain: true)
        let encoded = EdgeManifests.encode(plain)
        #expect(Array(encoded.prefix(8)) == Array("STOQEP1\0".utf8))
        let back = try #require(EdgeManifests.decode(encoded))
        #expect(back.plain && back.bytes == bytes && back.expires == 1_700_000_000)
        let fetched = EdgeManifests.encode(EdgeManifests.Entry(bytes: bytes, expires: 1_700_000_000))
        #expect(Array(fetched.prefix(8)) == Array("STOQEM1\0".utf8))
        #expect(EdgeManifests.decode(fetched)?.plain == false)
        #expect(EdgeManifests.decode(Array("STOQEX1\0".utf8) + fetched.dropFirst(8)) == nil)
    }

    /// A manifest cut here from a plain object is served for this node's own requests, never
    /// for one relayed to another holder: the holder has none of those chunks, so a node that
    /// reached it over another route would ask it for chunks it cannot have. A fetched
    /// manifest is served to both.
    @Test func aCutManifestIsNotHandedOnForAnotherHolder() throws {
        let data = (0..<6000).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ $0 >> 7) }
        let p = try ChunkingParameters(algorithm: .fixed, minSize: 64, avgSize: 256, maxSize: 1024)
        let bytes = try Manifest(chunking: BytesSource(data), parameters: p).encode()
        do {
            let cache = try open(capacity: 1_200_000)
            var at = 0
            for e in try Manifest(decoding: bytes).chunks {
                let piece = Array(data[at..<at + Int(e.length)])
                try cache.store.put(id: ChunkID(digestOf: piece), bytes: piece)
                at += Int(e.length)
            }
            let later = Date().timeIntervalSince1970 + 3600
            try FileManager.default.createDirectory(atPath: root + "/manifests", withIntermediateDirectories: true)
            try CacheIndexFile.write(EdgeManifests.encode(.init(bytes: bytes, expires: later, plain: true)), to: root + "/manifests/cut.bin")
            try CacheIndexFile.write(EdgeManifests.encode(.init(bytes: bytes, expires: later)), to: root + "/manifests/fetched.bin")
        }
        let cache = try open(capacity: 1_200_000)
        #expect(cache.manifest("cut.bin")?.fresh == true)
        // A `no-cache` request is answered from the cut all the same, and goes past the other.
        #expect(cache.manifest("cut.bin", askingPast: true)?.fresh == true)
        #expect(cache.manifest("fetched.bin", askingPast: true)?.fresh == false)
        #expect(cache.counters.revalidations == 1)
        #expect(cache.manifest("cut.bin", relayed: true) == nil)
        #expect(cache.manifest("fetched.bin", relayed: true)?.bytes == bytes)
    }

    /// Where a chunk of a cut lies in its object: the range an evicted one is asked for.
    /// A manifest of another version (another name's, or this name's changed) is decoded anew.
    @Test func aCutsChunkIsFoundAsItsRangeOfTheObject() throws {
        let data = (0..<3000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 5) }
        let p = try ChunkingParameters(algorithm: .fixed, minSize: 64, avgSize: 256, maxSize: 1024)
        let m = try Manifest(chunking: BytesSource(data), parameters: p)
        let bytes = m.encode()
        var offsets = PlainOffsets()
        let third = ChunkID(bytes: m.chunks[2].id.bytes)!
        let at = UInt64(m.chunks[0].length + m.chunks[1].length)
        #expect(offsets.lookup("a", bytes, third) == at...(at + UInt64(m.chunks[2].length) - 1))
        #expect(offsets.lookup("a", bytes, ChunkID(digestOf: [1, 2, 3])) == nil)
        let other = try Manifest(chunking: BytesSource(Array(data.dropFirst(100))), parameters: p).encode()
        #expect(offsets.lookup("a", other, third) == nil)
    }

    /// Manifests have a budget of a sixteenth of the bound: the least recently used leave
    /// first (file and all), one larger than the budget is not kept, and on reopen the saved
    /// ones come back most recent last, within a budget that may have shrunk.
    @Test func manifestsStayWithinTheirShareLeastRecentlyUsedFirst() throws {
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
                #expect(ms.insert(names[i], entry).evicted == [])
                usleep(10_000)  // distinct modification times
            }
            #expect(ms.get("m0") != nil)  // m0 used: m1 is now the least recently used
            try CacheIndexFile.write(EdgeManifests.encode(entry), to: ms.path("m3"))
            let r = ms.insert("m3", entry)
            #expect(r.kept)
            #expect(r.evicted == ["m1"])
            unlink(ms.path("m1"))
            #expect(ms.get("m1") == nil)
            #expect(ms.count == 3)
            #expect(ms.usedBytes == budget)
            let big = EdgeManifests.Entry(bytes: try manifest(2, bytes: 256 * 200), expires: 1e12)
            #expect(!ms.insert("big", big).kept)
            #expect(ms.get("big") == nil)
            #expect(ms.count == 3, "a manifest too large for the budget evicts nothing")
        }
        try Data("garbage".utf8).write(to: URL(fileURLWithPath: dir + "/bad"))
        do {
            // Reopened with room for two: the oldest file (m0, written first) goes.
            let ms = try EdgeManifests(dir: dir, capacity: entry.size * 2, logger: Logger(label: "test"))
            #expect(ms.count == 2)
            #expect(ms.evictedOnLoad == 1)
            #expect(Set(try FileManager.default.contentsOfDirectory(atPath: dir)) == ["m2", "m3"], "the evicted and the unreadable files are deleted")
        }
    }

    /// Object names may end in `.tmp`: the manifests of `a` and `a.tmp` are two files that both
    /// survive a restart (saving one once went through a temp file named as the other, and a
    /// reopen deleted names ending `.tmp`), and what a crash left mid-save is removed on open.
    @Test func manifestsWhoseNamesLookLikeTempFilesSurviveARestart() throws {
        let one = try manifest(4, bytes: 3000), other = try manifest(5, bytes: 4000)
        do {
            let cache = try open(capacity: 1_600_000)
            cache.keep("a.tmp", one, maxAge: nil)
            cache.keep("a", other, maxAge: nil)
        }
        let leftovers = [root + "/manifests/.tmp-a-1f", root + "/.tmp-index-2e"]
        for path in leftovers { try Data("torn".utf8).write(to: URL(fileURLWithPath: path)) }
        let cache = try open(capacity: 1_600_000)
        #expect(cache.manifest("a.tmp")?.bytes == one)
        #expect(cache.manifest("a")?.bytes == other)
        for path in leftovers { #expect(!FileManager.default.fileExists(atPath: path), "\(path) was left") }
        #expect(Set(try FileManager.default.contentsOfDirectory(atPath: root + "/manifests")) == ["a", "a.tmp"])
        #expect(cache.forgetManifest("a.tmp", ifStill: one))
        #expect(Set(try FileManager.default.contentsOfDirectory(atPath: root + "/manifests")) == ["a"])
        // The longest name there may be (255 bytes): its temp file's name fits too.
        let longest = String(repeating: "n", count: 255)
        cache.keep(longest, other, maxAge: nil)
        #expect(FileManager.default.fileExists(atPath: root + "/manifests/" + longest))
    }

    /// An upstream may send any `max-age` up to 2^63 seconds: held a year, not trapped on when
    /// its expiry is written down.
    @Test func anUpstreamsHugeMaxAgeIsHeldAYear() throws {
        let m = try manifest(6, bytes: 3000)
        let cache = try open(capacity: 1_600_000)
        cache.keep("forever", m, maxAge: .max)
        #expect(cache.manifest("forever")?.fresh == true)
        let file = try #require(try CacheIndexFile.read(root + "/manifests/forever"))
        let saved = try #require(EdgeManifests.decode(file))
        #expect(saved.expires <= Date().timeIntervalSince1970 + EdgeCache.maxTTL + 1)
        #expect(saved.expires >= Date().timeIntervalSince1970 + EdgeCache.maxTTL - 60)
        #expect(EdgeManifests.decode(EdgeManifests.encode(.init(bytes: m, expires: 1e30)))?.expires == 0x1p62 / 1000)
    }

    /// The edge cache reports manifests in its size, and the chunks' share leaves room for them.
    @Test func cachedBytesCountManifests() throws {
        let dir = root + "/manifests"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let entry = EdgeManifests.Entry(bytes: try manifest(3, bytes: 256 * 10), expires: 1e12)
        try CacheIndexFile.write(EdgeManifests.encode(entry), to: dir + "/obj")
        let cache = try open(capacity: 1_600_000)
        let c = cache.counters
        #expect(c.cachedManifests == 1)
        #expect(c.cachedBytes == entry.size)
        #expect(cache.manifest("obj")?.bytes == entry.bytes)
        #expect(cache.manifest("obj")?.fresh == true)
    }

    /// A chunk evicted between `readChunk`'s touch and its read (the file gone under it) is a
    /// plain miss: nothing logged, and the entry dropped since its file is gone.
    @Test func aChunkEvictedWhileReadIsAPlainMiss() throws {
        let lines = LogCapture()
        let cache = try open(capacity: 1_200_000, logger: lines.logger)
        let (id, bytes) = chunk(1, 5000)
        let put = try cache.store.put(id: id, bytes: bytes)
        #expect(bytes.withUnsafeBytes { cache.admit(id, $0, put: put) })
        try cache.store.remove(id)  // the eviction's unlink, as if it came between touch and read
        #expect(cache.readChunk(id) == nil)
        #expect(lines.messages(atLeast: .error) == [], "a chunk that went is a miss, not an error")
        #expect(!cache.holds(id))
    }

    /// A cached chunk whose file grew on disk is dropped at its size, without being read on the
    /// worker: the policy knows the chunk's length from the verified bytes it admitted.
    @Test func aCachedChunkGrownOnDiskIsDroppedUnread() throws {
        let lines = LogCapture()
        let cache = try open(capacity: 1_200_000, logger: lines.logger)
        let (id, bytes) = chunk(3, 5000)
        let put = try cache.store.put(id: id, bytes: bytes)
        #expect(bytes.withUnsafeBytes { cache.admit(id, $0, put: put) })
        let hex = id.hex
        let file = root + "/chunks/\(hex.prefix(2))/\(hex.dropFirst(2).prefix(2))/\(hex)"
        #expect(truncate(file, 64 << 20) == 0)
        #expect(cache.readChunk(id) == nil)
        let logged = lines.messages(atLeast: .error).filter { $0.hasPrefix("edge cache: cached chunk \(hex) unreadable") }
        #expect(logged.count == 1 && logged.first?.contains("it is \(64 << 20) bytes, and the chunk is 5000 bytes") == true, "\(logged)")
        #expect(!cache.holds(id) && !FileManager.default.fileExists(atPath: file))
        #expect(cache.store.counters.corruptQuarantined == 1 && cache.store.counters.bytesRead == 0)
    }

    /// A chunk whose read failed, fetched and admitted again before the failure is handled
    /// (here: while the failure is logged), stays in the policy with its new file: dropping the
    /// entry would leave the file on disk, tracked by nothing.
    @Test func aChunkAdmittedAgainWhileItsReadFailedStaysTracked() throws {
        let lines = LogCapture()
        let cache = try open(capacity: 1_200_000, logger: lines.logger)
        let (id, bytes) = chunk(2, 5000)
        let put = try cache.store.put(id: id, bytes: bytes)
        #expect(bytes.withUnsafeBytes { cache.admit(id, $0, put: put) })
        // Damaged on disk: the read quarantines it and fails.
        let hex = id.hex
        let file = root + "/chunks/\(hex.prefix(2))/\(hex.dropFirst(2).prefix(2))/\(hex)"
        try Data(repeating: 0, count: 5000).write(to: URL(fileURLWithPath: file))
        lines.onFirst(.error) {
            // The fetcher brings the chunk back meanwhile.
            bytes.withUnsafeBytes { b in _ = cache.admit(id, b, put: (try? cache.store.put(id: id, bytes: bytes)) ?? .stored) }
        }
        #expect(cache.readChunk(id) == nil)
        #expect(lines.messages(atLeast: .error).count == 1)
        #expect(FileManager.default.fileExists(atPath: file))
        #expect(cache.holds(id), "the file of the chunk admitted again is tracked")
        #expect(cache.readChunk(id) == bytes)
    }
}
