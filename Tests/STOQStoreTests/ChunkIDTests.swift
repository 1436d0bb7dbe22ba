import Crypto
import STOQStore
import XCTest

final class ChunkIDTests: XCTestCase {
    func testHexRoundTripAndDigest() {
        // SHA-256("abc"), FIPS 180-2 example.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        let id = ChunkID(digestOf: Array("abc".utf8))
        XCTAssertEqual(id.hex, abc)
        XCTAssertEqual(ChunkID(hex: abc), id)
        XCTAssertEqual(ChunkID(hex: abc.uppercased()), id)
        XCTAssertEqual(ChunkID(bytes: id.bytes), id)
        XCTAssertEqual(ChunkID(digest: SHA256.hash(data: Array("abc".utf8))), id)
    }

    func testRejectsBadHex() {
        XCTAssertNil(ChunkID(hex: ""))
        XCTAssertNil(ChunkID(hex: String(repeating: "a", count: 63)))
        XCTAssertNil(ChunkID(hex: String(repeating: "g", count: 64)))
        XCTAssertNil(ChunkID(bytes: [UInt8](repeating: 0, count: 31)))
    }
}
