import XCTest
@testable import STOQChunking

final class ContentDigestTests: XCTestCase {
    func testSHA256KnownAnswer() {
        // FIPS 180-2 example "abc".
        XCTAssertEqual(ContentDigest.sha256(Array("abc".utf8)).hex,
                       "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    }

    func testHexAndBytesRoundTrip() {
        let d = ContentDigest.sha256(Array("stoq".utf8))
        XCTAssertEqual(ContentDigest(hex: d.hex), d)
        XCTAssertEqual(ContentDigest(hex: d.hex.uppercased()), d)
        XCTAssertEqual(ContentDigest(d.bytes), d)
        XCTAssertEqual(d.bytes.count, 32)
        XCTAssertNil(ContentDigest(hex: "abc"))
        XCTAssertNil(ContentDigest(hex: String(repeating: "g", count: 64)))
        XCTAssertNil(ContentDigest([1, 2, 3]))
        XCTAssertEqual(ContentDigest.zero.hex, String(repeating: "0", count: 64))
    }

    func testOrderIsByteOrder() {
        var a = [UInt8](repeating: 0, count: 32), b = a
        a[31] = 1; b[0] = 1
        XCTAssertLessThan(ContentDigest(a)!, ContentDigest(b)!)
    }
}
