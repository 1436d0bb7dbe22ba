import Foundation
import Testing
@testable import STOQChunking

@Suite struct ChunkerTests {
    /// The table is part of the format: pin a few entries of the documented procedure.
    @Test func gearTableKnownAnswer() {
        let t = GearTable.values
        #expect(t.count == 256)
        #expect(t[0] == 6_511_582_773_316_307_774)
        #expect(t[1] == 8_697_219_625_034_372_335)
        #expect(t[255] == 14_830_110_611_394_122_186)
        #expect(Set(t).count == 256)
        for i in 0..<256 { #expect(GearTable.pointer[i] == t[i]) }
    }

    @Test func masksFollowAvg() {
        let p = ChunkingParameters.default  // avg 2^18
        #expect(p.maskBeforeAvg.nonzeroBitCount == 20)
        #expect(p.maskAfterAvg.nonzeroBitCount == 16)
        #expect(p.maskBeforeAvg.leadingZeroBitCount == 0)
        #expect(p.maskAfterAvg.leadingZeroBitCount == 0)
    }

    /// Pinned cut points for 8 MiB of xorshift64* bytes at the project defaults. If this fails,
    /// chunk ids changed for every stored object: that is a format change, not a refactor.
    @Test func knownAnswerCutPoints() {
        let bytes = pseudoRandomBytes(count: 8 << 20, seed: 0x5354_4F51)
        let chunker = Chunker(.default)
        let lengths = chunker.chunkLengths(of: bytes)
        // Computed once, and cross-checked by an independent Python implementation of the
        // Chunking article (window sum, masks, cut rule) written from the article alone.
        #expect(
            lengths == [
                320083, 293525, 125944, 113483, 309998, 270696, 267372, 266687, 301901, 283055,
                391862, 293488, 417545, 72335, 266311, 298110, 265113, 475633, 275746, 182252,
                329934, 265096, 291099, 272070, 268696, 281749, 276225, 279204, 255529, 377867,
            ])
        let chunks = chunker.chunks(of: bytes)
        #expect(chunks.map(\.length) == lengths)
        #expect(invariantViolation(chunks, of: bytes, .default) == nil)
        #expect(chunks.first?.id.hex == "425e7fee39f3bdb8b4538a66795693fc38245ebe88a830297a88c4b2fee28602")
    }

    @Test func invariantsAcrossSizesAndParameters() throws {
        let params = [
            ChunkingParameters.default, smallParameters,
            try ChunkingParameters(minSize: 64, avgSize: 256, maxSize: 257),
            try ChunkingParameters(minSize: 4096, avgSize: 8192, maxSize: 1 << 20),
            try ChunkingParameters(algorithm: .fixed, minSize: 512, avgSize: 2048, maxSize: 8192),
        ]
        let bytes = pseudoRandomBytes(count: 3 << 20, seed: 7)
        for p in params {
            for n in [0, 1, 63, 64, 65, p.minSize, p.minSize + 1, p.avgSize, p.maxSize, p.maxSize + 1, 3 * p.maxSize + 17, bytes.count] where n <= bytes.count {
                let slice = Array(bytes[0..<n])
                let chunks = Chunker(p).chunks(of: slice)
                #expect(invariantViolation(chunks, of: slice, p) == nil, "\(p), \(n) bytes")
            }
        }
    }

    /// Degenerate input: a constant hash either cuts at once or never; both must stay in bounds.
    @Test func lowEntropyInput() {
        for byte: UInt8 in [0, 0xFF, 0x41] {
            let bytes = [UInt8](repeating: byte, count: 5 << 20)
            let chunks = Chunker(.default).chunks(of: bytes)
            #expect(invariantViolation(chunks, of: bytes, .default) == nil)
            // All full chunks are identical, so they deduplicate to at most two ids.
            #expect(Set(chunks.map(\.id)).count <= 2)
        }
    }

    @Test func meanChunkSizeNearTarget() {
        let bytes = pseudoRandomBytes(count: 32 << 20, seed: 99)
        let lengths = Chunker(.default).chunkLengths(of: bytes)
        let mean = Double(bytes.count) / Double(lengths.count)
        // Normalized chunking with min 64 KiB, avg 256 KiB lands near 300 KiB on random data.
        #expect(mean > 200_000)
        #expect(mean < 400_000)
    }

    /// Inserting bytes near the start moves only the cuts around the insertion.
    @Test func shiftResistance() {
        let base = pseudoRandomBytes(count: 16 << 20, seed: 42)
        var edited = base
        edited.insert(contentsOf: pseudoRandomBytes(count: 100, seed: 5), at: 1000)
        edited.removeSubrange(9_000_000..<9_000_010)
        let before = Set(Chunker(.default).chunks(of: base).map(\.id))
        let afterChunks = Chunker(.default).chunks(of: edited)
        let reused = afterChunks.filter { before.contains($0.id) }.count
        #expect((Double(reused) / Double(afterChunks.count)) >= 0.9, "\(reused) of \(afterChunks.count) chunks reused")
        // The same edit defeats fixed-size chunking: every chunk after the insertion shifts.
        let fixed = try! ChunkingParameters(algorithm: .fixed, minSize: 64 << 10, avgSize: 256 << 10, maxSize: 1 << 20)
        let fixedBefore = Set(Chunker(fixed).chunks(of: base).map(\.id))
        let fixedAfter = Chunker(fixed).chunks(of: edited)
        #expect(fixedAfter.filter { fixedBefore.contains($0.id) }.count == 0)
    }

    @Test func fixedMode() throws {
        let p = try ChunkingParameters(algorithm: .fixed, minSize: 64 << 10, avgSize: 256 << 10, maxSize: 1 << 20)
        let bytes = pseudoRandomBytes(count: (5 << 20) + 123, seed: 3)
        let chunks = Chunker(p).chunks(of: bytes)
        #expect(chunks.count == 21)
        #expect(chunks.dropLast().map(\.length) == Array(repeating: 256 << 10, count: 20))
        #expect(chunks.last?.length == 123)
        #expect(invariantViolation(chunks, of: bytes, p) == nil)
        #expect((Chunker(p).chunkLengths(of: Array(bytes[0..<(1 << 20)]))) == [262144, 262144, 262144, 262144])
    }

    /// A cut depends on the 64 bytes before it only: bytes before `min - 64` of a chunk are never read.
    @Test func cutIgnoresSkippedPrefix() {
        let p = smallParameters
        var bytes = pseudoRandomBytes(count: 64 << 10, seed: 11)
        let first = Chunker(p).nextChunkLength(in: bytes.withUnsafeBytes { $0 })
        for i in 0..<(p.minSize - 64) { bytes[i] ^= 0x5A }
        #expect(bytes.withUnsafeBytes { Chunker(p).nextChunkLength(in: $0) } == first)
    }

    @Test func parameterValidation() {
        func message(_ min: Int, _ avg: Int, _ max: Int) -> String? {
            do { _ = try ChunkingParameters(minSize: min, avgSize: avg, maxSize: max); return nil } catch { return error.message }
        }
        #expect(message(64 << 10, 256 << 10, 1 << 20) == nil)
        #expect(message(32, 256, 1024) == ("min 32 is below 64 bytes (the rolling-hash window)"))
        #expect(message(64, 128, 1024) == ("avg 128 is below 256 bytes"))
        #expect(message(64, 300, 1024) == ("avg 300 is not a power of two"))
        #expect(message(64, 256, 2 << 30) == ("max 2147483648 is above 1073741824 bytes (1 GiB)"))
        #expect(message(512, 256, 1024) == ("expected min < avg < max, got 512 / 256 / 1024"))
        #expect(message(64, 256, 256) == ("expected min < avg < max, got 64 / 256 / 256"))
        func code(_ min: Int, _ avg: Int, _ max: Int) -> ChunkingParameterError.Code? {
            do { _ = try ChunkingParameters(minSize: min, avgSize: avg, maxSize: max); return nil } catch { return error.code }
        }
        #expect(code(32, 256, 1024) == .minTooSmall)
        #expect(code(64, 128, 1024) == .avgTooSmall)
        #expect(code(64, 300, 1024) == .avgNotPowerOfTwo)
        #expect(code(64, 256, 2 << 30) == .maxTooLarge)
        #expect(code(512, 256, 1024) == .notOrdered)
        #expect(ChunkingAlgorithm(name: "content_aware") == .contentAware)
        #expect(ChunkingAlgorithm(name: "fixed") == .fixed)
        #expect(ChunkingAlgorithm(name: "rabin") == nil)
    }
}
