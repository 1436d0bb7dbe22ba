import STOQCore

/// The cost of one directed link under each `RoutingAlgorithm` (docs/routing.md, "Costs").
///
/// Every cost is ≥ 0 and finite, so the searches are label-setting per hop layer.
public enum LinkCost {
    /// Weight of RTT variance in the adaptive cost: one mean deviation on top of the smoothed
    /// RTT, the delay a chunk typically sees beyond the average (QUIC's PTO uses 4·rttvar as a
    /// worst case; routing wants the typical case).
    public static let adaptiveVarianceWeight = 1.0
    /// Weight of the expected retransmissions per delivered packet, p/(1−p). A loss costs about
    /// two RTTs of that link: one to detect it (RFC 9002's packet/time threshold ≈ 9/8 RTT) and
    /// one to repair it.
    public static let adaptiveLossWeight = 2.0
    /// Weight of the peer's load: a saturated relay (load 1) doubles the link's cost, so traffic
    /// moves off it when an unloaded route is up to twice as slow, but not beyond.
    public static let adaptiveLoadWeight = 1.0
    /// Loss rates are clamped here so a nearly dead link keeps a finite (huge) cost.
    public static let maxLoss = 0.99

    /// The link's weight for `algorithm`, in milliseconds-like units.
    ///
    /// - shortest_path and latency: the smoothed RTT (shortest_path counts hops first and uses
    ///   the RTT only to break ties between routes of equally few hops).
    /// - adaptive and ml_optimized: `(srtt + a·rttvar) · (1 + b·p/(1−p)) · (1 + c·load)`.
    @inline(__always)
    public static func weight(_ m: LinkMetrics, _ algorithm: RoutingAlgorithm) -> Double {
        switch algorithm {
        case .shortestPath, .latency:
            return m.rttMs
        case .adaptive, .mlOptimized:
            let p = min(max(m.lossRate, 0), maxLoss)
            let load = min(max(m.load, 0), 1)
            return (m.rttMs + adaptiveVarianceWeight * m.rttVarMs)
                * (1 + adaptiveLossWeight * p / (1 - p))
                * (1 + adaptiveLoadWeight * load)
        }
    }
}
