/// How a node chooses routes through the mesh (`routing.algorithm`). Shared vocabulary: the
/// config parses it once, the routing engine acts on it.
public enum RoutingAlgorithm: String, Sendable, Hashable, CaseIterable {
    /// Fewest hops; ties broken by summed RTT.
    case shortestPath = "shortest_path"
    /// Least summed RTT.
    case latency
    /// Latency, loss and load together (formula in docs/routing.md).
    case adaptive
    /// Several routes at once, chunks assigned by an online learner (docs/multipath.md).
    case mlOptimized = "ml_optimized"
}
