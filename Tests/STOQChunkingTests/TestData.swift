@testable import STOQChunking

/// Deterministic pseudo-random bytes (xorshift64*), the same on every machine and independent of
/// the gear table's generator, so the known-answer cut points exercise the chunker, not the RNG.
func pseudoRandomBytes(count: Int, seed: UInt64) -> [UInt8] {
    var x = seed | 1
    var out = [UInt8](repeating: 0, count: count)
    var i = 0
    while i < count {
        x ^= x >> 12; x ^= x << 25; x ^= x >> 27
        var v = x &* 0x2545_F491_4F6C_DD1D
        for _ in 0..<8 where i < count { out[i] = UInt8(truncatingIfNeeded: v); v >>= 8; i += 1 }
    }
    return out
}

/// Small sizes so tests cover thousands of cuts quickly.
let smallParameters = try! ChunkingParameters(minSize: 512, avgSize: 2048, maxSize: 8192)

/// Checks what every chunking must satisfy: chunks tile the input in order, every chunk but the
/// last is within [min, max] (content-aware: longer than min; fixed: exactly avg), ids are the
/// SHA-256 of the bytes. Returns a description of the first violation, or nil.
func invariantViolation(_ chunks: [Chunk], of bytes: [UInt8], _ p: ChunkingParameters) -> String? {
    var offset = 0
    for (i, c) in chunks.enumerated() {
        if c.offset != UInt64(offset) { return "chunk \(i) at \(c.offset), expected \(offset)" }
        if c.length < 1 || c.length > p.maxSize { return "chunk \(i) length \(c.length) outside 1…max" }
        let last = i == chunks.count - 1
        switch p.algorithm {
        case .contentAware:
            if !last && c.length <= p.minSize { return "chunk \(i) length \(c.length) not above min" }
        case .fixed:
            if !last && c.length != p.avgSize { return "chunk \(i) length \(c.length) not avg" }
            if last && c.length > p.avgSize { return "last chunk \(c.length) above avg" }
        }
        if offset + c.length > bytes.count { return "chunk \(i) runs past the end" }
        let id = bytes[offset..<offset + c.length].withUnsafeBytes { ContentDigest.sha256($0) }
        if c.id != .zero && id != c.id { return "chunk \(i) id is not the SHA-256 of its bytes" }
        offset += c.length
    }
    return offset == bytes.count ? nil : "chunks cover \(offset) of \(bytes.count) bytes"
}
