import STOQChunking
import Testing

@testable import STOQContent

/// The bounds a manifest PUT and a have/want query are held to, checked before any chunk is
/// looked up in the store.
struct ContentServiceTests {
    /// A manifest's 64-byte header listing `count` chunks (the rest need not be valid: the
    /// count is read before anything is decoded).
    func header(count: UInt32) -> [UInt8] {
        var h = [UInt8](repeating: 0, count: Manifest.headerSize)
        withUnsafeBytes(of: count.bigEndian) { h.replaceSubrange(60..<64, with: $0) }
        return h
    }

    @Test func theChunkLimitFollowsMaxObjectSizeUpToAMillion() {
        #expect(ContentService.chunkLimit(maxObjectSize: 64 << 30) == ContentService.maxListedChunks)
        #expect(ContentService.chunkLimit(maxObjectSize: 1 << 50) == 1 << 20)
        // 1 MB in chunks of at least 64 bytes: 16384, and a short last one.
        #expect(ContentService.chunkLimit(maxObjectSize: 1 << 20) == 16_385)
    }

    @Test func aManifestListingMoreChunksThanTheLimitIsRefusedFromItsHeader() {
        let limit = ContentService.chunkLimit(maxObjectSize: 64 << 30)
        let over = header(count: 1 << 24)
        let why = over.withUnsafeBytes { ContentService.manifestCountRefusal("big", $0, limit: limit, maxObjectSize: 64 << 30) }
        #expect(why == "manifest of big lists 16777216 chunks, more than this node takes (1048576: at most 1048576 chunks a manifest)")

        let small = ContentService.chunkLimit(maxObjectSize: 1 << 20)
        let past = header(count: UInt32(small) + 1)
        let named = past.withUnsafeBytes { ContentService.manifestCountRefusal("o", $0, limit: small, maxObjectSize: 1 << 20) }
        #expect(
            named == "manifest of o lists 16386 chunks, more than this node takes "
                + "(16385: storage.max_object_size of 1048576 bytes in chunks of at least 64 bytes)")

        let within = header(count: UInt32(small))
        #expect(within.withUnsafeBytes { ContentService.manifestCountRefusal("o", $0, limit: small, maxObjectSize: 1 << 20) } == nil)
        // Too short to say: the decoder names what is wrong.
        #expect([UInt8](repeating: 0xff, count: 63).withUnsafeBytes { ContentService.manifestCountRefusal("o", $0, limit: 1, maxObjectSize: 1) } == nil)
    }
}

/// The node's bound on request bodies held in memory (`limits.body_memory`).
struct BodyMemoryTests {
    @Test func takesUpToTheLimitAndGivesBack() {
        let m = BodyMemory(limit: 3 << 20)
        #expect(m.take(1 << 20) == 1 << 20 && m.take(2 << 20) == 2 << 20)
        #expect(m.held == 3 << 20)
        #expect(m.take(1) == nil, "full: nothing more, however small")
        #expect(m.held == 3 << 20, "a refusal takes nothing")
        #expect(
            m.refusal(asked: 1)
                == "request bodies held in memory: 3145728 bytes of 3145728 (limits.body_memory); this one may need 1; try again once others end")
        m.give(1 << 20)
        #expect(m.take((1 << 20) + 1) == nil && m.take(1 << 20) == 1 << 20)
        m.give(3 << 20)
        m.give(5)
        #expect(m.held == 0, "never below nothing")
        // A body larger than the whole limit holds all of it, while nothing else is held.
        #expect(m.take(32 << 20) == 3 << 20)
        #expect(m.take(1) == nil)
        m.give(3 << 20)
        #expect(m.held == 0)
    }

    @Test func zeroIsNoLimit() {
        let m = BodyMemory(limit: 0)
        #expect(m.take(.max / 2) == .max / 2 && m.take(.max / 2) == .max / 2)
    }
}
