import Crypto

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Where a streaming chunker gets bytes: a file descriptor, memory, anything that can fill a buffer.
public protocol ChunkSource {
    /// Fills the start of `buffer` and returns how many bytes it wrote; 0 means the end.
    mutating func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int
}

/// Reads a file descriptor with read(2). The caller owns the descriptor.
public struct FileDescriptorSource: ChunkSource {
    /// The descriptor read from.
    public let fd: Int32

    /// Reads `fd` from its current position to its end.
    public init(fd: Int32) { self.fd = fd }

    /// One read(2), retried on EINTR.
    public mutating func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        while true {
            #if canImport(Glibc)
            let n = Glibc.read(fd, buffer.baseAddress, buffer.count)
            #else
            let n = Darwin.read(fd, buffer.baseAddress, buffer.count)
            #endif
            if n >= 0 { return n }
            if errno == EINTR { continue }
            throw ChunkSourceError(errno: errno, call: "read")
        }
    }
}

/// Serves bytes from memory, at most `maxRead` per call, so tests can cut reads anywhere.
public struct BytesSource: ChunkSource {
    private let bytes: [UInt8]
    private var position = 0
    private let maxRead: Int

    /// `bytes`, handed out at most `maxRead` bytes per read.
    public init(_ bytes: [UInt8], maxRead: Int = .max) {
        self.bytes = bytes
        self.maxRead = max(1, maxRead)
    }

    /// Copies the next bytes.
    public mutating func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let n = min(buffer.count, maxRead, bytes.count - position)
        guard n > 0 else { return 0 }
        bytes.withUnsafeBytes { src in
            buffer.baseAddress!.copyMemory(from: src.baseAddress! + position, byteCount: n)
        }
        position += n
        return n
    }
}

/// A failed read: errno and the call that set it.
///
/// A struct with a nested `Code` (static members) so codes can be added without breaking
/// callers that switch on them.
public struct ChunkSourceError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What failed.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// Stable name.
        public let name: String
        /// Creates a code; STOQ's own are the static members.
        public init(name: String) { self.name = name }
        /// A system call on the source failed; `errno` and `call` say which and why.
        public static let io = Code(name: "io")
        public var description: String { name }
    }

    /// What failed.
    public let code: Code
    /// The errno value.
    public let errno: Int32
    /// The system call, e.g. `read`.
    public let call: String
    /// Creates an error for a failed system call.
    public init(_ code: Code = .io, errno: Int32, call: String) { self.code = code; self.errno = errno; self.call = call }
    /// The description.
    public var message: String { description }
    /// `read: Input/output error (errno 5)`.
    public var description: String { "\(call): \(String(cString: strerror(errno))) (errno \(errno))" }
}

/// Chunks a stream in one pass, holding at most one maximal chunk plus one read in memory.
///
/// Cuts are identical to `Chunker`'s on the whole object whatever the read sizes: a cut is
/// only searched for once `max` bytes (or the end) are buffered, which is all a cut can see.
/// The buffer is allocated once; nothing is allocated per chunk except what swift-crypto's
/// SHA-256 does for its context.
public final class StreamingChunker<Source: ChunkSource> {
    /// The parameters cuts are made with.
    public let parameters: ChunkingParameters
    private let chunker: Chunker
    private var source: Source
    private let buffer: UnsafeMutableRawPointer
    private let capacity: Int
    private let readSize: Int
    private var start = 0  // first unconsumed byte in `buffer`
    private var fill = 0  // one past the last buffered byte
    private var atEnd = false
    private var offset: UInt64 = 0  // object offset of `buffer[start]`
    private var objectHasher: SHA256?
    private var finalDigest: ContentDigest?

    /// Chunks `source`. `readSize` is the least that each read asks for; `digestObject` also
    /// computes the SHA-256 of the whole stream (a second pass of SHA-256 over every byte).
    public init(
        source: Source, parameters: ChunkingParameters = .default,
        readSize: Int = 4 << 20, digestObject: Bool = false
    ) {
        self.parameters = parameters
        self.chunker = Chunker(parameters)
        self.source = source
        self.readSize = max(1, readSize)
        self.capacity = parameters.maxSize + self.readSize
        self.buffer = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 64)
        self.objectHasher = digestObject ? SHA256() : nil
    }

    deinit { buffer.deallocate() }

    /// Bytes consumed so far (the object's length once `next` has returned nil).
    public var bytesConsumed: UInt64 { offset }

    /// SHA-256 of the whole stream, once `next` has returned nil and if `digestObject` was set.
    public var objectDigest: ContentDigest? { finalDigest }

    /// The next chunk with its SHA-256, or nil at the end.
    public func next() throws -> Chunk? {
        try nextChunk(hash: true)?.chunk
    }

    /// The next chunk with its SHA-256 and the bytes it was computed from, or nil at the end.
    /// The bytes are the chunker's own buffer: valid until the next call.
    public func nextWithBytes() throws -> (chunk: Chunk, bytes: UnsafeRawBufferPointer)? {
        try nextChunk(hash: true)
    }

    /// The next chunk without hashing it (`id` is `.zero`): for measuring the cut search alone.
    public func nextBoundary() throws -> Chunk? {
        try nextChunk(hash: false)?.chunk
    }

    private func nextChunk(hash: Bool) throws -> (chunk: Chunk, bytes: UnsafeRawBufferPointer)? {
        try refill()
        let available = fill - start
        guard available > 0 else {
            if finalDigest == nil, let h = objectHasher { finalDigest = ContentDigest(h.finalize()); objectHasher = nil }
            return nil
        }
        let p = (buffer + start).assumingMemoryBound(to: UInt8.self)
        let length = chunker.nextChunkLength(p, count: available)
        let bytes = UnsafeRawBufferPointer(start: buffer + start, count: length)
        let id = hash ? ContentDigest.sha256(bytes) : .zero
        objectHasher?.update(bufferPointer: bytes)
        let chunk = Chunk(offset: offset, length: length, id: id)
        start += length
        offset += UInt64(length)
        return (chunk, bytes)
    }

    /// Buffers at least `max` bytes past `start`, or everything up to the end of the source.
    private func refill() throws {
        let want = parameters.maxSize
        guard fill - start < want, !atEnd else { return }
        while fill - start < want {
            if capacity - fill < readSize {
                // Slide the unconsumed tail (< max bytes) to the front: about once per read, and
                // afterwards there is room for a whole read, so a read never gets a tiny buffer.
                let tail = fill - start
                if tail > 0 { buffer.copyMemory(from: buffer + start, byteCount: tail) }
                start = 0
                fill = tail
            }
            let n = try source.read(into: UnsafeMutableRawBufferPointer(start: buffer + fill, count: capacity - fill))
            if n == 0 { atEnd = true; return }
            fill += n
        }
    }
}

extension Manifest {
    /// Chunks a whole stream and describes it: one pass, the object digest computed alongside.
    public init<Source: ChunkSource>(chunking source: Source, parameters: ChunkingParameters = .default) throws {
        let chunker = StreamingChunker(source: source, parameters: parameters, digestObject: true)
        var entries = [Entry]()
        while let c = try chunker.next() { entries.append(Entry(id: c.id, length: UInt32(c.length))) }
        try self.init(totalLength: chunker.bytesConsumed, digest: chunker.objectDigest!, parameters: parameters, chunks: entries)
    }
}
