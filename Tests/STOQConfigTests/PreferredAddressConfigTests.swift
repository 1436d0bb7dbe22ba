import STOQCore
import Testing
@testable import STOQConfig

/// `network.preferred_address`: QUIC's preferred_address transport parameter.
@Suite struct PreferredAddressConfigTests {
    func errors(_ text: String) -> [String] {
        do {
            _ = try ConfigLoader.parse(text, source: "t.toml")
            return []
        } catch { return error.errors.map(\.description) }
    }

    @Test func noneByDefault() throws {
        #expect(NodeConfig.default.network.quic.preferredAddress == nil)
        #expect(try ConfigLoader.parse("[network]\npreferred_address = \"\"\n").network.quic.preferredAddress == nil)
    }

    @Test func readsAnAddressOnTheListenPort() throws {
        let c = try ConfigLoader.parse("[network]\nlisten_addr = \"[::]:4433\"\npreferred_address = \"[fd00::2]:4433\"\n")
        #expect(c.network.quic.preferredAddress == IPv6Endpoint(address: IPv6Address("fd00::2")!, port: 4433))
    }

    @Test func refusesBadValuesNamingTheKey() {
        let ipv6 = "\"[ipv6-address]:port\", e.g. \"[::]:4433\" (STOQ is IPv6 only)"
        #expect(
            errors("[network]\npreferred_address = \"192.0.2.1:4433\"\n").first?
                .hasPrefix("network.preferred_address = \"192.0.2.1:4433\": IPv4 not supported; expected \(ipv6) — ") == true)
        #expect(
            errors("[network]\npreferred_address = \"fd00::2\"\n").first?
                .hasPrefix("network.preferred_address = \"fd00::2\": bad value; expected \(ipv6) — ") == true)
        #expect(errors("[network]\npreferred_address = 4433\n").first?.hasPrefix("network.preferred_address = 4433: bad type") == true)
        let own =
            "one of this node's own IPv6 addresses and a port, e.g. \"[2001:db8::2]:4433\" (not [::] nor port 0: clients move to exactly this address), or \"\" for none"
        #expect(errors("[network]\npreferred_address = \"[::]:4433\"\n") == ["network.preferred_address = \"[::]:4433\": bad value; expected \(own)"])
        #expect(errors("[network]\npreferred_address = \"[fd00::2]:0\"\n") == ["network.preferred_address = \"[fd00::2]:0\": bad value; expected \(own)"])
    }

    /// The node receives on its listen_addr sockets only: the preferred address must be one they cover.
    @Test func refusesAnAddressTheNodeDoesNotReceiveOn() {
        #expect(
            errors("[network]\nlisten_addr = \"[::]:4433\"\npreferred_address = \"[fd00::2]:5000\"\n") == [
                "network.preferred_address = \"[fd00::2]:5000\": bad value; expected an address the node already receives on: network.listen_addr = \"[::]:4433\" covers only port 4433 of every address; use listen_addr = \"[::]:5000\" or preferred_address on port 4433"
            ])
        #expect(
            errors("[network]\nlisten_addr = \"[fd00::1]:4433\"\npreferred_address = \"[fd00::2]:4433\"\n") == [
                "network.preferred_address = \"[fd00::2]:4433\": bad value; expected an address the node already receives on: network.listen_addr = \"[fd00::1]:4433\" covers only itself; use listen_addr = \"[::]:4433\" or preferred_address on port 4433"
            ])
    }
}
