import Testing
@testable import STOQCore

@Suite struct HexTests {
    @Test func roundTripsAndRefusesBadText() {
        let bytes: [UInt8] = [0x00, 0x01, 0x7f, 0x80, 0xab, 0xff]
        #expect(Hex.encode(bytes) == "00017f80abff")
        #expect(Hex.decode("00017F80ABff") == bytes)
        #expect(Hex.decode("") == [])
        #expect(Hex.decode("abc") == nil)  // odd length
        #expect(Hex.decode("zz") == nil)  // not hex
    }
}
