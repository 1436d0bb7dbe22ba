import Foundation
import STOQMesh
import Testing

@testable import STOQAdmin

/// The mesh's part of the admin API, rendered from a hand-built `MeshStatus`: exact Prometheus
/// lines, escaping, promtool's verdict, and `/status`'s "mesh" object (which round-trips, and
/// which equals Tests/fixtures/mesh-status.json, the document `stoq mesh` is tested against).
@Suite struct MeshMetricsTests {
    static let fixture = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("fixtures/mesh-status.json")

    static let a = "a1b2c3d4e5f60718" + String(repeating: "0a", count: 24)
    static let b = "9c4e7f10b2d3a5c6" + String(repeating: "1b", count: 24)
    static let c = "7d1e5a9b2c3f4a6b" + String(repeating: "2c", count: 24)
    static let d = "7d1e00ff4422aa11" + String(repeating: "3d", count: 24)
    static let e = "e0f1a2b3c4d5e6f7" + String(repeating: "4e", count: 24)

    /// Three neighbours (up, down, not yet named), three routes (one with a backup).
    static var status: MeshStatus {
        var counters = MeshStatus.Counters()
        counters.advertsOriginated = 12
        counters.advertsReceived = 57
        counters.advertsAccepted = 41
        counters.advertsForwarded = 96
        counters.advertsSynchronized = 7
        counters.advertsDuplicate = 13
        counters.advertsRefused = ["stale": 2, "bad_signature": 1]
        counters.peersRefused = 1
        counters.connectFailures = 4
        counters.probesRefused = 2
        counters.routeComputations = 9
        counters.relayServed = 30
        counters.relayForwarded = 18
        counters.maxHopsRefused = 2
        counters.maxHopsSeen = 3
        counters.failovers = 1
        counters.flapSuppressions = 1
        var discovery = DiscoveryCounters()
        discovery.updates = 3
        discovery.members = 4
        discovery.failures = 1
        discovery.recoveries = 1
        discovery.refused = ["bad_port": 2]
        discovery.lastError = "timeout: no answer from [fd00::53]:53"
        return MeshStatus(
            node: a, algorithm: "latency", maxHops: 4, discovery: "dns", discoveryCounters: discovery,
            neighbours: [
                .init(
                    url: "https://[fd00:1::2]:4433", node: b, state: "up", connected: true, srttMicros: 1_250,
                    rttvarMicros: 300, loss: 0.005, deliveryBytesPerSecond: 101_500_000, peerLoad: 0.12,
                    lastAnswerMillisAgo: 140, probesSent: 1_000, probesAnswered: 995, downs: 1, ups: 1, flapPenalty: 412),
                .init(
                    url: "https://[fd00:1::3]:4433", node: e, state: "down", connected: false, srttMicros: 20_000,
                    rttvarMicros: 5_000, loss: 1, deliveryBytesPerSecond: 0, peerLoad: 0.5,
                    lastAnswerMillisAgo: 4_210, probesSent: 800, probesAnswered: 700, downs: 5, ups: 4, suppressedMillis: 31_300,
                    flapPenalty: 4_568),
                .init(
                    url: "https://[fd00:1::4]:4433", node: "", state: "unknown", connected: false, srttMicros: 0,
                    rttvarMicros: 0, loss: 0, deliveryBytesPerSecond: 0, peerLoad: 0, lastAnswerMillisAgo: nil,
                    probesSent: 3, probesAnswered: 0, downs: 0, ups: 0),
            ],
            routes: [
                .init(destination: b, path: [a, b], cost: 1.25, backupPath: nil, backupCost: nil),
                .init(destination: c, path: [a, b, c], cost: 4.1, backupPath: [a, e, d, c], backupCost: 9.75),
                .init(destination: d, path: [a, b, c, d], cost: 6.5, backupPath: nil, backupCost: nil),
            ],
            nodesKnown: 5, linksKnown: 6, counters: counters)
    }

    static func render(_ m: MeshStatus?) -> NodeMetrics {
        NodeMetrics(workers: [], store: nil, certificate: nil, edge: nil, mesh: m)
    }

    @Test func prometheusLinesForNeighboursCountersAndDiscovery() {
        let text = Self.render(Self.status).prometheus()
        let lines = Set(text.split(separator: "\n").map(String.init))
        let up = #"{neighbour="https://[fd00:1::2]:4433",node="9c4e7f10b2d3a5c6"}"#
        let down = #"{neighbour="https://[fd00:1::3]:4433",node="e0f1a2b3c4d5e6f7"}"#
        let unnamed = #"{neighbour="https://[fd00:1::4]:4433",node=""}"#
        for line in [
            "# TYPE stoq_mesh_neighbour_up gauge",
            "stoq_mesh_neighbour_up\(up) 1", "stoq_mesh_neighbour_up\(down) 0", "stoq_mesh_neighbour_up\(unnamed) 0",
            "stoq_mesh_neighbour_srtt_seconds\(up) 0.00125", "stoq_mesh_neighbour_rttvar_seconds\(up) 0.0003",
            "stoq_mesh_neighbour_loss_ratio\(up) 0.005", "stoq_mesh_neighbour_loss_ratio\(down) 1",
            "stoq_mesh_neighbour_delivery_bytes_per_second\(up) 101500000",
            "stoq_mesh_neighbour_peer_load_ratio\(up) 0.12",
            "stoq_mesh_neighbour_last_answer_age_seconds\(down) 4.21",
            "# TYPE stoq_mesh_neighbour_probes_sent_total counter",
            "stoq_mesh_neighbour_probes_sent_total\(up) 1000", "stoq_mesh_neighbour_probes_answered_total\(up) 995",
            "stoq_mesh_neighbour_downs_total\(down) 5", "stoq_mesh_neighbour_ups_total\(down) 4",
            "# TYPE stoq_mesh_neighbour_suppressed gauge", "stoq_mesh_neighbour_suppressed\(down) 1", "stoq_mesh_neighbour_suppressed\(up) 0",
            "stoq_mesh_neighbour_flap_penalty\(down) 4568", "stoq_mesh_neighbour_flap_penalty\(up) 412",
            "# TYPE stoq_mesh_flap_suppressions_total counter", "stoq_mesh_flap_suppressions_total 1",
            "stoq_mesh_nodes_known 5", "stoq_mesh_links_known 6", "stoq_mesh_routes 3", "stoq_mesh_routes_with_backup 1",
            "stoq_mesh_max_hops 4",
            #"stoq_mesh_info{node="\#(Self.a)",algorithm="latency",discovery="dns"} 1"#,
            "# TYPE stoq_mesh_adverts_refused_total counter",
            #"stoq_mesh_adverts_refused_total{reason="bad_signature"} 1"#,
            #"stoq_mesh_adverts_refused_total{reason="stale"} 2"#,
            "stoq_mesh_adverts_originated_total 12", "stoq_mesh_adverts_duplicate_total 13",
            "stoq_mesh_max_hops_refused_total 2", "# TYPE stoq_mesh_max_hops_seen gauge", "stoq_mesh_max_hops_seen 3",
            "stoq_mesh_failovers_total 1", "stoq_mesh_route_computations_total 9",
            #"stoq_mesh_discovery_updates_total{backend="dns"} 3"#,
            #"stoq_mesh_discovery_failures_total{backend="dns"} 1"#,
            #"stoq_mesh_discovery_recoveries_total{backend="dns"} 1"#,
            #"stoq_mesh_discovery_registrations_total{backend="dns"} 0"#,
            "# TYPE stoq_mesh_discovery_members gauge", #"stoq_mesh_discovery_members{backend="dns"} 4"#,
            #"stoq_mesh_discovery_refused_total{backend="dns",reason="bad_port"} 2"#,
        ] {
            #expect(lines.contains(line), "missing: \(line)")
        }
        // Not answered yet: no age sample rather than a made-up one.
        #expect(!text.contains("stoq_mesh_neighbour_last_answer_age_seconds\(unnamed)"))
        // No mesh, no mesh families.
        #expect(!Self.render(nil).prometheus().contains("stoq_mesh_"))
    }

    @Test func labelValuesAreEscaped() {
        var m = Self.status
        m.neighbours[0].url = "https://[fd00::2]:4433/\"odd\"\\path\nx"
        m.counters.advertsRefused = ["we\"ird": 1]
        let text = Self.render(m).prometheus()
        #expect(text.contains(#"stoq_mesh_neighbour_up{neighbour="https://[fd00::2]:4433/\"odd\"\\path\nx",node="9c4e7f10b2d3a5c6"} 1"#))
        #expect(text.contains(#"stoq_mesh_adverts_refused_total{reason="we\"ird"} 1"#))
        #expect(MeshMetrics.number(.nan) == "NaN" && MeshMetrics.number(-.infinity) == "-Inf")
        #expect(MeshMetrics.number(2) == "2" && MeshMetrics.number(0.5) == "0.5")
    }

    /// promtool (Debian `prometheus`, scripts/install-deps) accepts the whole exposition, mesh
    /// families included: names, types, HELP, label syntax, counters ending in _total.
    @Test func promtoolAcceptsTheExposition() throws {
        var m = Self.status
        m.neighbours[0].url = "https://[fd00::2]:4433/\"odd\"\\path\nx"
        let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"].first { FileManager.default.isExecutableFile(atPath: $0) }
        let path = try #require(promtool, "promtool not installed: run scripts/install-deps")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = ["check", "metrics"]
        let input = Pipe(), output = Pipe()
        (p.standardInput, p.standardOutput, p.standardError) = (input, output, output)
        try p.run()
        input.fileHandleForWriting.write(Data(Self.render(m).prometheus().utf8))
        try input.fileHandleForWriting.close()
        let said = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0, "promtool: \(said)")
        #expect(said.isEmpty, "promtool lint: \(said)")
    }

    /// `/status`'s "mesh" object holds every field, and reads back into the same `MeshStatus`.
    @Test func statusJSONRoundTrips() throws {
        let text = Self.render(Self.status).json()
        let doc = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
        let mesh = try #require(doc["mesh"] as? [String: Any])
        #expect(try Self.decode(mesh) == Self.status)
        let routes = try #require(mesh["routes"] as? [[String: Any]])
        #expect(routes.map { $0["hops"] as? Int } == [1, 2, 3])
        #expect(routes[0]["backup_path"] is NSNull)
        #expect(!Self.render(nil).json().contains("\"mesh\""))
    }

    /// The committed fixture `stoq mesh` is tested against is what this code renders
    /// (regenerate with STOQ_UPDATE_FIXTURES=1).
    @Test func fixtureIsWhatTheAdminAPIRenders() throws {
        let text = Self.render(Self.status).json()
        let mesh = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])["mesh"]
        if ProcessInfo.processInfo.environment["STOQ_UPDATE_FIXTURES"] == "1" {
            let pretty = try JSONSerialization.data(withJSONObject: ["mesh": mesh!], options: [.prettyPrinted, .sortedKeys])
            try (String(decoding: pretty, as: UTF8.self) + "\n").write(to: Self.fixture, atomically: true, encoding: .utf8)
        }
        let fixture = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: Self.fixture)) as? [String: Any])
        #expect(NSDictionary(dictionary: fixture["mesh"] as? [String: Any] ?? [:]).isEqual(to: mesh as? [String: Any] ?? ["": 0]))
    }

    /// Reads the "mesh" object back, field by field: the test's own decoder, so a key renamed
    /// on one side only fails here.
    static func decode(_ j: [String: Any]) throws -> MeshStatus {
        func u(_ d: [String: Any], _ k: String) throws -> UInt64 {
            try #require((d[k] as? NSNumber)?.uint64Value, "\(k)")
        }
        func f(_ d: [String: Any], _ k: String) throws -> Double { try #require((d[k] as? NSNumber)?.doubleValue, "\(k)") }
        func s(_ d: [String: Any], _ k: String) throws -> String { try #require(d[k] as? String, "\(k)") }
        func counts(_ d: [String: Any], _ k: String) throws -> [String: UInt64] {
            try #require(d[k] as? [String: Any], "\(k)").mapValues { ($0 as? NSNumber)?.uint64Value ?? .max }
        }
        let dj = try #require(j["discovery_counters"] as? [String: Any])
        var disc = DiscoveryCounters()
        (disc.updates, disc.failures, disc.recoveries) = (try u(dj, "updates"), try u(dj, "failures"), try u(dj, "recoveries"))
        (disc.registrations, disc.members) = (try u(dj, "registrations"), Int(try u(dj, "members")))
        (disc.refused, disc.lastError) = (try counts(dj, "refused"), dj["last_error"] as? String)
        let cj = try #require(j["counters"] as? [String: Any])
        var c = MeshStatus.Counters()
        c.advertsOriginated = try u(cj, "adverts_originated")
        c.advertsReceived = try u(cj, "adverts_received")
        c.advertsAccepted = try u(cj, "adverts_accepted")
        c.advertsForwarded = try u(cj, "adverts_forwarded")
        c.advertsSynchronized = try u(cj, "adverts_synchronized")
        c.advertsDuplicate = try u(cj, "adverts_duplicate")
        c.advertsRefused = try counts(cj, "adverts_refused")
        c.peersRefused = try u(cj, "peers_refused")
        c.connectFailures = try u(cj, "connect_failures")
        c.probesRefused = try u(cj, "probes_refused")
        c.routeComputations = try u(cj, "route_computations")
        c.relayServed = try u(cj, "relay_served")
        c.relayForwarded = try u(cj, "relay_forwarded")
        c.maxHopsRefused = try u(cj, "max_hops_refused")
        c.maxHopsSeen = try u(cj, "max_hops_seen")
        c.failovers = try u(cj, "failovers")
        c.flapSuppressions = try u(cj, "flap_suppressions")
        let neighbours = try #require(j["neighbours"] as? [[String: Any]]).map { n in
            MeshStatus.Neighbour(
                url: try s(n, "url"), node: try s(n, "node"), state: try s(n, "state"),
                connected: try #require(n["connected"] as? Bool), srttMicros: try u(n, "srtt_us"),
                rttvarMicros: try u(n, "rttvar_us"), loss: try f(n, "loss"),
                deliveryBytesPerSecond: try f(n, "delivery_bytes_per_second"), peerLoad: try f(n, "peer_load"),
                lastAnswerMillisAgo: (n["last_answer_ms_ago"] as? NSNumber)?.uint64Value, probesSent: try u(n, "probes_sent"),
                probesAnswered: try u(n, "probes_answered"), downs: try u(n, "downs"), ups: try u(n, "ups"),
                suppressedMillis: (n["suppressed_ms"] as? NSNumber)?.uint64Value, flapPenalty: try u(n, "flap_penalty"))
        }
        let routes = try #require(j["routes"] as? [[String: Any]]).map { r in
            MeshStatus.Route(
                destination: try s(r, "destination"), path: try #require(r["path"] as? [String]), cost: try f(r, "cost"),
                backupPath: r["backup_path"] as? [String], backupCost: (r["backup_cost"] as? NSNumber)?.doubleValue)
        }
        return MeshStatus(
            node: try s(j, "node"), algorithm: try s(j, "algorithm"), maxHops: Int(try u(j, "max_hops")),
            discovery: try s(j, "discovery"), discoveryCounters: disc, neighbours: neighbours, routes: routes,
            nodesKnown: Int(try u(j, "nodes_known")), linksKnown: Int(try u(j, "links_known")), counters: c)
    }
}
