import Foundation
import STOQCore
import STOQRouting
import STOQTransfer
import Synchronization

/// `routing.algorithm = "ml_optimized"` in a node: the learner (`LearnerScheduler`) picks, for
/// every chunk this node fetches from a holder, which of the routes to it the request takes —
/// the primary's next hop, the backup's, or another holder's — and learns from how each
/// chunk fetch ended. One object's chunks are fetched several at a time (the edge's read-ahead),
/// so they spread over the routes in the proportion the learner finds fastest.
///
/// A route is (holder, next hop). The edge fetcher's thread makes every call but `estimates`;
/// the lock is there for the admin API's reads.
final class MeshMultipath: @unchecked Sendable {
    struct State {
        let scheduler: any MultipathChunkScheduler
        var ids: [String: MultipathRouteID] = [:]
        var names: [MultipathRouteID: (holder: NodeIdentity, nextHop: NodeID)] = [:]
        var candidates: [MultipathRouteID: MultipathRouteFeatures] = [:]
        /// Requests out: next hop and path → route, bytes, when, oldest first. Two fetches
        /// may send the same path to the same next hop at once (a chunk asked for whole and
        /// for a relay), so each key holds a list: two sends, two ends.
        var out: [String: [Out]] = [:]
        /// Per route since it was first offered: chunk requests sent, verified bytes delivered.
        var sent: [MultipathRouteID: Int] = [:]
        var delivered: [MultipathRouteID: Int] = [:]
        /// When each route was last offered (`order`), the next id, and the last sweep.
        var offered: [MultipathRouteID: Double] = [:]
        var nextID = 0
        var lastSweep = 0.0
        var lastOutSweep = 0.0
    }

    struct Out {
        var route: MultipathRouteID
        var bytes: Int
        var at: Double
    }

    /// A route not offered for this long (seconds: its holder or next hop gone, or nothing
    /// fetched through it) is forgotten, and learnt afresh if it comes back: a node that runs
    /// for months keeps only the routes it uses.
    static let forgetAfter = 600.0
    /// A request out this long (seconds) has lost its end: a path of the fetcher that dropped
    /// it without saying so. It is taken back as cancelled (no information about its route),
    /// so its bytes stop counting against the route, which would otherwise go unused until a
    /// restart. Far past any fetch's deadline.
    static let lostAfter = 120.0

    private let state: Mutex<State>
    private let clock: @Sendable () -> Double
    private let kind: MultipathSchedulerKind

    /// A scheduler of `kind` (the learner, or a baseline to compare it with), on `clock`
    /// (seconds; default: monotonic from now).
    init(kind: MultipathSchedulerKind, clock: (@Sendable () -> Double)? = nil) {
        let scheduler: any MultipathChunkScheduler =
            switch kind {
            case .minRTT: MinRTTScheduler()
            case .roundRobin: RoundRobinScheduler()
            case .bestSingle: BestSingleScheduler()
            case .mlOptimized, .fixedSplit: LearnerScheduler()
            }
        state = Mutex(State(scheduler: scheduler))
        self.kind = kind
        let epoch = monotonicNow()
        self.clock = clock ?? { Double(monotonicNow() &- epoch) / 1e9 }
    }

    var now: Double { clock() }

    /// Orders `choices` (the routes to holders of a chunk of `bytes`) with the learner's pick
    /// first; the rest keep their order (primary before backup) for failover.
    func order(_ choices: [(holder: NodeIdentity, path: MeshView.PathChoice, attempt: UpstreamAttempt)], bytes: Int) -> [UpstreamAttempt] {
        guard choices.count > 1 else { return choices.map(\.attempt) }
        let t = now
        let chosen: Int? = state.withLock { s in
            var ids: [MultipathRouteID] = []
            var changed = false
            for c in choices {
                let key = Self.routeKey(c.holder.hex, c.path.nextHop)
                let id: MultipathRouteID
                if let known = s.ids[key] {
                    id = known
                } else {
                    id = MultipathRouteID(s.nextID)
                    s.nextID += 1
                    s.ids[key] = id
                    s.names[id] = (c.holder, c.path.nextHop)
                }
                s.offered[id] = t
                if s.candidates[id] != c.path.features { s.candidates[id] = c.path.features; changed = true }
                ids.append(id)
            }
            if t - s.lastOutSweep >= Self.lostAfter / 10 {
                s.lastOutSweep = t
                takeBackLost(&s, now: t)
            }
            var forgot = false
            if t - s.lastSweep >= Self.forgetAfter / 10 {
                s.lastSweep = t
                forgot = forget(&s, now: t)
            }
            if changed || forgot {
                s.scheduler.update(
                    candidates: s.candidates.map { MultipathCandidate(id: $0.key, features: $0.value) }.sorted { $0.id < $1.id }, now: t)
            }
            if forgot { s.scheduler.forgetWithdrawn() }
            // "Wait" (nil) cannot be honoured: the edge fetcher sends every chunk it is given at
            // once. best_single waits for its one route, so the chunk goes there (falling back to
            // the least expected time spread it over both routes: 57 % / 43 % on the testbed);
            // for the others nil means every window is full or the learner holds back, and the
            // chunk takes the route expected to finish it first.
            let pick =
                s.scheduler.choose(transfer: 0, bytes: bytes, backlog: bytes, among: ids, excluding: nil, now: t)
                ?? (kind == .bestSingle
                    ? ids.max { rate(s.candidates[$0]) < rate(s.candidates[$1]) }
                    : ids.min { s.scheduler.expectedDuration(route: $0, bytes: bytes, now: t) < s.scheduler.expectedDuration(route: $1, bytes: bytes, now: t) })
            return pick.flatMap { ids.firstIndex(of: $0) }
        }
        guard let chosen else { return choices.map(\.attempt) }
        var out = [choices[chosen].attempt]
        for (i, c) in choices.enumerated() where i != chosen { out.append(c.attempt) }
        return out
    }

    /// Drops the routes not offered for `forgetAfter` with no request out; the caller's
    /// `update` then withdraws them from the scheduler, which forgets them. True when any went.
    private func forget(_ s: inout State, now t: Double) -> Bool {
        let busy = Set(s.out.values.flatMap { $0.map(\.route) })
        let stale = s.offered.filter { t - $0.value >= Self.forgetAfter && !busy.contains($0.key) }.map(\.key)
        guard !stale.isEmpty else { return false }
        for id in stale {
            if let n = s.names.removeValue(forKey: id) { s.ids[Self.routeKey(n.holder.hex, n.nextHop)] = nil }
            s.candidates[id] = nil
            s.offered[id] = nil
            s.sent[id] = nil
            s.delivered[id] = nil
        }
        return true
    }

    /// Cancels the requests out for `lostAfter` (see there).
    private func takeBackLost(_ s: inout State, now t: Double) {
        for (key, outs) in s.out where outs.contains(where: { t - $0.at >= Self.lostAfter }) {
            for o in outs where t - o.at >= Self.lostAfter {
                s.scheduler.completed(
                    MultipathCompletion(route: o.route, transfer: 0, bytes: o.bytes, requestedAt: o.at, endedAt: t, outcome: .cancelled),
                    now: t)
            }
            let left = outs.filter { t - $0.at < Self.lostAfter }
            s.out[key] = left.isEmpty ? nil : left
        }
    }

    /// The oldest request out under `key`, taken off the list.
    private static func takeOut(_ s: inout State, _ key: String) -> Out? {
        guard var outs = s.out[key], !outs.isEmpty else { return nil }
        let o = outs.removeFirst()
        s.out[key] = outs.isEmpty ? nil : outs
        return o
    }

    /// The key `State.ids` holds a route under: its holder (hex) and its next hop.
    private static func routeKey(_ holderHex: String, _ nextHop: NodeID) -> String { "\(holderHex)|\(nextHop.rawValue)" }

    /// A request out: the same path may go to two next hops at once (a hedge).
    static func key(_ attempt: UpstreamAttempt) -> String { "\(attempt.url.endpoint) \(attempt.path)" }

    /// What best_single ranks routes by: the advertised delivery rate, thinned by loss.
    private func rate(_ f: MultipathRouteFeatures?) -> Double { f.map { $0.deliveryRate * (1 - $0.loss) } ?? 0 }

    /// The route an attempt's path took, if the learner knows it.
    private func route(_ s: State, _ attempt: UpstreamAttempt, nextHop: NodeID?) -> MultipathRouteID? {
        guard let holder = attempt.holder, let nextHop else { return nil }
        return s.ids[Self.routeKey(holder, nextHop)]
    }

    func dispatched(_ attempt: UpstreamAttempt, nextHop: NodeID?, bytes: Int) {
        let t = now
        state.withLock { s in
            guard let r = route(s, attempt, nextHop: nextHop) else { return }
            s.scheduler.dispatched(transfer: 0, route: r, bytes: bytes, now: t)
            s.out[Self.key(attempt), default: []].append(Out(route: r, bytes: bytes, at: t))
            s.sent[r, default: 0] += 1
        }
    }

    func ended(_ attempt: UpstreamAttempt, delivered: Bool) {
        let t = now
        state.withLock { s in
            guard let o = Self.takeOut(&s, Self.key(attempt)) else { return }
            if delivered { s.delivered[o.route, default: 0] += o.bytes }
            s.scheduler.completed(
                MultipathCompletion(
                    route: o.route, transfer: 0, bytes: o.bytes, requestedAt: o.at, endedAt: t,
                    outcome: delivered ? .delivered : .failed), now: t)
        }
    }

    /// A request cancelled because its hedge partner won: no information about its route.
    func cancelled(_ attempt: UpstreamAttempt) {
        let t = now
        state.withLock { s in
            guard let o = Self.takeOut(&s, Self.key(attempt)) else { return }
            s.scheduler.completed(
                MultipathCompletion(route: o.route, transfer: 0, bytes: o.bytes, requestedAt: o.at, endedAt: t, outcome: .cancelled),
                now: t)
        }
    }

    /// When the request out through `attempt` is late enough to hedge, seconds after it was
    /// sent: the simulator's rule (`MultipathTransferSettings.hedgeAfter`) on what the scheduler
    /// expects of its route and how sure it is.
    func hedgeAfter(_ attempt: UpstreamAttempt) -> Double? {
        let t = now
        return state.withLock { s in
            guard let o = s.out[Self.key(attempt)]?.first else { return nil }
            return MultipathTransferSettings().hedgeAfter(
                expected: s.scheduler.expectedDuration(route: o.route, bytes: o.bytes, now: t),
                spread: s.scheduler.expectedSpread(route: o.route, bytes: o.bytes, now: t))
        }
    }

    /// Each route's estimate and share, for `stoq mesh routes`.
    func estimates() -> [MeshStatus.MultipathRoute] {
        let t = now
        return state.withLock { s in
            s.scheduler.estimates(now: t).compactMap { e in
                guard let n = s.names[e.route] else { return nil }
                return MeshStatus.MultipathRoute(
                    holder: n.holder.hex, nextHop: Hex.encode(withUnsafeBytes(of: n.nextHop.rawValue.bigEndian) { Array($0) }),
                    latencyMillis: e.latency * 1_000,
                    rateBytesPerSecond: e.rate, failureProbability: e.failureProbability, inFlightBytes: e.inFlightBytes,
                    chunkShare: e.chunkShare, evidence: e.evidence, dispatchedChunks: s.sent[e.route] ?? 0,
                    deliveredBytes: s.delivered[e.route] ?? 0)
            }
        }
    }
}
