import Foundation
import Testing

@testable import stoq

/// `stoq mesh`'s tables and errors, with no node: the fixture is the "mesh" object the admin
/// API renders for STOQNodeTests' hand-built MeshStatus (MeshMetricsTests checks they agree).
@Suite struct MeshTablesTests {
    static let fixture = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("fixtures/mesh-status.json")

    static func view() throws -> MeshStatusView {
        try #require(try MeshStatusView.decode(status: Data(contentsOf: fixture)))
    }

    @Test func statusTable() throws {
        #expect(
            MeshTables.status(try Self.view()) == """
                node a1b2c3d4e5f607180a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a
                algorithm latency, max_hops 4; 5 nodes and 6 links known, 3 routes
                discovery dns: 4 members, 3 updates, 1 failures, 1 recoveries; refused bad_port 2
                discovery last error: timeout: no answer from [fd00::53]:53

                neighbour                 node              state       conn  srtt ms  rttvar ms  loss %  Mbit/s  load %  answer ms ago  probes ans/sent
                https://[fd00:1::2]:4433  9c4e7f10b2d3a5c6  up          yes      1.25       0.30     0.5   812.0      12            140         995/1000
                https://[fd00:1::3]:4433  e0f1a2b3c4d5e6f7  suppressed  no      20.00       5.00   100.0     0.0      50           4210          700/800
                https://[fd00:1::4]:4433  -                 unknown     no       0.00       0.00     0.0     0.0       0              -              0/3
                https://[fd00:1::3]:4433: suppressed for flapping, 31.3 s more (flap penalty 4568)

                adverts: 12 originated, 57 received, 41 accepted, 96 forwarded, 7 synchronized, 13 duplicate; refused bad_signature 1, stale 2
                relay: 30 served, 18 forwarded, 2 refused over max_hops (most hops seen 3); 1 failovers, 9 route computations, 1 peers refused, 4 connect failures, 1 flap suppressions

                """)
    }

    @Test func routesTable() throws {
        #expect(
            MeshTables.routes(try Self.view()) == """
                destination       hops  cost  next hop          path                                                                       backup
                9c4e7f10b2d3a5c6     1  1.25  9c4e7f10b2d3a5c6  a1b2c3d4e5f60718 → 9c4e7f10b2d3a5c6                                        -
                7d1e5a9b2c3f4a6b     2  4.10  9c4e7f10b2d3a5c6  a1b2c3d4e5f60718 → 9c4e7f10b2d3a5c6 → 7d1e5a9b2c3f4a6b                     a1b2c3d4e5f60718 → e0f1a2b3c4d5e6f7 → 7d1e00ff4422aa11 → 7d1e5a9b2c3f4a6b (cost 9.75)
                7d1e00ff4422aa11     3  6.50  9c4e7f10b2d3a5c6  a1b2c3d4e5f60718 → 9c4e7f10b2d3a5c6 → 7d1e5a9b2c3f4a6b → 7d1e00ff4422aa11  -

                """)
    }

    @Test func pathHopByHopWithBackup() throws {
        let m = try Self.view()
        #expect(
            try MeshTables.path(m, prefix: "7d1e5a") == """
                to 7d1e5a9b2c3f4a6b2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c (latency)
                primary: 2 hops, cost 4.10
                  0  a1b2c3d4e5f60718  this node
                  1  9c4e7f10b2d3a5c6  via https://[fd00:1::2]:4433, up, srtt 1.25 ms, loss 0.5 %
                  2  7d1e5a9b2c3f4a6b  destination
                backup: 3 hops, cost 9.75
                  0  a1b2c3d4e5f60718  this node
                  1  e0f1a2b3c4d5e6f7  via https://[fd00:1::3]:4433, suppressed, srtt 20.00 ms, loss 100.0 %
                  2  7d1e00ff4422aa11
                  3  7d1e5a9b2c3f4a6b  destination

                """)
        // Prefixes are case-blind; no backup is said plainly.
        let d = try MeshTables.path(m, prefix: "7D1E00")
        #expect(d.hasPrefix("to 7d1e00ff4422aa11"))
        #expect(d.hasSuffix("  3  7d1e00ff4422aa11  destination\nbackup: none (no link-disjoint path in the graph)\n"))
    }

    @Test func pathPrefixErrorsNameTheProblem() throws {
        let m = try Self.view()
        func error(_ prefix: String) -> MeshViewError? {
            do { _ = try MeshTables.path(m, prefix: prefix) } catch let e as MeshViewError { return e } catch { return nil }
            return nil
        }
        #expect(
            error("7d1e") == MeshViewError(.ambiguous, "node \"7d1e\" is ambiguous: 7d1e5a9b2c3f4a6b, 7d1e00ff4422aa11; give more digits"))
        #expect(error("7d1") == MeshViewError(.badPrefix, "node \"7d1\": give at least 4 hex digits of its id"))
        #expect(error("7d1x") == MeshViewError(.badPrefix, "node \"7d1x\": give at least 4 hex digits of its id"))
        let known = "known destinations: 9c4e7f10b2d3a5c6, 7d1e5a9b2c3f4a6b, 7d1e00ff4422aa11"
        #expect(error("ffff") == MeshViewError(.noRoute, "no route to ffff: \(known)"))
        #expect(error("e0f1") == MeshViewError(.noRoute, "no route to e0f1: \(known)"))
        #expect(error("a1b2c3") == MeshViewError(.noRoute, "a1b2c3 is this node: \(known)"))
    }

    @Test func adminURLMustBeIPv6HostAndPort() throws {
        #expect(try MeshTables.adminBase("http://[::1]:9464") == "http://[::1]:9464")
        #expect(try MeshTables.adminBase("http://[fd00:1::2]:9464/status") == "http://[fd00:1::2]:9464")
        #expect(try MeshTables.adminBase("http://[::1]:9464/metrics") == "http://[::1]:9464")
        #expect(try MeshTables.adminBase("https://[fd00:1::2]:9464/") == "https://[fd00:1::2]:9464")
        for bad in [
            "http://127.0.0.1:9464", "http://[::1]", "http://[::1]:0", "http://[::1]:99999", "http://[zz::1]:80",
            "https://127.0.0.1:9464", "ftp://[::1]:9464", "[::1]:9464", "http://localhost:9464",
        ] {
            #expect(throws: MeshViewError(.badAdminURL, "<admin> \"\(bad)\": expected http://[ipv6]:port or https://[ipv6]:port (IPv6 only)")) {
                try MeshTables.adminBase(bad)
            }
        }
    }

    @Test func aStatusWithoutMeshIsNilAndABrokenMeshThrows() throws {
        #expect(try MeshStatusView.decode(status: Data(#"{"workers":[],"store":{}}"#.utf8)) == nil)
        #expect(throws: DecodingError.self) { try MeshStatusView.decode(status: Data(#"{"mesh":{"node":"ab"}}"#.utf8)) }
    }

    @Test func emptyMeshSaysSo() throws {
        var m = try Self.view()
        (m.routes, m.neighbours) = ([], [])
        #expect(MeshTables.routes(m).hasSuffix("(no routes: this node knows no other node yet)\n"))
        #expect(MeshTables.status(m).contains("(no neighbours)\n"))
        #expect(throws: MeshViewError(.noRoute, "no route to abcd: known destinations: none")) {
            try MeshTables.path(m, prefix: "abcd")
        }
    }
}
