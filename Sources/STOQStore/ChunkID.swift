import Crypto
import Foundation

/// The name of a chunk: the SHA-256 digest of its bytes.
///
/// Kept as four words rather than an array so that sets of millions of ids (the mark
/// phase of garbage collection) hold no per-id heap allocation.
public struct ChunkID: Hashable, Sendable, Comparable, CustomStringConvertible {
    private var w0: UInt64, w1: UInt64, w2: UInt64, w3: UInt64

    /// The id of `bytes`: their SHA-256 digest.
    public init(digestOf bytes: some ContiguousBytes) {
        let digest = bytes.withUnsafeBytes { SHA256.hash(data: $0) }
        self.init(digest: digest)
    }

    /// The id whose digest is `digest`.
    public init(digest: SHA256.Digest) {
        var raw = [UInt8]()
        raw.reserveCapacity(32)
        digest.withUnsafeBytes { raw.append(contentsOf: $0) }
        self.init(raw32: raw)
    }

    /// The id spelled by 64 hexadecimal digits (either case); nil for anything else.
    public init?(hex: some StringProtocol) {
        let utf8 = Array(hex.utf8)
        guard utf8.count == 64 else { return nil }
        var raw = [UInt8](repeating: 0, count: 32)
        for i in 0..<32 {
            guard let hi = Self.nibble(utf8[2 * i]), let lo = Self.nibble(utf8[2 * i + 1]) else { return nil }
            raw[i] = hi << 4 | lo
        }
        self.init(raw32: raw)
    }

    /// The id made of exactly 32 raw digest bytes; nil for any other length.
    public init?(bytes: some Collection<UInt8>) {
        guard bytes.count == 32 else { return nil }
        self.init(raw32: Array(bytes))
    }

    private init(raw32 b: [UInt8]) {
        func word(_ at: Int) -> UInt64 {
            var w: UInt64 = 0
            for i in at..<(at + 8) { w = w << 8 | UInt64(b[i]) }
            return w
        }
        w0 = word(0); w1 = word(8); w2 = word(16); w3 = word(24)
    }

    /// The 32 digest bytes.
    public var bytes: [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(32)
        for w in [w0, w1, w2, w3] {
            for shift in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: w >> UInt64(shift))) }
        }
        return out
    }

    /// 64 lowercase hexadecimal digits: the chunk's file name and its spelling in `/chunks/<sha256>`.
    public var hex: String {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(64)
        for b in bytes {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 0xf)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    public var description: String { hex }

    public static func < (a: ChunkID, b: ChunkID) -> Bool {
        (a.w0, a.w1, a.w2, a.w3) < (b.w0, b.w1, b.w2, b.w3)
    }

    private static func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case 0x30...0x39: return c - 0x30
        case 0x61...0x66: return c - 0x61 + 10
        case 0x41...0x46: return c - 0x41 + 10
        default: return nil
        }
    }
}
