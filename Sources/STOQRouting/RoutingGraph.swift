/// The link-state graph in compressed sparse row form: the flat arrays the searches walk.
///
/// Nodes are dense `Int32` indices (`nodeIDs[i]` is node i's identity); node `u`'s outgoing
/// links are the edge indices `offsets[u] ..< offsets[u+1]`, each with its `targets`, `sources`
/// and `weights` entry. A value type with no references but its arrays: `Sendable`, and cheap to
/// hand to another thread as a snapshot.
public struct RoutingGraph: Sendable {
    /// Identity of each dense index.
    public private(set) var nodeIDs: [NodeID]
    /// Dense index of each identity.
    public private(set) var index: [NodeID: Int32]
    /// `offsets[u] ..< offsets[u+1]` are node u's outgoing edges; `offsets.count == nodeCount + 1`.
    public private(set) var offsets: [Int32]
    /// Head of each edge.
    public private(set) var targets: [Int32]
    /// Tail of each edge (so a path can be rebuilt from edge indices alone).
    public private(set) var sources: [Int32]
    /// Cost of each edge (`LinkCost.weight`), `.infinity` for a link removed since the arrays were
    /// built (removal does not reshape the arrays; the next rebuild drops it).
    public var weights: [Float]
    /// `inEdges[inOffsets[v] ..< inOffsets[v+1]]` are the indices of the edges into v: a search
    /// that wants one destination pulls its last hop through these instead of pushing the
    /// whole last layer.
    public private(set) var inOffsets: [Int32]
    /// Edge indices grouped by head (see `inOffsets`).
    public private(set) var inEdges: [Int32]

    /// Number of nodes (dense indices `0 ..< nodeCount`).
    public var nodeCount: Int { nodeIDs.count }
    /// Number of directed edges, removed ones included.
    public var edgeCount: Int { targets.count }

    /// Builds the arrays from directed edges given by dense index. Edges keep their order within
    /// a source (stable), which fixes how ties between equal-cost routes are broken.
    public init(nodeIDs: [NodeID], edges: [(from: Int32, to: Int32, weight: Float)]) {
        let n = nodeIDs.count
        self.nodeIDs = nodeIDs
        var index: [NodeID: Int32] = [:]
        index.reserveCapacity(n)
        for (i, id) in nodeIDs.enumerated() { index[id] = Int32(i) }
        self.index = index
        var offsets = [Int32](repeating: 0, count: n + 1)
        for e in edges {
            precondition(Int(e.from) < n && Int(e.to) < n && e.from >= 0 && e.to >= 0, "edge endpoint out of range")
            offsets[Int(e.from) + 1] += 1
        }
        for i in 0..<n { offsets[i + 1] += offsets[i] }
        var fill = offsets
        var targets = [Int32](repeating: 0, count: edges.count)
        var sources = [Int32](repeating: 0, count: edges.count)
        var weights = [Float](repeating: 0, count: edges.count)
        for e in edges {
            let at = Int(fill[Int(e.from)])
            fill[Int(e.from)] += 1
            targets[at] = e.to
            sources[at] = e.from
            weights[at] = e.weight
        }
        self.offsets = offsets
        self.targets = targets
        self.sources = sources
        self.weights = weights
        var inOffsets = [Int32](repeating: 0, count: n + 1)
        for t in targets { inOffsets[Int(t) + 1] += 1 }
        for i in 0..<n { inOffsets[i + 1] += inOffsets[i] }
        var inFill = inOffsets
        var inEdges = [Int32](repeating: 0, count: targets.count)
        for (e, t) in targets.enumerated() {
            inEdges[Int(inFill[Int(t)])] = Int32(e)
            inFill[Int(t)] += 1
        }
        self.inOffsets = inOffsets
        self.inEdges = inEdges
    }

    /// Edge index of the link `from → to`, or nil. Linear in `from`'s degree.
    public func edge(from: Int32, to: Int32) -> Int32? {
        var e = offsets[Int(from)]
        let end = offsets[Int(from) + 1]
        while e < end {
            if targets[Int(e)] == to { return e }
            e += 1
        }
        return nil
    }
}
