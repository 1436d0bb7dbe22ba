import Crypto

/// One chunk of an object: where it is and, unless it was cut without hashing, its SHA-256.
public struct Chunk: Hashable, Sendable {
    /// Byte offset in the object.
    public var offset: UInt64
    /// Byte count (1 … max).
    public var length: Int
    /// SHA-256 of the chunk's bytes (`ContentDigest.zero` when hashing was turned off).
    public var id: ContentDigest

    /// A chunk.
    public init(offset: UInt64, length: Int, id: ContentDigest) {
        self.offset = offset
        self.length = length
        self.id = id
    }
}

/// Finds cut points. A pure function of the bytes and the parameters; no state between calls.
public struct Chunker: Sendable {
    /// The algorithm and sizes.
    public let parameters: ChunkingParameters
    // Copied out of `parameters` once so the hot loop reads plain integers.
    private let maskBeforeAvg: UInt64
    private let maskAfterAvg: UInt64

    /// A chunker for these parameters.
    public init(_ parameters: ChunkingParameters = .default) {
        self.parameters = parameters
        self.maskBeforeAvg = parameters.maskBeforeAvg
        self.maskAfterAvg = parameters.maskAfterAvg
    }

    /// The length of the chunk that starts at `bytes.baseAddress`.
    ///
    /// `bytes` must hold at least `max` bytes, or everything up to the end of the object:
    /// the answer for a shorter prefix is not the answer for the whole.
    @inlinable
    public func nextChunkLength(in bytes: UnsafeRawBufferPointer) -> Int {
        guard let base = bytes.baseAddress else { return 0 }
        return nextChunkLength(base.assumingMemoryBound(to: UInt8.self), count: bytes.count)
    }

    @usableFromInline
    func nextChunkLength(_ p: UnsafePointer<UInt8>, count n: Int) -> Int {
        let minSize = parameters.minSize, avgSize = parameters.avgSize, maxSize = parameters.maxSize
        if parameters.algorithm == .fixed { return Swift.min(n, avgSize) }
        if n <= minSize { return n }
        let end = Swift.min(n, maxSize)
        return Self.findCut(
            p, minSize: minSize, normal: Swift.min(end, avgSize), end: end,
            maskBeforeAvg: maskBeforeAvg, maskAfterAvg: maskAfterAvg, gear: GearTable.pointer)
    }

    /// The hot loop. Returns the chunk length: the first `i + 1` with `minSize <= i < end` whose
    /// 64-byte window hash H(i) has the masked bits zero (`maskBeforeAvg` while `i < normal`,
    /// then `maskAfterAvg`), or `end`.
    ///
    /// H(i) = Σ_{j=0}^{63} gear[b[i-j]] << j (mod 2^64): a left-shifting gear hash forgets a
    /// byte after 64 steps, so rolling from `minSize - 64` gives exactly H(i) at the first
    /// tested position, and the first `minSize - 64` bytes are never read (the FastCDC skip).
    ///
    /// Why four bytes per step: `h = (h << 1) + gear[b]` is a 2-cycle dependency chain per byte
    /// (shift, then add), which caps a one-byte loop near 2.4 GB/s here. Taking four bytes at
    /// once, the bytes' own sum `t = g0<<3 + g1<<2 + g2<<1 + g3` does not depend on `h`, so the
    /// chain is one shift and one add per four bytes, and the four intermediate hashes to test
    /// (`h<<1 + g0`, `h<<2 + t01`, …) hang off it in parallel: ~2.9 GB/s (measured in C with
    /// clang -O3 too: same speed, so this stays in Swift).
    @inline(__always)
    static func findCut(
        _ p: UnsafePointer<UInt8>, minSize: Int, normal: Int, end: Int,
        maskBeforeAvg: UInt64, maskAfterAvg: UInt64, gear: UnsafePointer<UInt64>
    ) -> Int {
        var h: UInt64 = 0
        var i = minSize - 64
        while i < minSize {
            h = (h &<< 1) &+ gear[Int(p[i])]
            i &+= 1
        }
        var mask = maskBeforeAvg
        var limit = normal
        for _ in 0..<2 {
            while i &+ 4 <= limit {
                let g0 = gear[Int(p[i])], g1 = gear[Int(p[i &+ 1])]
                let g2 = gear[Int(p[i &+ 2])], g3 = gear[Int(p[i &+ 3])]
                let t01 = (g0 &<< 1) &+ g1
                let t012 = (t01 &<< 1) &+ g2
                let t0123 = (t012 &<< 1) &+ g3
                let h1 = (h &<< 1) &+ g0
                let h2 = (h &<< 2) &+ t01
                let h3 = (h &<< 3) &+ t012
                let h4 = (h &<< 4) &+ t0123
                if h1 & mask == 0 { return i &+ 1 }
                if h2 & mask == 0 { return i &+ 2 }
                if h3 & mask == 0 { return i &+ 3 }
                if h4 & mask == 0 { return i &+ 4 }
                h = h4
                i &+= 4
            }
            while i < limit {
                h = (h &<< 1) &+ gear[Int(p[i])]
                if h & mask == 0 { return i &+ 1 }
                i &+= 1
            }
            mask = maskAfterAvg
            limit = end
        }
        return end
    }

    /// The lengths of all chunks of a complete object, in order (empty for an empty object).
    public func chunkLengths(of bytes: UnsafeRawBufferPointer) -> [Int] {
        var out: [Int] = []
        guard let base = bytes.baseAddress else { return out }
        let p = base.assumingMemoryBound(to: UInt8.self)
        var pos = 0
        while pos < bytes.count {
            let len = nextChunkLength(p + pos, count: bytes.count - pos)
            out.append(len)
            pos += len
        }
        return out
    }

    /// All chunks of a complete object, with their SHA-256 ids.
    public func chunks(of bytes: UnsafeRawBufferPointer) -> [Chunk] {
        var offset = 0
        return chunkLengths(of: bytes).map { len in
            defer { offset += len }
            return Chunk(
                offset: UInt64(offset), length: len,
                id: .sha256(UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + len])))
        }
    }

    /// All chunks of a complete object held in an array.
    public func chunks(of bytes: [UInt8]) -> [Chunk] {
        bytes.withUnsafeBytes { chunks(of: $0) }
    }

    /// The chunk lengths of an object held in an array.
    public func chunkLengths(of bytes: [UInt8]) -> [Int] {
        bytes.withUnsafeBytes { chunkLengths(of: $0) }
    }
}

extension ContentDigest {
    /// The value of a swift-crypto SHA-256 digest.
    public init(_ digest: SHA256.Digest) {
        self = digest.withUnsafeBytes { ContentDigest(bytes: $0) }
    }

    /// SHA-256 of `bytes`.
    public static func sha256(_ bytes: UnsafeRawBufferPointer) -> ContentDigest {
        var hasher = SHA256()
        hasher.update(bufferPointer: bytes)
        return ContentDigest(hasher.finalize())
    }

    /// SHA-256 of `bytes`.
    public static func sha256(_ bytes: [UInt8]) -> ContentDigest {
        bytes.withUnsafeBytes { sha256($0) }
    }
}
