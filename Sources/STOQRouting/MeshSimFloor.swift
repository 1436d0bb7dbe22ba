// The p99 no scheduler can beat: a lower bound on a scenario's p99 completion time from its
// arrivals and its routes' capacity alone. Bytes requested at or after t reach the client over
// the client's routes at no more than their summed capacity from t on, so when arrivals crowd
// into a window, the last of them cannot finish before the window's bytes have drained. When
// a scheduler is already near this floor, no other can be much faster at the p99, and a
// "−15 %" there measures nothing a scheduler controls. docs/multipath.md has the derivation.

/// Per client, the cumulative capacity of its routes on a time grid.
struct MeshSimCapacity {
    /// Grid step, seconds.
    static let step = 0.005
    /// cumulative[k]: bytes the routes can deliver in [0, k·step), summed over routes.
    var cumulative: [Double]

    /// Capacity of `routes` of `s` (each counted at its narrowest link; routes that share a
    /// link count it twice, which only lowers the floor).
    init(_ s: MeshSimScenario, routes: [Int]) {
        let bins = Int((s.horizon / Self.step).rounded(.up)) + 1
        var rate = [Double](repeating: 0, count: bins)
        for r in routes {
            let path = s.routes[r]
            var narrowest: MeshSimLink?
            var least = Double.infinity
            for h in 0..<(path.count - 1) {
                guard let l = s.network.link(path[h], path[h + 1]) else { continue }
                let link = s.network.fresh(l)
                let c = link.meanCapacity(horizon: s.horizon)
                if c < least { least = c; narrowest = link }
            }
            guard let link = narrowest else { continue }
            let failing = path.filter { s.network.failures[$0] != nil }
            for k in 0..<bins {
                let t0 = Double(k) * Self.step, t1 = t0 + Self.step
                // A node down for the whole bin carries nothing (checked at its ends and middle).
                let down = failing.contains { n in
                    [t0, (t0 + t1) / 2, t1 - 1e-9].allSatisfy { !s.network.isUp(n, at: $0) }
                }
                if down { continue }
                if let trace = link.spec.trace {
                    let n = trace.firstIndex(atOrAfter: t1) - trace.firstIndex(atOrAfter: t0)
                    rate[k] += Double(n * MeshSimTrace.packetBytes)
                } else {
                    // The larger rate and smaller loss of the bin's two ends: a change inside the
                    // bin can only be overestimated.
                    let a = link.parameters(at: t0), b = link.parameters(at: t1 - 1e-9)
                    rate[k] += max(a.rate, b.rate) * (1 - min(a.loss, b.loss)) * Self.step
                }
            }
        }
        cumulative = [0]
        cumulative.reserveCapacity(bins + 1)
        for k in 0..<bins { cumulative.append(cumulative[k] + rate[k]) }
    }

    /// The earliest time `bytes` requested at `t` can all have arrived, or a lower bound of it
    /// (to within one grid step); infinity if the routes cannot carry them before the horizon.
    func drained(from t: Double, bytes: Double) -> Double {
        let a = min(max(Int(t / Self.step), 0), cumulative.count - 1)
        let target = cumulative[a] + bytes
        var lo = a, hi = cumulative.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if cumulative[mid] < target { lo = mid + 1 } else { hi = mid }
        }
        if lo == cumulative.count { return .infinity }
        return max(t, Double(max(lo - 1, 0)) * Self.step)
    }
}

/// The scenario-wide floor of a quantile of completion times.
public enum MeshSimFloor {
    /// A lower bound on the nearest-rank quantile `q` of the scenario's completion times that
    /// holds for every scheduler: for every window of one client's consecutive arrivals, c of
    /// them finish no earlier than the rest of the window's bytes drain from its first arrival
    /// (the first finishers at best take the c−1 largest objects with them), measured from its
    /// last arrival. The quantile is at least x when, summed over clients, at least as many
    /// transfers as lie at or above the quantile are bound to take x.
    public static func quantile(_ s: MeshSimScenario, _ q: Double = 0.99) -> Double {
        let n = s.transfers.count
        guard n > 0 else { return 0 }
        // Transfers at or above the nearest-rank quantile.
        let need = n - Int((q * Double(n)).rounded(.up)) + 1
        var byClient: [Int: [MeshSimTransferSpec]] = [:]
        for t in s.transfers { byClient[t.client, default: []].append(t) }
        // best[c-1]: the longest time c transfers of the client are all bound to take.
        var claims: [[Double]] = []
        for client in byClient.keys.sorted() {
            let ts = byClient[client]!.sorted { $0.start < $1.start }
            let capacity = MeshSimCapacity(s, routes: Array(Set(ts.flatMap(\.routes))).sorted())
            var best = [Double](repeating: 0, count: need)
            for a in ts.indices {
                var total = 0.0, largest = 0.0
                for b in a..<ts.count {
                    let size = Double(ts[b].chunkBytes.reduce(0, +))
                    total += size
                    largest = max(largest, size)
                    let inWindow = b - a + 1
                    for c in 1...min(need, inWindow) {
                        let end = capacity.drained(from: ts[a].start, bytes: total - Double(c - 1) * largest)
                        let bound = min(end, s.horizon) - ts[b].start
                        if bound > best[c - 1] { best[c - 1] = bound }
                    }
                }
            }
            claims.append(best)
        }
        // The largest x that enough transfers, over all clients, are bound to reach.
        let candidates = Set(claims.flatMap { $0 }).sorted(by: >)
        for x in candidates where x > 0 {
            var count = 0
            for best in claims { count += best.lastIndex { $0 >= x }.map { $0 + 1 } ?? 0 }
            if count >= need { return x }
        }
        return 0
    }
}
