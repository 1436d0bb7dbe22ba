import Foundation
import STOQChunking
import STOQEdge
import STOQStore
import Testing

@testable import STOQContent

/// A node's cuts of its own plain files: the manifest is the file's cut, each
/// chunk is read from the file, and a changed file serves none of its old chunks.
struct PlainCutsTests {
    static let parameters = try! ChunkingParameters(algorithm: .contentAware, minSize: 16 << 10, avgSize: 64 << 10, maxSize: 256 << 10)

    /// Waits for the cut the worker would hear of through `inbox`.
    static func done(_ inbox: CompletionInbox<PlainCuts.Done>, tries: Int = 1000) -> [PlainCuts.Done] {
        var out: [PlainCuts.Done] = []
        for _ in 0..<tries where out.isEmpty {
            inbox.drain(into: &out)
            if out.isEmpty { usleep(10_000) }
        }
        return out
    }

    /// The bytes `chunk` found, nil for none (an unreadable file is recorded as an issue).
    static func bytes(_ cuts: PlainCuts, _ id: ChunkID) -> [UInt8]? {
        switch cuts.chunk(id) {
        case .bytes(let b): return b
        case .none: return nil
        case .unreadable(let why):
            Issue.record("unreadable: \(why)")
            return nil
        }
    }

    static func write(_ path: String, seed: UInt8, count: Int) -> [UInt8] {
        var x = UInt32(seed) &* 2_654_435_761 | 1
        let bytes = (0..<count).map { _ -> UInt8 in
            x ^= x << 13; x ^= x >> 17; x ^= x << 5
            return UInt8(truncatingIfNeeded: x)
        }
        FileManager.default.createFile(atPath: path, contents: Data(bytes))
        return bytes
    }

    /// The SHA-256 a cut computed is recorded beside the file (as a GET's digest would be), so
    /// its ETag becomes its digest and the next cut, by a node started again, takes it from
    /// there; a file with a current one is left as it is.
    @Test func aCutRecordsTheDigestItComputed() throws {
        let t = try makeTempNodeStore("plain-cuts-digest")
        defer { try? FileManager.default.removeItem(atPath: t.dir) }
        let bytes = Self.write(t.storage + "/d.bin", seed: 9, count: 300_001)
        let rootFD = open(t.storage, O_RDONLY | O_DIRECTORY)
        defer { close(rootFD) }
        let digests = PlainDigests(rootFD: rootFD, logger: .init(label: "test"))
        func recorded() -> String? {
            let fd = open(t.storage + "/d.bin", O_RDONLY)
            defer { close(fd) }
            return ObjectGate.readMeta(fd)?.sha256
        }
        guard recorded() == nil else { return }  // (a storage that keeps xattrs from elsewhere: nothing to learn)
        let inbox = CompletionInbox<PlainCuts.Done>()
        for round in 0..<2 {
            let cuts = try PlainCuts(
                root: t.storage, parameters: Self.parameters, maxObjectSize: 1 << 30, digests: digests, logger: .init(label: "test"))
            #expect(cuts.manifest(of: "d.bin", ticket: UInt64(round), inbox: inbox) == .cutting)
            let m = try #require(Self.done(inbox).first?.manifest)
            #expect(try Manifest(decoding: m).digest == ContentDigest.sha256(bytes))
            cuts.stop()
        }
        // Storages without user xattrs (some tmpfs) record nothing: counted, not recorded.
        #expect(digests.counters.recorded + digests.counters.unrecorded == 1)
        guard digests.counters.unrecorded == 0 else { return }
        #expect(recorded() == ContentDigest.sha256(bytes).hex)
        #expect(digests.counters.recorded == 1)  // once: the second cut took it from the file
    }

    @Test func aPlainFileIsCutOnceAndItsChunksAreReadFromIt() throws {
        let t = try makeTempNodeStore("plain-cuts")
        defer { try? FileManager.default.removeItem(atPath: t.dir) }
        let bytes = Self.write(t.storage + "/big.bin", seed: 7, count: 1_000_003)
        let cuts = try PlainCuts(root: t.storage, parameters: Self.parameters, maxObjectSize: 1 << 30, logger: .init(label: "test"))
        let inbox = CompletionInbox<PlainCuts.Done>()
        #expect(cuts.manifest(of: "absent.bin", ticket: 1, inbox: inbox) == .noFile)
        // A second request while it is cut (or just after) joins it: one cut.
        #expect(cuts.manifest(of: "big.bin", ticket: 2, inbox: inbox) == .cutting)
        let joined = cuts.manifest(of: "big.bin", ticket: 3, inbox: inbox) == .cutting
        var answers = Self.done(inbox)
        if joined && answers.count < 2 { answers += Self.done(inbox) }
        let expected = try Manifest(chunking: BytesSource(bytes), parameters: Self.parameters)
        #expect(answers.map(\.ticket) == (joined ? [2, 3] : [2]))
        for a in answers { #expect(try a.manifest.map { try Manifest(decoding: $0) } == expected) }
        #expect(cuts.counters.cut == 1)
        // Cut: answered at once, no second cut.
        guard case .manifest(let m) = cuts.manifest(of: "big.bin", ticket: 4, inbox: inbox) else {
            Issue.record("not cut")
            return
        }
        let manifest = try Manifest(decoding: m)
        #expect(manifest == expected && manifest.chunks.count > 3)
        // Each chunk from the file, byte for byte.
        var offset = 0
        for e in manifest.chunks {
            let id = ChunkID(bytes: e.id.bytes)!
            #expect(Self.bytes(cuts, id) == Array(bytes[offset..<offset + Int(e.length)]))
            offset += Int(e.length)
        }
        #expect(Self.bytes(cuts, ChunkID(digestOf: [1, 2, 3])) == nil)
        #expect(cuts.counters.chunksServed == UInt64(manifest.chunks.count))
        // Rewritten: the old chunks are stale (counted once, the cut forgotten), and the next
        // manifest request cuts the new version.
        _ = Self.write(t.storage + "/big.bin", seed: 8, count: 900_000)
        let first = ChunkID(bytes: manifest.chunks[0].id.bytes)!
        #expect(Self.bytes(cuts, first) == nil)
        #expect(Self.bytes(cuts, ChunkID(bytes: manifest.chunks[1].id.bytes)!) == nil)
        #expect(cuts.counters.chunksStale == 1)
        #expect(cuts.manifest(of: "big.bin", ticket: 5, inbox: inbox) == .cutting)
        let again = Self.done(inbox)
        #expect(again.map(\.ticket) == [5])
        #expect(try again.first?.manifest.map { try Manifest(decoding: $0).totalLength } == 900_000)
        #expect(cuts.counters.cut == 2)
    }

    @Test func aFileLargerThanTheLimitsIsNotCut() throws {
        let t = try makeTempNodeStore("plain-cuts")
        defer { try? FileManager.default.removeItem(atPath: t.dir) }
        _ = Self.write(t.storage + "/big.bin", seed: 9, count: 200_000)
        let inbox = CompletionInbox<PlainCuts.Done>()
        let small = try PlainCuts(root: t.storage, parameters: Self.parameters, maxObjectSize: 100_000, logger: .init(label: "test"))
        #expect(
            small.manifest(of: "big.bin", ticket: 1, inbox: inbox)
                == .refused("the plain file has 200000 bytes, more than storage.max_object_size (100000)"))
        // 200,000 bytes could need 13 chunks of at least 16 KiB; 10 are allowed.
        let few = try PlainCuts(root: t.storage, parameters: Self.parameters, maxObjectSize: 1 << 30, maxChunks: 10, logger: .init(label: "test"))
        #expect(
            few.manifest(of: "big.bin", ticket: 2, inbox: inbox)
                == .refused("the plain file has 200000 bytes, more than this node cuts (10 chunks)"))
        #expect(small.counters.failed == 1 && few.counters.failed == 1 && few.counters.cut == 0)
        // Once stopped, nothing more is cut (no request may wait on a cutter that is gone).
        _ = Self.write(t.storage + "/small.bin", seed: 10, count: 50_000)
        few.stop()
        #expect(few.manifest(of: "small.bin", ticket: 3, inbox: inbox) == .refused("the node is stopping"))
    }

    static func cut(_ cuts: PlainCuts, _ name: String, _ inbox: CompletionInbox<PlainCuts.Done>) throws -> Manifest? {
        if case .manifest(let m) = cuts.manifest(of: name, ticket: 9, inbox: inbox) { return try Manifest(decoding: m) }
        guard let m = Self.done(inbox).first?.manifest else { return nil }
        return try Manifest(decoding: m)
    }

    /// Two files with the same bytes list the same chunks: one deleted, the other's still serve.
    @Test func chunksSharedByTwoFiles() throws {
        let t = try makeTempNodeStore("plain-cuts")
        defer { try? FileManager.default.removeItem(atPath: t.dir) }
        let bytes = Self.write(t.storage + "/one.bin", seed: 3, count: 300_000)
        FileManager.default.createFile(atPath: t.storage + "/two.bin", contents: Data(bytes))
        let inbox = CompletionInbox<PlainCuts.Done>()
        let cuts = try PlainCuts(root: t.storage, parameters: Self.parameters, maxObjectSize: 1 << 30, logger: .init(label: "test"))
        let one = try #require(try Self.cut(cuts, "one.bin", inbox))
        let two = try #require(try Self.cut(cuts, "two.bin", inbox))
        #expect(one == two && one.chunks.count > 2)
        let id = ChunkID(bytes: one.chunks[0].id.bytes)!
        try FileManager.default.removeItem(atPath: t.storage + "/two.bin")
        #expect(Self.bytes(cuts, id) == Array(bytes[0..<Int(one.chunks[0].length)]))
        #expect(cuts.counters.chunksStale == 1)  // two.bin's place, tried first, is gone
        #expect(Self.bytes(cuts, id)?.count == Int(one.chunks[0].length))
        #expect(cuts.counters.chunksStale == 1 && cuts.counters.chunksServed == 2)
    }

    /// The oldest cuts go once the chunks the cuts list together pass the bound.
    @Test func theOldestCutsGoPastTheBound() throws {
        let t = try makeTempNodeStore("plain-cuts")
        defer { try? FileManager.default.removeItem(atPath: t.dir) }
        let names = (0..<8).map { "f\($0).bin" }
        for (i, n) in names.enumerated() { _ = Self.write(t.storage + "/" + n, seed: UInt8(20 + i), count: 300_000) }
        let inbox = CompletionInbox<PlainCuts.Done>()
        // 300,000 bytes may need 19 chunks of 16 KiB, so 19 is the least bound that cuts them.
        let cuts = try PlainCuts(root: t.storage, parameters: Self.parameters, maxObjectSize: 1 << 30, maxChunks: 19, logger: .init(label: "test"))
        var ms: [Manifest] = []
        var listed = 0
        for n in names where listed <= 19 {
            let m = try #require(try Self.cut(cuts, n, inbox))
            ms.append(m)
            listed += m.chunks.count
        }
        // The cut that passed the bound dropped the first (and as many more as it took).
        let first = ChunkID(bytes: ms[0].chunks[0].id.bytes)!
        let last = ms[ms.count - 1]
        #expect(listed > 19 && ms.count < names.count)
        #expect(Self.bytes(cuts, first) == nil)
        #expect(Self.bytes(cuts, ChunkID(bytes: last.chunks[0].id.bytes)!)?.count == Int(last.chunks[0].length))
        #expect(Self.bytes(cuts, ChunkID(bytes: ms[ms.count - 2].chunks[0].id.bytes)!)?.count == Int(ms[ms.count - 2].chunks[0].length))
        #expect(cuts.counters.chunksStale == 0 && cuts.counters.cut == UInt64(ms.count))
    }

    /// Rewritten in place with the same size and its mtime put back: the version looks the
    /// same, but the bytes no longer hash to the id, so nothing of it is served.
    @Test func bytesThatNoLongerHashToTheirIdAreNotServed() throws {
        let t = try makeTempNodeStore("plain-cuts")
        defer { try? FileManager.default.removeItem(atPath: t.dir) }
        let path = t.storage + "/same.bin"
        _ = Self.write(path, seed: 5, count: 200_000)
        var st = stat()
        #expect(stat(path, &st) == 0)
        let inbox = CompletionInbox<PlainCuts.Done>()
        let cuts = try PlainCuts(root: t.storage, parameters: Self.parameters, maxObjectSize: 1 << 30, logger: .init(label: "test"))
        let m = try #require(try Self.cut(cuts, "same.bin", inbox))
        let fd = open(path, O_WRONLY)
        #expect(fd >= 0)
        var zeros = [UInt8](repeating: 0, count: 1000)
        #expect(pwrite(fd, &zeros, zeros.count, 0) == zeros.count)
        var times = [st.st_atim, st.st_mtim]
        #expect(futimens(fd, &times) == 0)
        close(fd)
        #expect(Self.bytes(cuts, ChunkID(bytes: m.chunks[0].id.bytes)!)?.count == nil)
        #expect(cuts.counters.chunksStale == 1 && cuts.counters.chunksServed == 0)
    }

    /// While the cutter is busy: a request for a file that is then replaced gets the new
    /// version's cut (once, not a cut again and again), and a 65th file waiting is refused.
    @Test func queuedRequestsWhileTheCutterIsBusy() throws {
        let t = try makeTempNodeStore("plain-cuts")
        defer { try? FileManager.default.removeItem(atPath: t.dir) }
        _ = Self.write(t.storage + "/x.bin", seed: 41, count: 100_000)
        for i in 0..<64 { _ = Self.write(t.storage + "/q\(i).bin", seed: UInt8(i), count: 1000) }
        let inbox = CompletionInbox<PlainCuts.Done>()
        let cuts = try PlainCuts(root: t.storage, parameters: Self.parameters, maxObjectSize: 1 << 30, logger: .init(label: "test"))
        let go = cuts.hold()
        #expect(cuts.manifest(of: "x.bin", ticket: 2, inbox: inbox) == .cutting)
        let now = Self.write(t.storage + "/x.bin", seed: 42, count: 90_000)
        for i in 0..<63 { #expect(cuts.manifest(of: "q\(i).bin", ticket: UInt64(10 + i), inbox: inbox) == .cutting) }
        #expect(cuts.manifest(of: "q63.bin", ticket: 99, inbox: inbox) == .refused("64 plain files are already waiting to be cut"))
        go.signal()
        var answers: [PlainCuts.Done] = []
        for _ in 0..<64 where answers.count < 64 { answers += Self.done(inbox) }
        #expect(answers.count == 64)
        let x = try #require(answers.first { $0.ticket == 2 }?.manifest)
        #expect(try Manifest(decoding: x) == Manifest(chunking: BytesSource(now), parameters: Self.parameters))
        #expect(cuts.counters.cut == 64)
    }
}
