import CSTOQSystem
import Crypto
import Foundation
import Logging
import STOQCore
import STOQQUIC
import STOQRouting
import STOQTransfer
import Synchronization
import X509

/// The mesh, running: one thread that keeps a QUIC connection with mutual TLS to every
/// neighbour discovery reports, probes each, keeps its `NeighbourLink`, signs this node's
/// adverts and floods everyone's, and computes routes. Workers and the edge fetcher read what
/// it publishes (`view`, `status`) and hand it what arrives for it (`receiveAdvert`); nothing
/// here runs on a worker's packet path.
///
/// - **Neighbours** are the members discovery reports, minus this node. Each gets a
///   connection from one `ConnectionPool` (one socket, one endpoint). A peer whose certificate
///   this node's trust refuses fails its handshake and is counted (`peersRefused`).
/// - **Probes**: `GET /_stoq/mesh/probe` every `mesh.probe_interval` on each connection. The
///   answer names the neighbour's node id and load; answers and timeouts drive its
///   `NeighbourLink` (RTT, variance, loss, down within `mesh.down_after`, held down while
///   flapping with `mesh.flap_damping`).
/// - **Adverts**: this node signs one when a link goes up or down, and every
///   `routing.update_interval` with fresh metrics; it lives three intervals (at least 10 s).
///   Received adverts are verified (`SignedAdvert.verify`: format, signature, time, chain to
///   this node's trust), applied to the link-state database, and forwarded to every neighbour
///   when new. A node forwards an advert once (a second copy is a duplicate and stops there),
///   so each crosses each link at most twice.
/// - **Routes**: `RoutingEngine` with `routing.algorithm` and `max_hops`, a link-disjoint
///   backup per destination; recomputed when link-state changes, published as a `MeshView`.
public final class MeshService: @unchecked Sendable {
    /// Everything the service is built from.
    public struct Settings: @unchecked Sendable {  // a P256 key is immutable
        /// This node's certificate chain (leaf first) and its key: adverts are signed with it,
        /// and its key's digest is the node's id.
        public var chain: [Certificate]
        public var key: P256.Signing.PrivateKey
        /// How connections to neighbours verify them and present this node's certificate.
        public var trust: ClientTrust
        /// What an advert's signer must chain to (this node's trust roots).
        public var verifyChain: @Sendable ([Certificate]) throws -> Void
        /// The port this node listens on, and its addresses: a member at one of them is itself.
        public var listenPort: UInt16
        public var localAddresses: Set<IPv6Address>
        public var probeInterval: UInt64 = 100_000_000
        public var downAfter: UInt64 = 600_000_000
        /// Whether a neighbour whose link keeps going down is held down (`FlapDamping`).
        public var flapDamping = true
        public var updateInterval: UInt64 = 5_000_000_000
        public var algorithm: RoutingAlgorithm = .adaptive
        public var maxHops = 8
        /// With `ml_optimized`: the scheduler that spreads chunks over routes.
        public var multipathScheduler = MultipathSchedulerKind.mlOptimized

        public init(
            chain: [Certificate], key: P256.Signing.PrivateKey, trust: ClientTrust,
            verifyChain: @escaping @Sendable ([Certificate]) throws -> Void, listenPort: UInt16,
            localAddresses: Set<IPv6Address>
        ) {
            (self.chain, self.key, self.trust, self.verifyChain) = (chain, key, trust, verifyChain)
            (self.listenPort, self.localAddresses) = (listenPort, localAddresses)
        }

        /// How long this node's adverts live: three update intervals, at least 10 s.
        var advertLifetime: UInt64 { max(3 * updateInterval, 10 * Nanos.second) }
    }

    /// This node's id.
    public let identity: NodeIdentity
    public let settings: Settings
    let discovery: DiscoveryBackend
    let datapath: ClientDatapath
    let logger: Logger

    /// What an advert's signer must chain to now (`settings.verifyChain` until a `retrust`),
    /// and a new trust for the neighbour connections that the mesh thread has not taken yet.
    private let verifier: Replaceable<@Sendable ([Certificate]) throws -> Void>
    private let freshTrust = Mutex<ClientTrust?>(nil)
    private let published = Mutex<(view: MeshView, status: MeshStatus?)>((MeshView.empty, nil))
    /// Adverts waiting for the mesh thread, oldest first, each with its sender (`senderKey`);
    /// how many wait from each sender.
    private let inbox = Mutex<(queue: [(bytes: [UInt8], sender: String)], held: [String: Int])>(([], [:]))
    private let chainBox: Mutex<[Certificate]>
    private let credentialsRenewed = Atomic<Bool>(false)
    private let members = Mutex<Set<MeshMember>?>(nil)
    private let deliveries = Mutex<[IPv6Endpoint: DeliveryMeter]>([:])
    private let relay = Mutex(MeshStatus.Counters())
    private let loadPPM = Atomic<UInt32>(0)
    private let ownSequence = Atomic<UInt64>(0)
    private let stopFlag = Atomic<Bool>(false)
    private let wakeHook = Mutex<(@Sendable () -> Void)?>(nil)
    private let finished = DispatchGroup()
    private var discoveryTask: Task<Void, Never>?
    /// Left when the discovery task has returned (having withdrawn this node's registration).
    private let discoveryFinished = DispatchGroup()
    /// Connections, probes and adverts: the mesh thread's alone.
    private var state: MeshLoop?

    /// A service for this node; `start` runs it.
    public init(settings: Settings, discovery: DiscoveryBackend, datapath: ClientDatapath, logger: Logger) {
        self.settings = settings
        self.identity = NodeIdentity(publicKey: settings.chain[0].publicKey)
        self.chainBox = Mutex(settings.chain)
        self.discovery = discovery
        self.datapath = datapath
        self.logger = logger
        verifier = Replaceable(settings.verifyChain)
        published.withLock { $0.view = MeshView(me: identity, maxHops: settings.maxHops) }
    }

    /// Verifies neighbours with `trust` and adverts' signers with `verifyChain` from now on (a
    /// reload changed the node's `[trust]`): adverts at once; the neighbour connections made
    /// under the old trust are closed on the mesh thread's next turn, and made again under the
    /// new one (a probe in flight is lost, not counted). Any thread.
    public func retrust(_ trust: ClientTrust, verifyChain: @escaping @Sendable ([Certificate]) throws -> Void) {
        verifier.replace(verifyChain)
        freshTrust.withLock { $0 = trust }
        wakeHook.withLock { $0 }?()
    }

    /// The certificate chain this node's adverts carry now (`settings.chain` until a renewal).
    var chain: [Certificate] { chainBox.withLock { $0 } }

    /// Signs adverts with `chain` from now on: the node's certificate was renewed for the same
    /// key (`CertificateManager.keepsKey`), so its id stays. A chain for another key is refused
    /// (logged): adverts would name an id its key does not hold. Any thread.
    public func renewChain(_ chain: [Certificate]) {
        guard let leaf = chain.first, NodeIdentity(publicKey: leaf.publicKey) == identity, SignedAdvert.chainRange.contains(chain.count) else {
            logger.error("mesh: the renewed certificate is not for this node's key (id \(identity)); adverts keep the old one until it expires")
            return
        }
        chainBox.withLock { $0 = chain }
        credentialsRenewed.store(true, ordering: .releasing)
        wakeHook.withLock { $0 }?()
    }

    /// Whether the certificate was renewed since the last call: the neighbour connections
    /// made from now on present it (mutual TLS). The mesh thread.
    func takeCredentialsRenewed() -> Bool { credentialsRenewed.exchange(false, ordering: .acquiring) }

    /// Checks an advert's signer chain against this node's trust roots.
    func verifyChain(_ chain: [Certificate]) throws {
        try verifier.current(chain)
    }

    func takeTrust() -> ClientTrust? {
        freshTrust.withLock { t in
            defer { t = nil }; return t
        }
    }

    // MARK: - Any thread

    /// What routes and neighbours look like now.
    public var view: MeshView { published.withLock { $0.view } }

    /// The operator's view, refreshed about every probe interval (nil before the first).
    public var status: MeshStatus? {
        let relayCounters = relay.withLock { $0 }
        let published: MeshStatus? = self.published.withLock { $0.status }
        guard var s = published else { return nil }
        s.counters.relayServed = relayCounters.relayServed
        s.counters.relayForwarded = relayCounters.relayForwarded
        s.counters.maxHopsRefused = relayCounters.maxHopsRefused
        s.counters.maxHopsSeen = relayCounters.maxHopsSeen
        s.multipath = multipathSource?() ?? []
        for (code, n) in refusedEarly.withLock({ $0.counts }) { s.counters.advertsRefused[code, default: 0] += n }
        return s
    }

    /// The answer to a probe (a worker calls this; it reads two atomics).
    public func probeAnswer() -> [UInt8] {
        MeshWire.ProbeAnswer(
            node: identity, loadPPM: loadPPM.load(ordering: .relaxed), sequence: ownSequence.load(ordering: .relaxed)
        ).encoded
    }

    /// Where the mesh thread reads this node's load (0...1) from, every probe interval; set
    /// before `start`.
    public var loadSource: (@Sendable () -> Double)?
    /// The learner's routes for `status` (set by `MeshUpstream` with `ml_optimized`).
    var multipathSource: (@Sendable () -> [MeshStatus.MultipathRoute])? {
        get { multipathHook.withLock { $0 } }
        set { multipathHook.withLock { $0 = newValue } }
    }
    private let multipathHook = Mutex<(@Sendable () -> [MeshStatus.MultipathRoute])?>(nil)

    /// This node's load, 0...1 (the node sets it from its workers' connection counts).
    public func setLoad(_ load: Double) {
        loadPPM.store(PPM.from(load), ordering: .relaxed)
    }

    /// Adverts waiting for the mesh thread at most: a flood of them (a broken or hostile
    /// sender; `PUT /_stoq/mesh/advert` needs no credential) must not grow without bound.
    public static let advertQueueBound = 4096
    /// Of those, at most this many from one sender: all connections that showed no node's
    /// certificate together, always; a node (by its key: its mesh id) once the queue is half
    /// full. Below that a node may send more: a neighbour hands a large mesh's adverts over at
    /// once when its link comes up. So an anonymous flood and a broken or hostile node together
    /// leave the other nodes a quarter of the places.
    public static let senderAdvertBound = advertQueueBound / 4
    /// The sender an advert is counted against: the node's key id, or "" for every anonymous one.
    private static func senderKey(_ node: String?) -> String { node.map { "node " + $0 } ?? "" }

    /// An advert a neighbour `PUT` over a connection that showed the certificate of the node
    /// whose key id (hex) is `node` (nil: no node's): queued for the mesh thread, which
    /// verifies it. False, and counted (`queue_full`), when the queue or the sender's share of
    /// it is full: the sender is told to come back.
    public func receiveAdvert(_ bytes: [UInt8], from node: String?) -> Bool {
        let sender = Self.senderKey(node)
        let refused: String? = inbox.withLock { q in
            guard q.queue.count < Self.advertQueueBound else { return "\(Self.advertQueueBound) adverts already wait for the mesh thread" }
            let uncontended = node != nil && q.queue.count < Self.advertQueueBound / 2
            let held = q.held[sender, default: 0]
            guard uncontended || held < Self.senderAdvertBound else {
                let who = node.map { "node \($0.prefix(16))" } ?? "connections without a node's certificate"
                return "\(held) adverts from \(who) already wait for the mesh thread (\(q.queue.count) in all)"
            }
            q.queue.append((bytes, sender))
            q.held[sender, default: 0] += 1
            return nil
        }
        if let refused {
            countRefusedAdvert("queue_full", refused)
            return false
        }
        wakeHook.withLock { $0 }?()
        return true
    }

    /// A relayed request that arrived having taken `hops` hops, and what this node did with it.
    public enum RelayOutcome: Sendable { case served, forwarded, refusedMaxHops }

    /// Counts an advert refused before the mesh thread saw it (a worker refused its body, or
    /// the queue was full); logged at most once per code every `LogThrottle.interval`.
    public func countRefusedAdvert(_ code: String, _ detail: String) {
        let said = refusedEarly.withLock { r in
            r.counts[code, default: 0] += 1
            return r.logs.allow(code, now: monotonicNow())
        }
        if let said { logger.warning("mesh: advert refused (\(code)): \(detail)\(said)") }
    }
    private let refusedEarly = Mutex<(counts: [String: UInt64], logs: LogThrottle)>(([:], LogThrottle()))

    /// Counts a relayed request (a worker calls this once per request).
    public func countRelay(_ outcome: RelayOutcome, hops: Int) {
        relay.withLock { c in
            // A client may write any count into a relay path: what it claims past the limit is not news.
            c.maxHopsSeen = max(c.maxHopsSeen, UInt64(min(max(hops, 0), settings.maxHops + 1)))
            switch outcome {
            case .served: c.relayServed += 1
            case .forwarded: c.relayForwarded += 1
            case .refusedMaxHops: c.maxHopsRefused += 1
            }
        }
    }

    /// A chunk fetch through the neighbour at `endpoint` went out (its delivery rate,
    /// `DeliveryMeter`). Any thread.
    func deliveryStarted(at endpoint: IPv6Endpoint) {
        let now = monotonicNow()
        deliveries.withLock { $0[endpoint, default: DeliveryMeter()].started(now: now) }
    }

    /// A chunk fetch through the neighbour at `endpoint` ended with `bytes` delivered (0: it
    /// failed, or was cancelled). Any thread.
    func deliveryEnded(at endpoint: IPv6Endpoint, bytes: Int) {
        let now = monotonicNow()
        deliveries.withLock { $0[endpoint]?.ended(bytes: bytes, now: now) }
    }

    // MARK: - Lifecycle

    /// Starts discovery and the mesh thread.
    public func start() throws {
        let loop = try MeshLoop(service: self)
        state = loop
        let waker = loop.pool.waker
        wakeHook.withLock { $0 = { waker.wake() } }
        let backend = discovery
        discoveryFinished.enter()
        discoveryTask = Task { [self] in
            await backend.run { set in
                self.members.withLock { $0 = set }
                self.wakeHook.withLock { $0 }?()
            }
            discoveryFinished.leave()
        }
        finished.enter()
        let t = Thread { [self] in
            loop.run()
            finished.leave()
        }
        t.name = "stoq-mesh"
        t.start()
        logger.info(
            "mesh: node \(identity) started",
            metadata: [
                "discovery": "\(discovery.backendName)", "algorithm": "\(settings.algorithm.rawValue)",
                "max_hops": "\(settings.maxHops)", "probe_interval_ms": "\(settings.probeInterval / 1_000_000)",
                "down_after_ms": "\(settings.downAfter / 1_000_000)", "flap_damping": "\(settings.flapDamping)",
            ])
    }

    /// Stops the thread and discovery (withdrawing this node's registration); waits up to 5 s.
    public func stop() {
        stopFlag.store(true, ordering: .releasing)
        wakeHook.withLock { $0 }?()
        discoveryTask?.cancel()
        let deadline = DispatchTime.now() + 5
        _ = finished.wait(timeout: deadline)
        // Discovery withdraws this node on its way out (etcd: one revoke, within the request
        // timeout); a stop that returned before it might exit first, and leave the node listed
        // for a whole lease TTL instead of gone at once.
        _ = discoveryFinished.wait(timeout: deadline)
    }

    // MARK: - For the mesh thread

    var stopping: Bool { stopFlag.load(ordering: .acquiring) }
    func takeMembers() -> Set<MeshMember>? {
        members.withLock { m in
            defer { m = nil }; return m
        }
    }
    /// Whether adverts wait for the mesh thread.
    var advertsWaiting: Bool { inbox.withLock { !$0.queue.isEmpty } }
    /// The oldest queued adverts, at most `limit`: the loop verifies that many a pass, so a
    /// full queue (a flood of junk, each a signature check or more) does not hold its probes
    /// back for the whole queue.
    func takeAdverts(limit: Int) -> [[UInt8]] {
        inbox.withLock { q in
            let taken = q.queue.prefix(limit)
            q.queue.removeFirst(taken.count)
            for t in taken {
                q.held[t.sender]! -= 1
                if q.held[t.sender] == 0 { q.held[t.sender] = nil }
            }
            return taken.map(\.bytes)
        }
    }
    /// Each neighbour's delivery since the last call: bytes and the time its chunk fetches were
    /// in flight (`DeliveryMeter.sample`); neighbours that delivered nothing are left out.
    func takeDeliveries(now: UInt64) -> [IPv6Endpoint: (bytes: Int, nanos: UInt64)] {
        deliveries.withLock { d in
            var out: [IPv6Endpoint: (bytes: Int, nanos: UInt64)] = [:]
            for ep in Array(d.keys) {
                if let s = d[ep]!.sample(now: now) { out[ep] = s }
                if d[ep]!.idle { d[ep] = nil }
            }
            return out
        }
    }
    func publish(view: MeshView) { published.withLock { $0.view = view } }
    func publish(status: MeshStatus) { published.withLock { $0.status = status } }
    func signed(sequence: UInt64) { ownSequence.store(sequence, ordering: .relaxed) }
    var ownLoadPPM: UInt32 { loadPPM.load(ordering: .relaxed) }
}

/// What routes and neighbours look like at one moment: immutable, so that the edge fetcher
/// reads it without a lock held while it decides.
public struct MeshView: Sendable {
    /// This node.
    public let me: NodeIdentity
    /// Routes from this node (nil before any link-state).
    public let routes: RouteTable?
    /// Every node id heard of, by routing id.
    public let identities: [NodeID: NodeIdentity]
    /// The neighbours' URLs, by routing id (those whose id a probe answer named).
    public let neighbourURLs: [NodeID: STOQURL]
    /// Neighbours whose link is down, or suspect (silent for three probe intervals): requests
    /// through them are abandoned, and no new one goes their way.
    public let down: Set<IPv6Endpoint>
    public let maxHops: Int
    /// For each destination, its primary and backup paths as a multipath scheduler sees them.
    public let paths: [NodeID: [PathChoice]]

    /// One path to a destination: its first hop and what link-state says about it.
    public struct PathChoice: Sendable {
        public var nextHop: NodeID
        public var features: MultipathRouteFeatures
    }

    static let empty = MeshView(me: NodeIdentity([UInt8](repeating: 0, count: 32)), maxHops: 0)

    init(me: NodeIdentity, maxHops: Int) {
        self.init(me: me, routes: nil, identities: [:], neighbourURLs: [:], down: [], maxHops: maxHops, paths: [:])
    }

    init(
        me: NodeIdentity, routes: RouteTable?, identities: [NodeID: NodeIdentity], neighbourURLs: [NodeID: STOQURL],
        down: Set<IPv6Endpoint>, maxHops: Int, paths: [NodeID: [PathChoice]]
    ) {
        (self.me, self.routes, self.identities, self.neighbourURLs, self.down, self.maxHops) =
            (me, routes, identities, neighbourURLs, down, maxHops)
        self.paths = paths
    }

    /// The node with id `hex`, if known.
    public func node(hex: String) -> NodeIdentity? {
        guard let bytes = Hex.decode(hex), bytes.count == 32 else { return nil }
        let id = NodeIdentity(bytes)
        return identities[id.routingID] == id ? id : nil
    }

    /// The neighbours to ask for something `holder` has, best first: the primary route's next
    /// hop, then the backup's, but none of the nodes in `avoiding` (hex ids: those the request
    /// came through). Empty when `holder` is unreachable within `max_hops`.
    ///
    /// `within`: the links a relayed request may still take (`max_hops` less the hops it came).
    /// The primary is then the best route of that many links at most (docs/mesh.md, "Relays"),
    /// and the backup counts only if it is no longer. When neither fits (this node's view and
    /// the asker's differ), the routes of `max_hops` links are taken as before: a relay that
    /// would exceed the limit refuses the request (508).
    public func nextHops(to holder: NodeIdentity, avoiding: Set<String> = [], within: Int? = nil) -> [STOQURL] {
        guard let routes, let route = routes.route(to: holder.routingID) else { return [] }
        var hops = [route.primary.nextHop, route.backup?.nextHop]
        if let within, within < route.primary.hops {
            let fitting = [
                routes.nextHop(to: holder.routingID, within: within),
                route.backup.flatMap { $0.hops <= within ? $0.nextHop : nil },
            ]
            if fitting.contains(where: { $0 != nil }) { hops = fitting }
        }
        var out: [STOQURL] = []
        for hop in hops {
            if let hop, let url = neighbourURLs[hop], !down.contains(url.endpoint), !out.contains(where: { $0.endpoint == url.endpoint }),
                !(identities[hop].map { avoiding.contains($0.hex) } ?? false)
            {
                out.append(url)
            }
        }
        return out
    }

    /// Every node this one has a route to, nearest first.
    public var reachable: [NodeIdentity] {
        guard let routes else { return [] }
        return routes.destinations
            .compactMap { d in identities[d].map { (id: $0, cost: routes.cost(to: d) ?? .infinity) } }
            .sorted { $0.cost < $1.cost }
            .map(\.id)
    }
}
