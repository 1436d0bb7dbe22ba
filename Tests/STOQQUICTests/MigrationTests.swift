import Crypto
import STOQCore
import STOQQUIC
import STOQTestSupport
import Testing

/// The preferred-address plumbing, in memory. A client that moves (to the preferred address,
/// or to a new local address) is exercised end to end in Tests/interop/test_preferred_address.py:
/// in EndpointPair such a transfer stalls (not yet understood; see the branch's report).
@Suite(.serialized) struct MigrationTests {
    let identity: TestIdentity
    init() throws { identity = try TestIdentity() }

    let preferred = IPv6Endpoint(address: IPv6Address("fd00::9")!, port: 4433)

    func pair(preferred: IPv6Endpoint?) throws -> (EndpointPair, MemoryServer, RecordingClient, [UInt8]) {
        var settings = QUICSettings()
        settings.preferredAddress = preferred
        let pair = try EndpointPair(identity: identity, serverSettings: settings)
        let object = randomBytes(2 << 20, seed: 9)
        let server = MemoryServer(object: object)
        let client = RecordingClient()
        pair.server.application = server
        pair.client.application = client
        return (pair, server, client, object)
    }

    @Test func withoutOneTheClientStays() throws {
        let (pair, _, client, _) = try pair(preferred: nil)
        let conn = try pair.connect()
        #expect(pair.run { conn.isEstablished })
        _ = try conn.request(method: "GET", authority: "x", path: "/objects/x")
        #expect(pair.run(for: 600_000_000_000) { client.closedCode != nil })
        #expect(conn.preferredAddress == .none)
        #expect(conn.currentRemote == pair.serverAddress)
        #expect(pair.server.counters.datagramsToPreferredAddress == 0)
    }
}
