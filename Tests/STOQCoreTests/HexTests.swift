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
        #expect(Hex.decode("０１") == nil)  // fullwidth: Character.isHexDigit says yes
        #expect(Hex.isDigits("0aF9b") && Hex.isDigits(""))
        #expect(!Hex.isDigits("0a０") && !Hex.isDigits("0x1"))
    }
}
