import Crypto
import STOQStore
import Foundation
import Testing

@Suite struct ChunkIDTests {
    @Test func hexRoundTripAndDigest() {
        // SHA-256("abc"), FIPS 180-2 example.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        let id = ChunkID(digestOf: Array("abc".utf8))
        #expect(id.hex == abc)
        #expect(ChunkID(hex: abc) == id)
        #expect(ChunkID(hex: abc.uppercased()) == id)
        #expect(ChunkID(bytes: id.bytes) == id)
        #expect(ChunkID(digest: SHA256.hash(data: Array("abc".utf8))) == id)
    }

    @Test func rejectsBadHex() {
        #expect(ChunkID(hex: "") == nil)
        #expect(ChunkID(hex: String(repeating: "a", count: 63)) == nil)
        #expect(ChunkID(hex: String(repeating: "g", count: 64)) == nil)
        #expect(ChunkID(bytes: [UInt8](repeating: 0, count: 31)) == nil)
    }
}
