import STOQCore
import Testing
@testable import STOQRouting

/// Seeded random graphs and change sequences: the same cases every run.
@Suite struct RoutingPropertyTests {
    static func randomEdges(_ rng: inout MultipathRandom, nodes: Int, outDegree: Int) -> [(UInt64, UInt64, Double)] {
        var edges: [(UInt64, UInt64, Double)] = []
        for a in 1...nodes {
            var peers = Set<Int>()
            for _ in 0..<outDegree {
                let b = Int(rng.next() % UInt64(nodes)) + 1
                if b != a { peers.insert(b) }
            }
            for b in peers.sorted() { edges.append((UInt64(a), UInt64(b), 1 + Double(rng.next() % 100_000) / 1000)) }
        }
        return edges
    }

    /// Every walk of ≤ maxHops links from `s`, best by the algorithm's order (Float sums taken
    /// from the source outward, as the search does).
    static func bruteForce(_ edges: [(UInt64, UInt64, Double)], from s: UInt64, maxHops: Int, fewestHops: Bool) -> [UInt64: (hops: Int, cost: Float)] {
        var out: [UInt64: [(UInt64, Float)]] = [:]
        for (a, b, w) in edges { out[a, default: []].append((b, Float(LinkCost.weight(LinkMetrics(rttMs: w), .latency)))) }
        var best: [UInt64: (hops: Int, cost: Float)] = [:]
        func better(_ x: (hops: Int, cost: Float), than y: (hops: Int, cost: Float)?) -> Bool {
            guard let y else { return true }
            return fewestHops ? (x.hops, x.cost) < (y.hops, y.cost) : x.cost < y.cost
        }
        func walk(_ u: UInt64, _ hops: Int, _ cost: Float) {
            if hops == maxHops { return }
            for (v, w) in out[u] ?? [] where v != s {
                let c = (hops: hops + 1, cost: cost + w)
                if better(c, than: best[v]) { best[v] = c }
                walk(v, hops + 1, cost + w)
            }
        }
        walk(s, 0, 0)
        return best
    }

    @Test(arguments: [RoutingAlgorithm.latency, .shortestPath], [1, 2, 3, 4, 5])
    func searchIsExactAgainstEnumerationOfAllWalks(algorithm: RoutingAlgorithm, maxHops: Int) {
        var rng = MultipathRandom(seed: 0x5EED + UInt64(maxHops))
        for _ in 0..<20 {
            let edges = Self.randomEdges(&rng, nodes: 10, outDegree: 3)
            let e = engine(edges, algorithm: algorithm, maxHops: maxHops, backups: .none)
            let weight = Dictionary(edges.map { ("\($0.0)>\($0.1)", Float($0.2)) }, uniquingKeysWith: { a, _ in a })
            for s in 1...10 {
                let want = Self.bruteForce(edges, from: UInt64(s), maxHops: maxHops, fewestHops: algorithm == .shortestPath)
                let t = e.routes(from: NodeID(UInt64(s)))
                #expect(Set(t.destinations) == Set(want.keys.map { NodeID($0) }))
                for (d, w) in want {
                    guard let r = t.route(to: NodeID(d)) else { Issue.record("no route \(s)→\(d)"); continue }
                    #expect(r.primary.hops == w.hops || algorithm == .latency)
                    #expect(r.primary.hops <= maxHops)
                    #expect(Float(r.primary.cost) == w.cost, "\(s)→\(d): \(r.primary.nodes)")
                    // The path is real and costs what it says.
                    var c: Float = 0
                    for (a, b) in zip(r.primary.nodes, r.primary.nodes.dropFirst()) { c += weight["\(a.rawValue)>\(b.rawValue)"]! }
                    #expect(c == Float(r.primary.cost))
                }
            }
        }
    }

    /// The first hop a table keeps for each hop budget j is that of the route an engine capped
    /// at j links computes (random costs with 10⁻³ ms resolution: no ties).
    @Test(arguments: [RoutingAlgorithm.latency, .shortestPath, .adaptive])
    func theFirstHopWithinEachBudgetIsThatOfAnEngineCappedThere(algorithm: RoutingAlgorithm) {
        var rng = MultipathRandom(seed: 0xB0D6E7)
        for _ in 0..<20 {
            let edges = Self.randomEdges(&rng, nodes: 12, outDegree: 3)
            let table = engine(edges, algorithm: algorithm, maxHops: 5, backups: .none)
            let capped = (1...5).map { engine(edges, algorithm: algorithm, maxHops: $0, backups: .none) }
            var differs = 0
            for s in 1...12 {
                let t = table.routes(from: NodeID(UInt64(s)))
                for d in t.destinations {
                    for j in 1...5 {
                        let want = capped[j - 1].routes(from: NodeID(UInt64(s))).nextHop(to: d)
                        #expect(t.nextHop(to: d, within: j) == want, "\(s)→\(d) within \(j)")
                        if want != nil && want != t.nextHop(to: d) { differs += 1 }
                    }
                }
            }
            // The budget changes the answer somewhere (else this test would prove nothing).
            if algorithm != .shortestPath { #expect(differs > 0) }
        }
    }

    /// A fresh engine holding exactly `db`'s live adverts: no history, graph built in one go.
    static func fresh(from db: LinkStateDatabase, algorithm: RoutingAlgorithm, maxHops: Int) -> RoutingEngine {
        let f = RoutingEngine(algorithm: algorithm, maxHops: maxHops, backups: .all)
        for (id, o) in db.origins.sorted(by: { $0.key < $1.key }) where o.live {
            try! f.apply(LinkStateAdvert(origin: id, sequence: o.sequence, links: o.links), now: 0)
        }
        return f
    }

    @Test(arguments: [RoutingAlgorithm.latency, .shortestPath, .adaptive])
    func incrementalEqualsFullRecomputeOnRandomChangeSequences(algorithm: RoutingAlgorithm) throws {
        var rng = MultipathRandom(seed: 42)
        let nodes = 24
        let maxAge = 100 * Nanos.second
        let e = RoutingEngine(algorithm: algorithm, maxHops: 3, backups: .all, advertMaxAge: maxAge)
        var links: [UInt64: [UInt64: LinkMetrics]] = [:]
        for (a, b, w) in both(Self.randomEdges(&rng, nodes: nodes, outDegree: 2)) { links[a, default: [:]][b] = LinkMetrics(rttMs: w) }
        var seq: [UInt64: UInt64] = [:]
        var now: Timestamp = 0
        func advertise(_ a: UInt64) throws {
            seq[a, default: 0] += 1
            let l = (links[a] ?? [:]).map { AdvertisedLink(peer: NodeID($0.key), metrics: $0.value) }
            try e.apply(LinkStateAdvert(origin: NodeID(a), sequence: seq[a]!, links: l), now: now)
        }
        for a in 1...UInt64(nodes) { try advertise(a) }
        let sources = ids([1, 5, 9, 17])
        for s in sources { _ = e.routes(from: s) }
        var kinds: [String: Int] = [:]
        for step in 0..<400 {
            now += Nanos.second
            let a = UInt64(rng.next() % UInt64(nodes)) + 1
            let roll = rng.next() % 100
            var l = links[a] ?? [:]
            if roll < 55, let peer = l.keys.sorted().randomElement(using: &rng) {
                // Dearer or cheaper, sometimes lossy or loaded.
                var m = l[peer]!
                m.rttMs = max(0.5, m.rttMs * (0.5 + Double(rng.next() % 1000) / 1000))
                m.lossRate = rng.next() % 4 == 0 ? Double(rng.next() % 300) / 1000 : m.lossRate
                m.load = rng.next() % 4 == 0 ? Double(rng.next() % 1000) / 1000 : m.load
                l[peer] = m
                kinds["metric", default: 0] += 1
            } else if roll < 75, let peer = l.keys.sorted().randomElement(using: &rng) {
                l[peer] = nil
                kinds["remove", default: 0] += 1
            } else if roll < 90 {
                let b = UInt64(rng.next() % UInt64(nodes)) + 1
                if b != a { l[b] = LinkMetrics(rttMs: 1 + Double(rng.next() % 100_000) / 1000) }
                kinds["add", default: 0] += 1
            } else {
                // Everyone but `a` re-advertises; then a's advert ages out.
                for o in 1...UInt64(nodes) where o != a && e.database.origins[NodeID(o)]?.live == true { try advertise(o) }
                now += maxAge
                for o in 1...UInt64(nodes) where o != a && e.database.origins[NodeID(o)]?.live == true { try advertise(o) }
                now += 1
                _ = e.expire(now: now)
                links[a] = [:]
                kinds["expire", default: 0] += 1
                continue
            }
            links[a] = l
            try advertise(a)
            if step % 3 == 0 { continue }  // let some changes batch up
            let full = Self.fresh(from: e.database, algorithm: algorithm, maxHops: 3)
            for s in sources {
                let inc = e.routes(from: s)
                let ref = full.routes(from: s)
                #expect(Set(inc.destinations) == Set(ref.destinations), "step \(step) from \(s)")
                for d in ref.destinations {
                    #expect(inc.route(to: d) == ref.route(to: d), "step \(step) \(s)→\(d)")
                    for j in 1...3 { #expect(inc.nextHop(to: d, within: j) == ref.nextHop(to: d, within: j), "step \(step) \(s)→\(d) within \(j)") }
                }
                #expect(inc.route(to: s) == nil)
            }
        }
        // The sequence exercised every kind of change, and some tables survived changes.
        #expect(kinds.count == 4)
        #expect(e.stats.tablesKept > 0)
        #expect(e.stats.tablesInvalidated > 0)
    }
}

@Suite struct TargetedSearchTests {
    @Test(arguments: [false, true], [1, 2, 3, 4, 5, 6])
    func aSearchForOneTargetFindsWhatTheFullSearchFinds(fewestHops: Bool, maxHops: Int) {
        var rng = MultipathRandom(seed: 7 + UInt64(maxHops))
        for _ in 0..<10 {
            let edges = RoutingPropertyTests.randomEdges(&rng, nodes: 16, outDegree: 3)
            let g = engine(edges, backups: .none).graph
            let full = HopLimitedSearch(), one = HopLimitedSearch()
            for s in Int32(0)..<Int32(g.nodeCount) {
                full.run(g, source: s, maxHops: maxHops, fewestHops: fewestHops)
                for t in Int32(0)..<Int32(g.nodeCount) where t != s {
                    one.run(g, source: s, maxHops: maxHops, fewestHops: fewestHops, target: t)
                    #expect(one.cost(t) == full.cost(t))
                    #expect(one.hops(t) == full.hops(t))
                    #expect(one.path(to: t, graph: g).count == max(full.hops(t), -1) + 1)
                }
            }
        }
    }
}
