import Foundation
import Testing
@testable import STOQChunking

@Suite struct ContentDigestTests {
    @Test func sha256KnownAnswer() {
        // FIPS 180-2 example "abc".
        #expect(ContentDigest.sha256(Array("abc".utf8)).hex == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    }

    @Test func hexAndBytesRoundTrip() {
        let d = ContentDigest.sha256(Array("stoq".utf8))
        #expect(ContentDigest(hex: d.hex) == d)
        #expect(ContentDigest(hex: d.hex.uppercased()) == d)
        #expect(ContentDigest(d.bytes) == d)
        #expect(d.bytes.count == 32)
        #expect(ContentDigest(hex: "abc") == nil)
        #expect(ContentDigest(hex: String(repeating: "g", count: 64)) == nil)
        #expect(ContentDigest([1, 2, 3]) == nil)
        #expect(ContentDigest.zero.hex == String(repeating: "0", count: 64))
    }

    @Test func orderIsByteOrder() {
        var a = [UInt8](repeating: 0, count: 32), b = a
        a[31] = 1; b[0] = 1
        #expect(ContentDigest(a)! < ContentDigest(b)!)
    }
}
