import Foundation
import STOQCore

/// The "mesh" object of a node's `/status` (docs/api.md), as `stoq mesh` reads it, and the
/// tables it prints. Pure: tested on a fixture document with no node (Tests/stoqTests).
struct MeshStatusView: Decodable, Sendable {
    struct Neighbour: Decodable, Sendable {
        var url: String
        var node: String
        var state: String
        var connected: Bool
        var srttUs: UInt64
        var rttvarUs: UInt64
        var loss: Double
        var deliveryBytesPerSecond: Double
        var peerLoad: Double
        var lastAnswerMsAgo: UInt64?
        var probesSent: UInt64
        var probesAnswered: UInt64
        var downs: UInt64
        var ups: UInt64
        /// Held down for flapping: milliseconds left (absent from nodes older than flap damping).
        var suppressedMs: UInt64?
        var flapPenalty: UInt64?
        /// The state as a table shows it: "suppressed" for a link held down for flapping.
        var shownState: String { suppressedMs == nil ? state : "suppressed" }
    }
    struct Route: Decodable, Sendable {
        var destination: String
        var path: [String]
        var cost: Double
        var hops: Int
        var backupPath: [String]?
        var backupCost: Double?
    }
    struct Discovery: Decodable, Sendable {
        var updates: UInt64
        var members: Int
        var failures: UInt64
        var recoveries: UInt64
        var registrations: UInt64
        var refused: [String: UInt64]
        var lastError: String?
    }
    struct Counters: Decodable, Sendable {
        var advertsOriginated: UInt64
        var advertsReceived: UInt64
        var advertsAccepted: UInt64
        var advertsForwarded: UInt64
        var advertsSynchronized: UInt64?
        var advertsDuplicate: UInt64
        var advertsRefused: [String: UInt64]
        var peersRefused: UInt64
        var connectFailures: UInt64
        var routeComputations: UInt64
        var relayServed: UInt64
        var relayForwarded: UInt64
        var maxHopsRefused: UInt64
        var maxHopsSeen: UInt64
        var failovers: UInt64
        var flapSuppressions: UInt64?
    }
    var node: String
    var algorithm: String
    var maxHops: Int
    var discovery: String
    var discoveryCounters: Discovery
    var neighbours: [Neighbour]
    var routes: [Route]
    var nodesKnown: Int
    var linksKnown: Int
    var counters: Counters
    /// The learner's routes (`ml_optimized` only).
    var multipath: [Multipath]?

    struct Multipath: Decodable {
        var holder: String
        var nextHop: String
        var latencyMs: Double
        var rateBytesPerSecond: Double
        var failureProbability: Double
        var inFlightBytes: Int
        var chunkShare: Double
        var evidence: Double
        /// Since the node started (absent from nodes older than these counters).
        var dispatchedChunks: Int?
        var deliveredBytes: Int?
    }

    /// Reads a whole `/status` document; `nil` when the node runs no mesh (no "mesh" key).
    static func decode(status data: Data) throws -> MeshStatusView? {
        struct Document: Decodable { var mesh: MeshStatusView? }
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        return try decoder.decode(Document.self, from: data).mesh
    }
}

/// Why `stoq mesh` could not show what was asked.
struct MeshViewError: Error, Equatable, CustomStringConvertible {
    /// What kind of failure.
    struct Code: Hashable, Sendable {
        let name: String
        /// The admin URL is not `http://[ipv6]:port`.
        static let badAdminURL = Code(name: "bad_admin_url")
        /// `/status` has no "mesh" key.
        static let noMesh = Code(name: "no_mesh")
        /// The node id prefix is too short or not hex.
        static let badPrefix = Code(name: "bad_prefix")
        /// More than one destination starts with the prefix.
        static let ambiguous = Code(name: "ambiguous")
        /// No route starts with the prefix.
        static let noRoute = Code(name: "no_route")
    }
    var code: Code
    var message: String
    init(_ code: Code, _ message: String) { (self.code, self.message) = (code, message) }
    var description: String { message }
}

/// The tables `stoq mesh status|routes|path` print.
enum MeshTables {
    /// Node ids are 64 hex digits; 16 tell nodes apart in a table (as on /metrics).
    static func short(_ id: String) -> String { id.isEmpty ? "-" : String(id.prefix(16)) }

    /// `http://[ipv6]:port` (or `https://`, under `admin.auth = "mtls"`) from what the operator
    /// typed (a trailing `/`, `/metrics` or `/status` is forgiven): the admin API is IPv6 only,
    /// like the node.
    static func adminBase(_ text: String) throws -> String {
        var base = text.trimmingCharacters(in: .whitespaces)
        for suffix in ["/metrics", "/status", "/"] where base.hasSuffix(suffix) { base.removeLast(suffix.count) }
        let bad = MeshViewError(.badAdminURL, "<admin> \"\(text)\": expected http://[ipv6]:port or https://[ipv6]:port (IPv6 only)")
        guard let scheme = ["http://[", "https://["].first(where: { base.hasPrefix($0) }), let close = base.firstIndex(of: "]") else {
            throw bad
        }
        let host = base[base.index(base.startIndex, offsetBy: scheme.count)..<close]
        let rest = base[base.index(after: close)...]
        var addr = in6_addr()
        guard inet_pton(AF_INET6, String(host.split(separator: "%").first ?? ""), &addr) == 1, rest.hasPrefix(":"),
            let port = Int(rest.dropFirst()), (1...65535).contains(port)
        else { throw bad }
        return base
    }

    /// `stoq mesh status`: who this node is, its neighbours, what it counted.
    static func status(_ m: MeshStatusView) -> String {
        var out = "node \(m.node)\n"
        out += "algorithm \(m.algorithm), max_hops \(m.maxHops); \(m.nodesKnown) nodes and \(m.linksKnown) links known, \(m.routes.count) routes\n"
        let d = m.discoveryCounters
        out += "discovery \(m.discovery): \(d.members) members, \(d.updates) updates, \(d.failures) failures, \(d.recoveries) recoveries"
        if d.registrations > 0 { out += ", \(d.registrations) registrations" }
        if !d.refused.isEmpty { out += "; refused \(reasons(d.refused))" }
        out += "\n"
        if let e = d.lastError { out += "discovery last error: \(e)\n" }
        out += "\n"
        var rows = [["neighbour", "node", "state", "conn", "srtt ms", "rttvar ms", "loss %", "Mbit/s", "load %", "answer ms ago", "probes ans/sent"]]
        for n in m.neighbours {
            rows.append([
                n.url, short(n.node), n.shownState, n.connected ? "yes" : "no", ms(n.srttUs), ms(n.rttvarUs),
                String(format: "%.1f", n.loss * 100), String(format: "%.1f", n.deliveryBytesPerSecond * 8 / 1e6),
                String(format: "%.0f", n.peerLoad * 100), n.lastAnswerMsAgo.map { "\($0)" } ?? "-",
                "\(n.probesAnswered)/\(n.probesSent)",
            ])
        }
        out += table(rows, right: [4, 5, 6, 7, 8, 9, 10])
        if m.neighbours.isEmpty { out += "(no neighbours)\n" }
        for n in m.neighbours {
            guard let left = n.suppressedMs else { continue }
            out += "\(n.url): suppressed for flapping, \(String(format: "%.1f", Double(left) / 1e3)) s more (flap penalty \(n.flapPenalty ?? 0))\n"
        }
        let c = m.counters
        out += "\nadverts: \(c.advertsOriginated) originated, \(c.advertsReceived) received, \(c.advertsAccepted) accepted, "
        out += "\(c.advertsForwarded) forwarded, \(c.advertsSynchronized ?? 0) synchronized, \(c.advertsDuplicate) duplicate; refused "
        out += c.advertsRefused.isEmpty ? "none\n" : "\(reasons(c.advertsRefused))\n"
        out += "relay: \(c.relayServed) served, \(c.relayForwarded) forwarded, \(c.maxHopsRefused) refused over max_hops "
        out += "(most hops seen \(c.maxHopsSeen)); \(c.failovers) failovers, \(c.routeComputations) route computations, "
        out += "\(c.peersRefused) peers refused, \(c.connectFailures) connect failures"
        out += c.flapSuppressions.map { ", \($0) flap suppressions\n" } ?? "\n"
        return out
    }

    /// `stoq mesh routes`: one row per destination.
    static func routes(_ m: MeshStatusView) -> String {
        var rows = [["destination", "hops", "cost", "next hop", "path", "backup"]]
        for r in m.routes {
            rows.append([
                short(r.destination), "\(r.hops)", cost(r.cost), r.path.count > 1 ? short(r.path[1]) : "-", chain(r.path),
                r.backupPath.map { "\(chain($0)) (cost \(cost(r.backupCost ?? 0)))" } ?? "-",
            ])
        }
        if m.routes.isEmpty { return table(rows, right: [1, 2]) + "(no routes: this node knows no other node yet)\n" }
        return table(rows, right: [1, 2]) + learned(m.multipath ?? [])
    }

    /// What `ml_optimized` learned: each route to a holder, its estimate and its share of chunks.
    static func learned(_ routes: [MeshStatusView.Multipath]) -> String {
        guard !routes.isEmpty else { return "" }
        var rows = [["holder", "next hop", "latency ms", "rate Mbit/s", "fail %", "in flight KiB", "share %", "evidence", "chunks sent", "MiB delivered"]]
        for r in routes.sorted(by: { ($0.holder, $0.nextHop) < ($1.holder, $1.nextHop) }) {
            rows.append([
                short(r.holder), short(r.nextHop), String(format: "%.2f", r.latencyMs), String(format: "%.1f", r.rateBytesPerSecond * 8 / 1e6),
                String(format: "%.1f", r.failureProbability * 100), "\(r.inFlightBytes / 1024)", String(format: "%.1f", r.chunkShare * 100),
                String(format: "%.1f", r.evidence), r.dispatchedChunks.map { "\($0)" } ?? "-",
                r.deliveredBytes.map { String(format: "%.1f", Double($0) / 1_048_576) } ?? "-",
            ])
        }
        return "\nml_optimized: routes to holders as the learner sees them\n" + table(rows, right: [2, 3, 4, 5, 6, 7, 8, 9])
    }

    /// The route whose destination starts with `prefix` (at least 4 hex digits, unique).
    static func route(_ m: MeshStatusView, prefix: String) throws -> MeshStatusView.Route {
        let p = prefix.lowercased()
        guard p.count >= 4, Hex.isDigits(p) else {
            throw MeshViewError(.badPrefix, "node \"\(prefix)\": give at least 4 hex digits of its id")
        }
        let matches = m.routes.filter { $0.destination.lowercased().hasPrefix(p) }
        if matches.count > 1 {
            throw MeshViewError(
                .ambiguous, "node \"\(prefix)\" is ambiguous: \(matches.map { short($0.destination) }.joined(separator: ", ")); give more digits")
        }
        guard let r = matches.first else {
            let what = m.node.lowercased().hasPrefix(p) ? "\(prefix) is this node" : "no route to \(prefix)"
            let known = m.routes.map { short($0.destination) }
            throw MeshViewError(
                .noRoute, "\(what): known destinations: \(known.isEmpty ? "none" : known.joined(separator: ", "))")
        }
        return r
    }

    /// `stoq mesh path <node>`: the primary route and its backup, hop by hop.
    static func path(_ m: MeshStatusView, prefix: String) throws -> String {
        let r = try route(m, prefix: prefix)
        var out = "to \(r.destination) (\(m.algorithm))\n"
        out += "primary: \(r.hops) hops, cost \(cost(r.cost))\n" + hops(r.path, m)
        if let b = r.backupPath {
            out += "backup: \(max(b.count - 1, 0)) hops, cost \(cost(r.backupCost ?? 0))\n" + hops(b, m)
        } else {
            out += "backup: none (no link-disjoint path in the graph)\n"
        }
        return out
    }

    /// One line per node of a path; the first hop says which neighbour link it leaves by.
    static func hops(_ path: [String], _ m: MeshStatusView) -> String {
        var rows: [[String]] = []
        for (i, id) in path.enumerated() {
            var note = ""
            if i == 0 {
                note = "this node"
            } else if i == 1, let n = m.neighbours.first(where: { $0.node == id }) {
                note = "via \(n.url), \(n.shownState), srtt \(ms(n.srttUs)) ms, loss \(String(format: "%.1f", n.loss * 100)) %"
            }
            if i == path.count - 1 && i > 0 { note += note.isEmpty ? "destination" : "; destination" }
            rows.append(["  \(i)", short(id), note])
        }
        return table(rows, right: [0])
    }

    static func ms(_ micros: UInt64) -> String { String(format: "%.2f", Double(micros) / 1e3) }
    static func cost(_ c: Double) -> String { c == c.rounded() && abs(c) < 1e15 ? "\(Int64(c))" : String(format: "%.2f", c) }
    static func chain(_ ids: [String]) -> String { ids.map(short).joined(separator: " → ") }
    static func reasons(_ r: [String: UInt64]) -> String {
        r.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
    }

    /// Columns two spaces apart, padded to the widest cell (counted in characters, so "→" is one).
    static func table(_ rows: [[String]], right: Set<Int>) -> String {
        guard let first = rows.first else { return "" }
        var widths = Array(repeating: 0, count: first.count)
        for row in rows { for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) } }
        var out = ""
        for row in rows {
            var line = ""
            for (i, cell) in row.enumerated() {
                let pad = String(repeating: " ", count: widths[i] - cell.count)
                if i > 0 { line += "  " }
                line += right.contains(i) ? pad + cell : cell + pad
            }
            while line.hasSuffix(" ") { line.removeLast() }
            out += line + "\n"
        }
        return out
    }
}
