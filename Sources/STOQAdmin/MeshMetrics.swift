import Foundation
import STOQMesh

/// The mesh's part of `/metrics` and `/status`, from the `MeshStatus` the mesh service last
/// published. Every name and key is documented in docs/mesh.md ("Watching the mesh").
package enum MeshMetrics {
    /// The first 16 hex digits of a node id: enough to tell nodes apart in labels and tables.
    package static func short(_ node: String) -> String { String(node.prefix(16)) }

    /// The flap penalty gauge's help, from the damping's own constants.
    static let flapPenaltyHelp: String = {
        let d = FlapDamping()
        return "The link's flap penalty: \(Int(d.penaltyPerDown)) a down, halving every \(d.halfLife / 1_000_000_000) s; "
            + "suppressed above \(Int(d.suppressAbove))."
    }()

    /// The Prometheus families (text format 0.0.4), appended after the node's own.
    package static func prometheus(_ m: MeshStatus) -> String {
        var out = ""
        func family(_ name: String, _ type: String, _ help: String, _ samples: [(String, String)]) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
            for (labels, v) in samples { out += "\(name)\(labels) \(v)\n" }
        }
        func one(_ name: String, _ type: String, _ help: String, _ value: UInt64) {
            family(name, type, help, [("", "\(value)")])
        }
        let neighbours = m.neighbours.map { n in
            (n, "{neighbour=\"\(label(n.url))\",node=\"\(label(short(n.node)))\"}")
        }
        func perNeighbour(_ name: String, _ type: String, _ help: String, _ f: (MeshStatus.Neighbour) -> String) {
            family(name, type, help, neighbours.map { ($0.1, f($0.0)) })
        }
        perNeighbour("stoq_mesh_neighbour_up", "gauge", "1 while the neighbour answers probes (state up), else 0.") {
            $0.state == "up" ? "1" : "0"
        }
        perNeighbour("stoq_mesh_neighbour_connected", "gauge", "1 while the QUIC connection to the neighbour is established.") {
            $0.connected ? "1" : "0"
        }
        perNeighbour("stoq_mesh_neighbour_srtt_seconds", "gauge", "Smoothed round-trip time to the neighbour.") {
            number(Double($0.srttMicros) / 1e6)
        }
        perNeighbour("stoq_mesh_neighbour_rttvar_seconds", "gauge", "Variation of the round-trip time to the neighbour.") {
            number(Double($0.rttvarMicros) / 1e6)
        }
        perNeighbour("stoq_mesh_neighbour_loss_ratio", "gauge", "Share of recent probes to the neighbour that got no answer (0-1).") {
            number($0.loss)
        }
        perNeighbour(
            "stoq_mesh_neighbour_delivery_bytes_per_second", "gauge", "Rate at which chunks fetched through the neighbour arrived."
        ) { number($0.deliveryBytesPerSecond) }
        perNeighbour("stoq_mesh_neighbour_peer_load_ratio", "gauge", "The neighbour's load as it last reported it (0-1).") {
            number($0.peerLoad)
        }
        family(
            "stoq_mesh_neighbour_last_answer_age_seconds", "gauge", "Time since the neighbour last answered a probe (absent before the first answer).",
            neighbours.compactMap { n, l in n.lastAnswerMillisAgo.map { (l, number(Double($0) / 1e3)) } })
        perNeighbour("stoq_mesh_neighbour_probes_sent_total", "counter", "Probes sent to the neighbour.") { "\($0.probesSent)" }
        perNeighbour("stoq_mesh_neighbour_probes_answered_total", "counter", "Probes the neighbour answered.") { "\($0.probesAnswered)" }
        perNeighbour("stoq_mesh_neighbour_downs_total", "counter", "Times the link to the neighbour was declared down.") { "\($0.downs)" }
        perNeighbour("stoq_mesh_neighbour_ups_total", "counter", "Times the link to the neighbour came back up.") { "\($0.ups)" }
        perNeighbour(
            "stoq_mesh_neighbour_suppressed", "gauge", "1 while the link to the neighbour is held down for flapping (mesh.flap_damping), else 0."
        ) { $0.suppressedMillis == nil ? "0" : "1" }
        perNeighbour("stoq_mesh_neighbour_flap_penalty", "gauge", Self.flapPenaltyHelp) {
            "\($0.flapPenalty)"
        }

        family(
            "stoq_mesh_info", "gauge", "This node's mesh identity and settings (routing.algorithm, discovery backend).",
            [("{node=\"\(label(m.node))\",algorithm=\"\(label(m.algorithm))\",discovery=\"\(label(m.discovery))\"}", "1")])
        one("stoq_mesh_max_hops", "gauge", "routing.max_hops in force.", UInt64(max(m.maxHops, 0)))
        one("stoq_mesh_nodes_known", "gauge", "Nodes in the link-state database (this one included).", UInt64(max(m.nodesKnown, 0)))
        one("stoq_mesh_links_known", "gauge", "Links in the link-state database.", UInt64(max(m.linksKnown, 0)))
        one("stoq_mesh_routes", "gauge", "Destinations in the current route table.", UInt64(m.routes.count))
        one(
            "stoq_mesh_routes_with_backup", "gauge", "Routes that have a link-disjoint backup path.",
            UInt64(m.routes.filter { $0.backupPath != nil }.count))

        let c = m.counters
        one("stoq_mesh_adverts_originated_total", "counter", "Link-state adverts this node signed and sent.", c.advertsOriginated)
        one("stoq_mesh_adverts_received_total", "counter", "Link-state adverts received from neighbours.", c.advertsReceived)
        one("stoq_mesh_adverts_accepted_total", "counter", "Received adverts accepted into the link-state database.", c.advertsAccepted)
        one("stoq_mesh_adverts_forwarded_total", "counter", "Adverts sent on to neighbours (one per neighbour).", c.advertsForwarded)
        one(
            "stoq_mesh_adverts_synchronized_total", "counter", "Held adverts sent to a neighbour whose link came up.",
            c.advertsSynchronized)
        one("stoq_mesh_adverts_duplicate_total", "counter", "Received adverts already held (the normal end of flooding).", c.advertsDuplicate)
        one(
            "stoq_mesh_adverts_unverified_total", "counter",
            "Received adverts counted as duplicate or refused before their signature was checked: a copy of the advert held, a sequence not above the one held, a copy of one refused before.",
            c.advertsUnverified)
        family(
            "stoq_mesh_adverts_refused_total", "counter", "Received adverts refused, by reason (docs/mesh.md lists the codes).",
            c.advertsRefused.sorted { $0.key < $1.key }.map { ("{reason=\"\(label($0.key))\"}", "\($0.value)") })
        one(
            "stoq_mesh_peers_refused_total", "counter",
            "Connections to neighbours refused in their handshake: a certificate either side would not take, a TLS alert, or the neighbour's CONNECTION_REFUSED (its max_connections, its drain).",
            c.peersRefused)
        one("stoq_mesh_connect_failures_total", "counter", "Connection attempts to neighbours that failed.", c.connectFailures)
        one(
            "stoq_mesh_probes_refused_total", "counter",
            "Probe answers not taken: another status than 200 (no mesh there, or refused), an answer that is not one (malformed, empty, or longer than 512 bytes), a node id that is not the certificate's key's, or a certificate that is not a node's.",
            c.probesRefused)
        one("stoq_mesh_route_computations_total", "counter", "Route tables computed after link-state changes.", c.routeComputations)
        one("stoq_mesh_relay_served_total", "counter", "Relay requests this node served from its own store.", c.relayServed)
        one("stoq_mesh_relay_forwarded_total", "counter", "Relay requests this node passed on to the next hop.", c.relayForwarded)
        one("stoq_mesh_max_hops_refused_total", "counter", "Relay requests refused because they would exceed routing.max_hops.", c.maxHopsRefused)
        one("stoq_mesh_max_hops_seen", "gauge", "Most hops any relayed request reaching this node had taken.", c.maxHopsSeen)
        one("stoq_mesh_failovers_total", "counter", "Fetches moved to another route or holder after the one in use failed.", c.failovers)
        one("stoq_mesh_flap_suppressions_total", "counter", "Times a neighbour's link was held down for flapping (mesh.flap_damping).", c.flapSuppressions)

        let d = m.discoveryCounters
        let backend = "{backend=\"\(label(m.discovery))\"}"
        family("stoq_mesh_discovery_updates_total", "counter", "Member sets discovery reported (the first and every change).", [(backend, "\(d.updates)")])
        family(
            "stoq_mesh_discovery_failures_total", "counter", "Failed discovery attempts (resolution, etcd request, lost watch or lease).",
            [(backend, "\(d.failures)")])
        family("stoq_mesh_discovery_recoveries_total", "counter", "Times discovery worked again after failing.", [(backend, "\(d.recoveries)")])
        family("stoq_mesh_discovery_registrations_total", "counter", "Times this node registered itself (etcd).", [(backend, "\(d.registrations)")])
        family("stoq_mesh_discovery_members", "gauge", "Members in the last set discovery reported.", [(backend, "\(max(d.members, 0))")])
        family(
            "stoq_mesh_discovery_refused_total", "counter", "Discovery records refused, by reason (the rest of the answer is used).",
            d.refused.sorted { $0.key < $1.key }.map {
                ("{backend=\"\(label(m.discovery))\",reason=\"\(label($0.key))\"}", "\($0.value)")
            })
        return out
    }

    /// `/status`'s "mesh" object: every field of `MeshStatus`, snake_case.
    package static func json(_ m: MeshStatus) -> [String: Any] {
        let c = m.counters, d = m.discoveryCounters
        return [
            "node": m.node, "algorithm": m.algorithm, "max_hops": m.maxHops, "discovery": m.discovery,
            "discovery_counters": [
                "updates": d.updates, "members": d.members, "failures": d.failures, "recoveries": d.recoveries,
                "registrations": d.registrations, "refused": d.refused, "last_error": d.lastError ?? NSNull(),
            ] as [String: Any],
            "nodes_known": m.nodesKnown, "links_known": m.linksKnown,
            "neighbours": m.neighbours.map { n -> [String: Any] in
                [
                    "url": n.url, "node": n.node, "state": n.state, "connected": n.connected,
                    "srtt_us": n.srttMicros, "rttvar_us": n.rttvarMicros, "loss": finite(n.loss),
                    "delivery_bytes_per_second": finite(n.deliveryBytesPerSecond), "peer_load": finite(n.peerLoad),
                    "last_answer_ms_ago": n.lastAnswerMillisAgo.map { $0 as Any } ?? NSNull(),
                    "probes_sent": n.probesSent, "probes_answered": n.probesAnswered, "downs": n.downs, "ups": n.ups,
                    "suppressed_ms": n.suppressedMillis.map { $0 as Any } ?? NSNull(), "flap_penalty": n.flapPenalty,
                ]
            },
            "routes": m.routes.map { r -> [String: Any] in
                [
                    "destination": r.destination, "path": r.path, "cost": finite(r.cost), "hops": r.hops,
                    "backup_path": r.backupPath.map { $0 as Any } ?? NSNull(),
                    "backup_cost": r.backupCost.map { finite($0) as Any } ?? NSNull(),
                ]
            },
            "multipath": m.multipath.map { r -> [String: Any] in
                [
                    "holder": r.holder, "next_hop": r.nextHop, "latency_ms": finite(r.latencyMillis),
                    "rate_bytes_per_second": finite(r.rateBytesPerSecond), "failure_probability": finite(r.failureProbability),
                    "in_flight_bytes": r.inFlightBytes, "chunk_share": finite(r.chunkShare), "evidence": finite(r.evidence),
                    "dispatched_chunks": r.dispatchedChunks, "delivered_bytes": r.deliveredBytes,
                ]
            },
            "counters": [
                "adverts_originated": c.advertsOriginated, "adverts_received": c.advertsReceived,
                "adverts_accepted": c.advertsAccepted, "adverts_forwarded": c.advertsForwarded,
                "adverts_synchronized": c.advertsSynchronized,
                "adverts_duplicate": c.advertsDuplicate, "adverts_refused": c.advertsRefused,
                "peers_refused": c.peersRefused, "connect_failures": c.connectFailures, "probes_refused": c.probesRefused,
                "route_computations": c.routeComputations, "relay_served": c.relayServed,
                "relay_forwarded": c.relayForwarded, "max_hops_refused": c.maxHopsRefused,
                "max_hops_seen": c.maxHopsSeen, "failovers": c.failovers, "flap_suppressions": c.flapSuppressions,
            ] as [String: Any],
        ]
    }

    /// A label value escaped as the text format requires (backslash, double quote, newline).
    static func label(_ s: String) -> String {
        var out = ""
        for ch in s {
            switch ch {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            default: out.append(ch)
            }
        }
        return out
    }

    /// A sample value: Swift's shortest round-trip decimal, which Prometheus parses; the
    /// text format's spellings for the non-finite ones.
    static func number(_ v: Double) -> String {
        if v.isNaN { return "NaN" }
        if v.isInfinite { return v > 0 ? "+Inf" : "-Inf" }
        if v == v.rounded(), abs(v) < 1e15 { return "\(Int64(v))" }
        return "\(v)"
    }

    /// JSON has no NaN or infinity, and JSONSerialization throws on them (the whole document
    /// would be lost): a metric not measured yet shows as 0.
    static func finite(_ v: Double) -> Double { v.isFinite ? v : 0 }
}
