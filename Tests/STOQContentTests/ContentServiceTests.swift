import Foundation
import Logging
import STOQChunking
import STOQStore
import STOQTestSupport
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
        #expect(ContentService.chunkLimit(maxObjectSize: 64 << 30) == Manifest.maxListedChunks)
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

    /// A manifest's whole-object SHA-256 becomes the object's strong ETag: it is checked against
    /// the chunks it lists before the record is written, and a manifest that claims another
    /// is refused naming both digests, with nothing stored.
    @Test func aManifestWhoseDigestIsNotItsChunksIsRefused() throws {
        let (dir, _, index) = try makeTempNodeStore("stoq-manifest-digest")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let parts = [[UInt8](repeating: 1, count: 1000), [UInt8](repeating: 2, count: 500)]
        let ids = parts.map { ChunkID(digestOf: $0) }
        for (id, p) in zip(ids, parts) { try index.chunks.put(id: id, bytes: p) }
        let parameters = try ChunkingParameters(minSize: 64, avgSize: 256, maxSize: 1024)
        let entries = zip(ids, parts).map { Manifest.Entry(id: ContentDigest($0.0.bytes)!, length: UInt32($0.1.count)) }
        let whole = ContentDigest.sha256(parts[0] + parts[1])
        let claimed = ContentDigest.sha256(Array("something else".utf8))
        let liar = try Manifest(totalLength: 1500, digest: claimed, parameters: parameters, chunks: entries)
        let r = ContentService.commitManifest("liar", liar, liar.encode(), ids, nil, index: index, gate: nil)
        #expect(r.status == 400)
        #expect(r.reason == "manifest of liar: it claims the object's SHA-256 is \(claimed.hex), but its chunks hash to \(whole.hex)")
        #expect(throws: StoreError.self) { try index.object("liar") }

        let honest = try Manifest(totalLength: 1500, digest: whole, parameters: parameters, chunks: entries)
        let stored = ContentService.commitManifest("honest", honest, honest.encode(), ids, nil, index: index, gate: nil)
        #expect(stored.status == 201 && stored.reason == "")
        #expect(try index.object("honest").chunkIDs == ids)

        // A chunk the store lacks cannot be hashed: 409 naming it, as the record's write would.
        #expect(try index.chunks.remove(ids[1]))
        let gap = ContentService.commitManifest("gap", honest, honest.encode(), ids, nil, index: index, gate: nil)
        #expect(gap.status == 409 && gap.reason.contains(ids[1].hex), "\(gap)")
    }

    /// The record's lengths are the chunks' own once it is committed (reads of the object hold
    /// each chunk to its entry's length): a manifest listing a chunk twice, at its length and
    /// at another, is refused even though its digest is what the chunks hash to.
    @Test func aManifestGivingAChunkTwoLengthsIsRefused() throws {
        let (dir, _, index) = try makeTempNodeStore("stoq-manifest-lengths")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let part = [UInt8](repeating: 3, count: 1000)
        let id = ChunkID(digestOf: part)
        try index.chunks.put(id: id, bytes: part)
        let parameters = try ChunkingParameters(minSize: 64, avgSize: 256, maxSize: 1024)
        let entries = [1000, 500].map { Manifest.Entry(id: ContentDigest(id.bytes)!, length: UInt32($0)) }
        let twice = try Manifest(totalLength: 1500, digest: ContentDigest.sha256(part + part), parameters: parameters, chunks: entries)
        let r = ContentService.commitManifest("twice", twice, twice.encode(), [id, id], nil, index: index, gate: nil)
        #expect(r.status == 400)
        #expect(r.reason == "manifest of twice: chunk \(id.hex) is 1000 bytes in the store, the manifest says 500")
        #expect(throws: StoreError.self) { try index.object("twice") }
        #expect(index.chunks.counters.corruptQuarantined == 0, "a client's claim quarantines nothing")
    }

    /// A chunk whose file grew after the manifest arrived (its size then is in `sizes`) is
    /// quarantined by the verification without being read, and the manifest answered 409
    /// naming it, as for any chunk the store lacks.
    @Test func aChunkGrownSinceTheManifestArrivedIsQuarantinedUnread() throws {
        let (dir, _, _) = try makeTempNodeStore("stoq-manifest-grown")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let lines = LogCapture()
        let index = try ObjectIndex(chunks: ChunkStore(root: dir + "/store", logger: lines.logger))
        let part = [UInt8](repeating: 4, count: 1000)
        let id = ChunkID(digestOf: part)
        try index.chunks.put(id: id, bytes: part)
        let parameters = try ChunkingParameters(minSize: 64, avgSize: 256, maxSize: 1024)
        let m = try Manifest(
            totalLength: 1000, digest: ContentDigest.sha256(part), parameters: parameters,
            chunks: [Manifest.Entry(id: ContentDigest(id.bytes)!, length: 1000)])
        let hex = id.hex
        #expect(truncate(dir + "/store/chunks/\(hex.prefix(2))/\(hex.dropFirst(2).prefix(2))/\(hex)", 64 << 20) == 0)
        let r = ContentService.commitManifest("grown", m, m.encode(), [id], nil, index: index, gate: nil, sizes: [id: 1000])
        #expect(r.status == 409 && r.reason.contains(hex), "\(r)")
        #expect(index.chunks.counters.corruptQuarantined == 1)
        #expect(lines.metadata("problem", of: "corrupt chunk quarantined") == ["it is \(64 << 20) bytes, and the chunk is 1000 bytes"])
    }
}

/// The node's bound on request bodies held in memory (`limits.body_memory`), and each
/// client's share of it (`limits.body_memory_per_client`).
struct BodyMemoryTests {
    /// What `take` took, or the refusal's text.
    func taken(_ r: Result<BodyMemory.Hold, BodyMemory.Refusal>) -> UInt64? { try? r.get().bytes }

    @Test func takesUpToTheLimitAndGivesBack() throws {
        let m = BodyMemory(limit: 3 << 20)
        let one = try m.take(1 << 20, client: "a").get(), two = try m.take(2 << 20, client: "b").get()
        #expect(one.bytes == 1 << 20 && two.bytes == 2 << 20)
        #expect(m.held == 3 << 20)
        #expect(
            m.take(1, client: "c")
                == .failure(
                    .init(
                        reason: "request bodies held in memory: 3145728 bytes of 3145728 (limits.body_memory); "
                            + "this one may need 1; try again once others end")),
            "full: nothing more, however small")
        #expect(m.held == 3 << 20, "a refusal takes nothing")
        m.give(one)
        #expect(taken(m.take((1 << 20) + 1, client: "c")) == nil)
        let three = try m.take(1 << 20, client: "c").get()
        m.give(two)
        m.give(three)
        m.give(three)
        #expect(m.held == 0, "never below nothing")
        #expect(m.held(by: "a") == 0 && m.held(by: "b") == 0 && m.held(by: "c") == 0)
        // A body larger than the whole limit holds all of it, while nothing else is held.
        let whole = try m.take(32 << 20, client: "a").get()
        #expect(whole.bytes == 3 << 20)
        #expect(taken(m.take(1, client: "b")) == nil)
        m.give(whole)
        #expect(m.held == 0)
    }

    @Test func oneClientHoldsAtMostItsShare() throws {
        let m = BodyMemory(limit: 4 << 20, perClient: 2 << 20)
        let a1 = try m.take(1 << 20, client: "token:alice").get(), a2 = try m.take(1 << 20, client: "token:alice").get()
        #expect(m.held(by: "token:alice") == 2 << 20)
        #expect(
            m.take(1000, client: "token:alice")
                == .failure(
                    .init(
                        reason: "request bodies held in memory for token:alice: 2097152 bytes of 2097152 "
                            + "(limits.body_memory_per_client); this one may need 1000; try again once its others end")))
        // Another client still has the rest of the node's room.
        let b = try m.take(2 << 20, client: "addr:2001:db8::/64").get()
        #expect(m.held == 4 << 20)
        // The node's limit still binds whoever asks.
        #expect(taken(m.take(1, client: "token:carol")) == nil)
        m.give(a1)
        #expect(taken(m.take(1 << 20, client: "token:alice")) == 1 << 20)
        // A body larger than the share holds all of it while its client holds nothing else.
        m.give(a2)
        m.give(b)
        #expect(m.held(by: "addr:2001:db8::/64") == 0)
        let big = try m.take(16 << 20, client: "addr:2001:db8::/64").get()
        #expect(big.bytes == 2 << 20)
    }

    @Test func zeroIsNoLimit() {
        let m = BodyMemory(limit: 0)
        #expect(taken(m.take(.max / 2, client: "a")) == .max / 2 && taken(m.take(.max / 2, client: "a")) == .max / 2)
    }
}

/// A manifest PUT costs a pass over its whole object on the store threads: the checks that can
/// refuse it without that pass come first, and the passes under way are bounded node-wide.
struct ManifestAdmissionTests {
    /// A store holding a 1500-byte object's two chunks, and its manifest.
    func stored(_ prefix: String) throws -> (dir: String, index: ObjectIndex, ids: [ChunkID], manifest: Manifest) {
        let (dir, _, index) = try makeTempNodeStore(prefix)
        let parts = [[UInt8](repeating: 5, count: 1000), [UInt8](repeating: 6, count: 500)]
        let ids = parts.map { ChunkID(digestOf: $0) }
        for (id, p) in zip(ids, parts) { try index.chunks.put(id: id, bytes: p) }
        let entries = zip(ids, parts).map { Manifest.Entry(id: ContentDigest($0.0.bytes)!, length: UInt32($0.1.count)) }
        let parameters = try ChunkingParameters(minSize: 64, avgSize: 256, maxSize: 1024)
        let m = try Manifest(totalLength: 1500, digest: ContentDigest.sha256(parts[0] + parts[1]), parameters: parameters, chunks: entries)
        return (dir, index, ids, m)
    }

    func service(_ index: ObjectIndex) -> ContentService {
        ContentService(index: index, maxChunkSize: 1 << 20, logger: Logger(label: "test"))
    }

    /// `ManifestChecks.limit` verifications at once: the next manifest PUT is answered 503 with
    /// `Retry-After`, counted, and holds nothing; a place given back lets the next one in.
    @Test func aManifestPastTheVerificationsUnderWayIsBusy() throws {
        let (dir, index, _, m) = try stored("stoq-manifest-busy")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let s = service(index)
        let checks = ManifestChecks(limit: 1)
        s.manifestChecks = checks
        let body = m.encode()
        let first = body.withUnsafeBytes { s.admitManifest("one", $0, nil) }
        #expect((try? first.get()) != nil && checks.inFlight == 1)
        let second = body.withUnsafeBytes { s.admitManifest("two", $0, nil) }
        guard case .failure(let busy) = second else { Issue.record("admitted past the bound"); return }
        #expect(busy.status == 503)
        #expect(busy.reason == "manifest of two: the node is verifying 1 manifests already (each read back and hashed whole); try again")
        #expect(busy.headers.map { "\($0.0): \($0.1)" } == ["retry-after: 1"])
        #expect(s.counters.manifestChecksBusy == 1 && checks.inFlight == 1)
        checks.end()
        #expect((try? body.withUnsafeBytes { s.admitManifest("two", $0, nil) }.get()) != nil && checks.inFlight == 1)
        #expect(ManifestChecks.limit(storeThreads: 1) == 1 && ManifestChecks.limit(storeThreads: 3) == 1)
        #expect(ManifestChecks.limit(storeThreads: 4) == 2)
    }

    /// A writer past its quota is refused (507 naming it) before a verification place is taken
    /// and before a chunk is read: here one of the chunks is damaged on disk, which a read would
    /// find (quarantined, 409), and the places are all taken (503).
    @Test func theQuotaComesBeforeTheChunksAreRead() throws {
        let (dir, index, ids, m) = try stored("stoq-manifest-quota")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let gate = try ObjectGate(settings: .init(writerQuota: 1000), storagePath: dir + "/objects", index: index)
        let s = service(index)
        s.gate = gate
        let checks = ManifestChecks(limit: 1)
        s.manifestChecks = checks
        #expect(checks.begin())
        let hex = ids[0].hex
        let file = dir + "/content/chunks/\(hex.prefix(2))/\(hex.dropFirst(2).prefix(2))/\(hex)"
        try Data(repeating: 0, count: 1000).write(to: URL(fileURLWithPath: file))
        let alice = ObjectGate.Writer(identity: "token:alice")
        let quota = "quota for token:alice: 0 bytes used of 1000 bytes (limits.writer_quota), this upload needs 1.5 KB (1500 bytes)"
        let admitted = m.encode().withUnsafeBytes { s.admitManifest("big", $0, alice) }
        guard case .failure(let r) = admitted else { Issue.record("admitted over the quota"); return }
        #expect(r.status == 507 && r.reason == quota, "\(r.reason)")
        #expect(s.counters.manifestChecksBusy == 0 && checks.inFlight == 1)
        // On the store pool too, in case the quota filled while the commit waited for a thread.
        let committed = ContentService.commitManifest("big", m, m.encode(), ids, alice, index: index, gate: gate)
        #expect(committed.status == 507 && committed.reason == quota, "\(committed.reason)")
        #expect(index.chunks.counters.corruptQuarantined == 0 && FileManager.default.fileExists(atPath: file))
        #expect(gate.counters.writerQuotaRefused == 2)
    }
}
