import Foundation
import STOQCore
import Testing
@testable import STOQChunking

@Suite struct ManifestTests {
    private let bytes = pseudoRandomBytes(count: 10_000, seed: 12)

    private func sample(_ p: ChunkingParameters = smallParameters) throws -> Manifest {
        try Manifest(chunking: BytesSource(bytes), parameters: p)
    }

    private func put<T: FixedWidthInteger>(_ v: T, at offset: Int, in enc: inout [UInt8]) {
        withUnsafeBytes(of: v.bigEndian) { for (i, b) in $0.enumerated() { enc[offset + i] = b } }
    }

    private func decodeError(_ enc: [UInt8]) -> ManifestError? {
        do { _ = try Manifest(decoding: enc); return nil } catch { return error }
    }

    private func assertError(
        _ enc: [UInt8], _ code: ManifestError.Code, _ message: String,
        sourceLocation: SourceLocation = #_sourceLocation
    ) {
        guard let e = decodeError(enc) else { Issue.record("decoded", sourceLocation: sourceLocation); return }
        #expect(e.code == code, sourceLocation: sourceLocation)
        #expect(e.message == message, sourceLocation: sourceLocation)
        #expect(e.description == "manifest \(code.name): \(message)", sourceLocation: sourceLocation)
    }

    @Test func roundTrip() throws {
        let fixed = try ChunkingParameters(algorithm: .fixed, minSize: 512, avgSize: 2048, maxSize: 8192)
        for p in [smallParameters, fixed, .default] {
            let m = try sample(p)
            let enc = m.encode()
            #expect(enc.count == m.encodedSize)
            #expect(enc.count == (Manifest.headerSize + Manifest.entrySize * m.chunks.count))
            let back = try Manifest(decoding: enc)
            #expect(back == m)
            #expect(back.encode() == enc)
            #expect(back.version == 1)
            #expect(back.parameters == p)
            #expect(back.digest == .sha256(bytes))
        }
        let empty = try Manifest(chunking: BytesSource([]), parameters: smallParameters)
        #expect(empty.chunks == [])
        #expect(try Manifest(decoding: empty.encode()) == empty)
    }

    /// The layout in the doc comment, byte by byte.
    /// The ETag a node sends for a chunked object is the one rule (`ContentETag`) that
    /// clients and edges read a digest back from (`HTTPResponseHead.etagSHA256`).
    @Test func theETagNamesTheObjectsDigest() throws {
        let m = try sample()
        #expect(m.etag == "\"\(m.digest.hex)\"")
        #expect(ContentETag.sha256(in: m.etag) == m.digest.hex)
        #expect(ContentETag.sha256(in: "W/" + m.etag) == nil)
        #expect(ContentETag.sha256(in: m.etag.uppercased()) == m.digest.hex)
    }

    @Test func encodingLayout() throws {
        let m = try sample()
        let enc = m.encode()
        #expect((Array(enc[0..<4])) == Array("STQM".utf8))
        #expect(enc[4] == 1)
        #expect(enc[5] == 1)
        #expect((Array(enc[6..<8])) == [0, 0])
        #expect((Array(enc[8..<12])) == [0, 0, 2, 0])  // min 512
        #expect((Array(enc[12..<16])) == [0, 0, 8, 0])  // avg 2048
        #expect((Array(enc[16..<20])) == [0, 0, 0x20, 0])  // max 8192
        #expect((Array(enc[20..<28])) == [0, 0, 0, 0, 0, 0, 0x27, 0x10])  // 10000
        #expect((Array(enc[28..<60])) == ContentDigest.sha256(bytes).bytes)
        #expect((Array(enc[60..<64])) == [0, 0, 0, UInt8(m.chunks.count)])
        #expect((Array(enc[64..<96])) == m.chunks[0].id.bytes)
        #expect((Array(enc[96..<100])) == withUnsafeBytes(of: m.chunks[0].length.bigEndian) { Array($0) })
    }

    @Test func everyErrorCode() throws {
        let m = try sample()
        let enc = m.encode()
        let n = m.chunks.count
        #expect(n > 2)
        var e: [UInt8]

        assertError(Array(enc[0..<10]), .truncated, "10 bytes, the header alone is 64")
        assertError([], .truncated, "0 bytes, the header alone is 64")
        assertError(Array(enc.dropLast()), .truncated, "\(enc.count - 1) bytes, \(n) chunks need \(enc.count)")

        e = enc; e[0] = UInt8(ascii: "X")
        assertError(e, .badMagic, "magic is 0x5854514d, expected 0x5354514d (\"STQM\")")

        e = enc; e[4] = 2
        assertError(e, .unsupportedVersion, "version 2, this build reads version 1")

        e = enc; e[5] = 7
        assertError(e, .unknownAlgorithm, "algorithm 7, expected 0 (fixed) or 1 (content_aware)")

        e = enc; e[7] = 1
        assertError(e, .reservedNotZero, "reserved field is 1, expected 0")

        e = enc; put(UInt32(3000), at: 12, in: &e)
        assertError(e, .invalidParameters, "avg 3000 is not a power of two")
        e = enc; put(UInt32(1 << 31), at: 16, in: &e)
        assertError(e, .invalidParameters, "max 2147483648 is above 1073741824 bytes (1 GiB)")

        e = enc; put(UInt32(1000), at: 60, in: &e)
        assertError(e, .tooManyChunks, "1000 chunks, at most 20 fit 10000 bytes with min 512")
        e = enc; put(UInt64.max, at: 20, in: &e); put(UInt32.max, at: 60, in: &e)
        assertError(e, .tooManyChunks, "4294967295 chunks, the limit is 16777216")
        e = enc; put(UInt64(0), at: 20, in: &e)
        assertError(e, .tooManyChunks, "\(n) chunks, at most 0 fit 0 bytes with min 512")

        assertError(enc + [1, 2, 3], .trailingBytes, "3 bytes after the last of \(n) chunks")

        e = enc; put(UInt32(0), at: 64 + 32, in: &e)
        assertError(e, .emptyChunk, "chunk 0 has length 0")

        e = enc; put(UInt32(9000), at: 64 + 36 + 32, in: &e)
        assertError(e, .chunkTooLong, "chunk 1 is 9000 bytes, longer than max 8192")

        e = enc; put(UInt32(100), at: 64 + 32, in: &e)
        assertError(e, .chunkTooShort, "chunk 0 is 100 bytes, shorter than min 512 (only the last chunk may be)")

        let fixed = try ChunkingParameters(algorithm: .fixed, minSize: 512, avgSize: 2048, maxSize: 8192)
        let f = try sample(fixed).encode()
        e = f; put(UInt32(2000), at: 64 + 32, in: &e)
        assertError(
            e, .fixedSizeMismatch,
            "chunk 0 is 2000 bytes, fixed chunking makes every chunk but the last 2048 bytes and the last at most that")

        e = enc; put(UInt64(10_001), at: 20, in: &e)
        assertError(e, .lengthMismatch, "chunk lengths sum to 10000, the total length is 10001")
    }

    /// The initializer applies the decoder's rules, so no invalid manifest can be encoded.
    @Test func initializerValidates() throws {
        let m = try sample()
        let e1 = #expect(throws: ManifestError.self) {
            try Manifest(totalLength: m.totalLength + 1, digest: m.digest, parameters: m.parameters, chunks: m.chunks)
        }
        #expect(e1?.code == .lengthMismatch)
        var chunks = m.chunks
        chunks[0].length = 0
        let e2 = #expect(throws: ManifestError.self) {
            try Manifest(totalLength: m.totalLength, digest: m.digest, parameters: m.parameters, chunks: chunks)
        }
        #expect(e2?.code == .emptyChunk)
    }

    /// Thousands of mutated and truncated encodings: never a crash, and each either throws or
    /// decodes to a manifest whose encoding is exactly the input (there is one encoding per manifest).
    @Test func randomizedMutations() throws {
        let fixed = try ChunkingParameters(algorithm: .fixed, minSize: 512, avgSize: 2048, maxSize: 8192)
        let seeds = [
            try sample().encode(), try sample(fixed).encode(),
            try Manifest(chunking: BytesSource([]), parameters: smallParameters).encode(),
            try Manifest(chunking: BytesSource([7]), parameters: smallParameters).encode(),
        ]
        var rng: UInt64 = 0x9E37_79B9_7F4A_7C15
        func next(_ bound: Int) -> Int {
            rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27
            return Int((rng &* 0x2545_F491_4F6C_DD1D) >> 1) % Swift.max(bound, 1)
        }
        var decoded = 0, refused = 0
        var codes = Set<String>()
        for _ in 0..<20_000 {
            var e = seeds[next(seeds.count)]
            for _ in 0...next(3) {
                switch next(6) {
                case 0 where !e.isEmpty: e[next(e.count)] ^= UInt8(1 << next(8))
                case 1 where !e.isEmpty: e[next(e.count)] = UInt8(truncatingIfNeeded: next(256))
                case 2: e = Array(e.prefix(next(e.count + 1)))
                case 3: e.insert(contentsOf: (0..<next(40)).map { _ in UInt8(truncatingIfNeeded: next(256)) }, at: next(e.count + 1))
                case 4 where !e.isEmpty:
                    let a = next(e.count), b = Swift.min(e.count, a + next(40))
                    e.removeSubrange(a..<b)
                default:
                    // Header fields are where the interesting checks are: hit them with extremes.
                    if e.count >= 64 { e[[5, 6, 8, 11, 15, 19, 20, 27, 60, 63][next(10)]] = [0, 1, 0xFF, 0x80][next(4)] }
                }
            }
            do {
                let m = try Manifest(decoding: e)
                #expect(m.encode() == e)
                #expect(try Manifest(decoding: m.encode()) == m)
                decoded += 1
            } catch {
                codes.insert(error.code.name)
                refused += 1
            }
        }
        #expect(decoded > 100)
        #expect(refused > 1000)
        #expect(codes.count >= 10, "\(codes.sorted())")
    }
}
