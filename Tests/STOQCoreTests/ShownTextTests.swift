import STOQCore
import Testing

@Suite struct ShownTextTests {
    /// Up to 64 characters a text is shown whole; past that its first 64 and its byte length,
    /// counted in characters, so a multi-byte one is not cut inside a character.
    @Test func longTextIsCutWithItsLength() {
        #expect(ShownText.cut("/metrics") == "/metrics")
        #expect(ShownText.cut(String(repeating: "a", count: 64)) == String(repeating: "a", count: 64))
        #expect(ShownText.cut(String(repeating: "a", count: 65)) == String(repeating: "a", count: 64) + "… (65 bytes)")
        #expect(ShownText.cut(String(repeating: "é", count: 100)) == String(repeating: "é", count: 64) + "… (200 bytes)")
    }
}
