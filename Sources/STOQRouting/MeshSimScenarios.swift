// The benchmark's scenarios, built from input files, and the side-by-side run of every
// algorithm including the oracle search. Workloads are drawn from the seed once and replayed
// identically for every algorithm.

/// Scenario builders.
public enum MeshSimScenarios {
    /// Poisson arrivals of equal objects from `start` for `duration` seconds at `rate` per
    /// second; each arrival picks one entry of `choices` (client, routes), uniformly or in
    /// proportion to `weights`.
    static func poisson(
        rng: inout MultipathRandom, rate: Double, duration: Double, start: Double = 0.5,
        objectBytes: Int, chunkBytes: Int, choices: [(client: Int, routes: [Int])], weights: [Double]? = nil
    ) -> [MeshSimTransferSpec] {
        var out: [MeshSimTransferSpec] = []
        var t = start
        let chunks = chunkList(objectBytes: objectBytes, chunkBytes: chunkBytes)
        let total = weights?.reduce(0, +) ?? 0
        while true {
            t += rng.exponential(mean: 1 / rate)
            if t >= start + duration { break }
            var pick = 0
            if let weights, total > 0 {
                var u = rng.unit() * total
                while pick < weights.count - 1 && u >= weights[pick] { u -= weights[pick]; pick += 1 }
            } else {
                pick = rng.below(choices.count)
            }
            let c = choices[pick]
            out.append(MeshSimTransferSpec(start: t, client: c.client, routes: c.routes, chunkBytes: chunks))
        }
        return out
    }

    static func chunkList(objectBytes: Int, chunkBytes: Int) -> [Int] {
        var left = objectBytes
        var out: [Int] = []
        while left > 0 {
            out.append(min(chunkBytes, left))
            left -= chunkBytes
        }
        return out
    }

    /// Offered load of the Poisson scenarios, as a fraction of the routes' summed capacity.
    public static let load = 0.5
    /// Offered load of the graph scenarios, as a fraction of the capacity a client's routes add
    /// up to. Lower than `load` because routes of different clients share links: at 0.5 every
    /// algorithm's p99 exceeded 40 s on leios1k (queues grew without bound), which measures
    /// overload, not scheduling.
    public static let graphLoad = 0.25

    /// The five Pantheon paths between S and C (Benchmarks/topologies/pantheon5.csv), with a
    /// variant: stable, the best path degrading mid-run, or its relay failing.
    public static func pantheon(_ topo: MeshSimTopology, variant: String, seed: UInt64) -> MeshSimScenario? {
        var net = MeshSimNetwork.from(topo, defaultRate: { _ in 100 * 125_000 })
        guard let s = net.index(of: "S"), let c = net.index(of: "C") else { return nil }
        let routes = net.disjointRoutes(from: s, to: c, k: 8, maxHops: 4)
        guard !routes.isEmpty else { return nil }
        var probe = MeshSimScenario(name: variant, summary: "", network: net, routes: routes, transfers: [], horizon: 200)
        let caps = MeshSimRunner.routeCapacities(probe)
        // The best path is the one with the highest capacity; what happens to it is the test.
        let best = caps.indices.max { caps[$0] < caps[$1] }!
        let bestRelay = net.names[routes[best][1]]
        var rng = MultipathRandom(seed: seed)
        let object = 4 << 20, chunk = 256 << 10
        let all = Array(routes.indices)
        let duration = 60.0
        // Offered load against what the scenario leaves standing: with the failed path counted,
        // the survivors ran at 98 % after the failure and every algorithm's p99 was that queue.
        let surviving = caps.reduce(0, +) - (variant == "node_failure" ? caps[best] : 0)
        let rate = load * surviving / Double(object)
        var summary: String
        switch variant {
        case "stable":
            summary = "5 Pantheon paths, Poisson arrivals of 4 MiB objects at 50 % load for 60 s"
        case "degrade":
            net.change("S", bestRelay, at: 20, rateMbit: 4, lossPercent: 2)
            net.change("S", bestRelay, at: 40, rateMbit: caps[best] / 125_000, lossPercent: 0)
            summary = "as stable; the best path (via \(bestRelay)) drops to 4 Mbit/s, 2 % loss in [20 s, 40 s)"
        case "node_failure":
            net.fail(bestRelay, from: 20)
            summary =
                "the relay of the best path (\(bestRelay)) fails at 20 s for good; 50 % load of the other paths"
        case "herding":
            summary = "50 transfers of 4 MiB start within 100 ms on the 5 Pantheon paths"
            var specs: [MeshSimTransferSpec] = []
            for k in 0..<50 {
                specs.append(
                    MeshSimTransferSpec(
                        start: 0.5 + Double(k) * 0.002, client: c, routes: all,
                        chunkBytes: chunkList(objectBytes: object, chunkBytes: chunk)))
            }
            probe.network = net
            probe.name = variant
            probe.summary = summary
            probe.transfers = specs
            probe.horizon = 300
            return probe
        default:
            return nil
        }
        probe.network = net
        probe.name = variant
        probe.summary = summary
        probe.transfers = poisson(
            rng: &rng, rate: rate, duration: duration, objectBytes: object, chunkBytes: chunk,
            choices: [(c, all)])
        probe.horizon = 300
        return probe
    }

    /// Three routes whose last hop replays a cellular downlink trace each.
    public static func cellular(traces: [MeshSimTrace], seed: UInt64) -> MeshSimScenario? {
        guard !traces.isEmpty else { return nil }
        var net = MeshSimNetwork()
        let s = net.node("S"), c = net.node("C")
        let delays = [0.040, 0.030, 0.050, 0.035, 0.045]
        for (k, tr) in traces.enumerated() {
            let relay = "cell\(k)"
            net.connect("S", relay, MeshSimLinkSpec(latency: 0.005, rate: 1000 * 125_000))
            let r = net.node(relay)
            // The trace is the downlink: relay → C. The uplink carries only requests.
            net.addDirected(r, c, MeshSimLinkSpec(latency: delays[k % delays.count], rate: 1, trace: tr))
            net.addDirected(c, r, MeshSimLinkSpec(latency: delays[k % delays.count], rate: 100 * 125_000))
        }
        let routes = net.disjointRoutes(from: s, to: c, k: traces.count, maxHops: 2)
        var sc = MeshSimScenario(name: "cellular", summary: "", network: net, routes: routes, transfers: [], horizon: 400)
        let caps = MeshSimRunner.routeCapacities(sc)
        var rng = MultipathRandom(seed: seed)
        let object = 2 << 20, chunk = 128 << 10
        let rate = load * caps.reduce(0, +) / Double(object)
        sc.transfers = poisson(
            rng: &rng, rate: rate, duration: 100, objectBytes: object, chunkBytes: chunk,
            choices: [(c, Array(routes.indices))])
        sc.summary =
            "\(traces.count) routes over cellular downlinks (\(traces.map(\.name).joined(separator: ", "))), "
            + "2 MiB objects at 50 % load for 100 s"
        return sc
    }

    /// Many clients on a large graph: objects held by 3 sources each, 2 disjoint routes per
    /// source; edges without a rate get one drawn log-uniformly in 10…100 Mbit/s from the seed.
    public static func graph(
        _ topo: MeshSimTopology, name: String, maxNodes: Int?, clients: Int, seed: UInt64,
        duration: Double = 30
    ) -> MeshSimScenario? {
        var rateRng = MultipathRandom(seed: seed ^ 0xED6E)
        var edges = topo.edges
        if let maxNodes { edges = subgraph(edges, maxNodes: maxNodes) }
        var rates: [Double] = []
        for _ in edges.indices { rates.append(125_000 * 10 * _exp(rateRng.unit() * _log(10))) }
        let net = MeshSimNetwork.from(MeshSimTopology(edges: edges), defaultRate: { rates[$0] })
        let n = net.names.count
        guard n >= 4 else { return nil }
        var rng = MultipathRandom(seed: seed)
        var routes: [[Int]] = []
        var choices: [(client: Int, routes: [Int])] = []
        var attempts = 0
        while choices.count < clients * 3 && attempts < clients * 50 {
            attempts += 1
            let client = rng.below(n)
            var rs: [Int] = []
            var sources = Set<Int>()
            while sources.count < 3 {
                let src = rng.below(n)
                if src != client { sources.insert(src) }
            }
            for src in sources.sorted() {
                for p in net.disjointRoutes(from: src, to: client, k: 2, maxHops: 6) {
                    rs.append(routes.count)
                    routes.append(p)
                }
            }
            if rs.count >= 2 { choices.append((client, rs)) }
        }
        guard !choices.isEmpty else { return nil }
        // Each client fetches its own objects (a client appears with up to three objects).
        var sc = MeshSimScenario(name: name, summary: "", network: net, routes: routes, transfers: [], horizon: 300)
        let caps = MeshSimRunner.routeCapacities(sc)
        let perChoice = choices.map { ch in ch.routes.map { caps[$0] }.reduce(0, +) }
        let object = 4 << 20, chunk = 256 << 10
        // Each client asks graphLoad of what its own routes can carry: a client on thin links
        // asks less, as a real one would (one drawing from the mean overloaded the thinnest
        // clients for every algorithm, and their queues were the p99).
        let rate = graphLoad * perChoice.reduce(0, +) / Double(object)
        sc.transfers = poisson(
            rng: &rng, rate: rate, duration: duration, objectBytes: object, chunkBytes: chunk,
            choices: choices, weights: perChoice)
        sc.summary =
            "\(n) nodes, \(edges.count) edges, \(Set(choices.map(\.client)).count) clients, objects on 3 sources, "
            + "\(sc.transfers.count) transfers of 4 MiB"
        return sc
    }

    /// The first `maxNodes` nodes reached breadth-first from the first edge's first node (edges
    /// in file order), and the edges among them.
    static func subgraph(_ edges: [MeshSimEdge], maxNodes: Int) -> [MeshSimEdge] {
        var adj: [String: [String]] = [:]
        for e in edges {
            adj[e.a, default: []].append(e.b)
            adj[e.b, default: []].append(e.a)
        }
        guard let root = edges.first?.a else { return [] }
        var keep: Set<String> = [root]
        var queue = [root]
        var head = 0
        while head < queue.count && keep.count < maxNodes {
            for v in adj[queue[head]] ?? [] where keep.count < maxNodes && !keep.contains(v) {
                keep.insert(v)
                queue.append(v)
            }
            head += 1
        }
        return edges.filter { keep.contains($0.a) && keep.contains($0.b) }
    }
}

/// Every algorithm on one scenario.
public struct MeshSimComparison: Sendable {
    public var scenario: String
    public var summary: String
    public var routeCapacity: [Double]
    /// ml_optimized, min_rtt, round_robin, best_single, oracle — in that order.
    public var results: [MeshSimResult]
    /// The oracle's split: exponent on capacity and number of routes kept.
    public var oracleSplit: String
    public var oracleCandidates: Int
    /// The p99 no scheduler can beat on this workload (MeshSimFloor): how much any scheduler can
    /// gain over another at the p99 is bounded by how far that one is above it.
    public var p99Floor: Double

    public func result(_ name: String) -> MeshSimResult? { results.first { $0.algorithm == name } }

    /// (mean completion − oracle's) / oracle's.
    public func regret(_ name: String) -> Double {
        guard let r = result(name), let o = result("oracle"), o.mean > 0 else { return 0 }
        return (r.mean - o.mean) / o.mean
    }

    /// Total variation distance between the share of bytes each route carried and its share of
    /// capacity: 0 is load exactly in proportion to capacity, 1 is everything on useless routes.
    public func loadSkew(_ name: String) -> Double {
        guard let r = result(name) else { return 0 }
        let total = Double(r.routeBytes.reduce(0, +)), cap = routeCapacity.reduce(0, +)
        guard total > 0, cap > 0 else { return 0 }
        var d = 0.0
        for i in r.routeBytes.indices { d += abs(Double(r.routeBytes[i]) / total - routeCapacity[i] / cap) }
        return d / 2
    }

    /// Runs ml_optimized, the baselines and the oracle search.
    public static func run(_ s: MeshSimScenario, seed: UInt64) -> MeshSimComparison {
        let caps = MeshSimRunner.routeCapacities(s)
        var results: [MeshSimResult] = []
        results.append(
            MeshSimRunner.run(s, seed: seed, algorithm: "ml_optimized") { client in
                var st = LearnerSettings()
                st.seed = seed &+ UInt64(client) &* 0x9E37_79B9
                return LearnerScheduler(settings: st)
            })
        results.append(MeshSimRunner.run(s, seed: seed, algorithm: "min_rtt") { _ in MinRTTScheduler() })
        results.append(MeshSimRunner.run(s, seed: seed, algorithm: "round_robin") { _ in RoundRobinScheduler() })
        results.append(MeshSimRunner.run(s, seed: seed, algorithm: "best_single") { _ in BestSingleScheduler() })
        // Oracle: the best fixed split in hindsight, among splits proportional to the routes'
        // true mean capacity raised to 0, 1 or 2, keeping the k best routes of each transfer.
        let maxRoutes = s.transfers.map(\.routes.count).max() ?? 1
        var best: MeshSimResult?
        var bestName = ""
        var candidates = 0
        for alpha in [0.0, 1.0, 2.0] {
            for k in 1...maxRoutes {
                var w: [MultipathRouteID: Double] = [:]
                for (i, c) in caps.enumerated() { w[MultipathRouteID(i)] = alpha == 0 ? 1 : (c / 1e6).magnitude.power(alpha) }
                candidates += 1
                var r = MeshSimRunner.run(s, seed: seed, algorithm: "oracle") { _ in FixedSplitScheduler(weights: w, topK: k) }
                r.algorithm = "oracle"
                if best == nil || r.mean < best!.mean {
                    best = r
                    bestName = "capacity^\(Int(alpha)), best \(k) route(s) per transfer"
                }
            }
        }
        results.append(best!)
        return MeshSimComparison(
            scenario: s.name, summary: s.summary, routeCapacity: caps, results: results,
            oracleSplit: bestName, oracleCandidates: candidates, p99Floor: MeshSimFloor.quantile(s, 0.99))
    }
}

extension Double {
    func power(_ e: Double) -> Double { e == 1 ? self : (e == 2 ? self * self : _exp(e * _log(self))) }
}
