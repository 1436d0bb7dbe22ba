import STOQCore

/// One route: the nodes from the source to the destination, and its cost.
public struct RoutePath: Sendable, Equatable {
    /// Source first, destination last.
    public var nodes: [NodeID]
    /// Sum of the link costs under the table's algorithm (for `shortest_path`, the summed RTT
    /// that breaks ties between routes of equally few hops).
    public var cost: Double

    /// Creates a path.
    public init(nodes: [NodeID], cost: Double) {
        self.nodes = nodes
        self.cost = cost
    }

    /// Number of links.
    public var hops: Int { max(nodes.count - 1, 0) }
    /// The neighbour to send to (the destination itself for a one-hop route).
    public var nextHop: NodeID? { nodes.count > 1 ? nodes[1] : nil }
}

/// The decision for one destination: the primary route, and a link-disjoint backup when the
/// graph has one within `maxHops` (and the table was asked to compute backups).
public struct Route: Sendable, Equatable {
    /// Where the route goes.
    public var destination: NodeID
    /// The best route of at most `maxHops` links.
    public var primary: RoutePath
    /// A route sharing no link (in either direction) with `primary`, or nil.
    public var backup: RoutePath?

    /// The neighbour to send to.
    public var nextHop: NodeID { primary.nodes[1] }
}

/// Immutable routes from one source to every reachable node: the snapshot fetchers and workers
/// read (any thread) while the engine computes the next one. Every lookup is O(1): a hash of
/// the destination, then array reads (a path has at most `maxHops` + 1 nodes).
public final class RouteTable: Sendable {
    /// Where every route starts.
    public let source: NodeID
    /// How the routes were chosen.
    public let algorithm: RoutingAlgorithm
    /// No route has more links than this.
    public let maxHops: Int
    /// The link-state database version the table was computed from.
    public let version: UInt64

    let index: [NodeID: Int32]
    let nodeIDs: [NodeID]
    /// Row length of `paths` and `backupPaths`: maxHops + 1.
    let stride: Int
    let cost: [Float]
    /// Row v (`v * stride ..< v * stride + lengths[v]`): the route to v, source first.
    /// `lengths[v]` is 0 when v is unreachable or the source.
    let paths: [Int32]
    let lengths: [UInt8]
    /// Row v (width maxHops − 1), column j − 1: the first hop of the best route to v of at most
    /// j links (j < maxHops), as an index into `firstHopChoices`; `HopLimitedSearch.noSlot`
    /// when none is that short. Valid where `lengths[v]` ≥ 2.
    let budgets: [UInt16]
    /// The source's neighbours in the graph's edge order (dense indices).
    let firstHopChoices: [Int32]
    let backupPaths: [Int32]
    let backupLengths: [UInt8]
    let backupCost: [Float]
    /// Bit per edge index of the graph the table came from: the links some route (primary or
    /// backup) uses. A link off this set getting dearer or vanishing changes nothing here.
    let usedEdges: [UInt64]
    /// Destinations with a route, by dense index, in order of first reach.
    let reachable: [Int32]

    init(
        source: NodeID, algorithm: RoutingAlgorithm, maxHops: Int, version: UInt64, index: [NodeID: Int32], nodeIDs: [NodeID],
        cost: [Float], paths: [Int32], lengths: [UInt8], budgets: [UInt16], firstHopChoices: [Int32], backupPaths: [Int32],
        backupLengths: [UInt8], backupCost: [Float], usedEdges: [UInt64], reachable: [Int32]
    ) {
        self.source = source; self.algorithm = algorithm; self.maxHops = maxHops; self.version = version
        self.index = index; self.nodeIDs = nodeIDs; self.stride = maxHops + 1; self.cost = cost
        self.paths = paths; self.lengths = lengths; self.budgets = budgets; self.firstHopChoices = firstHopChoices
        self.backupPaths = backupPaths; self.backupLengths = backupLengths; self.backupCost = backupCost
        self.usedEdges = usedEdges; self.reachable = reachable
    }

    /// Number of destinations with a route (the source excluded).
    public var count: Int { reachable.count }

    /// Destinations with a route, in order of their dense index.
    public var destinations: [NodeID] { reachable.map { nodeIDs[Int($0)] } }

    /// The neighbour to send to for `destination`, or nil when there is no route. No allocation.
    @inline(__always)
    public func nextHop(to destination: NodeID) -> NodeID? {
        guard let v = index[destination], lengths[Int(v)] >= 2 else { return nil }
        return nodeIDs[Int(paths[Int(v) * stride + 1])]
    }

    /// The neighbour to send to for `destination` on the best route of at most `hops` links, or
    /// nil when there is none that short. A relay asks this with what `maxHops` leaves of a
    /// request's budget: the best route within fewer links may start at another neighbour
    /// (a dearer but shorter way), and the best of `maxHops` links would be refused by a
    /// later relay. `hops` ≥ `maxHops` is `nextHop(to:)`. No allocation.
    @inline(__always)
    public func nextHop(to destination: NodeID, within hops: Int) -> NodeID? {
        guard hops >= 1, let v = index[destination], lengths[Int(v)] >= 2 else { return nil }
        guard hops < maxHops else { return nodeIDs[Int(paths[Int(v) * stride + 1])] }
        let slot = budgets[Int(v) * (maxHops - 1) + hops - 1]
        return slot == HopLimitedSearch.noSlot ? nil : nodeIDs[Int(firstHopChoices[Int(slot)])]
    }

    /// The neighbour to send to on the backup route, or nil when there is none. No allocation.
    @inline(__always)
    public func backupNextHop(to destination: NodeID) -> NodeID? {
        guard let v = index[destination], backupLengths[Int(v)] >= 2 else { return nil }
        return nodeIDs[Int(backupPaths[Int(v) * stride + 1])]
    }

    /// Cost of the primary route to `destination`, or nil.
    public func cost(to destination: NodeID) -> Double? {
        guard let v = index[destination], lengths[Int(v)] >= 2 else { return nil }
        return Double(cost[Int(v)])
    }

    /// The routes to `destination`, or nil when it is unknown, unreachable or the source itself.
    public func route(to destination: NodeID) -> Route? {
        guard let v = index[destination] else { return nil }
        let n = Int(lengths[Int(v)])
        guard n >= 2 else { return nil }
        let row = Int(v) * stride
        let primary = RoutePath(nodes: paths[row..<row + n].map { nodeIDs[Int($0)] }, cost: Double(cost[Int(v)]))
        var backup: RoutePath?
        let bn = Int(backupLengths[Int(v)])
        if bn >= 2 {
            backup = RoutePath(nodes: backupPaths[row..<row + bn].map { nodeIDs[Int($0)] }, cost: Double(backupCost[Int(v)]))
        }
        return Route(destination: destination, primary: primary, backup: backup)
    }
}
