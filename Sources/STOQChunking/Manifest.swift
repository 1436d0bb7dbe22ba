// No imports: this file is also compiled into the manifest fuzz target (scripts/fuzz manifest).

/// What an object is made of: its length and digest, how it was chunked, and its chunks in order.
///
/// A manifest is always valid: the initializer and the decoder check the same rules (see
/// `validate`), so `encode()` never writes something `init(decoding:)` would refuse.
/// The binary format is described in the Chunking article; all integers are big-endian.
public struct Manifest: Hashable, Sendable {
    /// One chunk: its id (SHA-256 of its bytes) and length.
    public struct Entry: Hashable, Sendable {
        /// SHA-256 of the chunk's bytes; the chunk's name in a content-addressed store.
        public var id: ContentDigest
        /// Byte count.
        public var length: UInt32

        /// An entry.
        public init(id: ContentDigest, length: UInt32) {
            self.id = id
            self.length = length
        }
    }

    /// The format version this build writes and the only one it reads.
    public static let currentVersion: UInt8 = 1
    /// "STQM".
    public static let magic: UInt32 = 0x5354_514D
    /// Bytes before the first entry.
    public static let headerSize = 64
    /// Where the header keeps the chunk count (a big-endian u32).
    static let chunkCountOffset = 60

    /// The chunk count a manifest's header states, read before anything is decoded; nil when
    /// `bytes` is shorter than a header.
    public static func chunkCount(inHeader bytes: UnsafeRawBufferPointer) -> Int? {
        guard bytes.count >= headerSize else { return nil }
        return Int(UInt32(bigEndian: bytes.loadUnaligned(fromByteOffset: chunkCountOffset, as: UInt32.self)))
    }
    /// Bytes per entry: a 32-byte id and a 32-bit length.
    public static let entrySize = 36
    /// No manifest lists more chunks than this (16 Mi entries, a 604 MB manifest), whatever its
    /// total length says: a bound on what a hostile manifest can make a reader allocate.
    public static let maxChunkCount = 1 << 24
    /// The most chunks a node takes in a manifest, whatever `storage.max_object_size` (a PUT's,
    /// one fetched from an upstream), and ids a `/_stoq/missing` query may ask about (a client
    /// asks about all of a manifest's chunks at once): a million (a 36 MiB manifest, a 32 MiB
    /// query). Every id costs a worker a lookup in the store; this bounds the stall one request
    /// can cause. It covers an object of 64 GiB (the default `max_object_size`) cut with the
    /// default 64 KiB `min_chunk_size`.
    public static let maxListedChunks = 1 << 20
    /// The largest manifest a node takes: `maxListedChunks` entries (37,748,800 bytes). An
    /// upstream's longer answer is refused as it arrives, not held whole first.
    public static let maxListedSize = headerSize + entrySize * maxListedChunks

    /// Format version (1).
    public let version: UInt8
    /// The object's length in bytes (the sum of the chunk lengths).
    public let totalLength: UInt64
    /// SHA-256 of the whole object.
    public let digest: ContentDigest
    /// How the object was cut.
    public let parameters: ChunkingParameters
    /// The chunks, in object order.
    public let chunks: [Entry]

    /// A manifest, checked like a decoded one.
    public init(totalLength: UInt64, digest: ContentDigest, parameters: ChunkingParameters, chunks: [Entry]) throws(ManifestError) {
        self.version = Self.currentVersion
        self.totalLength = totalLength
        self.digest = digest
        self.parameters = parameters
        self.chunks = chunks
        try Self.validate(chunkCount: chunks.count, totalLength: totalLength, parameters: parameters)
        try Self.validate(chunks: chunks, totalLength: totalLength, parameters: parameters)
    }

    /// The largest chunk count an object of `totalLength` bytes can have: every chunk but the
    /// last is at least `min` long. Capped at `maxChunkCount`.
    public static func chunkCountBound(totalLength: UInt64, parameters: ChunkingParameters) -> Int {
        guard totalLength > 0 else { return 0 }
        let bound = totalLength / UInt64(parameters.minSize) + 1
        return bound > UInt64(maxChunkCount) ? maxChunkCount : Int(bound)
    }

    /// The size of `encode()`'s result.
    public var encodedSize: Int { Self.headerSize + Self.entrySize * chunks.count }

    // MARK: Encoding

    /// The binary form:
    ///
    /// ```
    /// offset size  field
    ///  0      4    magic "STQM"
    ///  4      1    version (1)
    ///  5      1    algorithm: 0 fixed, 1 content_aware
    ///  6      2    reserved, zero
    ///  8      4    min chunk size
    /// 12      4    avg chunk size (a power of two)
    /// 16      4    max chunk size
    /// 20      8    total length
    /// 28     32    SHA-256 of the whole object
    /// 60      4    chunk count N
    /// 64   36×N    N × (32-byte chunk id, 4-byte length)
    /// ```
    public func encode() -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(encodedSize)
        func put<T: FixedWidthInteger>(_ v: T) {
            withUnsafeBytes(of: v.bigEndian) { out.append(contentsOf: $0) }
        }
        put(Self.magic)
        put(version)
        put(parameters.algorithm.rawValue)
        put(UInt16(0))
        put(UInt32(parameters.minSize))
        put(UInt32(parameters.avgSize))
        put(UInt32(parameters.maxSize))
        put(totalLength)
        out.append(contentsOf: digest.bytes)
        put(UInt32(chunks.count))
        for e in chunks {
            put(e.id.w0); put(e.id.w1); put(e.id.w2); put(e.id.w3)
            put(e.length)
        }
        return out
    }

    // MARK: Decoding

    /// Decodes exactly one manifest (no trailing bytes), refusing anything `encode()` could not
    /// have written: the error's code says which rule, its message names the values.
    public init(decoding bytes: [UInt8]) throws(ManifestError) {
        var result: Result<Manifest, ManifestError>!
        bytes.withUnsafeBytes { raw in
            do throws(ManifestError) { result = .success(try Manifest(decoding: raw)) } catch { result = .failure(error) }
        }
        self = try result.get()
    }

    /// Decodes from raw bytes; see `init(decoding: [UInt8])`.
    public init(decoding bytes: UnsafeRawBufferPointer) throws(ManifestError) {
        func u8(_ at: Int) -> UInt8 { bytes[at] }
        func u16(_ at: Int) -> UInt16 { UInt16(bigEndian: bytes.loadUnaligned(fromByteOffset: at, as: UInt16.self)) }
        func u32(_ at: Int) -> UInt32 { UInt32(bigEndian: bytes.loadUnaligned(fromByteOffset: at, as: UInt32.self)) }
        func u64(_ at: Int) -> UInt64 { UInt64(bigEndian: bytes.loadUnaligned(fromByteOffset: at, as: UInt64.self)) }
        func digest(_ at: Int) -> ContentDigest {
            ContentDigest(w0: u64(at), w1: u64(at + 8), w2: u64(at + 16), w3: u64(at + 24))
        }

        guard bytes.count >= Self.headerSize else {
            throw ManifestError(.truncated, "\(bytes.count) bytes, the header alone is \(Self.headerSize)")
        }
        let magic = u32(0)
        guard magic == Self.magic else {
            throw ManifestError(.badMagic, "magic is \(hex32(magic)), expected \(hex32(Self.magic)) (\"STQM\")")
        }
        let version = u8(4)
        guard version == Self.currentVersion else {
            throw ManifestError(.unsupportedVersion, "version \(version), this build reads version \(Self.currentVersion)")
        }
        guard let algorithm = ChunkingAlgorithm(rawValue: u8(5)) else {
            throw ManifestError(.unknownAlgorithm, "algorithm \(u8(5)), expected 0 (fixed) or 1 (content_aware)")
        }
        let reserved = u16(6)
        guard reserved == 0 else {
            throw ManifestError(.reservedNotZero, "reserved field is \(reserved), expected 0")
        }
        let (minSize, avgSize, maxSize) = (Int(u32(8)), Int(u32(12)), Int(u32(16)))
        if let problem = ChunkingParameters.problem(minSize: minSize, avgSize: avgSize, maxSize: maxSize) {
            throw ManifestError(.invalidParameters, problem)
        }
        let parameters = ChunkingParameters(uncheckedAlgorithm: algorithm, minSize: minSize, avgSize: avgSize, maxSize: maxSize)
        let totalLength = u64(20)
        let objectDigest = digest(28)
        let count = Int(u32(Self.chunkCountOffset))
        try Self.validate(chunkCount: count, totalLength: totalLength, parameters: parameters)
        // The count is bounded now, so this cannot overflow.
        let expected = Self.headerSize + Self.entrySize * count
        guard bytes.count >= expected else {
            throw ManifestError(.truncated, "\(bytes.count) bytes, \(count) chunks need \(expected)")
        }
        guard bytes.count == expected else {
            throw ManifestError(.trailingBytes, "\(bytes.count - expected) bytes after the last of \(count) chunks")
        }
        var chunks = [Entry]()
        chunks.reserveCapacity(count)
        var at = Self.headerSize
        for _ in 0..<count {
            chunks.append(Entry(id: digest(at), length: u32(at + 32)))
            at += Self.entrySize
        }
        try Self.validate(chunks: chunks, totalLength: totalLength, parameters: parameters)
        self.version = version
        self.totalLength = totalLength
        self.digest = objectDigest
        self.parameters = parameters
        self.chunks = chunks
    }

    // MARK: Rules

    static func validate(chunkCount count: Int, totalLength: UInt64, parameters: ChunkingParameters) throws(ManifestError) {
        let bound = chunkCountBound(totalLength: totalLength, parameters: parameters)
        guard count <= bound else {
            if count > maxChunkCount {
                throw ManifestError(.tooManyChunks, "\(count) chunks, the limit is \(maxChunkCount)")
            }
            throw ManifestError(
                .tooManyChunks,
                "\(count) chunks, at most \(bound) fit \(totalLength) bytes with min \(parameters.minSize)")
        }
    }

    static func validate(chunks: [Entry], totalLength: UInt64, parameters: ChunkingParameters) throws(ManifestError) {
        var sum: UInt64 = 0
        let last = chunks.count - 1
        for (i, e) in chunks.enumerated() {
            let length = Int(e.length)
            guard length > 0 else { throw ManifestError(.emptyChunk, "chunk \(i) has length 0") }
            guard length <= parameters.maxSize else {
                throw ManifestError(.chunkTooLong, "chunk \(i) is \(length) bytes, longer than max \(parameters.maxSize)")
            }
            switch parameters.algorithm {
            case .contentAware:
                guard i == last || length >= parameters.minSize else {
                    throw ManifestError(
                        .chunkTooShort,
                        "chunk \(i) is \(length) bytes, shorter than min \(parameters.minSize) (only the last chunk may be)")
                }
            case .fixed:
                guard i == last ? length <= parameters.avgSize : length == parameters.avgSize else {
                    throw ManifestError(
                        .fixedSizeMismatch,
                        "chunk \(i) is \(length) bytes, fixed chunking makes every chunk but the last \(parameters.avgSize) bytes and the last at most that")
                }
            }
            sum += UInt64(length)
        }
        guard sum == totalLength else {
            throw ManifestError(.lengthMismatch, "chunk lengths sum to \(sum), the total length is \(totalLength)")
        }
    }
}

private func hex32(_ v: UInt32) -> String {
    let digits = Array("0123456789abcdef".utf8)
    var out: [UInt8] = Array("0x".utf8)
    for k in (0..<8).reversed() { out.append(digits[Int((v >> (UInt32(k) * 4)) & 15)]) }
    return String(decoding: out, as: UTF8.self)
}

/// Why a manifest was refused.
public struct ManifestError: Error, Hashable, Sendable, CustomStringConvertible {
    /// Which rule was broken; a struct so codes can be added without breaking callers' switches.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// Stable name, e.g. `truncated`.
        public let name: String
        private init(_ name: String) { self.name = name }

        /// Shorter than its header, or than its chunk count says.
        public static let truncated = Code("truncated")
        /// Does not start with "STQM".
        public static let badMagic = Code("bad_magic")
        /// A format version this build does not read.
        public static let unsupportedVersion = Code("unsupported_version")
        /// An algorithm byte other than 0 or 1.
        public static let unknownAlgorithm = Code("unknown_algorithm")
        /// The reserved field is not zero.
        public static let reservedNotZero = Code("reserved_not_zero")
        /// min/avg/max break the rules of `ChunkingParameters`.
        public static let invalidParameters = Code("invalid_parameters")
        /// More chunks than the total length allows (or than `Manifest.maxChunkCount`).
        public static let tooManyChunks = Code("too_many_chunks")
        /// Bytes after the last entry.
        public static let trailingBytes = Code("trailing_bytes")
        /// A chunk of length 0.
        public static let emptyChunk = Code("empty_chunk")
        /// A chunk longer than max.
        public static let chunkTooLong = Code("chunk_too_long")
        /// A content-aware chunk other than the last shorter than min.
        public static let chunkTooShort = Code("chunk_too_short")
        /// A fixed-size chunk other than the last not `avg` long, or a last one longer.
        public static let fixedSizeMismatch = Code("fixed_size_mismatch")
        /// The chunk lengths do not add up to the total length.
        public static let lengthMismatch = Code("length_mismatch")

        /// The name.
        public var description: String { name }
    }

    /// Which rule.
    public let code: Code
    /// What was wrong, with the values, e.g. `chunk 3 has length 0`.
    public let message: String

    init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// `manifest <code>: <message>`.
    public var description: String { "manifest \(code): \(message)" }
}
