// The chunk scheduler contract: one object's chunks are spread over several candidate routes
// (several routes to one source, or routes to several sources holding the chunks). The
// scheduler only decides; the transfer (MultipathTransfer) owns chunks, hedges and timers, and
// the caller owns I/O. Every call takes `now` (seconds on the caller's clock), so the same code
// runs in a node and in the simulator.

/// Identifies one candidate route of a node (unique among the routes a scheduler is given).
public struct MultipathRouteID: Hashable, Sendable, Comparable, CustomStringConvertible {
    /// The number the route table gave the route.
    public var rawValue: Int
    /// Wraps a route number.
    public init(_ rawValue: Int) { self.rawValue = rawValue }
    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
    public var description: String { "r\(rawValue)" }
}

/// What the mesh knows about a route before any chunk crossed it (link-state metrics summed or
/// minimised along the path). Units: seconds, bytes per second, fractions in 0...1.
public struct MultipathRouteFeatures: Sendable, Equatable {
    /// Round-trip time along the route (probe RTT, queueing included), seconds.
    public var rttMean: Double
    /// Variance of that RTT, seconds².
    public var rttVariance: Double
    /// Loss probability along the route, 0...1.
    public var loss: Double
    /// Delivery rate of the route's bottleneck, bytes per second.
    public var deliveryRate: Double
    /// Hops between the source and this node.
    public var hopCount: Int
    /// How busy the serving peer says it is, 0 (idle) ... 1 (saturated).
    public var peerLoad: Double

    /// Creates features; values are clamped to their domains so a bad advert cannot poison a
    /// scheduler with NaN or negative rates.
    public init(
        rttMean: Double, rttVariance: Double = 0, loss: Double = 0, deliveryRate: Double, hopCount: Int = 1,
        peerLoad: Double = 0
    ) {
        self.rttMean = rttMean.isFinite ? max(0, rttMean) : 1
        self.rttVariance = rttVariance.isFinite ? max(0, rttVariance) : 0
        self.loss = loss.isFinite ? min(max(0, loss), 0.99) : 0
        self.deliveryRate = deliveryRate.isFinite ? max(1, deliveryRate) : 1
        self.hopCount = max(1, hopCount)
        self.peerLoad = peerLoad.isFinite ? min(max(0, peerLoad), 0.99) : 0
    }
}

/// One route a scheduler may use, with its current link-state features.
public struct MultipathCandidate: Sendable, Equatable {
    /// The route.
    public var id: MultipathRouteID
    /// What the mesh currently knows about it.
    public var features: MultipathRouteFeatures
    /// Creates a candidate.
    public init(id: MultipathRouteID, features: MultipathRouteFeatures) {
        self.id = id
        self.features = features
    }
}

/// Identifies one transfer (one object being fetched) among those sharing a scheduler.
public typealias MultipathTransferID = Int

/// How one chunk request ended, fed back to the scheduler.
public struct MultipathCompletion: Sendable, Equatable {
    /// How it ended.
    public enum Outcome: Sendable, Equatable {
        /// The chunk arrived and verified.
        case delivered
        /// No answer in time (timeout), a reset, or a chunk that failed verification.
        case failed
        /// The other copy of a hedged chunk won; this one was cancelled (no information).
        case cancelled
    }
    /// The route the request used.
    public var route: MultipathRouteID
    /// The transfer it belonged to.
    public var transfer: MultipathTransferID
    /// Chunk size in bytes.
    public var bytes: Int
    /// When it was requested (the `now` of `dispatched`).
    public var requestedAt: Double
    /// When it ended.
    public var endedAt: Double
    /// How it ended.
    public var outcome: Outcome

    /// Creates a completion record.
    public init(
        route: MultipathRouteID, transfer: MultipathTransferID, bytes: Int, requestedAt: Double, endedAt: Double,
        outcome: Outcome
    ) {
        self.route = route
        self.transfer = transfer
        self.bytes = bytes
        self.requestedAt = requestedAt
        self.endedAt = endedAt
        self.outcome = outcome
    }
}

/// A route's state as an operator sees it (`stoq mesh routes`): the estimate and the share of
/// chunks the route got recently.
public struct MultipathRouteEstimate: Sendable, Equatable {
    /// The route.
    public var route: MultipathRouteID
    /// Estimated fixed part of a chunk's time (request + propagation + per-hop work), seconds.
    public var latency: Double
    /// Estimated service rate, bytes per second.
    public var rate: Double
    /// Estimated probability that a request on this route fails.
    public var failureProbability: Double
    /// Bytes requested on this route and not yet answered (all transfers together).
    public var inFlightBytes: Int
    /// Share of recent chunk requests that went to this route, 0...1 (discounted).
    public var chunkShare: Double
    /// Discounted number of completions the estimate rests on (0: link-state prior only).
    public var evidence: Double
}

/// The decision interface shared by the learner and the baselines.
///
/// One scheduler instance serves all transfers of a node, so it sees the load every transfer
/// puts on every route. Not thread-safe: the worker that owns the transfers calls it; operators
/// read `estimates()` snapshots, which are Sendable values.
public protocol MultipathChunkScheduler: AnyObject {
    /// The `routing.algorithm`-style name (`ml_optimized`, `min_rtt`, …).
    var name: String { get }
    /// Replaces the candidate set or refreshes features (routes missing from `candidates` are
    /// withdrawn: never chosen again until they come back).
    func update(candidates: [MultipathCandidate], now: Double)
    /// Picks a route for a chunk of `bytes` of `transfer`, or nil to wait (every usable route
    /// is at its window). `backlog` is the bytes the transfer has not requested yet, this
    /// chunk included. `among` restricts the choice (routes to sources holding the chunk);
    /// `excluding` is the route a hedge must avoid.
    func choose(
        transfer: MultipathTransferID, bytes: Int, backlog: Int, among: [MultipathRouteID]?,
        excluding: MultipathRouteID?, now: Double
    ) -> MultipathRouteID?
    /// Records that a request went out on `route` (after `choose`, or for a hedge).
    func dispatched(transfer: MultipathTransferID, route: MultipathRouteID, bytes: Int, now: Double)
    /// Feeds back how a request ended.
    func completed(_ completion: MultipathCompletion, now: Double)
    /// The time the scheduler expects a chunk of `bytes` dispatched now on `route` to take
    /// (used by the transfer to spot a stalled chunk), seconds.
    func expectedDuration(route: MultipathRouteID, bytes: Int, now: Double) -> Double
    /// How sure the scheduler is of `expectedDuration`: one standard deviation of the duration,
    /// seconds. A transfer hedges a request `hedgeSpreads` of these past its expectation (and
    /// never later than `hedgeFactor` times it).
    func expectedSpread(route: MultipathRouteID, bytes: Int, now: Double) -> Double
    /// Current per-route estimates, for operators.
    func estimates(now: Double) -> [MultipathRouteEstimate]
    /// Lets go of what it keeps for routes withdrawn (missing from the last `update`) with
    /// nothing in flight.
    func forgetWithdrawn()
}

extension MultipathChunkScheduler {
    /// A scheduler with no model of its uncertainty: half its expectation, so the transfer's
    /// default hedging (2 spreads) hedges at twice the expectation, as it always did.
    public func expectedSpread(route: MultipathRouteID, bytes: Int, now: Double) -> Double {
        0.5 * expectedDuration(route: route, bytes: bytes, now: now)
    }
}

/// The schedulers this module provides, by the name operators and the benchmark use.
public enum MultipathSchedulerKind: String, Sendable, CaseIterable {
    /// The online learner (docs/multipath.md).
    case mlOptimized = "ml_optimized"
    /// Lowest advertised RTT with window space first (the MPTCP default scheduler).
    case minRTT = "min_rtt"
    /// Routes in turn, skipping those whose window is full.
    case roundRobin = "round_robin"
    /// Every chunk on the one route with the highest advertised delivery rate.
    case bestSingle = "best_single"
    /// A fixed split given from outside (the oracle is the best such split in hindsight).
    case fixedSplit = "fixed_split"
}
