import STOQCore
import Testing

@testable import STOQTransfer

/// How a client reads a URL: IPv6 only, and a path HTTP can carry as it is.
struct STOQURLTests {
    func refusal(_ text: String) -> String? {
        do {
            _ = try STOQURL(text)
            return nil
        } catch { return error.message }
    }

    @Test func readsAnIPv6LiteralAndItsPath() throws {
        let u = try STOQURL("https://[::1]:4433/objects/a%20b.bin")
        #expect(u.endpoint == IPv6Endpoint(address: .loopback, port: 4433))
        #expect(u.path == "/objects/a%20b.bin")
        #expect(try STOQURL("https://[::1]:4433").path == "/")
    }

    /// A space went out as it was and the server closed the connection for the malformed
    /// request ("connection closed before a response").
    @Test func refusesAPathHTTPCannotCarryNamingTheByte() {
        #expect(
            refusal("https://[::1]:4433/objects/my file.bin")
                == "https://[::1]:4433/objects/my file.bin: its path has a space at byte 11, which HTTP does not carry: percent-encode it (%20)")
        #expect(refusal("https://[::1]:4433/a\tb")?.contains("a control character at byte 2") == true)
        #expect(
            refusal("https://[::1]:4433/café")?.hasSuffix("a non-ASCII character at byte 4, which HTTP does not carry: percent-encode it (%C3 for this byte)")
                == true)
        #expect(refusal("https://192.0.2.1:4433/x") == "https://192.0.2.1:4433/x: IPv4 is not supported; STOQ is IPv6 only")
    }
}
