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
    let cost: [Float]
    /// `pathStart[v] ..< pathStart[v+1]` in `pathNodes`: the route to v, source first (empty
    /// when unreachable).
    let pathStart: [Int32]
    let pathNodes: [Int32]
    let backupStart: [Int32]
    let backupNodes: [Int32]
    let backupCost: [Float]
    /// Bit per edge index of the graph the table came from: the links some route (primary or
    /// backup) uses. A link off this set getting dearer or vanishing changes nothing here.
    let usedEdges: [UInt64]
    /// Destinations with a route, by dense index.
    let reachable: [Int32]

    init(source: NodeID, algorithm: RoutingAlgorithm, maxHops: Int, version: UInt64, index: [NodeID: Int32], nodeIDs: [NodeID],
         cost: [Float], pathStart: [Int32], pathNodes: [Int32], backupStart: [Int32], backupNodes: [Int32], backupCost: [Float],
         usedEdges: [UInt64], reachable: [Int32]) {
        self.source = source; self.algorithm = algorithm; self.maxHops = maxHops; self.version = version
        self.index = index; self.nodeIDs = nodeIDs; self.cost = cost
        self.pathStart = pathStart; self.pathNodes = pathNodes
        self.backupStart = backupStart; self.backupNodes = backupNodes; self.backupCost = backupCost
        self.usedEdges = usedEdges; self.reachable = reachable
    }

    /// Number of destinations with a route (the source excluded).
    public var count: Int { reachable.count }

    /// Destinations with a route, in order of their dense index.
    public var destinations: [NodeID] { reachable.map { nodeIDs[Int($0)] } }

    /// The neighbour to send to for `destination`, or nil when there is no route. No allocation.
    @inline(__always)
    public func nextHop(to destination: NodeID) -> NodeID? {
        guard let v = index[destination] else { return nil }
        let s = Int(pathStart[Int(v)]), e = Int(pathStart[Int(v) + 1])
        guard e - s >= 2 else { return nil }
        return nodeIDs[Int(pathNodes[s + 1])]
    }

    /// The neighbour to send to on the backup route, or nil when there is none. No allocation.
    @inline(__always)
    public func backupNextHop(to destination: NodeID) -> NodeID? {
        guard let v = index[destination] else { return nil }
        let s = Int(backupStart[Int(v)]), e = Int(backupStart[Int(v) + 1])
        guard e - s >= 2 else { return nil }
        return nodeIDs[Int(backupNodes[s + 1])]
    }

    /// Cost of the primary route to `destination`, or nil.
    public func cost(to destination: NodeID) -> Double? {
        guard let v = index[destination], cost[Int(v)].isFinite, destination != source else { return nil }
        return Double(cost[Int(v)])
    }

    /// The routes to `destination`, or nil when it is unknown, unreachable or the source itself.
    public func route(to destination: NodeID) -> Route? {
        guard let v = index[destination] else { return nil }
        let s = Int(pathStart[Int(v)]), e = Int(pathStart[Int(v) + 1])
        guard e - s >= 2 else { return nil }
        let primary = RoutePath(nodes: pathNodes[s..<e].map { nodeIDs[Int($0)] }, cost: Double(cost[Int(v)]))
        var backup: RoutePath?
        let bs = Int(backupStart[Int(v)]), be = Int(backupStart[Int(v) + 1])
        if be - bs >= 2 {
            backup = RoutePath(nodes: backupNodes[bs..<be].map { nodeIDs[Int($0)] }, cost: Double(backupCost[Int(v)]))
        }
        return Route(destination: destination, primary: primary, backup: backup)
    }
}
