/// What the mesh service shows an operator: its neighbours, the routes it computed and what it
/// counted. The mesh thread publishes one about every probe interval; the admin API renders it
/// on `/metrics` and `/status` ("mesh"), and `stoq mesh status|routes|path` prints it.
public struct MeshStatus: Sendable, Equatable {
    /// One neighbour, as `NeighbourLink` sees it.
    public struct Neighbour: Sendable, Equatable {
        /// `https://[addr]:port`.
        public var url: String
        /// Its node id (hex of SHA-256 of its key), once a probe answer named it; "" before.
        public var node: String
        /// "unknown", "up" or "down" (suppressed links are "down").
        public var state: String
        /// Whether the QUIC connection to it is established.
        public var connected: Bool
        public var srttMicros: UInt64
        public var rttvarMicros: UInt64
        /// Share of probes lost, 0...1.
        public var loss: Double
        /// Bytes per second delivered by it (chunks fetched through it); 0 before any.
        public var deliveryBytesPerSecond: Double
        /// Its load as it last reported it, 0...1.
        public var peerLoad: Double
        /// Milliseconds since its last probe answer; nil before the first.
        public var lastAnswerMillisAgo: UInt64?
        public var probesSent: UInt64
        public var probesAnswered: UInt64
        /// Times its link went down, and came back up.
        public var downs: UInt64
        public var ups: UInt64
        /// While its link is suppressed for flapping (its state is "down", answering or not):
        /// milliseconds until the penalty is below the reuse threshold; nil when it is not.
        public var suppressedMillis: UInt64?
        /// Its flap penalty now, rounded down — so a link reused below 750 never shows 750
        /// (`FlapDamping`; 0 with `mesh.flap_damping = false`).
        public var flapPenalty: UInt64

        public init(
            url: String, node: String, state: String, connected: Bool, srttMicros: UInt64, rttvarMicros: UInt64,
            loss: Double, deliveryBytesPerSecond: Double, peerLoad: Double, lastAnswerMillisAgo: UInt64?,
            probesSent: UInt64, probesAnswered: UInt64, downs: UInt64, ups: UInt64, suppressedMillis: UInt64? = nil,
            flapPenalty: UInt64 = 0
        ) {
            (self.url, self.node, self.state, self.connected) = (url, node, state, connected)
            (self.srttMicros, self.rttvarMicros, self.loss) = (srttMicros, rttvarMicros, loss)
            (self.deliveryBytesPerSecond, self.peerLoad, self.lastAnswerMillisAgo) = (deliveryBytesPerSecond, peerLoad, lastAnswerMillisAgo)
            (self.probesSent, self.probesAnswered, self.downs, self.ups) = (probesSent, probesAnswered, downs, ups)
            (self.suppressedMillis, self.flapPenalty) = (suppressedMillis, flapPenalty)
        }
    }

    /// One route of the current table: to `destination` over `path` (node ids, this node first).
    public struct Route: Sendable, Equatable {
        public var destination: String
        public var path: [String]
        /// The route's cost in the algorithm's unit (hops, milliseconds, or the adaptive score).
        public var cost: Double
        /// A link-disjoint backup, when the graph has one.
        public var backupPath: [String]?
        public var backupCost: Double?
        public var hops: Int { max(path.count - 1, 0) }

        public init(destination: String, path: [String], cost: Double, backupPath: [String]?, backupCost: Double?) {
            (self.destination, self.path, self.cost, self.backupPath, self.backupCost) = (destination, path, cost, backupPath, backupCost)
        }
    }

    /// With `routing.algorithm = "ml_optimized"`: one route (a holder, through a next hop) as
    /// the learner sees it, and the share of chunks it gets.
    public struct MultipathRoute: Sendable, Equatable {
        public var holder: String
        /// The next hop's short id (16 hex digits).
        public var nextHop: String
        /// Estimated fixed part of a chunk's time, and service rate.
        public var latencyMillis: Double
        public var rateBytesPerSecond: Double
        public var failureProbability: Double
        public var inFlightBytes: Int
        /// Share of recent chunk requests, 0...1.
        public var chunkShare: Double
        /// Discounted completions the estimate rests on (0: link-state prior only).
        public var evidence: Double
        /// Chunk requests sent on this route since the node started: `chunkShare` is discounted
        /// and lags, so a shift is measured from differences of these (scripts/bench-multipath).
        public var dispatchedChunks: Int
        /// Verified chunk bytes this route delivered since the node started.
        public var deliveredBytes: Int

        public init(
            holder: String, nextHop: String, latencyMillis: Double, rateBytesPerSecond: Double, failureProbability: Double,
            inFlightBytes: Int, chunkShare: Double, evidence: Double, dispatchedChunks: Int = 0, deliveredBytes: Int = 0
        ) {
            (self.holder, self.nextHop, self.latencyMillis, self.rateBytesPerSecond) = (holder, nextHop, latencyMillis, rateBytesPerSecond)
            (self.failureProbability, self.inFlightBytes, self.chunkShare, self.evidence) = (failureProbability, inFlightBytes, chunkShare, evidence)
            (self.dispatchedChunks, self.deliveredBytes) = (dispatchedChunks, deliveredBytes)
        }
    }

    /// Counters since the node started.
    public struct Counters: Sendable, Equatable {
        /// Adverts this node signed and sent (each counted once, whatever the neighbours).
        public var advertsOriginated: UInt64 = 0
        /// Adverts received from neighbours (`PUT /_stoq/mesh/advert`).
        public var advertsReceived: UInt64 = 0
        /// Received adverts accepted into the link-state database.
        public var advertsAccepted: UInt64 = 0
        /// Adverts sent on to neighbours (one per neighbour it went to).
        public var advertsForwarded: UInt64 = 0
        /// Held adverts sent to a neighbour whose link came up (the database it starts from).
        public var advertsSynchronized: UInt64 = 0
        /// Received adverts that were already held (flooding's normal end): not errors.
        public var advertsDuplicate: UInt64 = 0
        /// Received adverts refused, by reason (`AdvertError.Code` names, and `stale`).
        public var advertsRefused: [String: UInt64] = [:]
        /// Of the received adverts counted as duplicate or refused, those refused before their
        /// signature and chain were checked: a copy of the advert held, a sequence not above the
        /// one held, a copy of one refused before.
        public var advertsUnverified: UInt64 = 0
        /// Neighbours whose certificate this node refused, and connection attempts that failed.
        public var peersRefused: UInt64 = 0
        public var connectFailures: UInt64 = 0
        /// Probe answers not taken: another status than 200 (it runs no mesh: 404; its access
        /// policy refuses this node: 403), a node id that is not its certificate's key's, or a
        /// certificate that is not a node's (`NodeCertificate`).
        public var probesRefused: UInt64 = 0
        /// Route tables computed (each after a link-state change that needed it).
        public var routeComputations: UInt64 = 0
        /// Relay requests answered by this node: served from its own store, or passed on.
        public var relayServed: UInt64 = 0
        public var relayForwarded: UInt64 = 0
        /// Relay requests refused because they would exceed `routing.max_hops`.
        public var maxHopsRefused: UInt64 = 0
        /// The most hops any relayed request that reached this node had taken.
        public var maxHopsSeen: UInt64 = 0
        /// Fetches moved to another route or holder after the one in use failed or stalled.
        public var failovers: UInt64 = 0
        /// Times a neighbour's link was suppressed for flapping (`FlapDamping`).
        public var flapSuppressions: UInt64 = 0

        public init() {}
    }

    /// This node's id (hex).
    public var node: String
    /// `routing.algorithm` and `routing.max_hops` in force.
    public var algorithm: String
    public var maxHops: Int
    /// The discovery backend ("static", "dns", "etcd") and what it counted.
    public var discovery: String
    public var discoveryCounters: DiscoveryCounters
    public var neighbours: [Neighbour]
    public var routes: [Route]
    /// Nodes and links in the link-state database.
    public var nodesKnown: Int
    public var linksKnown: Int
    public var counters: Counters
    /// The learner's routes (empty unless `ml_optimized`).
    public var multipath: [MultipathRoute] = []

    public init(
        node: String, algorithm: String, maxHops: Int, discovery: String, discoveryCounters: DiscoveryCounters,
        neighbours: [Neighbour], routes: [Route], nodesKnown: Int, linksKnown: Int, counters: Counters
    ) {
        (self.node, self.algorithm, self.maxHops, self.discovery) = (node, algorithm, maxHops, discovery)
        (self.discoveryCounters, self.neighbours, self.routes) = (discoveryCounters, neighbours, routes)
        (self.nodesKnown, self.linksKnown, self.counters) = (nodesKnown, linksKnown, counters)
    }
}
