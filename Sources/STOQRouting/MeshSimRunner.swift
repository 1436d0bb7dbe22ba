// The discrete-event loop: a simulated clock, one event heap ordered by (time, sequence), the
// multipath transfers of every client node driven exactly as a node drives them (poll, send,
// receive, deadlines), and link-state refreshes that hand every scheduler the features the mesh
// would advertise. No wall clock, no system randomness: same scenario and seed, same numbers.

/// One object fetch of a scenario.
public struct MeshSimTransferSpec: Sendable {
    /// When the fetch starts, seconds.
    public var start: Double
    /// The fetching node.
    public var client: Int
    /// Indices into the scenario's route table the object may come over.
    public var routes: [Int]
    /// Chunk sizes.
    public var chunkBytes: [Int]
    public init(start: Double, client: Int, routes: [Int], chunkBytes: [Int]) {
        self.start = start
        self.client = client
        self.routes = routes
        self.chunkBytes = chunkBytes
    }
}

/// A scenario: a network, its routes, a workload, and how the mesh advertises.
public struct MeshSimScenario: Sendable {
    public var name: String
    /// One line saying what it tests.
    public var summary: String
    public var network: MeshSimNetwork
    /// Route table: node paths from a source to a client (data direction).
    public var routes: [[Int]]
    public var transfers: [MeshSimTransferSpec]
    /// Transfers still running at this time count as finishing at it (and as incomplete).
    public var horizon: Double
    /// Link-state refresh period, seconds (routing.update_interval).
    public var refreshInterval: Double = 1
    /// A route through a failed node is withdrawn this long after the failure (missed probes).
    public var withdrawAfter: Double = 3
    /// Transfer settings (window, hedging) shared by every algorithm.
    public var transferSettings = MultipathTransferSettings()
}

/// What one algorithm did on one scenario.
public struct MeshSimResult: Sendable {
    public var algorithm: String
    /// Per transfer, in workload order, seconds.
    public var completion: [Double]
    /// Per transfer goodput, bit/s.
    public var goodput: [Double]
    public var incomplete: Int
    /// Verified bytes delivered per route of the route table.
    public var routeBytes: [Int]
    public var hedges: Int
    public var retries: Int
    public var duplicateBytes: Int
    public var events: Int
    /// The first client's scheduler estimates at the end (what `stoq mesh routes` shows).
    public var estimates: [MultipathRouteEstimate]

    /// Quantile of completion times (nearest rank).
    public func quantile(_ q: Double) -> Double { Self.quantile(completion, q) }
    public var mean: Double { completion.isEmpty ? 0 : completion.reduce(0, +) / Double(completion.count) }
    public var meanGoodputMbit: Double { goodput.isEmpty ? 0 : goodput.reduce(0, +) / Double(goodput.count) / 1e6 }

    /// Quantile of any sample (nearest rank).
    public static func quantile(_ xs: [Double], _ q: Double) -> Double {
        guard !xs.isEmpty else { return 0 }
        let s = xs.sorted()
        let rank = Int((q * Double(s.count)).rounded(.up)) - 1
        return s[min(max(rank, 0), s.count - 1)]
    }
}

/// Runs scenarios.
public enum MeshSimRunner {
    private enum Kind {
        case start(Int)
        case hop(copy: Int, hop: Int)
        case served(link: Int, copy: Int, hop: Int)
        case deliver(copy: Int)
        case poll(Int)
        case refresh
    }
    private struct Event {
        var time: Double
        var seq: Int
        var kind: Kind
    }
    private struct Copy {
        var transfer: Int
        var request: Int
        var route: Int
        var bytes: Int
        var cancelled = false
    }

    /// Ground-truth mean capacity of every route over the horizon (its slowest link), bytes/s.
    public static func routeCapacities(_ s: MeshSimScenario) -> [Double] {
        let links = s.network.links
        return s.routes.map { p in
            var cap = Double.infinity
            for h in 0..<(p.count - 1) {
                guard let l = s.network.link(p[h], p[h + 1]) else { return 0 }
                cap = min(cap, s.network.fresh(l).meanCapacity(horizon: s.horizon) * (1 - links[l].spec.loss))
            }
            return cap
        }
    }

    /// Runs the scenario with one scheduler per client node, made by `make(client)`.
    public static func run(
        _ s: MeshSimScenario, seed: UInt64, algorithm: String,
        make: (Int) -> any MultipathChunkScheduler
    ) -> MeshSimResult {
        var rng = MultipathRandom(seed: seed ^ 0x5EED_11E7)
        var links = s.network.links.indices.map { s.network.fresh($0) }
        let routeLinks: [[Int]] = s.routes.map { p in (0..<(p.count - 1)).map { s.network.link(p[$0], p[$0 + 1])! } }
        // One scheduler per client node, in order of first appearance (deterministic).
        var clientOf: [Int: Int] = [:]
        var schedulers: [any MultipathChunkScheduler] = []
        var budgets: [MultipathHedgeBudget] = []
        var clientRoutes: [[Int]] = []
        var clientNodes: [Int] = []
        for t in s.transfers where clientOf[t.client] == nil {
            clientOf[t.client] = schedulers.count
            schedulers.append(make(t.client))
            budgets.append(MultipathHedgeBudget(fraction: s.transferSettings.hedgeBudget))
            clientRoutes.append([])
            clientNodes.append(t.client)
        }
        for t in s.transfers {
            let c = clientOf[t.client]!
            for r in t.routes where !clientRoutes[c].contains(r) { clientRoutes[c].append(r) }
        }
        for c in clientRoutes.indices { clientRoutes[c].sort() }

        var heap = MeshSimHeap<Event>(less: { ($0.time, $0.seq) < ($1.time, $1.seq) })
        var seq = 0
        func push(_ time: Double, _ kind: Kind) {
            heap.push(Event(time: time, seq: seq, kind: kind))
            seq += 1
        }
        var transfers: [MultipathTransfer?] = Array(repeating: nil, count: s.transfers.count)
        var requestCopy: [[Int]] = Array(repeating: [], count: s.transfers.count)
        var pollAt = Array(repeating: Double.infinity, count: s.transfers.count)
        var finished = Array(repeating: -1.0, count: s.transfers.count)
        var active: [Int] = []
        var copies: [Copy] = []
        var routeBytes = Array(repeating: 0, count: s.routes.count)
        var remaining = s.transfers.count
        var events = 0

        for (i, t) in s.transfers.enumerated() { push(t.start, .start(i)) }
        push(0, .refresh)

        func features(route r: Int, now: Double) -> MultipathRouteFeatures? {
            let p = s.routes[r]
            for n in p {
                if let w = s.network.failures[n], w.contains(where: { now >= $0.from + s.withdrawAfter && now < $0.to }) {
                    return nil
                }
            }
            var rtt = 0.0, queue = 0.0, rate = Double.infinity
            for l in routeLinks[r] {
                let link = links[l]
                rtt += 2 * link.spec.latency
                queue += link.queueDelay(now: now)
                rate = min(rate, link.measuredRate(now: now))
            }
            var keep = 1.0
            for l in routeLinks[r] { keep *= 1 - links[l].parameters(at: now).loss }
            let firstQueue = links[routeLinks[r][0]].queueDelay(now: now)
            return MultipathRouteFeatures(
                rttMean: rtt + queue, rttVariance: (0.5 * queue) * (0.5 * queue), loss: 1 - keep,
                deliveryRate: rate, hopCount: p.count - 1, peerLoad: min(0.9, firstQueue))
        }

        func send(_ t: Int, _ reqs: [MultipathChunkRequest], now: Double) {
            for q in reqs {
                let r = q.route.rawValue
                let c = copies.count
                copies.append(Copy(transfer: t, request: q.request, route: r, bytes: q.bytes))
                while requestCopy[t].count <= q.request { requestCopy[t].append(-1) }
                requestCopy[t][q.request] = c
                // The request crosses the route backwards; it is lost if a node on it is down.
                var latency = 0.0
                var alive = true
                for l in routeLinks[r] { latency += links[l].spec.latency }
                for n in s.routes[r] where !s.network.isUp(n, at: now) { alive = false }
                if alive { push(now + latency, .hop(copy: c, hop: 0)) }
            }
        }

        var hopOf: [Int: Int] = [:]
        func startService(_ l: Int, now: Double) {
            while links[l].waitingHead < links[l].waiting.count {
                let c = links[l].waiting[links[l].waitingHead]
                links[l].waitingHead += 1
                if copies[c].cancelled {
                    links[l].queuedBytes -= copies[c].bytes
                    continue
                }
                links[l].busy = true
                let departure = links[l].serve(arrival: now, bytes: copies[c].bytes, rng: &rng)
                push(departure, .served(link: l, copy: c, hop: hopOf[c]!))
                if links[l].waitingHead > 256 && links[l].waitingHead * 2 > links[l].waiting.count {
                    links[l].waiting.removeFirst(links[l].waitingHead)
                    links[l].waitingHead = 0
                }
                return
            }
            links[l].busy = false
        }

        func poll(_ t: Int, now: Double) {
            guard var tr = transfers[t] else { return }
            let sched = schedulers[clientOf[s.transfers[t].client]!]
            let reqs = tr.poll(now: now, scheduler: sched)
            transfers[t] = tr
            send(t, reqs, now: now)
            if let deadline = tr.nextDeadline, deadline < pollAt[t] {
                // Never in the past: a deadline poll cannot act on is retried, not spun on.
                let d = max(deadline, now + 1e-6)
                pollAt[t] = d
                push(d, .poll(t))
            }
        }

        while remaining > 0, let e = heap.pop() {
            if e.time > s.horizon { break }
            events += 1
            let now = e.time
            switch e.kind {
            case .start(let t):
                let spec = s.transfers[t]
                transfers[t] = MultipathTransfer(
                    id: t, chunkBytes: spec.chunkBytes,
                    routes: spec.routes.map { MultipathRouteID($0) },
                    settings: s.transferSettings, budget: budgets[clientOf[spec.client]!])
                active.append(t)
                poll(t, now: now)
            case .poll(let t):
                if now >= pollAt[t] { pollAt[t] = .infinity }
                poll(t, now: now)
                // A failure it declared may have freed a window other transfers wait on.
                let client = s.transfers[t].client
                for u in active where u != t && s.transfers[u].client == client { poll(u, now: now) }
            case .refresh:
                for c in schedulers.indices {
                    var cands: [MultipathCandidate] = []
                    for r in clientRoutes[c] {
                        if let f = features(route: r, now: now) { cands.append(MultipathCandidate(id: MultipathRouteID(r), features: f)) }
                    }
                    schedulers[c].update(candidates: cands, now: now)
                }
                for t in active { poll(t, now: now) }
                push(now + s.refreshInterval, .refresh)
            case .hop(let c, let h):
                let copy = copies[c]
                if copy.cancelled { continue }
                let p = s.routes[copy.route]
                guard s.network.isUp(p[h], at: now), s.network.isUp(p[h + 1], at: now) else { continue }
                let l = routeLinks[copy.route][h]
                links[l].waiting.append(c)
                links[l].queuedBytes += copy.bytes
                hopOf[c] = h
                if !links[l].busy { startService(l, now: now) }
            case .served(let l, let c, let h):
                links[l].queuedBytes -= copies[c].bytes
                let copy = copies[c]
                let p = s.routes[copy.route]
                if !copy.cancelled && s.network.isUp(p[h], at: now) {
                    let arrival = now + links[l].spec.latency
                    if h + 2 == p.count { push(arrival, .deliver(copy: c)) } else { push(arrival, .hop(copy: c, hop: h + 1)) }
                }
                startService(l, now: now)
            case .deliver(let c):
                let copy = copies[c]
                if copy.cancelled { continue }
                let t = copy.transfer
                guard var tr = transfers[t] else { continue }
                guard s.network.isUp(s.routes[copy.route].last!, at: now) else { continue }
                let sched = schedulers[clientOf[s.transfers[t].client]!]
                let before = tr.completedChunks
                let cancelled = tr.receive(request: copy.request, verified: true, now: now, scheduler: sched)
                if tr.completedChunks > before { routeBytes[copy.route] += copy.bytes }
                for x in cancelled where x.request < requestCopy[t].count {
                    let k = requestCopy[t][x.request]
                    if k >= 0 { copies[k].cancelled = true }
                }
                transfers[t] = tr
                if tr.isComplete && finished[t] < 0 {
                    finished[t] = now
                    remaining -= 1
                    active.removeAll { $0 == t }
                }
                // The answer freed room on a route every transfer of this client shares.
                let client = s.transfers[t].client
                for u in active where s.transfers[u].client == client { poll(u, now: now) }
            }
        }

        var completion: [Double] = []
        var goodput: [Double] = []
        var incomplete = 0
        var hedges = 0, retries = 0, dup = 0
        for (i, spec) in s.transfers.enumerated() {
            var end = finished[i]
            if end < 0 {
                incomplete += 1
                end = s.horizon
            }
            let d = max(end - spec.start, 1e-9)
            completion.append(d)
            goodput.append(Double(spec.chunkBytes.reduce(0, +) * 8) / d)
            if let tr = transfers[i] {
                hedges += tr.hedges
                retries += tr.retries
                dup += tr.duplicateBytes
            }
        }
        let lastTime = s.transfers.map(\.start).max() ?? 0
        return MeshSimResult(
            algorithm: algorithm, completion: completion, goodput: goodput, incomplete: incomplete,
            routeBytes: routeBytes, hedges: hedges, retries: retries, duplicateBytes: dup, events: events,
            estimates: schedulers.first?.estimates(now: lastTime) ?? [])
    }
}
