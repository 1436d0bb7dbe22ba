import STOQCore
import STOQRouting

/// Builds adverts from directed edges `(from, to, rttMs)` and applies them at `now`.
func engine(
    _ edges: [(UInt64, UInt64, Double)], algorithm: RoutingAlgorithm = .latency, maxHops: Int = 4,
    backups: BackupPolicy = .all, metrics: [String: LinkMetrics] = [:], now: Timestamp = 0
) -> RoutingEngine {
    let e = RoutingEngine(algorithm: algorithm, maxHops: maxHops, backups: backups)
    for advert in adverts(edges, sequence: 1, metrics: metrics) {
        try! e.apply(advert, now: now)
    }
    return e
}

/// Adverts for every origin in `edges`; `metrics["a>b"]` overrides the plain RTT metrics.
func adverts(_ edges: [(UInt64, UInt64, Double)], sequence: UInt64, metrics: [String: LinkMetrics] = [:]) -> [LinkStateAdvert] {
    var by: [UInt64: [AdvertisedLink]] = [:]
    for (a, b, w) in edges {
        by[a, default: []].append(AdvertisedLink(peer: NodeID(b), metrics: metrics["\(a)>\(b)"] ?? LinkMetrics(rttMs: w)))
    }
    return by.keys.sorted().map { LinkStateAdvert(origin: NodeID($0), sequence: sequence, links: by[$0]!) }
}

/// Both directions of each undirected edge.
func both(_ edges: [(UInt64, UInt64, Double)]) -> [(UInt64, UInt64, Double)] {
    edges.flatMap { [($0.0, $0.1, $0.2), ($0.1, $0.0, $0.2)] }
}

func ids(_ xs: [UInt64]) -> [NodeID] { xs.map { NodeID($0) } }
