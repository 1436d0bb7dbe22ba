// The classic schedulers the learner is measured against, behind the same contract. They see
// the same link-state features and the same completions; what they do with them is the
// textbook rule, nothing tuned per scenario.

/// Bookkeeping every scheduler needs: the candidate routes in a stable order, bytes in flight
/// per route (all transfers) and per (transfer, route), and a discounted share of requests.
/// Arrays, never dictionary iteration, so decisions replay identically from a seed.
public class MultipathRouteBook {
    struct Route {
        var id: MultipathRouteID
        var features: MultipathRouteFeatures
        var active: Bool
        var inFlightBytes = 0
        var inFlightChunks = 0
        var share = 0.0
        /// Least RTT ever advertised: the propagation part, which sizes a window.
        var minRTT = Double.infinity
    }
    var routes: [Route] = []
    var index: [MultipathRouteID: Int] = [:]
    /// Requests in flight per transfer, one counter per route index.
    var perTransfer: [MultipathTransferID: [Int]] = [:]
    /// Half-life of the chunk share shown to operators, in requests.
    let shareDecay = 0.98

    public func update(candidates: [MultipathCandidate], now: Double) {
        for i in routes.indices { routes[i].active = false }
        for c in candidates {
            if let i = index[c.id] {
                routes[i].features = c.features
                routes[i].active = true
                routes[i].minRTT = min(routes[i].minRTT, c.features.rttMean)
            } else {
                index[c.id] = routes.count
                routes.append(Route(id: c.id, features: c.features, active: true, minRTT: c.features.rttMean))
                routeAdded(at: routes.count - 1, now: now)
            }
        }
    }

    /// Hook for subclasses that keep more per-route state.
    func routeAdded(at i: Int, now: Double) {}

    /// Forgets the routes withdrawn by the last `update` that have nothing in flight: their
    /// state goes for good, and an id that comes back later starts afresh. A long-running
    /// node calls it now and then, so that routes to holders long gone do not pile up.
    public func forgetWithdrawn() {
        let keep = routes.indices.filter { routes[$0].active || routes[$0].inFlightChunks > 0 }
        guard keep.count < routes.count else { return }
        routesKept(keep)
        routes = keep.map { routes[$0] }
        index = Dictionary(uniqueKeysWithValues: routes.indices.map { (routes[$0].id, $0) })
        perTransfer = perTransfer.mapValues { c in keep.map { $0 < c.count ? c[$0] : 0 } }.filter { $0.value.contains { $0 > 0 } }
    }

    /// Hook for subclasses that keep more per-route state: the entries of the routes at
    /// `kept` (ascending) stay, in that order; the rest go.
    func routesKept(_ kept: [Int]) {}

    /// The route indices a choice may use, in stable order.
    @inline(__always) func usable(_ i: Int, among: [MultipathRouteID]?, excluding: MultipathRouteID?) -> Bool {
        let r = routes[i]
        guard r.active, r.id != excluding else { return false }
        if let among { return among.contains(r.id) }
        return true
    }

    func inFlight(transfer: MultipathTransferID, route i: Int) -> Int {
        perTransfer[transfer].map { $0.count > i ? $0[i] : 0 } ?? 0
    }

    /// The window a baseline keeps on a route, over all transfers (every chunk request to a
    /// neighbour rides one QUIC connection, hence one congestion window): two bandwidth-delay
    /// products of the propagation RTT in chunks, at least two chunks.
    func window(route i: Int, bytes: Int) -> Int {
        let f = routes[i].features
        let bdp = f.deliveryRate * routes[i].minRTT
        return max(2, Int((2 * bdp / Double(max(1, bytes))).rounded(.up)))
    }

    /// True when the route's window has room for one more chunk.
    func hasRoom(route i: Int, bytes: Int) -> Bool { routes[i].inFlightChunks < window(route: i, bytes: bytes) }

    public func dispatched(transfer: MultipathTransferID, route: MultipathRouteID, bytes: Int, now: Double) {
        guard let i = index[route] else { return }
        routes[i].inFlightBytes += bytes
        routes[i].inFlightChunks += 1
        var counts = perTransfer[transfer] ?? []
        if counts.count < routes.count { counts += Array(repeating: 0, count: routes.count - counts.count) }
        counts[i] += 1
        perTransfer[transfer] = counts
        for j in routes.indices { routes[j].share *= shareDecay }
        routes[i].share += 1 - shareDecay
    }

    public func completed(_ c: MultipathCompletion, now: Double) {
        guard let i = index[c.route] else { return }
        routes[i].inFlightBytes = max(0, routes[i].inFlightBytes - c.bytes)
        routes[i].inFlightChunks = max(0, routes[i].inFlightChunks - 1)
        if var counts = perTransfer[c.transfer], counts.count > i {
            counts[i] = max(0, counts[i] - 1)
            if counts.allSatisfy({ $0 == 0 }) { perTransfer[c.transfer] = nil } else { perTransfer[c.transfer] = counts }
        }
    }

    /// Advertised RTT plus the time to drain what is queued on the route, plus this chunk.
    public func expectedDuration(route: MultipathRouteID, bytes: Int, now: Double) -> Double {
        guard let i = index[route] else { return 1 }
        let f = routes[i].features
        let rate = f.deliveryRate * (1 - f.loss)
        return f.rttMean + Double(routes[i].inFlightBytes + bytes) / rate
    }

    public func estimates(now: Double) -> [MultipathRouteEstimate] {
        routes.map { r in
            MultipathRouteEstimate(
                route: r.id, latency: r.features.rttMean, rate: r.features.deliveryRate,
                failureProbability: r.features.loss, inFlightBytes: r.inFlightBytes,
                chunkShare: r.share, evidence: 0)
        }
    }
}

/// MPTCP's default rule: the lowest advertised RTT among routes whose window has space.
public final class MinRTTScheduler: MultipathRouteBook, MultipathChunkScheduler {
    public var name: String { MultipathSchedulerKind.minRTT.rawValue }
    public override init() {}
    public func choose(
        transfer: MultipathTransferID, bytes: Int, backlog: Int, among: [MultipathRouteID]?,
        excluding: MultipathRouteID?, now: Double
    ) -> MultipathRouteID? {
        var best = -1
        for i in routes.indices where usable(i, among: among, excluding: excluding) {
            guard hasRoom(route: i, bytes: bytes) else { continue }
            if best < 0 || routes[i].features.rttMean < routes[best].features.rttMean { best = i }
        }
        return best < 0 ? nil : routes[best].id
    }
}

/// Routes in turn, skipping those whose window is full.
public final class RoundRobinScheduler: MultipathRouteBook, MultipathChunkScheduler {
    public var name: String { MultipathSchedulerKind.roundRobin.rawValue }
    private var next = 0
    public override init() {}
    /// The turn stays with the route that had it, or the next one kept.
    override func routesKept(_ kept: [Int]) { next = kept.firstIndex { $0 >= next } ?? 0 }
    public func choose(
        transfer: MultipathTransferID, bytes: Int, backlog: Int, among: [MultipathRouteID]?,
        excluding: MultipathRouteID?, now: Double
    ) -> MultipathRouteID? {
        let n = routes.count
        for k in 0..<n {
            let i = (next + k) % n
            guard usable(i, among: among, excluding: excluding),
                hasRoom(route: i, bytes: bytes)
            else { continue }
            next = (i + 1) % n
            return routes[i].id
        }
        return nil
    }
}

/// Every chunk on the single route with the highest advertised delivery rate (after loss);
/// a hedge goes to the next best.
public final class BestSingleScheduler: MultipathRouteBook, MultipathChunkScheduler {
    public var name: String { MultipathSchedulerKind.bestSingle.rawValue }
    public override init() {}
    public func choose(
        transfer: MultipathTransferID, bytes: Int, backlog: Int, among: [MultipathRouteID]?,
        excluding: MultipathRouteID?, now: Double
    ) -> MultipathRouteID? {
        var best = -1
        var bestRate = 0.0
        for i in routes.indices where usable(i, among: among, excluding: excluding) {
            let f = routes[i].features
            let rate = f.deliveryRate * (1 - f.loss)
            if best < 0 || rate > bestRate { best = i; bestRate = rate }
        }
        guard best >= 0, hasRoom(route: best, bytes: bytes) else { return nil }
        return routes[best].id
    }
}

/// A fixed split: chunks go to routes in proportion to given weights (smooth weighted round
/// robin over all transfers). The benchmark's oracle is the best such split in hindsight,
/// chosen by replaying the scenario with each candidate split.
public final class FixedSplitScheduler: MultipathRouteBook, MultipathChunkScheduler {
    public var name: String { MultipathSchedulerKind.fixedSplit.rawValue }
    private let weights: [MultipathRouteID: Double]
    private let topK: Int
    private var credit: [Double] = []

    /// Creates the split; routes missing from `weights` get none. `topK` keeps, for each
    /// choice, only the k heaviest usable routes (the oracle's "best k routes" splits).
    public init(weights: [MultipathRouteID: Double], topK: Int = .max) {
        self.weights = weights
        self.topK = max(1, topK)
    }

    override func routeAdded(at i: Int, now: Double) { credit.append(0) }
    override func routesKept(_ kept: [Int]) { credit = kept.map { credit[$0] } }

    public func choose(
        transfer: MultipathTransferID, bytes: Int, backlog: Int, among: [MultipathRouteID]?,
        excluding: MultipathRouteID?, now: Double
    ) -> MultipathRouteID? {
        var pool: [(w: Double, i: Int)] = []
        for i in routes.indices where usable(i, among: among, excluding: excluding) {
            let w = weights[routes[i].id] ?? 0
            if w > 0 { pool.append((w, i)) }
        }
        if pool.count > topK {
            pool.sort { $0.w != $1.w ? $0.w > $1.w : $0.i < $1.i }
            pool.removeLast(pool.count - topK)
        }
        if pool.isEmpty {
            // The split names no usable route (all withdrawn, or a hedge away from the only
            // one): fall back to the lowest RTT so the transfer still finishes.
            var best = -1
            for i in routes.indices where usable(i, among: among, excluding: excluding) {
                if best < 0 || routes[i].features.rttMean < routes[best].features.rttMean { best = i }
            }
            return best < 0 ? nil : routes[best].id
        }
        var total = 0.0
        var best = -1
        for (w, i) in pool {
            total += w
            credit[i] += w
            if best < 0 || credit[i] > credit[best] { best = i }
        }
        credit[best] -= total
        return routes[best].id
    }
}
