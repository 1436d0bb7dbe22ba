import CSTOQSystem
import Foundation
import STOQChunking
import STOQStore
import Testing

@testable import STOQContent

/// The gate every object write commits through: RFC 9110 preconditions, the overwrite
/// policy, the quotas and their accounting, over real files and a real store.
final class ObjectGateTests {
    let dir: String
    let storage: String
    let index: ObjectIndex

    init() throws {
        (dir, storage, index) = try makeTempNodeStore("stoq-gate")
    }

    deinit { try? FileManager.default.removeItem(atPath: dir) }

    func gate(_ settings: ObjectGate.Settings) throws -> ObjectGate {
        try ObjectGate(settings: settings, storagePath: storage, index: index)
    }

    /// Stores `bytes` as plain object `name` of `owner` the way ObjectService does: a temp file
    /// with its owner and digest, renamed through the gate.
    @discardableResult
    func put(_ g: ObjectGate, _ name: String, _ bytes: [UInt8], by w: ObjectGate.Writer, hold: ObjectGate.Hold? = nil) throws -> ObjectGate.Refusal? {
        let temp = storage + "/.upload-test"
        let fd = open(temp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        #expect(write(fd, bytes, bytes.count) == bytes.count)
        #expect(ObjectGate.writeMeta(fd, sha256: sha(bytes), owner: w.identity))
        close(fd)
        let r = try g.commit(name, by: w, size: UInt64(bytes.count), physical: UInt64(bytes.count), hold: hold) {
            #expect(rename(temp, storage + "/" + name) == 0)
        }
        unlink(temp)
        return r
    }

    func sha(_ bytes: [UInt8]) -> [UInt8] {
        let hex = Array(ContentDigest.sha256(bytes).hex.utf8)
        return stride(from: 0, to: 64, by: 2).map { UInt8(String(decoding: hex[$0..<$0 + 2], as: UTF8.self), radix: 16)! }
    }

    func etag(_ bytes: [UInt8]) -> String { "\"\(ContentDigest.sha256(bytes).hex)\"" }

    /// A plain file's SHA-256 is its ETag only while the file is as it was recorded: one
    /// rewritten in place (`cp` keeps the inode and `user.stoq.object`) gets the ETag of a file
    /// without a digest, and keeps its owner. The first format, with no size or mtime, is
    /// trusted as it was.
    @Test func aFileRewrittenInPlaceLosesItsDigestButNotItsOwner() throws {
        let g = try gate(.init())
        let alice = ObjectGate.Writer(identity: "token:alice")
        let old = [UInt8](repeating: 1, count: 1000), new = [UInt8](repeating: 2, count: 1000)
        #expect(try put(g, "a.bin", old, by: alice) == nil)
        #expect(g.current("a.bin")?.etag == etag(old))
        #expect(g.current("a.bin")?.owner == "token:alice")
        usleep(20_000)  // past the file system's timestamp granularity
        let fd = open(storage + "/a.bin", O_WRONLY | O_CLOEXEC)
        #expect(pwrite(fd, new, new.count, 0) == new.count)
        var st = stat()
        #expect(fstat(fd, &st) == 0)
        #expect(g.current("a.bin")?.etag == ObjectGate.fileETag(st))
        #expect(g.current("a.bin")?.owner == "token:alice")
        let first = Array("1 \(ContentDigest.sha256(new).hex) token:bob".utf8)
        #expect(stoq_fsetxattr(fd, ObjectGate.metaName, first, UInt(first.count)) == 0)
        close(fd)
        #expect(g.current("a.bin")?.etag == etag(new))
        #expect(g.current("a.bin")?.owner == "token:bob")
    }

    // MARK: - Preconditions (pure)

    /// A file dated before 1970 (negative tv_sec) has a stamp, not a trap: a peer's manifest
    /// request for it reaches this through the cutter of plain files.
    @Test func aFileDatedBefore1970HasAStamp() {
        var st = stat()
        st.st_size = 10
        st.st_mtim.tv_sec = -5
        st.st_mtim.tv_nsec = 7
        let s = ObjectGate.stamp(st)
        #expect(s.size == 10 && s.mtime == UInt64(bitPattern: -5_000_000_000) &+ 7)
    }

    @Test func preconditionsFollowRFC9110() {
        let f = ObjectGate.preconditionFailure
        let cur = "\"abc\""
        // If-None-Match: * — only when there is nothing.
        #expect(f("", "*", nil) == nil)
        #expect(f("", "*", cur) == "If-None-Match: * but the object exists (ETag \"abc\")")
        // If-Match: strong comparison, lists, and * requires existence.
        #expect(f("\"abc\"", "", cur) == nil)
        #expect(f("\"x\", \"abc\"", "", cur) == nil)
        #expect(f("*", "", cur) == nil)
        #expect(f("\"old\"", "", cur) == "If-Match: \"old\" but the object's ETag is \"abc\"")
        #expect(f("W/\"abc\"", "", cur) != nil)
        #expect(f("*", "", nil) == "If-Match: * but there is no such object")
        #expect(f("\"abc\"", "", nil) != nil)
        // If-None-Match with tags: weak comparison.
        #expect(f("", "W/\"abc\"", cur) != nil)
        #expect(f("", "\"other\"", cur) == nil)
        // No conditions: always.
        #expect(f("", "", cur) == nil && f("", "", nil) == nil)
    }

    // MARK: - Policy

    @Test func ownerPolicyLetsOnlyTheOwnerOrAnAdminReplaceOrDelete() throws {
        let g = try gate(.init(overwrite: .owner))
        let alice = ObjectGate.Writer(identity: "token:alice"), bob = ObjectGate.Writer(identity: "token:bob")
        #expect(try put(g, "a.bin", [1, 2, 3], by: alice) == nil)
        #expect(g.current("a.bin")?.owner == "token:alice")
        #expect(g.current("a.bin")?.etag == etag([1, 2, 3]))
        let refused = try put(g, "a.bin", [9], by: bob)
        #expect(refused?.status == 403)
        #expect(refused?.reason == "object a.bin belongs to token:alice; access.overwrite = \"owner\" lets only its owner or an admin replace it")
        #expect(try g.delete("a.bin", by: bob)?.status == 403)
        #expect(try Data(contentsOf: URL(fileURLWithPath: storage + "/a.bin")) == Data([1, 2, 3]))
        #expect(g.counters.overwriteRefused == 2)
        // The owner may; so may an admin.
        #expect(try put(g, "a.bin", [4, 5], by: alice) == nil)
        #expect(try put(g, "a.bin", [6], by: ObjectGate.Writer(identity: "token:root", admin: true)) == nil)
        #expect(g.current("a.bin")?.owner == "token:root")
        #expect(try g.delete("a.bin", by: ObjectGate.Writer(identity: "token:root")) == nil)
        #expect(g.current("a.bin") == nil)
        #expect(try g.delete("a.bin", by: alice)?.status == 404)
    }

    @Test func writersPolicyLetsAnyoneAndNeverLetsNoOne() throws {
        let w = try gate(.init(overwrite: .writers))
        #expect(try put(w, "a", [1], by: .init(identity: "token:alice")) == nil)
        #expect(try put(w, "a", [2], by: .init(identity: "token:bob")) == nil)
        let never = try gate(.init(overwrite: .never))
        let r = try put(never, "a", [3], by: .init(identity: "token:bob"))
        #expect(r?.status == 409)
        #expect(r?.reason == "object a exists and access.overwrite = \"never\": objects cannot be replaced")
        #expect(try never.delete("a", by: .init(identity: "token:bob", admin: true))?.status == 409)
        #expect(try put(never, "b", [3], by: .init(identity: "token:bob")) == nil)
    }

    @Test func conditionalWritesAreCheckedAtTheCommit() throws {
        let g = try gate(.init())
        let w = ObjectGate.Writer(identity: "token:alice")
        #expect(try put(g, "c", [1], by: w) == nil)
        var create = w
        create.ifNoneMatch = "*"
        #expect(try put(g, "c", [2], by: create)?.status == 412)
        var stale = w
        stale.ifMatch = etag([7])
        #expect(try put(g, "c", [2], by: stale)?.status == 412)
        var fresh = w
        fresh.ifMatch = etag([1])
        #expect(try put(g, "c", [2], by: fresh) == nil)
        #expect(g.current("c")?.etag == etag([2]))
        #expect(try g.delete("c", by: fresh)?.status == 412)
        #expect(g.counters.preconditionFailed == 3)
    }

    /// Tallies from the racing threads.
    final class Tally: @unchecked Sendable {
        let lock = NSLock()
        var won = 0, refused = 0
    }

    @Test func ofConcurrentCreatesOnlyOneWins() throws {
        let g = try gate(.init())
        let index = self.index
        let group = DispatchGroup()
        let tally = Tally()
        for i in 0..<8 {
            group.enter()
            Thread {
                defer { group.leave() }
                let w = ObjectGate.Writer(identity: "token:\(i)", ifNoneMatch: "*")
                let r = try? g.commit("race", by: w, size: 1, physical: 0) {
                    usleep(2000)  // widen the window a racy check would lose in
                    let m = try Manifest(totalLength: 0, digest: .zero, parameters: .default, chunks: [])
                    try index.putObject("race", manifest: m.encode(), chunkIDs: [], owner: w.identity)
                }
                tally.lock.withLock { if r == .some(nil) { tally.won += 1 } else { tally.refused += 1 } }
            }.start()
        }
        group.wait()
        #expect(tally.won == 1 && tally.refused == 7)
        #expect(g.counters.preconditionFailed == 7)
    }

    // MARK: - Quotas

    @Test func writerQuotaAndStorageCapRefuseWithTheNumbers() throws {
        let g = try gate(.init(storageCap: 3 << 20, writerQuota: 2 << 20))
        let alice = ObjectGate.Writer(identity: "token:alice")
        #expect(try put(g, "one", [UInt8](repeating: 1, count: 1 << 20), by: alice) == nil)
        #expect(g.usage(of: "token:alice") == 1 << 20)
        // 1.5 MB more does not fit alice's 2 MB.
        let r = g.check("two", by: alice, size: 3 << 19, physical: 3 << 19)
        #expect(r?.status == 507)
        #expect(
            r?.reason
                == "quota for token:alice: 1 MB (1048576 bytes) used of 2 MB (2097152 bytes) (limits.writer_quota), this upload needs 1.5 MB (1572864 bytes)"
        )
        // Replacing her own object frees its bytes first.
        #expect(g.check("one", by: alice, size: 3 << 19, physical: 3 << 19) == nil)
        // The most an upload may receive (its sink's limit), as its hold says.
        for (name, room) in [("two", UInt64(1) << 20), ("one", 2 << 20)] {
            let h = try #require(try g.hold(name, by: alice, size: nil).get())
            #expect(h.limit == room)
            g.end(h)
        }
        // The cap counts everyone: bob fills it.
        let bob = ObjectGate.Writer(identity: "token:bob")
        #expect(try put(g, "b1", [UInt8](repeating: 2, count: 2 << 20), by: bob) == nil)
        let cap = g.check("c1", by: ObjectGate.Writer(identity: "token:carol"), size: 10, physical: 10)
        #expect(cap?.reason == "storage cap of this node: 3 MB (3145728 bytes) stored of 3 MB (3145728 bytes) (limits.storage_cap), this upload needs 10 bytes")
        #expect(g.checkChunk(size: 1)?.status == 507)
        let c = g.counters
        #expect(c.writerQuotaRefused == 1 && c.storageCapRefused == 2 && c.storedBytes == 3 << 20 && c.owners == 2)
        // Deleting gives the room back.
        #expect(try g.delete("b1", by: bob) == nil)
        #expect(g.counters.storedBytes == 1 << 20 && g.usage(of: "token:bob") == 0)
    }

    @Test func usageIsRecomputedAtStartFromFilesRecordsAndChunks() throws {
        do {
            let g = try gate(.init())
            #expect(try put(g, "flat", [UInt8](repeating: 1, count: 1000), by: .init(identity: "token:alice")) == nil)
        }
        // A chunked object of bob's: 24 KiB of length, its one 4 KiB chunk stored once.
        let chunk = [UInt8](repeating: 7, count: 4096)
        let id = ChunkID(digestOf: chunk)
        try index.chunks.put(id: id, bytes: chunk)
        let entries = Array(repeating: Manifest.Entry(id: ContentDigest.sha256(chunk), length: 4096), count: 6)
        let parameters = try ChunkingParameters(minSize: 1024, avgSize: 4096, maxSize: 8192)
        let m = try Manifest(totalLength: 6 * 4096, digest: ContentDigest.sha256([1]), parameters: parameters, chunks: entries)
        try index.putObject("chunked", manifest: m.encode(), chunkIDs: Array(repeating: id, count: 6), owner: "token:bob")
        // A plain file from before owners were kept: no owner, an ETag from the file.
        FileManager.default.createFile(atPath: storage + "/legacy", contents: Data([1, 2]))
        let g = try gate(.init())
        #expect(g.usage(of: "token:alice") == 1000 && g.usage(of: "token:bob") == 6 * 4096)
        #expect(g.counters.storedBytes == 1000 + 4096 + 2)
        #expect(g.current("legacy")?.owner == "" && g.current("legacy")?.etag.hasPrefix("\"f") == true)
        #expect(g.current("chunked")?.etag == m.etag)
        // An object without an owner may be replaced by any writer, who then owns it.
        #expect(try put(g, "legacy", [3], by: .init(identity: "token:carol")) == nil)
        #expect(g.usage(of: "token:carol") == 1)
    }

    // MARK: - Uploads in progress

    /// A hold, or the refusal's reason.
    func hold(_ g: ObjectGate, _ name: String, _ w: ObjectGate.Writer, _ size: UInt64?) -> Result<ObjectGate.Hold, ObjectGate.Refusal> {
        g.hold(name, by: w, size: size).map { $0! }
    }

    /// Two uploads started side by side that fit the quota together both hold their announced
    /// length and both commit; each commit turns its hold into usage, checked without it.
    @Test func twoUploadsThatFitTogetherBothCommit() throws {
        let g = try gate(.init(storageCap: 8 << 20, writerQuota: 3 << 20))
        let alice = ObjectGate.Writer(identity: "token:alice")
        let a = try hold(g, "a", alice, 3 << 19).get(), b = try hold(g, "b", alice, 3 << 19).get()
        #expect(a.bytes == 3 << 19 && b.bytes == 3 << 19 && a.id != b.id)
        // The sink's limit is the room were no other upload in progress; the hold is the bound.
        #expect(a.limit == 3 << 20 && b.limit == 3 << 20)
        #expect(g.counters.inFlightBytes == 3 << 20 && g.counters.inFlightUploads == 2 && g.counters.storedBytes == 0)
        #expect(try put(g, "a", [UInt8](repeating: 1, count: 3 << 19), by: alice, hold: a) == nil)
        #expect(g.usage(of: "token:alice") == 3 << 19 && g.counters.inFlightBytes == 3 << 19 && g.counters.inFlightUploads == 1)
        #expect(try put(g, "b", [UInt8](repeating: 2, count: 3 << 19), by: alice, hold: b) == nil)
        #expect(g.usage(of: "token:alice") == 3 << 20 && g.counters.inFlightBytes == 0 && g.counters.inFlightUploads == 0)
        #expect(g.counters.writerQuotaRefused == 0 && g.counters.storageCapRefused == 0)
    }

    /// A third upload that does not fit beside what is used and what the two in progress hold
    /// is refused at its start, naming all of it; another writer has a quota of its own but
    /// shares the cap, where every writer's uploads in progress count.
    @Test func aThirdUploadIsRefusedAtItsStartWithWhatIsInFlight() throws {
        let g = try gate(.init(storageCap: 6 << 20, writerQuota: 4 << 20))
        let alice = ObjectGate.Writer(identity: "token:alice")
        #expect(try put(g, "old", [UInt8](repeating: 1, count: 1 << 20), by: alice) == nil)
        _ = try hold(g, "a", alice, 3 << 19).get()
        _ = try hold(g, "b", alice, 3 << 19).get()
        let third = hold(g, "c", alice, 3 << 19)
        #expect(
            third
                == .failure(
                    .init(
                        status: 507,
                        reason:
                            "quota for token:alice: 1 MB (1048576 bytes) used of 4 MB (4194304 bytes) (limits.writer_quota), "
                            + "3 MB (3145728 bytes) in flight in 2 other uploads, this upload needs 1.5 MB (1572864 bytes)")))
        #expect(g.counters.writerQuotaRefused == 1 && g.counters.inFlightUploads == 2)
        // The same check for a manifest (no hold of its own): the uploads in progress count.
        #expect(g.check("m", by: alice, size: 3 << 19, physical: 0)?.status == 507)
        let bob = ObjectGate.Writer(identity: "token:bob")
        _ = try hold(g, "b1", bob, 3 << 19).get()
        let carol = hold(g, "c1", .init(identity: "token:carol"), 1 << 20)
        #expect(
            carol
                == .failure(
                    .init(
                        status: 507,
                        reason:
                            "storage cap of this node: 1 MB (1048576 bytes) stored of 6 MB (6291456 bytes) (limits.storage_cap), "
                            + "4.5 MB (4718592 bytes) in flight in 3 other uploads, this upload needs 1 MB (1048576 bytes)")))
        // Chunks written meanwhile are refused by the same count.
        #expect(g.reserve(1 << 20)?.status == 507)
    }

    /// An upload of unannounced length holds what it received and some more, never more than
    /// the room left, and can grow no further once that is gone: it is stopped there, and the
    /// 507 names the uploads in flight.
    @Test func anUploadOfUnknownLengthIsStoppedAtItsShare() throws {
        let g = try gate(.init(writerQuota: 4 << 20))
        let alice = ObjectGate.Writer(identity: "token:alice")
        let a = try hold(g, "a", alice, 3 << 19).get()
        _ = try hold(g, "b", alice, 3 << 19).get()
        // 1 MB left: half of it first, then half of what is left past what arrived, 64 KB at least.
        let c = try hold(g, "c", alice, nil).get()
        #expect(c.bytes == 512 << 10 && c.limit == 4 << 20)
        var held = c.bytes
        var grows: [UInt64] = []
        while case .success(let next) = g.grow(c, received: held) {
            grows.append(next)
            held = next
        }
        #expect(grows == [768 << 10, 896 << 10, 960 << 10, 1 << 20])
        #expect(g.counters.inFlightBytes == 4 << 20)
        // Nothing left: why, as it is now; counted only once the body passes it.
        let stopped =
            "quota for token:alice: 0 bytes used of 4 MB (4194304 bytes) (limits.writer_quota), "
            + "3 MB (3145728 bytes) in flight in 2 other uploads, this upload needs more than 1 MB (1048576 bytes)"
        #expect(g.grow(c, received: 1 << 20) == .failure(.init(status: 507, reason: stopped)))
        #expect(g.counters.writerQuotaRefused == 0)
        // The others ending meanwhile does not change what the 507 says, which the service asks
        // for (with the hold) when the next byte comes, then ends the hold.
        g.end(a)
        #expect(g.overHeadroom("c", by: alice, limit: 1 << 20, hold: c).reason == stopped)
        #expect(g.counters.writerQuotaRefused == 1)
        g.end(c)
        // A body that jumped past its hold is held whole (its bytes are on disk) but grows no more.
        _ = try hold(g, "a2", alice, 3 << 19).get()
        let e = try hold(g, "e", alice, nil).get()
        #expect(e.bytes == 512 << 10)
        if case .failure = g.grow(e, received: (1 << 20) + 100) {} else { Issue.record("grew") }
        #expect(g.held(e) == (1 << 20) + 100)
        g.end(e)
        // With nothing left at all, an upload of unannounced length holds nothing from the start.
        _ = try hold(g, "f", alice, 1 << 20).get()
        #expect(try hold(g, "g", alice, nil).get().bytes == 0)
    }

    /// Two uploads of unannounced length that fit together both get there, growing side by
    /// side; three that do not fit never hold more than the quota between them.
    @Test func uploadsOfUnknownLengthShareTheRoomAsTheyGrow() throws {
        for (count, size) in [(2, UInt64(3 << 19)), (3, UInt64(3 << 19))] {
            let g = try gate(.init(writerQuota: 4 << 20))
            let alice = ObjectGate.Writer(identity: "token:alice")
            let holds = (0..<count).map { try! hold(g, "u\($0)", alice, nil).get() }
            var held = holds.map(\.bytes), received = [UInt64](repeating: 0, count: count), stopped = Set<Int>()
            // 16 KB at a time to each in turn, growing a hold when its body reaches it.
            while received.indices.contains(where: { received[$0] < size && !stopped.contains($0) }) {
                for i in received.indices where received[i] < size && !stopped.contains(i) {
                    if received[i] + (16 << 10) > held[i] {
                        guard case .success(let bytes) = g.grow(holds[i], received: received[i]) else {
                            stopped.insert(i)
                            continue
                        }
                        held[i] = bytes
                    }
                    received[i] = min(size, received[i] + min(16 << 10, held[i] - received[i]))
                    #expect(g.counters.inFlightBytes <= 4 << 20)
                }
            }
            if count == 2 {
                #expect(stopped.isEmpty && received == [size, size])
            } else {
                #expect(!stopped.isEmpty && received.reduce(0, +) <= 4 << 20)
            }
        }
    }

    /// A hold ends once, whichever end comes first: an aborted upload gives its room back (the
    /// upload refused before now fits), ending it again changes nothing, a commit refused ends
    /// it too, and `settle` frees what an upload held past its length.
    @Test func aHoldEndsOnceAndGivesItsRoomBack() throws {
        let g = try gate(.init(writerQuota: 3 << 20))
        let alice = ObjectGate.Writer(identity: "token:alice")
        let a = try hold(g, "a", alice, 2 << 20).get()
        #expect(hold(g, "b", alice, 2 << 20).isFailure)
        g.end(a)
        #expect(g.counters.inFlightBytes == 0 && g.counters.inFlightUploads == 0)
        let b = try hold(g, "b", alice, 2 << 20).get()
        g.end(a)
        #expect(g.counters.inFlightBytes == 2 << 20 && g.held(b) == 2 << 20 && g.held(a) == 0 && g.grow(a, received: 1) == .success(0))
        // A commit the conditions refuse ends the hold all the same.
        #expect(try put(g, "x", [1], by: alice) == nil)
        let c = try hold(g, "x", alice, 1).get()
        let refused = try g.commit("x", by: ObjectGate.Writer(identity: "token:alice", ifNoneMatch: "*"), size: 1, physical: 1, hold: c) {
            Issue.record("written")
        }
        #expect(refused?.status == 412 && g.held(c) == 0 && g.counters.inFlightBytes == 2 << 20)
        // An upload of unannounced length that ended short holds its length only.
        g.end(b)
        let u = try hold(g, "u", alice, nil).get()
        #expect(g.held(u) == 1 << 20)
        #expect(g.settle(u, "u", by: alice, size: 300) == nil && g.counters.inFlightBytes == 300)
        // A restart (a new gate over the same files) holds nothing.
        let again = try gate(.init(writerQuota: 3 << 20))
        #expect(again.counters.inFlightBytes == 0 && again.counters.inFlightUploads == 0 && again.usage(of: "token:alice") == 1)
    }

    /// Chunks an upload's ingest stores before its commit are inside the upload's hold: counted
    /// once against the cap, in flight and not as stored too, so the upload settles with room
    /// for itself only once; an upload abandoned leaves them stored (garbage until collected).
    @Test func chunksStoredForAnUploadCountOnceInsideItsHold() throws {
        let g = try gate(.init(storageCap: 40 << 20, writerQuota: 30 << 20))
        let alice = ObjectGate.Writer(identity: "token:alice")
        let a = try hold(g, "a", alice, 24 << 20).get()
        var chunk = [UInt8](repeating: 7, count: 1 << 20)
        for i in 0..<20 {
            chunk[0] = UInt8(i)
            #expect(try index.chunks.put(id: ChunkID(digestOf: chunk), bytes: chunk) == .stored)
            g.stored(1 << 20, by: a)
        }
        #expect(g.counters.storedBytes == 0 && g.counters.inFlightBytes == 24 << 20)
        // Beside it the cap leaves 16 MiB, and the writer's quota 6 MiB (its object's length).
        #expect(g.check("b", by: .init(identity: "token:bob"), size: 16 << 20, physical: 16 << 20) == nil)
        #expect(g.check("b", by: .init(identity: "token:bob"), size: (16 << 20) + 1, physical: (16 << 20) + 1)?.status == 507)
        #expect(g.check("c", by: alice, size: (6 << 20) + 1, physical: 1)?.status == 507)
        // Counted twice, its end would need 48 MiB of the 40.
        #expect(g.settle(a, "a", by: alice, size: 24 << 20) == nil)
        #expect(g.counters.storedBytes == 0 && g.counters.inFlightBytes == 24 << 20)
        g.end(a)
        #expect(g.counters.storedBytes == 20 << 20 && g.counters.inFlightBytes == 0)
        #expect(g.counters.storageCapRefused == 1 && g.counters.writerQuotaRefused == 1)  // the two checks above
        // A hold that ended takes no more chunks in.
        g.stored(1 << 20, by: a)
        #expect(g.counters.storedBytes == 20 << 20)
    }

    @Test func reservedChunkBytesCountUntilReleased() throws {
        let g = try gate(.init(storageCap: 1000))
        #expect(g.reserve(600) == nil)
        // A second writer at the same moment cannot pass the cap with the first.
        #expect(g.reserve(600)?.status == 507)
        #expect(g.counters.storedBytes == 600)
        g.release(600)
        #expect(g.counters.storedBytes == 0 && g.reserve(600) == nil)
    }

    @Test func aChunkedObjectReplacesThePlainFileOfItsName() throws {
        let g = try gate(.init())
        let w = ObjectGate.Writer(identity: "token:alice")
        #expect(try put(g, "x", [UInt8](repeating: 1, count: 100), by: w) == nil)
        let m = try Manifest(totalLength: 0, digest: .zero, parameters: .default, chunks: [])
        let r = try g.commit("x", by: w, size: 0, physical: 0, chunked: true) {
            try index.putObject("x", manifest: m.encode(), chunkIDs: [], owner: w.identity)
        }
        #expect(r == nil)
        // The plain file would have shadowed the record, and its bytes are no longer charged.
        #expect(!FileManager.default.fileExists(atPath: storage + "/x"))
        #expect(g.current("x")?.etag == m.etag)
        #expect(g.usage(of: "token:alice") == 0 && g.counters.storedBytes == 0)
    }

    // MARK: - Durability

    /// A removal that may not survive a crash is no success: when the storage directory's
    /// fsync fails after the unlink, a delete (and a chunked write's removal of the plain file
    /// that would shadow it) throws naming the fsync and its errno (a 500), with the object's
    /// accounting done all the same, since the file is gone.
    @Test func aRemovalWhoseDirectoryFsyncFailsIsAnError() throws {
        let g = try ObjectGate(
            settings: .init(), storagePath: storage, index: index,
            syncDirectory: { _ in
                errno = EIO
                return -1
            })
        let w = ObjectGate.Writer(identity: "token:alice")
        func message(_ body: () throws -> ObjectGate.Refusal?) -> String? {
            do { _ = try body() } catch { return "\(error)" }
            return nil
        }
        let why = "fsync of the storage directory: \(String(cString: strerror(EIO))) (errno \(EIO))"
        #expect(try put(g, "a.bin", [UInt8](repeating: 1, count: 100), by: w) == nil)
        #expect(message { try g.delete("a.bin", by: w) } == why)
        #expect(!FileManager.default.fileExists(atPath: storage + "/a.bin"))
        #expect(g.current("a.bin") == nil && g.usage(of: "token:alice") == 0)

        #expect(try put(g, "x", [UInt8](repeating: 1, count: 100), by: w) == nil)
        let m = try Manifest(totalLength: 0, digest: .zero, parameters: .default, chunks: [])
        let thrown = message {
            try g.commit("x", by: w, size: 0, physical: 0, chunked: true) {
                try index.putObject("x", manifest: m.encode(), chunkIDs: [], owner: w.identity)
            }
        }
        #expect(thrown == why)
        #expect(!FileManager.default.fileExists(atPath: storage + "/x"))
        #expect(g.current("x")?.etag == m.etag)
        #expect(g.usage(of: "token:alice") == 0 && g.counters.storedBytes == 0)
    }
}

extension Result {
    var isFailure: Bool { if case .failure = self { true } else { false } }
}
