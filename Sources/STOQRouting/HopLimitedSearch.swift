/// The best route of at most `maxHops` links from one source to every node: a Bellman–Ford
/// relaxation by hop layers that expands, in layer k, only the nodes whose cost improved in
/// layer k−1 (the frontier), with the costs they had at the end of layer k−1.
///
/// Why not Dijkstra: Dijkstra's label for a node is the cheapest route of any length; a route
/// capped at `maxHops` can be dearer than that label and is not found by it. The layered search
/// is exact for the cap, and on the mesh's small-world graphs (degree ~30, 10,000 nodes) its
/// frontiers stay small until the last layer, whose improvements are never expanded.
///
/// Cost per run: O(Σ over layers of the frontier's out-degree) ≤ O(maxHops · E), no heap, no
/// allocation: every buffer is owned here and reused (sized on first use, grown when a larger
/// graph comes). Results stay readable until the next `run`.
///
/// Not thread-safe: one instance per thread.
public final class HopLimitedSearch {
    private var capacity = 0
    private var layerCapacity = 0
    private var dist: UnsafeMutablePointer<Float>
    private var mask: UnsafeMutablePointer<UInt64>
    /// `parent[k * capacity + v]`: the edge that gave v its cost in layer k, in the low 32 bits,
    /// and that edge's tail in the high 32 (one load per step when routes are written out;
    /// the tail from `graph.sources` would be a second random read). Valid where bit k
    /// of `mask[v]` is set). Per layer, because a node's route of ≤ k hops and its route of
    /// ≤ k+1 hops may differ, and a longer route may pass through it at hop k.
    private var parent: UnsafeMutablePointer<UInt64>
    private var touched: UnsafeMutablePointer<Int32>
    private var frontier: UnsafeMutablePointer<Int32>
    private var frontierCost: UnsafeMutablePointer<Float>
    private var next: UnsafeMutablePointer<Int32>
    private var pullNode: UnsafeMutablePointer<Int32>
    private var pullCost: UnsafeMutablePointer<Float>
    private var pullParent: UnsafeMutablePointer<UInt64>
    private var touchedCount = 0

    /// Source of the last run.
    public private(set) var source: Int32 = -1
    /// Hop cap of the last run.
    public private(set) var maxHops = 0
    /// Edge relaxations done by the last run (the work measure of docs/routing.md).
    public private(set) var relaxations = 0

    /// Largest supported hop cap (layers are bits of a 64-bit mask).
    public static let hopLimit = 63

    /// Creates a search with empty buffers.
    public init() {
        dist = .allocate(capacity: 1)
        mask = .allocate(capacity: 1)
        parent = .allocate(capacity: 1)
        touched = .allocate(capacity: 1)
        frontier = .allocate(capacity: 1)
        frontierCost = .allocate(capacity: 1)
        next = .allocate(capacity: 1)
        pullNode = .allocate(capacity: 1)
        pullCost = .allocate(capacity: 1)
        pullParent = .allocate(capacity: 1)
    }

    deinit {
        dist.deallocate(); mask.deallocate(); parent.deallocate(); touched.deallocate()
        frontier.deallocate(); frontierCost.deallocate(); next.deallocate()
        pullNode.deallocate(); pullCost.deallocate(); pullParent.deallocate()
    }

    private func reserve(nodes n: Int, layers: Int) {
        if n > capacity {
            dist.deallocate(); mask.deallocate(); touched.deallocate()
            frontier.deallocate(); frontierCost.deallocate(); next.deallocate()
            dist = .allocate(capacity: n); dist.initialize(repeating: .infinity, count: n)
            mask = .allocate(capacity: n); mask.initialize(repeating: 0, count: n)
            touched = .allocate(capacity: n)
            frontier = .allocate(capacity: n)
            frontierCost = .allocate(capacity: n)
            next = .allocate(capacity: n)
            pullNode.deallocate(); pullCost.deallocate(); pullParent.deallocate()
            pullNode = .allocate(capacity: n + 1)
            pullCost = .allocate(capacity: n + 1)
            pullParent = .allocate(capacity: n + 1)
            capacity = n
            touchedCount = 0
            layerCapacity = 0
        }
        if layers > layerCapacity {
            parent.deallocate()
            parent = .allocate(capacity: capacity * (layers + 1))
            layerCapacity = layers
        }
    }

    /// Computes the best route of at most `maxHops` links from `source` to every node of `graph`.
    ///
    /// - fewestHops: order routes by hop count first, cost second (`shortest_path`); otherwise by
    ///   cost alone.
    /// - target: when ≥ 0, only the route to `target` is wanted: branches that cannot beat its
    ///   current cost are cut (and, with `fewestHops`, the search stops at its layer). Costs of
    ///   other nodes are then upper bounds only.
    public func run(_ graph: RoutingGraph, source: Int32, maxHops: Int, fewestHops: Bool, target: Int32 = -1) {
        let n = graph.nodeCount
        let hops = min(max(maxHops, 0), Self.hopLimit)
        reserve(nodes: max(n, 1), layers: hops)
        for i in 0..<touchedCount {
            let v = Int(touched[i])
            dist[v] = .infinity
            mask[v] = 0
        }
        touchedCount = 0
        self.source = source
        self.maxHops = hops
        relaxations = 0
        guard source >= 0 && Int(source) < n else { self.source = -1; return }
        dist[Int(source)] = 0
        mask[Int(source)] = 1
        touched[0] = source
        touchedCount = 1
        frontier[0] = source
        frontierCost[0] = 0
        var frontierCount = 1
        let cap = capacity
        let dist = self.dist, mask = self.mask, parent = self.parent
        let pullNode = self.pullNode, pullCost = self.pullCost, pullParent = self.pullParent
        let touched = self.touched, nextBuf = self.next
        var touchedCount = self.touchedCount
        var relaxed = 0
        graph.offsets.withUnsafeBufferPointer { off in
            graph.targets.withUnsafeBufferPointer { tgt in
                graph.weights.withUnsafeBufferPointer { w in
                    let off = off.baseAddress!, tgt = tgt.baseAddress!, w = w.baseAddress!
                    var k = 1
                    while k <= hops && frontierCount > 0 {
                        if target >= 0 && k >= hops - 1 {
                            // One destination, last two layers: only the target's in-neighbours (layer
                            // hops−1) and the target (layer hops) can still matter. Pull their in-edges
                            // from the previous layer's frontier — O(Σ in-degree) — instead of pushing
                            // the frontier's whole out-degree, which is most of a search's work.
                            let t = Int(target)
                            if fewestHops && mask[t] != 0 { break }
                            let bit: UInt64 = 1 << UInt64(k)
                            var count = 0
                            graph.inOffsets.withUnsafeBufferPointer { io in
                                graph.inEdges.withUnsafeBufferPointer { ie in
                                    graph.sources.withUnsafeBufferPointer { src in
                                        if k < hops {
                                            for i in Int(io[t])..<Int(io[t + 1]) { pullNode[count] = src[Int(ie[i])]; count &+= 1 }
                                        }
                                        pullNode[count] = target
                                        count &+= 1
                                        // Candidates first, writes after: every read sees costs of ≤ k−1 hops.
                                        for j in 0..<count {
                                            let x = Int(pullNode[j])
                                            pullParent[j] = .max
                                            if fewestHops && mask[x] & (bit &- 1) != 0 { continue }
                                            var best = dist[x]
                                            for i in Int(io[x])..<Int(io[x + 1]) {
                                                let e = Int(ie[i])
                                                let u = Int(src[e])
                                                // Only the last frontier: a node that last improved earlier was
                                                // expanded then (or cut, as no better than the target).
                                                guard mask[u] & (bit >> 1) != 0 else { continue }
                                                relaxed &+= 1
                                                let nd = dist[u] + w[e]
                                                if nd < best {
                                                    best = nd
                                                    pullParent[j] = UInt64(UInt32(truncatingIfNeeded: u)) << 32 | UInt64(UInt32(truncatingIfNeeded: e))
                                                }
                                            }
                                            pullCost[j] = best
                                        }
                                    }
                                }
                            }
                            var improved = 0
                            for j in 0..<count where pullParent[j] != .max {
                                let x = Int(pullNode[j])
                                dist[x] = pullCost[j]
                                parent[k * cap + x] = pullParent[j]
                                let m = mask[x]
                                if m == 0 { touched[touchedCount] = pullNode[j]; touchedCount &+= 1 }
                                mask[x] = m | bit
                                improved &+= 1
                            }
                            // The next (last) layer pulls again; it needs only the layer bits.
                            frontierCount = improved
                            k += 1
                            continue
                        }
                        let bit: UInt64 = 1 << UInt64(k)
                        let earlier = bit &- 1
                        let last = k == hops
                        let layerParent = parent + k * cap
                        var nextCount = 0
                        for i in 0..<frontierCount {
                            let u = Int(frontier[i])
                            let du = frontierCost[i]
                            let tail = UInt64(UInt32(truncatingIfNeeded: u)) << 32
                            if target >= 0 && !fewestHops && du >= dist[Int(target)] { continue }
                            let end = Int(off[u + 1])
                            var e = Int(off[u])
                            relaxed &+= end &- e
                            while e < end {
                                let v = Int(tgt[e])
                                let nd = du + w[e]
                                if nd < dist[v] {
                                    let m = mask[v]
                                    if !fewestHops || m & earlier == 0 {
                                        dist[v] = nd
                                        layerParent[v] = tail | UInt64(UInt32(truncatingIfNeeded: e))
                                        if m & bit == 0 {
                                            if m == 0 { touched[touchedCount] = Int32(truncatingIfNeeded: v); touchedCount &+= 1 }
                                            mask[v] = m | bit
                                            if !last { nextBuf[nextCount] = Int32(truncatingIfNeeded: v); nextCount &+= 1 }
                                        }
                                    }
                                }
                                e &+= 1
                            }
                        }
                        // The next layer expands the nodes improved in this one, at this layer's cost.
                        if nextCount > n >> 4 {
                            // A large frontier is taken in index order (a scan of the layer bits), so
                            // its adjacency rows are read in address order: the edge arrays stream
                            // instead of being read in the order nodes happened to improve.
                            var j = 0
                            for v in 0..<n where mask[v] & bit != 0 {
                                frontier[j] = Int32(truncatingIfNeeded: v)
                                frontierCost[j] = dist[v]
                                j &+= 1
                            }
                        } else {
                            for i in 0..<nextCount {
                                let v = nextBuf[i]
                                frontier[i] = v
                                frontierCost[i] = dist[Int(v)]
                            }
                        }
                        frontierCount = nextCount
                        if fewestHops && target >= 0 && mask[Int(target)] != 0 { break }
                        k += 1
                    }
                }
            }
        }
        self.touchedCount = touchedCount
        relaxations = relaxed
    }

    /// Cost of the best route found to `v` (`.infinity` when none of ≤ maxHops links).
    @inline(__always)
    public func cost(_ v: Int32) -> Float {
        guard v >= 0 && Int(v) < capacity && source >= 0 else { return .infinity }
        return dist[Int(v)]
    }

    /// Links on the best route to `v` (0 for the source, -1 when unreachable).
    @inline(__always)
    public func hops(_ v: Int32) -> Int {
        guard v >= 0 && Int(v) < capacity && source >= 0 else { return -1 }
        let m = mask[Int(v)]
        return m == 0 ? -1 : 63 - m.leadingZeroBitCount
    }

    /// Nodes reached by the last run, the source first, in order of first reach.
    public var reachedNodes: UnsafeBufferPointer<Int32> {
        UnsafeBufferPointer(start: touched, count: touchedCount)
    }

    /// Appends the edge indices of the best route to `v`, last edge first. Returns the number
    /// appended (0 for the source or an unreachable node).
    @discardableResult
    public func appendEdgesReversed(to v: Int32, graph: RoutingGraph, into out: inout [Int32]) -> Int {
        var h = hops(v)
        guard h > 0 else { return 0 }
        var node = Int(v)
        var count = 0
        while h > 0 {
            let pe = parent[h * capacity + node]
            out.append(Int32(truncatingIfNeeded: pe))
            count += 1
            let u = Int(pe >> 32)
            // u's cost when it was expanded for layer h: its last improvement before layer h.
            let below = mask[u] & ((1 << UInt64(h)) &- 1)
            h = below == 0 ? 0 : 63 - below.leadingZeroBitCount
            node = u
        }
        return count
    }

    /// Writes every reached node's route in fixed-stride rows: row v of `paths` (stride
    /// `maxHops + 1`) holds the route's nodes, source first, `lengths[v]` of them (0 for the
    /// source and unreached nodes, whose rows are left alone); `costs[v]` its cost; every edge
    /// used gets its bit set in `used`. `reachable` receives the reached nodes but the source,
    /// in order of first reach; returns their count.
    ///
    /// Row v of `budgets` (width `maxHops − 1`) holds, at column j − 1, the first hop of the best
    /// route to v of at most j links (j < maxHops), as its edge's place among the source's
    /// (edge index − `firstEdge`; `noSlot` when v has no route that short, or past 65,534
    /// edges): what a relay whose request has already come `maxHops − j` hops sends it on. That
    /// route is the one of the last layer ≤ j that improved v, so a walk down from each earlier
    /// layer that improved v gives it; its edges count as used too. Two bytes a budget, not a
    /// node index's four: the table's new pages cost more than the walks.
    ///
    /// One pass over the reached nodes, O(reached · maxHops²) at worst (a walk per layer a node
    /// improved in), no allocation. Only after a full run (no `target`).
    func writeRoutes(
        stride: Int, paths: UnsafeMutablePointer<Int32>, lengths: UnsafeMutablePointer<UInt8>,
        costs: UnsafeMutablePointer<Float>, used: UnsafeMutablePointer<UInt64>, reachable: UnsafeMutablePointer<Int32>,
        budgets: UnsafeMutablePointer<UInt16>, firstEdge: Int
    ) -> Int {
        precondition(stride > maxHops)
        let cap = capacity, mask = self.mask, parent = self.parent, dist = self.dist, src = source, width = maxHops - 1
        @inline(__always) func slot(_ e: Int) -> UInt16 { e &- firstEdge < Int(Self.noSlot) ? UInt16(truncatingIfNeeded: e &- firstEdge) : Self.noSlot }
        var count = 0
        for i in 0..<touchedCount {
            let v = Int(touched[i])
            if Int32(v) == src { continue }
            let m = mask[v]
            let hv = 63 - m.leadingZeroBitCount
            var h = hv
            let row = paths + v * stride
            lengths[v] = UInt8(truncatingIfNeeded: h + 1)
            costs[v] = dist[v]
            reachable[count] = Int32(truncatingIfNeeded: v)
            count &+= 1
            var node = v
            var firstEdgeUsed = 0
            // A node improved in layer h was reached from one improved in layer h−1 (the
            // frontier), so the walk steps down one layer per link: no mask reads needed.
            while h > 0 {
                row[h] = Int32(truncatingIfNeeded: node)
                let pe = parent[h * cap + node]
                let e = Int(pe & 0xFFFF_FFFF)
                used[e >> 6] |= UInt64(1) << UInt64(e & 63)
                firstEdgeUsed = e
                node = Int(pe >> 32)
                h -= 1
            }
            row[0] = src
            guard width > 0 else { continue }
            let budget = budgets + v * width
            var hop = Self.noSlot
            var j = 1
            var earlier = m & ((1 << UInt64(hv)) &- 1) & ~1
            while earlier != 0 {
                let k = earlier.trailingZeroBitCount
                earlier &= earlier &- 1
                while j < k { budget[j &- 1] = hop; j &+= 1 }
                var x = v
                var l = k
                while true {
                    let pe = parent[l * cap + x]
                    let e = Int(pe & 0xFFFF_FFFF)
                    used[e >> 6] |= UInt64(1) << UInt64(e & 63)
                    if l == 1 {
                        hop = slot(e)
                        break
                    }
                    x = Int(pe >> 32)
                    l -= 1
                }
            }
            while j < hv { budget[j &- 1] = hop; j &+= 1 }
            let best = slot(firstEdgeUsed)
            while j <= width { budget[j &- 1] = best; j &+= 1 }
        }
        return count
    }

    /// In `writeRoutes`' budgets: no route within the budget.
    static let noSlot = UInt16.max

    /// The best route to `v` as dense node indices, source first; empty when unreachable.
    public func path(to v: Int32, graph: RoutingGraph) -> [Int32] {
        if hops(v) < 0 { return [] }
        var edges: [Int32] = []
        appendEdgesReversed(to: v, graph: graph, into: &edges)
        var nodes: [Int32] = [source]
        for e in edges.reversed() { nodes.append(graph.targets[Int(e)]) }
        return nodes
    }
}
