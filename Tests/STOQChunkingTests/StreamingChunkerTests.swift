import Foundation
import Testing
@testable import STOQChunking

@Suite struct StreamingChunkerTests {
    private func stream(_ bytes: [UInt8], _ p: ChunkingParameters, maxRead: Int, readSize: Int) throws -> [Chunk] {
        let s = StreamingChunker(source: BytesSource(bytes, maxRead: maxRead), parameters: p, readSize: readSize)
        var out = [Chunk]()
        while let c = try s.next() { out.append(c) }
        #expect(try s.next() == nil, "stays at the end")
        #expect(s.bytesConsumed == UInt64(bytes.count))
        return out
    }

    /// Whatever the reads look like, the stream cuts exactly where the one-shot chunker does.
    @Test func streamingEqualsOneShot() throws {
        let bytes = pseudoRandomBytes(count: 300_000, seed: 21)
        let fixed = try ChunkingParameters(algorithm: .fixed, minSize: 512, avgSize: 2048, maxSize: 8192)
        for p in [smallParameters, fixed] {
            let expected = Chunker(p).chunks(of: bytes)
            #expect(expected.count > 30)
            for (maxRead, readSize) in [(1, 1), (7, 100), (4096, 1), (8191, 8192), (65_536, 65_536), (Int.max, 1 << 20), (Int.max, 3)] {
                #expect(try stream(bytes, p, maxRead: maxRead, readSize: readSize) == expected, "\(p.algorithm) maxRead \(maxRead) readSize \(readSize)")
            }
        }
    }

    /// `nextWithBytes` hands the very bytes each id was computed from: the object's own, at
    /// the chunk's offset, whatever the reads looked like.
    @Test func chunksComeWithTheirBytes() throws {
        let bytes = pseudoRandomBytes(count: 300_000, seed: 22)
        let s = StreamingChunker(source: BytesSource(bytes, maxRead: 4093), parameters: smallParameters, readSize: 1000)
        var chunks = 0
        while let (c, b) = try s.nextWithBytes() {
            #expect(Array(b) == Array(bytes[Int(c.offset)..<Int(c.offset) + c.length]))
            #expect(ContentDigest.sha256(b) == c.id)
            chunks += 1
        }
        #expect(chunks > 30 && s.bytesConsumed == UInt64(bytes.count))
    }

    @Test func streamingEqualsOneShotAtDefaults() throws {
        let bytes = pseudoRandomBytes(count: 6 << 20, seed: 0x5354_4F51)
        let expected = Chunker(.default).chunks(of: bytes)
        for (maxRead, readSize) in [(65_536, 65_536), (1_000_003, 1 << 20), (Int.max, 4 << 20)] {
            #expect(try stream(bytes, .default, maxRead: maxRead, readSize: readSize) == expected)
        }
    }

    /// Every read lands inside one buffer of `max + readSize` bytes: that is all the memory the
    /// stream holds, however long it is.
    @Test func memoryIsOneMaxChunkPlusOneRead() throws {
        final class Spans { var low = UInt.max, high = UInt.min, reads = 0 }
        struct Recording: ChunkSource {
            var inner: BytesSource
            let spans: Spans
            mutating func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
                let start = UInt(bitPattern: buffer.baseAddress)
                spans.low = min(spans.low, start)
                spans.high = max(spans.high, start + UInt(buffer.count))
                spans.reads += 1
                return try inner.read(into: buffer)
            }
        }
        let bytes = pseudoRandomBytes(count: 2 << 20, seed: 31)
        for readSize in [100, 4096, 65_536] {
            let spans = Spans()
            let s = StreamingChunker(
                source: Recording(inner: BytesSource(bytes, maxRead: 3000), spans: spans),
                parameters: smallParameters, readSize: readSize)
            var count = 0
            while try s.next() != nil { count += 1 }
            #expect(count > 200)
            #expect(spans.reads > 100)
            #expect((spans.high - spans.low) <= (UInt(smallParameters.maxSize + readSize)))
        }
    }

    @Test func emptyAndTinyStreams() throws {
        #expect(try stream([], smallParameters, maxRead: 10, readSize: 10) == [])
        let one = try stream([42], smallParameters, maxRead: 10, readSize: 10)
        #expect(one == [Chunk(offset: 0, length: 1, id: .sha256([42]))])
    }

    @Test func boundariesWithoutHashing() throws {
        let bytes = pseudoRandomBytes(count: 200_000, seed: 8)
        let s = StreamingChunker(source: BytesSource(bytes, maxRead: 5000), parameters: smallParameters, readSize: 4096)
        var lengths = [Int]()
        while let c = try s.nextBoundary() { #expect(c.id == .zero); lengths.append(c.length) }
        #expect(lengths == Chunker(smallParameters).chunkLengths(of: bytes))
    }

    @Test func fileDescriptorSourceAndObjectDigest() throws {
        let bytes = pseudoRandomBytes(count: 3 << 20, seed: 77)
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("stoq-chunk-\(getpid()).bin").path
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        defer { unlink(path) }
        let fd = open(path, O_RDONLY)
        #expect(fd >= 0)
        defer { close(fd) }
        let s = StreamingChunker(source: FileDescriptorSource(fd: fd), parameters: smallParameters, digestObject: true)
        var chunks = [Chunk]()
        while let c = try s.next() { chunks.append(c) }
        #expect(chunks == Chunker(smallParameters).chunks(of: bytes))
        #expect(s.objectDigest == .sha256(bytes))
    }

    @Test func readErrorCarriesErrno() {
        var source = FileDescriptorSource(fd: -1)
        var buf = [UInt8](repeating: 0, count: 16)
        let error = #expect(throws: ChunkSourceError.self) { try buf.withUnsafeMutableBytes { try source.read(into: $0) } }
        #expect(error?.errno == EBADF)
        #expect(error?.code == .io)
        #expect(error?.description == "read: Bad file descriptor (errno 9)")
    }

    @Test func manifestFromStream() throws {
        let bytes = pseudoRandomBytes(count: 100_000, seed: 4)
        let m = try Manifest(chunking: BytesSource(bytes, maxRead: 999), parameters: smallParameters)
        #expect(m.totalLength == 100_000)
        #expect(m.digest == .sha256(bytes))
        #expect(m.chunks.map { Int($0.length) } == Chunker(smallParameters).chunkLengths(of: bytes))
        #expect(m.chunks.map(\.id) == Chunker(smallParameters).chunks(of: bytes).map(\.id))
    }
}
