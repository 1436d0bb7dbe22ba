import STOQCore
import Testing
@testable import STOQRouting

@Suite struct RoutingEngineTests {
    // 1 ─10─ 2 ─10─ 4         the direct 1→4 costs 50; the long way round 1-3-5-6-4 costs 4;
    // │ ╲___50_____╱ │        the middle way 1-2-4 costs 20.
    // 1 ─1─ 3 ─1─ 5 ─1─ 6 ─1─ 4
    let diamond: [(UInt64, UInt64, Double)] = both([(1, 2, 10), (2, 4, 10), (1, 4, 50), (1, 3, 1), (3, 5, 1), (5, 6, 1), (6, 4, 1)])

    @Test func latencyTakesTheCheapestRouteWithinMaxHops() {
        #expect(engine(diamond, maxHops: 4).routes(from: 1).route(to: 4)?.primary == RoutePath(nodes: ids([1, 3, 5, 6, 4]), cost: 4))
        #expect(engine(diamond, maxHops: 3).routes(from: 1).route(to: 4)?.primary == RoutePath(nodes: ids([1, 2, 4]), cost: 20))
        #expect(engine(diamond, maxHops: 1).routes(from: 1).route(to: 4)?.primary == RoutePath(nodes: ids([1, 4]), cost: 50))
    }

    /// A relay whose request has come some hops may send it only `maxHops` − hops links further:
    /// its table answers with the first hop of the best route within that budget, which is not
    /// the best route's when that one is longer (the detour 1-3-5-6-4 here).
    @Test func aTableGivesTheFirstHopOfTheBestRouteWithinEachHopBudget() {
        for algorithm in [RoutingAlgorithm.latency, .adaptive] {
            let t = engine(diamond, algorithm: algorithm, maxHops: 4).routes(from: 1)
            #expect(t.nextHop(to: 4) == NodeID(3))
            #expect([4, 3, 2, 1, 9].map { t.nextHop(to: 4, within: $0) } == ids([3, 2, 2, 4, 3]))
            #expect(t.nextHop(to: 4, within: 0) == nil)
            // 6 is 3 links away the cheap way, 2 links away through 4.
            #expect([3, 2, 1].map { t.nextHop(to: 6, within: $0) } == [NodeID(3), NodeID(4), nil])
            #expect(t.nextHop(to: 1, within: 4) == nil && t.nextHop(to: 99, within: 4) == nil)
        }
        // Fewest links first: the best route is already the shortest, so a budget only cuts.
        let s = engine(diamond, algorithm: .shortestPath, maxHops: 4).routes(from: 1)
        #expect([4, 1].map { s.nextHop(to: 4, within: $0) } == ids([4, 4]))
        #expect([4, 3, 2].map { s.nextHop(to: 6, within: $0) } == [NodeID(4), NodeID(4), NodeID(4)])
        #expect(s.nextHop(to: 6, within: 1) == nil)
    }

    @Test func shortestPathCountsHopsFirstAndBreaksTiesByRTT() {
        let t = engine(diamond, algorithm: .shortestPath).routes(from: 1)
        #expect(t.route(to: 4)?.primary == RoutePath(nodes: ids([1, 4]), cost: 50))
        // Two 2-hop routes to 7: via 2 (10 + 30) and via 3 (1 + 5): the lower RTT wins.
        let t2 = engine(diamond + both([(2, 7, 30), (3, 7, 5)]), algorithm: .shortestPath).routes(from: 1)
        #expect(t2.route(to: 7)?.primary == RoutePath(nodes: ids([1, 3, 7]), cost: 6))
        // 6 is 3 hops away via 3-5 (cost 3) and 2 hops away via 4 (cost 51): fewer hops win.
        #expect(t2.route(to: 6)?.primary == RoutePath(nodes: ids([1, 4, 6]), cost: 51))
    }

    @Test func adaptiveWeighsLossAndLoad() {
        // 1→2→4 and 1→3→4, both 20 ms. Loss on 1→2 and load at 3: the formula decides.
        let edges: [(UInt64, UInt64, Double)] = [(1, 2, 10), (2, 4, 10), (1, 3, 10), (3, 4, 10)]
        let lossy = ["1>2": LinkMetrics(rttMs: 10, lossRate: 0.2)]  // 10·(1 + 2·0.25) = 15
        let loaded = ["1>3": LinkMetrics(rttMs: 10, load: 0.6)]  // 10·1.6 = 16
        var m = lossy; m.merge(loaded) { a, _ in a }
        let t = engine(edges, algorithm: .adaptive, metrics: m).routes(from: 1)
        #expect(t.route(to: 4)?.primary.nodes == ids([1, 2, 4]))
        #expect(t.route(to: 4)?.primary.cost == 25)
        // Latency alone ignores both and takes the first of the equal routes.
        let l = engine(edges, algorithm: .latency, metrics: m).routes(from: 1)
        #expect(l.route(to: 4)?.primary.cost == 20)
        // Variance counts one mean deviation: 1→2 at 10 + 7 = 17 loses to the loaded 16.
        let jittery = ["1>2": LinkMetrics(rttMs: 10, rttVarMs: 7)]
        var m2 = jittery; m2.merge(loaded) { a, _ in a }
        #expect(engine(edges, algorithm: .adaptive, metrics: m2).routes(from: 1).route(to: 4)?.primary.nodes == ids([1, 3, 4]))
        #expect(LinkCost.weight(LinkMetrics(rttMs: 10, rttVarMs: 2, lossRate: 0.5, load: 1), .adaptive) == 12 * 3 * 2)
    }

    @Test func mlOptimizedUsesTheAdaptiveRoutesAsCandidates() {
        let m = ["1>2": LinkMetrics(rttMs: 10, lossRate: 0.3)]
        let a = engine(diamond, algorithm: .adaptive, metrics: m).routes(from: 1)
        let ml = engine(diamond, algorithm: .mlOptimized, metrics: m).routes(from: 1)
        for d in a.destinations { #expect(a.route(to: d) == ml.route(to: d)) }
    }

    @Test(arguments: 1...6)
    func noRouteHasMoreLinksThanMaxHops(maxHops: Int) {
        // A chain 1-2-…-8 plus a cheap ring: every destination is reachable, some only far away.
        var edges = both((1...7).map { (UInt64($0), UInt64($0 + 1), 1.0) })
        edges += both([(1, 8, 100)])
        let e = engine(edges, maxHops: maxHops)
        let t = e.routes(from: 1)
        for d in 2...8 {
            let hopsAway = min(d - 1, 9 - d)
            let r = t.route(to: NodeID(UInt64(d)))
            if hopsAway > maxHops {
                #expect(r == nil)
            } else {
                #expect(r != nil)
                #expect(r!.primary.hops <= maxHops)
                if let b = r!.backup { #expect(b.hops <= maxHops) }
            }
        }
        #expect(t.maxHops == maxHops)
    }

    @Test func backupsShareNoLinkWithThePrimaryInEitherDirection() {
        // A 3x3 grid: between corners there are two link-disjoint routes of 4 hops.
        var edges: [(UInt64, UInt64, Double)] = []
        for r in 0..<3 {
            for c in 0..<3 {
                let n = UInt64(r * 3 + c + 1)
                if c < 2 { edges.append((n, n + 1, Double(1 + r))) }
                if r < 2 { edges.append((n, n + 3, Double(1 + c))) }
            }
        }
        let t = engine(both(edges)).routes(from: 1)
        for d in t.destinations {
            guard let r = t.route(to: d) else { Issue.record("no route to \(d)"); continue }
            guard let b = r.backup else { continue }  // remove-and-recompute may need > 4 hops
            let p = Set(zip(r.primary.nodes, r.primary.nodes.dropFirst()).flatMap { [[$0.0, $0.1], [$0.1, $0.0]] })
            let q = Set(zip(b.nodes, b.nodes.dropFirst()).map { [$0.0, $0.1] })
            #expect(p.isDisjoint(with: q), "backup \(b.nodes) reuses a link of \(r.primary.nodes)")
            #expect(b.nodes.first == 1 && b.nodes.last == d)
            #expect(b.cost >= r.primary.cost)
            #expect(t.backupNextHop(to: d) == b.nextHop)
        }
        #expect(t.route(to: 9)?.backup?.hops == 4)
        #expect(t.route(to: 2)?.backup?.hops == 3)
        #expect(t.destinations.filter { t.backupNextHop(to: $0) != nil }.count >= 6)
    }

    @Test func noBackupAcrossABridgeOrBeyondMaxHops() {
        // 1-2 is a bridge; 2..5 a ring.
        let edges = both([(1, 2, 1), (2, 3, 1), (3, 4, 1), (4, 5, 1), (5, 2, 1)])
        let t = engine(edges).routes(from: 1)
        #expect(t.route(to: 4) != nil)
        #expect(t.route(to: 4)?.backup == nil)
        // From 2, node 4 has two disjoint routes (2-3-4, 2-5-4), but not within 1 hop.
        #expect(engine(edges).disjointRoutes(from: 2, to: 4)?.backup?.nodes == ids([2, 5, 4]))
        #expect(engine(edges, maxHops: 2).routes(from: 2).route(to: 4)?.backup != nil)
        let e1 = engine(edges + both([(2, 4, 10)]), maxHops: 1)
        #expect(e1.disjointRoutes(from: 2, to: 4)?.primary.nodes == ids([2, 4]))
        #expect(e1.disjointRoutes(from: 2, to: 4)?.backup == nil)
    }

    @Test func lookupsOfUnknownUnreachableAndSourceAreNil() {
        let e = engine(both([(1, 2, 1)]) + [(3, 1, 1)])
        let t = e.routes(from: 1)
        #expect(t.nextHop(to: 2) == 2)
        #expect(t.nextHop(to: 1) == nil)
        #expect(t.nextHop(to: 3) == nil)  // 3 → 1 exists, 1 → 3 does not
        #expect(t.route(to: 99) == nil)
        #expect(t.cost(to: 2) == 1)
        #expect(t.count == 1)
        #expect(e.routes(from: 99).count == 0)
    }

    @Test func expiredAdvertsTakeTheirLinksOutOfTheRoutes() throws {
        let e = RoutingEngine(advertMaxAge: 10 * Nanos.second)
        for a in adverts(diamond, sequence: 1) { try e.apply(a, now: 0) }
        // 3 keeps advertising; 5 goes silent, so 5 → 6 disappears and 1-3-5-6-4 with it.
        for a in adverts(diamond, sequence: 2) where a.origin != 5 { try e.apply(a, now: 8 * Nanos.second) }
        #expect(e.routes(from: 1).route(to: 4)?.primary.cost == 4)
        #expect(e.expire(now: 11 * Nanos.second) == (expired: [5], forgotten: []))
        #expect(e.routes(from: 1).route(to: 4)?.primary == RoutePath(nodes: ids([1, 2, 4]), cost: 20))
        // 5 is still reachable through the link 3 advertises towards it.
        #expect(e.routes(from: 1).route(to: 5)?.primary.nodes == ids([1, 3, 5]))
        #expect(throws: LinkStateError.self) { try e.apply(adverts(diamond, sequence: 1)[0], now: 12 * Nanos.second) }
        #expect(e.database.refused[.stale] == 1)
    }

    /// A node that left (a new key is a new id) leaves the graph once it is forgotten: the
    /// engine of a mesh whose nodes come and go does not keep every id it ever saw.
    @Test func forgottenNodesLeaveTheGraph() throws {
        let e = RoutingEngine(advertMaxAge: 10 * Nanos.second, forgetAfter: 100 * Nanos.second)
        try e.apply(LinkStateAdvert(origin: 1, sequence: 1, links: [AdvertisedLink(peer: 2, metrics: LinkMetrics(rttMs: 1))]), now: 0)
        try e.apply(LinkStateAdvert(origin: 2, sequence: 1, links: [AdvertisedLink(peer: 7, metrics: LinkMetrics(rttMs: 1))]), now: 0)
        try e.apply(LinkStateAdvert(origin: 7, sequence: 1, links: [AdvertisedLink(peer: 2, metrics: LinkMetrics(rttMs: 1))]), now: 0)
        #expect(Set(e.graph.nodeIDs) == [1, 2, 7])
        // 1 and 2 keep advertising; 2 drops its link to 7, and 7 goes silent.
        for t in stride(from: UInt64(5), through: 105, by: 5) {
            try e.apply(LinkStateAdvert(origin: 1, sequence: t, links: [AdvertisedLink(peer: 2, metrics: LinkMetrics(rttMs: 1))]), now: t * Nanos.second)
            try e.apply(LinkStateAdvert(origin: 2, sequence: t, links: []), now: t * Nanos.second)
            let (expired, forgotten) = e.expire(now: t * Nanos.second + 1)
            #expect(expired == (t == 10 ? [7] : []))
            #expect(forgotten == (t == 100 ? [7] : []))
        }
        #expect(e.graph.nodeIDs.sorted() == [1, 2])
        #expect(e.database.origins[7] == nil)
        #expect(e.routes(from: 1).route(to: 2)?.primary.nodes == ids([1, 2]))
        // Forgotten with its sequence: 7 may come back from a clock set back.
        try e.apply(LinkStateAdvert(origin: 7, sequence: 0, links: [AdvertisedLink(peer: 2, metrics: LinkMetrics(rttMs: 1))]), now: 106 * Nanos.second)
        #expect(Set(e.graph.nodeIDs) == [1, 2, 7])
    }

    /// With the two-way check (the mesh's), a link counts only while its peer lists it back:
    /// an origin claiming a cheap link to a real node, or links to nodes that never advertised,
    /// changes no route and adds no node; once the peer lists it, it counts, and not after.
    @Test func aOneSidedLinkCountsOnlyWithTheTwoWayCheckMet() throws {
        func link(_ p: UInt64, _ rtt: Double) -> AdvertisedLink { AdvertisedLink(peer: NodeID(p), metrics: LinkMetrics(rttMs: rtt)) }
        let e = RoutingEngine(requireTwoWay: true)
        try e.apply(LinkStateAdvert(origin: 1, sequence: 1, links: [link(2, 10), link(9, 1)]), now: 0)
        try e.apply(LinkStateAdvert(origin: 2, sequence: 1, links: [link(1, 10), link(3, 10)]), now: 0)
        try e.apply(LinkStateAdvert(origin: 3, sequence: 1, links: [link(2, 10)]), now: 0)
        // 9 claims a free link to 3 and links to 1,000 made-up peers; 3 never lists 9.
        try e.apply(LinkStateAdvert(origin: 9, sequence: 1, links: [link(1, 1), link(3, 0.001)] + (100...1_099).map { link($0, 1) }), now: 0)
        #expect(e.routes(from: 1).route(to: 3)?.primary.nodes == ids([1, 2, 3]))
        #expect(Set(e.graph.nodeIDs) == [1, 2, 3, 9])
        #expect(e.graph.edgeCount == 6)
        // 3 lists 9: the link counts both ways.
        try e.apply(LinkStateAdvert(origin: 3, sequence: 2, links: [link(2, 10), link(9, 1)]), now: 1)
        #expect(e.routes(from: 1).route(to: 3)?.primary.nodes == ids([1, 9, 3]))
        // And stops counting when 3 drops it, whatever 9 still says.
        try e.apply(LinkStateAdvert(origin: 3, sequence: 3, links: [link(2, 10)]), now: 2)
        #expect(e.routes(from: 1).route(to: 3)?.primary.nodes == ids([1, 2, 3]))
        // Two origins that list each other, expiring together, take the link out (each side
        // looks one-sided once the other is gone).
        let pair = RoutingEngine(advertMaxAge: 10 * Nanos.second, requireTwoWay: true)
        try pair.apply(LinkStateAdvert(origin: 1, sequence: 1, links: [link(2, 1)]), now: 0)
        try pair.apply(LinkStateAdvert(origin: 2, sequence: 1, links: [link(1, 1)]), now: 0)
        #expect(pair.routes(from: 1).route(to: 2) != nil && pair.graph.edgeCount == 2)
        #expect(pair.expire(now: 11 * Nanos.second).expired == [1, 2])
        #expect(pair.graph.edgeCount == 0 && pair.routes(from: 1).route(to: 2) == nil)
        // Without the check (a simulator's honest adverts), 9's claim routes.
        let open = RoutingEngine()
        for a in e.database.origins.keys.sorted() {
            try open.apply(LinkStateAdvert(origin: a, sequence: 1, links: e.database.links(from: a)), now: 0)
        }
        #expect(open.routes(from: 1).route(to: 3)?.primary.nodes == ids([1, 9, 3]))
    }

    @Test func onlyChangesThatCanAffectATableRecomputeIt() throws {
        let e = engine(diamond, backups: .none)
        var seq: UInt64 = 1
        func readvertise(_ origin: UInt64, _ change: (inout [(UInt64, UInt64, Double)]) -> Void) throws {
            var edges = diamond.filter { $0.0 == origin }
            change(&edges)
            seq += 1
            try e.apply(adverts(edges, sequence: seq)[0], now: 0)
        }
        let before = e.routes(from: 1)
        #expect(e.stats.fullComputes == 1)
        // 4 → 2 is on no route from 1: dearer, the table is kept. (2 → 4 is: on 1-2-4, the best
        // route to 4 of ≤ 3 links, which a relay with 3 links left takes.)
        try readvertise(4) { $0 = $0.map { $0.1 == 2 ? ($0.0, $0.1, 30) : $0 } }
        #expect(e.stats.tablesKept == 1)
        #expect(e.routes(from: 1) === before)
        #expect(e.stats.fullComputes == 1)
        // 4 → 6 is on no route of ≤ 4 links from 1 (6 is reached through 5), but on 1-4-6, the
        // best of ≤ 2 links, which a relay with 2 links left takes: dearer, the table goes.
        try readvertise(4) { $0 = $0.map { $0.1 == 2 ? ($0.0, $0.1, 30) : $0.1 == 6 ? ($0.0, $0.1, 60) : $0 } }
        #expect(e.stats.tablesInvalidated == 1)
        #expect(e.routes(from: 1).nextHop(to: 6, within: 2) == NodeID(4))
        #expect(e.stats.fullComputes == 2)
        // 5 → 6 is on the route to 4: dearer, the table goes and is recomputed when asked.
        try readvertise(5) { $0 = $0.map { $0.1 == 6 ? ($0.0, $0.1, 40) : $0 } }
        #expect(e.stats.tablesInvalidated == 2)
        #expect(e.routes(from: 1).route(to: 4)?.primary.nodes == ids([1, 2, 4]))
        #expect(e.stats.fullComputes == 3)
        // Several changes before the next request: one recompute for all of them.
        try readvertise(3) { $0 = $0.map { ($0.0, $0.1, 0.5) } }
        try readvertise(6) { $0 = $0.map { ($0.0, $0.1, 0.5) } }
        _ = e.routes(from: 1)
        #expect(e.stats.fullComputes == 4)
        // Only the delivery rate moved: the cost is the same, nothing is dropped.
        let t = e.routes(from: 1)
        let m = ["1>2": LinkMetrics(rttMs: 10, deliveryRate: 1e6)]
        seq += 1
        try e.apply(adverts(diamond.filter { $0.0 == 1 }, sequence: seq, metrics: m)[0], now: 0)
        #expect(e.routes(from: 1) === t)
    }
}
