import Foundation
import STOQChunking
import STOQEdge
import STOQStore
import Testing

@testable import STOQContent

/// A holder's cuts of its own plain files for the mesh: the manifest is the file's cut, each
/// chunk is read from the file, and a changed file serves none of its old chunks.
struct PlainCutsTests {
    static let parameters = try! ChunkingParameters(algorithm: .contentAware, minSize: 16 << 10, avgSize: 64 << 10, maxSize: 256 << 10)

    /// Waits for the cut the worker would hear of through `inbox`.
    static func done(_ inbox: CompletionInbox<PlainCuts.Done>) -> [PlainCuts.Done] {
        var out: [PlainCuts.Done] = []
        for _ in 0..<1000 where out.isEmpty {
            inbox.drain(into: &out)
            if out.isEmpty { usleep(10_000) }
        }
        return out
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
            #expect(cuts.chunk(id) == Array(bytes[offset..<offset + Int(e.length)]))
            offset += Int(e.length)
        }
        #expect(cuts.chunk(ChunkID(digestOf: [1, 2, 3])) == nil)
        #expect(cuts.counters.chunksServed == UInt64(manifest.chunks.count))
        // Rewritten: the old chunks are stale (counted once, the cut forgotten), and the next
        // manifest request cuts the new version.
        _ = Self.write(t.storage + "/big.bin", seed: 8, count: 900_000)
        let first = ChunkID(bytes: manifest.chunks[0].id.bytes)!
        #expect(cuts.chunk(first) == nil)
        #expect(cuts.chunk(ChunkID(bytes: manifest.chunks[1].id.bytes)!) == nil)
        #expect(cuts.counters.chunksStale == 1)
        #expect(cuts.manifest(of: "big.bin", ticket: 5, inbox: inbox) == .cutting)
        let again = Self.done(inbox)
        #expect(again.map(\.ticket) == [5])
        #expect(try again.first?.manifest.map { try Manifest(decoding: $0).totalLength } == 900_000)
        #expect(cuts.counters.cut == 2)
    }

    @Test func aFileLargerThanTheObjectLimitIsNotCut() throws {
        let t = try makeTempNodeStore("plain-cuts")
        defer { try? FileManager.default.removeItem(atPath: t.dir) }
        _ = Self.write(t.storage + "/big.bin", seed: 9, count: 200_000)
        let cuts = try PlainCuts(root: t.storage, parameters: Self.parameters, maxObjectSize: 100_000, logger: .init(label: "test"))
        let inbox = CompletionInbox<PlainCuts.Done>()
        #expect(cuts.manifest(of: "big.bin", ticket: 1, inbox: inbox) == .cutting)
        let d = Self.done(inbox)
        #expect(d.count == 1 && d[0].manifest == nil)
        #expect(d.first?.why == "big.bin has 200000 bytes, more than storage.max_object_size (100000)")
        #expect(cuts.counters.failed == 1 && cuts.counters.cut == 0)
    }
}
