import STOQCore

/// Which destinations of a route table get a link-disjoint backup route. Each backup costs one
/// more (target-pruned) search, so a 10,000-node simulator may want them only where it sends.
public enum BackupPolicy: Sendable, Equatable {
    /// No backups.
    case none
    /// A backup for every reachable destination.
    case all
    /// Backups for these destinations only.
    case only(Set<NodeID>)
}

/// Counters of the engine's work, for `/metrics` and for tests that check what was recomputed.
public struct RoutingEngineStats: Sendable, Equatable {
    /// Route tables computed from scratch.
    public var fullComputes: UInt64 = 0
    /// Cached tables kept across a link-state change that could not affect them.
    public var tablesKept: UInt64 = 0
    /// Cached tables dropped by a change that could affect them (recomputed when next asked).
    public var tablesInvalidated: UInt64 = 0
    /// Times the flat graph arrays were rebuilt (a link or node appeared).
    public var graphRebuilds: UInt64 = 0
    /// Backup-route searches run.
    public var backupSearches: UInt64 = 0
}

/// The mesh's routing engine: the link-state database, its flat graph, and route tables per
/// source, kept up to date incrementally.
///
/// Sans-IO: every call that depends on time takes `now`; nothing here reads a clock, sleeps,
/// or starts a thread. Not thread-safe: one owner (the mesh's control loop, or a simulator)
/// drives it; the `RouteTable`s it returns are immutable and may be read from any thread.
///
/// Incremental recompute (docs/routing.md): each link change is classified by its cost under
/// the current algorithm. A link that got dearer or vanished, and that no route of a cached
/// table uses, cannot change that table: the table is kept. Anything else (a cheaper link, a
/// new link, a used link getting dearer) drops the affected tables, which are recomputed only
/// when next asked, so a burst of adverts costs one recompute per table, not one per advert.
public final class RoutingEngine {
    /// Accepted adverts, refusals and their counters.
    public private(set) var database: LinkStateDatabase
    /// How routes are chosen. Changing it drops every cached table.
    public var algorithm: RoutingAlgorithm {
        didSet { if algorithm != oldValue { graphStale = true; dropAll() } }
    }
    /// No route has more links than this (1 … `HopLimitedSearch.hopLimit`).
    public var maxHops: Int {
        didSet {
            maxHops = min(max(maxHops, 1), HopLimitedSearch.hopLimit)
            if maxHops != oldValue { dropAll() }
        }
    }
    /// Which destinations get a backup route.
    public var backups: BackupPolicy {
        didSet { if backups != oldValue { dropAll() } }
    }
    /// Whether a link counts only when its peer's live advert lists the link back (OSPF's
    /// two-way check): one origin alone cannot make routes through links it claims to nodes
    /// that never said so, nor put nodes that never advertised into the graph. The mesh sets
    /// it; simulators whose adverts are all honest need not.
    public let requireTwoWay: Bool
    /// Work counters.
    public private(set) var stats = RoutingEngineStats()

    private var nodeIDs: [NodeID] = []
    private var index: [NodeID: Int32] = [:]
    private var graphStore = RoutingGraph(nodeIDs: [], edges: [])
    private var graphStale = true
    private var cache: [Int32: RouteTable] = [:]
    private let search = HopLimitedSearch()
    private let backupSearch = HopLimitedSearch()

    /// Creates an engine with an empty database.
    public init(
        algorithm: RoutingAlgorithm = .latency, maxHops: Int = 4, backups: BackupPolicy = .all,
        advertMaxAge: UInt64 = 60 * Nanos.second, maxLinksPerAdvert: Int = 1024, forgetAfter: UInt64? = nil,
        requireTwoWay: Bool = false
    ) {
        self.requireTwoWay = requireTwoWay
        self.algorithm = algorithm
        self.maxHops = min(max(maxHops, 1), HopLimitedSearch.hopLimit)
        self.backups = backups
        self.database = LinkStateDatabase(maxAge: advertMaxAge, maxLinksPerAdvert: maxLinksPerAdvert, forgetAfter: forgetAfter)
    }

    /// Applies an advert (see `LinkStateDatabase.apply`) and updates the cached routes.
    /// Throws, and counts in `database.refused`, when it is stale, duplicate, malformed or oversized.
    @discardableResult
    public func apply(_ advert: LinkStateAdvert, now: Timestamp) throws(LinkStateError) -> [LinkChange] {
        let changes = try database.apply(advert, now: now)
        absorb(changes, oneOrigin: true)
        return changes
    }

    /// Expires adverts older than their lifetime at `now` and forgets origins past the
    /// database's `forgetAfter`; returns both (sorted). Forgetting renumbers the graph's nodes,
    /// so that the ids of nodes long gone do not stay in it.
    @discardableResult
    public func expire(now: Timestamp) -> (expired: [NodeID], forgotten: [NodeID]) {
        let (gone, changes, forgotten) = database.expire(now: now)
        absorb(changes, oneOrigin: false)
        if !forgotten.isEmpty {
            nodeIDs.removeAll()
            index.removeAll()
            graphStale = true
            dropAll()
        }
        return (gone, forgotten)
    }

    /// The flat graph routes are computed on (rebuilt first if links were added).
    public var graph: RoutingGraph {
        refreshGraph()
        return graphStore
    }

    /// Routes from `source` to every node reachable in at most `maxHops` links. Cached: a table
    /// is recomputed only after a change that can affect it.
    public func routes(from source: NodeID) -> RouteTable {
        refreshGraph()
        guard let s = graphStore.index[source] else {
            return emptyTable(source: source)
        }
        if let t = cache[s] { return t }
        let t = compute(from: s)
        cache[s] = t
        return t
    }

    /// Computes the table for `source` from scratch, ignoring (and not touching) the cache.
    /// The reference the incremental path is tested against.
    public func computeFull(from source: NodeID) -> RouteTable {
        refreshGraph()
        guard let s = graphStore.index[source] else { return emptyTable(source: source) }
        return compute(from: s)
    }

    /// The primary route from `source` to `destination` and a link-disjoint backup, computed now
    /// whatever the backup policy. Nil when `destination` is unreachable within `maxHops`.
    public func disjointRoutes(from source: NodeID, to destination: NodeID) -> Route? {
        refreshGraph()
        guard let s = graphStore.index[source], let d = graphStore.index[destination], s != d else { return nil }
        search.run(graphStore, source: s, maxHops: maxHops, fewestHops: algorithm == .shortestPath, target: d)
        guard search.hops(d) > 0 else { return nil }
        let primary = search.path(to: d, graph: graphStore)
        let primaryCost = search.cost(d)
        let backup = backupPath(source: s, destination: d, primary: primary)
        return Route(
            destination: destination,
            primary: RoutePath(nodes: primary.map { graphStore.nodeIDs[Int($0)] }, cost: Double(primaryCost)),
            backup: backup.map { RoutePath(nodes: $0.nodes.map { graphStore.nodeIDs[Int($0)] }, cost: Double($0.cost)) })
    }

    // MARK: - Incremental maintenance

    /// `oneOrigin`: the changes are one advert's, so a peer's listing of a link back did not
    /// change with them (an expiry's batch may take two origins that listed each other).
    private func absorb(_ changes: [LinkChange], oneOrigin: Bool) {
        for c in changes {
            if graphStale { return dropAll() }
            if requireTwoWay {
                // One-sided (its peer does not list it back, now or before: one advert changes
                // one origin's links): in the graph neither before nor after, so nothing to
                // do. Two-way, a link that comes or goes also takes its reverse in or out.
                if oneOrigin && !database.lists(c.to, c.from) { continue }
                if c.old == nil || c.new == nil {
                    graphStale = true
                    return dropAll()
                }
            }
            guard let old = c.old, let u = graphStore.index[c.from], let v = graphStore.index[c.to],
                let e = graphStore.edge(from: u, to: v)
            else {
                // A new link (and maybe new nodes): the arrays change shape.
                graphStale = true
                return dropAll()
            }
            let wOld = graphStore.weights[Int(e)]
            let wNew = c.new.map { Float(LinkCost.weight($0, algorithm)) } ?? .infinity
            assert(wOld == Float(LinkCost.weight(old, algorithm)), "graph out of step with the database")
            if wNew == wOld { continue }
            graphStore.weights[Int(e)] = wNew
            if wNew < wOld {
                dropAll()
                continue
            }
            let word = Int(e) >> 6, bit = UInt64(1) << UInt64(Int(e) & 63)
            for (s, t) in cache {
                if t.usedEdges[word] & bit != 0 {
                    cache[s] = nil
                    stats.tablesInvalidated += 1
                } else {
                    stats.tablesKept += 1
                }
            }
        }
    }

    private func dropAll() {
        stats.tablesInvalidated += UInt64(cache.count)
        cache.removeAll(keepingCapacity: true)
    }

    private func refreshGraph() {
        guard graphStale else { return }
        var edges: [(from: Int32, to: Int32, weight: Float)] = []
        edges.reserveCapacity(database.linkCount)
        // Numbering kept across rebuilds, but not past twice what the database names: ids that
        // came and went (peers claimed once, nodes long gone) do not pile up in it.
        if nodeIDs.count > 2 * database.origins.count + 64 {
            nodeIDs.removeAll()
            index.removeAll()
        }
        func idx(_ id: NodeID) -> Int32 {
            if let i = index[id] { return i }
            let i = Int32(nodeIDs.count)
            nodeIDs.append(id)
            index[id] = i
            return i
        }
        // Origins in id order, links in peer order: the edge order (and so tie-breaking) depends
        // only on the database's content, never on the order adverts arrived in.
        for id in database.origins.keys.sorted() {
            let u = idx(id)
            for l in database.links(from: id) where !requireTwoWay || database.lists(l.peer, id) {
                edges.append((u, idx(l.peer), Float(LinkCost.weight(l.metrics, algorithm))))
            }
        }
        graphStore = RoutingGraph(nodeIDs: nodeIDs, edges: edges)
        graphStale = false
        stats.graphRebuilds += 1
        cache.removeAll()
    }

    // MARK: - Table construction

    private func emptyTable(source: NodeID) -> RouteTable {
        RouteTable(
            source: source, algorithm: algorithm, maxHops: maxHops, version: database.version, index: [:], nodeIDs: [],
            cost: [], paths: [], lengths: [], budgets: [], firstHopChoices: [], backupPaths: [], backupLengths: [], backupCost: [],
            usedEdges: [], reachable: [])
    }

    private func compute(from s: Int32) -> RouteTable {
        stats.fullComputes += 1
        let n = graphStore.nodeCount
        let stride = maxHops + 1
        search.run(graphStore, source: s, maxHops: maxHops, fewestHops: algorithm == .shortestPath)
        var used = [UInt64](repeating: 0, count: (graphStore.edgeCount + 63) / 64)
        var cost = [Float](repeating: .infinity, count: n)
        var lengths = [UInt8](repeating: 0, count: n)
        var reachable = [Int32](repeating: 0, count: n)
        // Zero-filled rather than uninitialised: a memset of (maxHops + 1) · 4 bytes per node is
        // a few µs on 10,000 nodes, and keeps every row defined.
        var paths = [Int32](repeating: 0, count: n * stride)
        // Not zero-filled: writeRoutes writes every reached node's row, and lookups read no
        // other (rows of unreached nodes are never read: their length is 0).
        let width = maxHops - 1
        // At least one element (never read), so that the buffer has an address.
        var budgets = [UInt16](unsafeUninitializedCapacity: max(n * width, 1)) { _, count in count = max(n * width, 1) }
        let firstEdge = Int(graphStore.offsets[Int(s)])
        let firstHopChoices = Array(graphStore.targets[firstEdge..<Int(graphStore.offsets[Int(s) + 1])])
        let reachedCount = cost.withUnsafeMutableBufferPointer { c in
            lengths.withUnsafeMutableBufferPointer { l in
                used.withUnsafeMutableBufferPointer { u in
                    paths.withUnsafeMutableBufferPointer { p in
                        reachable.withUnsafeMutableBufferPointer { r in
                            budgets.withUnsafeMutableBufferPointer { b in
                                search.writeRoutes(
                                    stride: stride, paths: p.baseAddress!, lengths: l.baseAddress!, costs: c.baseAddress!,
                                    used: u.baseAddress!, reachable: r.baseAddress!, budgets: b.baseAddress!,
                                    firstEdge: firstEdge)
                            }
                        }
                    }
                }
            }
        }
        reachable.removeLast(n - reachedCount)

        // No copy of graphStore may be alive here: backupPath writes its weights in place, and a
        // live copy would make every backup search copy the whole weight array.
        let ids = graphStore.nodeIDs
        let wanted: (Int32) -> Bool
        switch backups {
        case .none: wanted = { _ in false }
        case .all: wanted = { _ in true }
        case .only(let set): wanted = { set.contains(ids[Int($0)]) }
        }
        var backupPaths: [Int32] = []
        var backupLengths = [UInt8](repeating: 0, count: n)
        var backupCost: [Float] = []
        if backups != .none {
            backupPaths = [Int32](repeating: 0, count: n * stride)
            backupCost = [Float](repeating: .infinity, count: n)
            for v in reachable where wanted(v) {
                let row = Int(v) * stride
                let primary = Array(paths[row..<row + Int(lengths[Int(v)])])
                guard let b = backupPath(source: s, destination: v, primary: primary) else { continue }
                backupCost[Int(v)] = b.cost
                backupLengths[Int(v)] = UInt8(b.nodes.count)
                for (i, x) in b.nodes.enumerated() { backupPaths[row + i] = x }
                for e in b.edges { used[Int(e) >> 6] |= UInt64(1) << UInt64(Int(e) & 63) }
            }
        }
        return RouteTable(
            source: ids[Int(s)], algorithm: algorithm, maxHops: maxHops, version: database.version,
            index: graphStore.index, nodeIDs: ids, cost: cost, paths: paths, lengths: lengths,
            budgets: budgets, firstHopChoices: firstHopChoices, backupPaths: backupPaths, backupLengths: backupLengths, backupCost: backupCost,
            usedEdges: used, reachable: reachable)
    }

    /// The best route of ≤ maxHops links from s to d that uses no link of `primary` in either
    /// direction (a cut neighbour connection takes both directions down). Remove-and-recompute:
    /// the primary's links are priced out, one target-pruned search runs, the prices come back.
    private func backupPath(source s: Int32, destination d: Int32, primary: [Int32]) -> (nodes: [Int32], cost: Float, edges: [Int32])? {
        guard primary.count >= 2 else { return nil }
        var banned: [(Int32, Float)] = []
        banned.reserveCapacity(2 * primary.count)
        for i in 0..<(primary.count - 1) {
            if let e = graphStore.edge(from: primary[i], to: primary[i + 1]) { banned.append((e, graphStore.weights[Int(e)])) }
            if let r = graphStore.edge(from: primary[i + 1], to: primary[i]) { banned.append((r, graphStore.weights[Int(r)])) }
        }
        for (e, _) in banned { graphStore.weights[Int(e)] = .infinity }
        defer { for (e, w) in banned.reversed() { graphStore.weights[Int(e)] = w } }
        stats.backupSearches += 1
        backupSearch.run(graphStore, source: s, maxHops: maxHops, fewestHops: algorithm == .shortestPath, target: d)
        guard backupSearch.hops(d) > 0 else { return nil }
        var edges: [Int32] = []
        backupSearch.appendEdgesReversed(to: d, graph: graphStore, into: &edges)
        edges.reverse()
        var nodes: [Int32] = [s]
        for e in edges { nodes.append(graphStore.targets[Int(e)]) }
        return (nodes, backupSearch.cost(d), edges)
    }
}
