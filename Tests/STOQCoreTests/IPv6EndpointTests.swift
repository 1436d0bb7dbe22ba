import Testing
@testable import STOQCore

@Suite struct IPv6EndpointTests {
    @Test func parsesBracketedEndpoint() throws {
        let ep = try IPv6Endpoint.parse("[2001:db8::1]:4433").get()
        #expect(ep.port == 4433)
        #expect(ep.address.description == "2001:db8::1")
        #expect(ep.description == "[2001:db8::1]:4433")
    }

    @Test func refusesIPv4() {
        guard case .failure(let e) = IPv6Endpoint.parse("127.0.0.1:4433") else { Issue.record("accepted IPv4"); return }
        #expect(e.code == .ipv4Refused)
        #expect(e.reason.contains("IPv6 only"))
    }

    @Test func refusesIPv4Mapped() {
        guard case .failure(let e) = IPv6Endpoint.parse("[::ffff:10.0.0.1]:4433") else { Issue.record("accepted mapped"); return }
        #expect(e.code == .ipv4Refused)
        #expect(e.reason.contains("IPv4-mapped"))
        #expect(IPv6Address("::ffff:10.0.0.1") == nil)
    }

    @Test func refusesMissingPort() {
        guard case .failure(let e) = IPv6Endpoint.parse("[::1]") else { Issue.record("accepted"); return }
        #expect(e.code == .invalidPort)
        #expect(e.reason.contains("port"))
    }

    @Test func roundTripsSockaddr() throws {
        let ep = try IPv6Endpoint.parse("[fe80::1%1]:80").get()
        #expect(IPv6Endpoint(ep.sockaddr) == ep)
    }

    /// A /64 is one client: the masked address and the table key name the same prefix.
    @Test func slash64AndPrefix64NameOnePrefix() throws {
        let a = try #require(IPv6Address("2001:db8:1:2:aaaa:bbbb:cccc:dddd"))
        #expect(a.slash64 == IPv6Address("2001:db8:1:2::"))
        #expect(a.prefix64 == 0x2001_0db8_0001_0002)
        #expect(a.slash64.prefix64 == a.prefix64)
        #expect(IPv6Address("2001:db8:1:3::1")!.prefix64 != a.prefix64)
    }
}
