// The simulated network: directed links with propagation latency, a bottleneck served FIFO
// (fixed rate with scheduled changes, or a replayed Mahimahi trace), random loss, and nodes
// that fail. Chunks move hop by hop, store-and-forward, because a STOQ relay verifies every
// chunk before passing it on.

/// A directed link's parameters.
public struct MeshSimLinkSpec: Sendable {
    public var latency: Double  // one-way, seconds
    public var rate: Double  // bytes per second (ignored with a trace)
    public var loss: Double  // 0...1 per packet
    public var trace: MeshSimTrace?
    public init(latency: Double, rate: Double, loss: Double = 0, trace: MeshSimTrace? = nil) {
        self.latency = latency
        self.rate = rate
        self.loss = loss
        self.trace = trace
    }
}

/// A change of a link at a time (the degrading-path scenario).
public struct MeshSimLinkChange: Sendable {
    public var at: Double
    public var rate: Double
    public var loss: Double
}

struct MeshSimLink {
    var from: Int
    var to: Int
    var spec: MeshSimLinkSpec
    var changes: [MeshSimLinkChange] = []
    var freeAt = 0.0
    var cursor = 0
    /// Chunks waiting (copy ids, FIFO) and whether one is being served; a cancelled chunk is
    /// skipped when its turn comes, as a relay drops a stream its requester reset.
    var waiting: [Int] = []
    var waitingHead = 0
    var busy = false
    var queuedBytes = 0

    func parameters(at t: Double) -> (rate: Double, loss: Double) {
        var r = (spec.rate, spec.loss)
        for c in changes where c.at <= t { r = (c.rate, c.loss) }
        return r
    }

    /// Serves a chunk arriving at `arrival`; returns when its last byte has left (plus one
    /// recovery round if packets were lost, as the hop's QUIC connection retransmits them).
    mutating func serve(arrival: Double, bytes: Int, rng: inout MultipathRandom) -> Double {
        let packets = (bytes + MeshSimTrace.packetBytes - 1) / MeshSimTrace.packetBytes
        let (rate, loss) = parameters(at: arrival)
        var lost = 0
        if loss > 0 { for _ in 0..<packets where rng.unit() < loss { lost += 1 } }
        var departure: Double
        if let trace = spec.trace {
            let first = max(cursor, trace.firstIndex(atOrAfter: arrival))
            let last = first + packets + lost - 1
            departure = max(trace.time(last), arrival)
            cursor = last + 1
        } else {
            let start = max(arrival, freeAt)
            departure = start + Double((packets + lost) * MeshSimTrace.packetBytes) / rate
            freeAt = departure
        }
        if lost > 0 { departure += 2 * spec.latency }
        return departure
    }

    /// Queueing delay a probe sent now would see, seconds.
    func queueDelay(now: Double) -> Double { Double(queuedBytes) / measuredRate(now: now) }

    /// Capacity a measurement over the last second would report, bytes per second.
    func measuredRate(now: Double) -> Double {
        if let trace = spec.trace { return max(trace.meanRate(from: now - 1, to: now), 1500) }
        return parameters(at: now).rate
    }

    /// Mean capacity over [0, horizon), bytes per second (ground truth, for the oracle).
    func meanCapacity(horizon: Double) -> Double {
        if let trace = spec.trace { return trace.meanRate(from: 0, to: horizon) }
        var total = 0.0
        var t = 0.0
        var rate = spec.rate
        for c in changes where c.at < horizon {
            total += rate * (c.at - t) * (1 - spec.loss)
            t = c.at
            rate = c.rate
        }
        total += rate * (horizon - t)
        return total / horizon
    }
}

/// Nodes and directed links; routes are node paths from a source to a client.
public struct MeshSimNetwork: Sendable {
    /// Node names, by index.
    public private(set) var names: [String] = []
    var nameIndex: [String: Int] = [:]
    var links: [MeshSimLinkSpecEntry] = []
    var linkIndex: [Int: [(to: Int, link: Int)]] = [:]
    /// Failure windows per node: down in [from, to).
    var failures: [Int: [(from: Double, to: Double)]] = [:]

    struct MeshSimLinkSpecEntry: Sendable {
        var from: Int
        var to: Int
        var spec: MeshSimLinkSpec
        var changes: [MeshSimLinkChange]
    }

    public init() {}

    /// Node index of a name, adding the node if new.
    @discardableResult public mutating func node(_ name: String) -> Int {
        if let i = nameIndex[name] { return i }
        nameIndex[name] = names.count
        names.append(name)
        return names.count - 1
    }

    /// Index of an existing node.
    public func index(of name: String) -> Int? { nameIndex[name] }

    /// Adds a link in both directions (a later duplicate of an existing direction is ignored).
    public mutating func connect(_ a: String, _ b: String, _ spec: MeshSimLinkSpec) {
        let i = node(a), j = node(b)
        addDirected(i, j, spec)
        addDirected(j, i, spec)
    }

    /// Adds one direction only (a trace-driven downlink, say).
    public mutating func addDirected(_ i: Int, _ j: Int, _ spec: MeshSimLinkSpec) {
        if link(i, j) != nil { return }
        linkIndex[i, default: []].append((j, links.count))
        links.append(MeshSimLinkSpecEntry(from: i, to: j, spec: spec, changes: []))
    }

    /// Link `l` as the event loop runs it: idle, its scheduled changes included.
    func fresh(_ l: Int) -> MeshSimLink {
        var link = MeshSimLink(from: links[l].from, to: links[l].to, spec: links[l].spec)
        link.changes = links[l].changes
        return link
    }

    /// The link index from i to j.
    func link(_ i: Int, _ j: Int) -> Int? { linkIndex[i]?.first(where: { $0.to == j })?.link }

    /// Schedules a change of the link a→b (one direction).
    public mutating func change(_ a: String, _ b: String, at: Double, rateMbit: Double, lossPercent: Double) {
        guard let i = nameIndex[a], let j = nameIndex[b], let l = link(i, j) else { return }
        links[l].changes.append(MeshSimLinkChange(at: at, rate: rateMbit * 125_000, loss: lossPercent / 100))
        links[l].changes.sort { $0.at < $1.at }
    }

    /// Takes a node down during [from, to).
    public mutating func fail(_ name: String, from: Double, to: Double = .infinity) {
        guard let i = nameIndex[name] else { return }
        failures[i, default: []].append((from, to))
    }

    func isUp(_ node: Int, at t: Double) -> Bool {
        guard let w = failures[node] else { return true }
        return !w.contains { t >= $0.from && t < $0.to }
    }

    /// Builds a network from a topology file; edges without rate/loss get `defaultRate`
    /// (called with the edge's position so a scenario can draw it from a seeded stream).
    public static func from(_ topo: MeshSimTopology, defaultRate: (Int) -> Double) -> MeshSimNetwork {
        var net = MeshSimNetwork()
        for (k, e) in topo.edges.enumerated() {
            let rate = e.rateMbit.map { $0 * 125_000 } ?? defaultRate(k)
            net.connect(e.a, e.b, MeshSimLinkSpec(latency: e.latencyMs / 1000, rate: rate, loss: (e.lossPercent ?? 0) / 100))
        }
        return net
    }

    /// Up to `k` node-disjoint routes from `source` to `client`, shortest latency first
    /// (Dijkstra, then the inner nodes of each found route removed), at most `maxHops` hops.
    /// A stand-in for STOQRouting's disjoint routes that keeps the simulator self-contained.
    public func disjointRoutes(from source: Int, to client: Int, k: Int, maxHops: Int) -> [[Int]] {
        var banned = Set<Int>()
        var usedDirect = false
        var routes: [[Int]] = []
        for _ in 0..<k {
            guard
                let p = shortestPath(
                    from: source, to: client, banned: banned, maxHops: maxHops,
                    skipDirect: usedDirect)
            else { break }
            routes.append(p)
            if p.count == 2 { usedDirect = true }
            for n in p.dropFirst().dropLast() { banned.insert(n) }
        }
        return routes
    }

    private func shortestPath(from s: Int, to t: Int, banned: Set<Int>, maxHops: Int, skipDirect: Bool) -> [Int]? {
        // Hop-bounded Dijkstra over (node, hops) states, small heap of (dist, node, hops).
        let n = names.count
        var best = Array(repeating: Double.infinity, count: n * (maxHops + 1))
        var prev = Array(repeating: -1, count: n * (maxHops + 1))
        var heap = MeshSimHeap<(Double, Int, Int)>(less: { ($0.0, $0.1, $0.2) < ($1.0, $1.1, $1.2) })
        best[s * (maxHops + 1)] = 0
        heap.push((0, s, 0))
        while let (d, u, h) = heap.pop() {
            if d > best[u * (maxHops + 1) + h] { continue }
            if u == t {
                var path = [t]
                var state = u * (maxHops + 1) + h
                while prev[state] >= 0 { state = prev[state]; path.append(state / (maxHops + 1)) }
                return path.reversed()
            }
            guard h < maxHops, let out = linkIndex[u] else { continue }
            for (v, l) in out {
                if banned.contains(v) { continue }
                if skipDirect && u == s && v == t { continue }
                let nd = d + links[l].spec.latency
                let st = v * (maxHops + 1) + h + 1
                if nd < best[st] {
                    best[st] = nd
                    prev[st] = u * (maxHops + 1) + h
                    heap.push((nd, v, h + 1))
                }
            }
        }
        return nil
    }
}

/// A binary heap with an explicit order (deterministic: ties are ordered by the caller).
struct MeshSimHeap<T> {
    private var items: [T] = []
    private let less: (T, T) -> Bool
    init(less: @escaping (T, T) -> Bool) { self.less = less }
    var isEmpty: Bool { items.isEmpty }
    var count: Int { items.count }
    mutating func push(_ x: T) {
        items.append(x)
        var i = items.count - 1
        while i > 0 {
            let p = (i - 1) / 2
            guard less(items[i], items[p]) else { break }
            items.swapAt(i, p)
            i = p
        }
    }
    mutating func pop() -> T? {
        guard !items.isEmpty else { return nil }
        items.swapAt(0, items.count - 1)
        let top = items.removeLast()
        var i = 0
        while true {
            let l = 2 * i + 1, r = l + 1
            var m = i
            if l < items.count && less(items[l], items[m]) { m = l }
            if r < items.count && less(items[r], items[m]) { m = r }
            if m == i { break }
            items.swapAt(i, m)
            i = m
        }
        return top
    }
}
