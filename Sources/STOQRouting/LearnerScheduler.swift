// ml_optimized: an online learner that predicts, for every route, how long a chunk sent now
// would take, and sends it where that is shortest. docs/multipath.md has the derivation.
//
// Model, per route: T = L + θ·x + ε, where T is a chunk's request-to-verified time, x the bytes
// ahead of and including the chunk on that route (in-flight bytes of every transfer of this
// node, plus the chunk), L the fixed part (RTT, per-hop verification), θ seconds per byte
// (1 / service rate). A Bayesian linear regression with a Gaussian prior built from the
// link-state features, observations discounted in time so the posterior drifts back to the
// current link-state view when a route goes quiet or the network changes, and a two-sided
// CUSUM on standardised residuals that drops old evidence at once when the route changes.
// Decision: Thompson sampling — draw (L, θ) from each posterior and take the smallest
// expected completion time, inflated by the discounted failure probability and by how late the
// route's oldest outstanding chunk already is. Because x counts every transfer's bytes, fifty
// transfers see each other's load and spread instead of herding.

/// Settings of the learner; defaults are the documented ones (docs/multipath.md).
public struct LearnerSettings: Sendable, Equatable {
    /// Time constant of forgetting: an observation's weight is exp(-age / forgetTime), seconds.
    public var forgetTime: Double = 8
    /// Relative standard deviation of the link-state prior on L and θ.
    public var priorSpread: Double = 0.5
    /// CUSUM slack and threshold (in standard deviations) of change detection.
    public var cusumSlack: Double = 0.5
    public var cusumThreshold: Double = 6
    /// Fraction of evidence kept when a change is detected.
    public var keepOnChange: Double = 0.05
    /// The link state says a route changed when its advertised time per byte (bottleneck rate,
    /// loss, peer load) moves by this factor or more between two updates: the evidence gathered
    /// before is then dropped as on a detected change, instead of outvoting the new prior for
    /// `forgetTime`.
    public var advertChange: Double = 2
    /// Late binding: a chunk is held back (choose returns nil) while the route it would finish
    /// soonest on already has more than max(queueHorizon, queueHorizonRTTs × its least RTT)
    /// seconds of work queued, so few chunks are committed to a route that may change.
    public var queueHorizon: Double = 0.25
    public var queueHorizonRTTs: Double = 4
    /// Earliest-completion-first margin: a slower route takes a chunk held back from the full
    /// ones only if the chunk's completion there, mean plus this many predictive standard
    /// deviations, is before the node's queue ahead of it drains through the full routes. The
    /// chunk a slower route takes is often its transfer's last, so its variance is the tail.
    public var ecfRiskSDs: Double = 2
    /// A transfer not heard from for this long no longer counts in the node's queue, seconds.
    public var pendingExpiry: Double = 5
    /// Seed of the sampling stream.
    public var seed: UInt64 = 1
    /// Creates the defaults.
    public init() {}
}

/// The `ml_optimized` scheduler.
public final class LearnerScheduler: MultipathRouteBook, MultipathChunkScheduler {
    public var name: String { MultipathSchedulerKind.mlOptimized.rawValue }

    /// Units inside the model: seconds and megabytes, so θ is seconds per MB and the 2×2
    /// algebra stays well conditioned.
    private static let mb = 1_000_000.0

    struct Model {
        // Discounted sufficient statistics of (1, x) → T.
        var n = 0.0, sx = 0.0, sxx = 0.0, st = 0.0, sxt = 0.0, rss = 0.0
        var stamp = 0.0
        // Prior from link-state features.
        var l0 = 0.05, th0 = 0.1
        // Posterior (mean, covariance Cholesky factor), noise variance.
        var mL = 0.05, mT = 0.1, c11 = 0.0, c21 = 0.0, c22 = 0.0, sigma2 = 0.0
        // The Thompson draw decisions use until the posterior next changes.
        var sL = 0.05, sT = 0.1
        // Discounted failures and trials.
        var fails = 0.0, trials = 0.0
        var cusumUp = 0.0, cusumDown = 0.0
        var changes = 0
        // Outstanding requests in dispatch order (time, predicted duration); lazily popped.
        var outstanding: [(at: Double, expect: Double, bytes: Int, x: Double)] = []
        var head = 0
    }

    private var models: [Model] = []
    /// Bytes each transfer had not requested yet at its last decision, and when: the queue late
    /// binding holds at the node. ECF counts the part ahead of a transfer (smaller ids started
    /// earlier and are served first).
    private var pending: [MultipathTransferID: (bytes: Int, at: Double)] = [:]
    /// Size past which expired entries of `pending` are dropped (doubles with live transfers, so
    /// the purge stays amortised O(1) per decision).
    private var pendingPurgeAt = 256
    private var rng: MultipathRandom
    private let settings: LearnerSettings
    /// Chunk-size-agnostic count of decisions, for operators and the benchmark.
    public private(set) var decisions = 0
    /// How many times change detection dropped a route's evidence.
    public var detectedChanges: Int { models.reduce(0) { $0 + $1.changes } }

    /// Creates the learner.
    public init(settings: LearnerSettings = LearnerSettings()) {
        self.settings = settings
        self.rng = MultipathRandom(seed: settings.seed)
    }

    override func routeAdded(at i: Int, now: Double) {
        var m = Model()
        m.stamp = now
        models.append(m)
        setPrior(i)
        refresh(i, now: now)
    }

    override func routesKept(_ kept: [Int]) { models = kept.map { models[$0] } }

    public override func update(candidates: [MultipathCandidate], now: Double) {
        super.update(candidates: candidates, now: now)
        for i in routes.indices {
            let th0 = models[i].th0
            setPrior(i)
            if moved(th0, models[i].th0) { forgetEvidence(i) }
            refresh(i, now: now)
        }
    }

    /// The link-state prior: L from the probe RTT, θ from the advertised bottleneck rate thinned
    /// by loss and by the peer's load.
    private func setPrior(_ i: Int) {
        let f = routes[i].features
        let rate = f.deliveryRate * (1 - f.loss) * (1 - 0.5 * f.peerLoad)
        models[i].l0 = f.rttMean + f.rttVariance.squareRoot()
        models[i].th0 = Self.mb / max(rate, 1)
    }

    /// Applies time discounting and recomputes the posterior.
    private func refresh(_ i: Int, now: Double) {
        var m = models[i]
        let dt = now - m.stamp
        if dt > 0 {
            let w = _exp(-dt / settings.forgetTime)
            m.n *= w; m.sx *= w; m.sxx *= w; m.st *= w; m.sxt *= w; m.rss *= w
            m.fails *= w; m.trials *= w
            m.stamp = now
        }
        // Noise: the prior guess (30 % of a 1 MB chunk's time) worth two observations, plus the
        // discounted residuals.
        let s0 = 0.3 * (m.l0 + m.th0)
        let sigma2 = max((2 * s0 * s0 + m.rss) / (2 + m.n), 1e-8)
        let pL = 1 / sq(settings.priorSpread * m.l0 + 0.002)
        let pT = 1 / sq(settings.priorSpread * m.th0)
        // Posterior precision A = diag(pL, pT) + X'X / σ², right side b.
        let a11 = pL + m.n / sigma2, a12 = m.sx / sigma2, a22 = pT + m.sxx / sigma2
        let b1 = pL * m.l0 + m.st / sigma2, b2 = pT * m.th0 + m.sxt / sigma2
        let det = a11 * a22 - a12 * a12
        m.mL = (a22 * b1 - a12 * b2) / det
        m.mT = (a11 * b2 - a12 * b1) / det
        // Covariance = A⁻¹; keep its Cholesky factor for sampling.
        let v11 = a22 / det, v12 = -a12 / det, v22 = a11 / det
        m.c11 = v11.squareRoot()
        m.c21 = v12 / m.c11
        m.c22 = max(v22 - m.c21 * m.c21, 0).squareRoot()
        m.sigma2 = sigma2
        // One draw per posterior, not per decision: within a burst of decisions the queue term
        // then stays consistent (a fresh optimistic draw per chunk would pile a burst onto a
        // slow route). Clamped to [½, 2]× the mean so one unlucky draw cannot flood a route.
        let z1 = rng.normal(), z2 = rng.normal()
        m.sL = min(max(m.mL + m.c11 * z1, 0), 2 * max(m.mL, 0) + 0.002)
        m.sT = min(max(m.mT + m.c21 * z1 + m.c22 * z2, 0.5 * m.mT), 2 * m.mT)
        models[i] = m
    }

    @inline(__always) private func sq(_ x: Double) -> Double { x * x }

    /// Expected completion time of `bytes` on route i given (L, θ) and the route's state.
    @inline(__always) private func completionTime(_ i: Int, l: Double, theta: Double, bytes: Int, now: Double) -> Double {
        let m = models[i]
        let x = Double(routes[i].inFlightBytes + bytes) / Self.mb
        var t = max(l, 0) + max(theta, 0.02 * m.th0) * x
        // A route whose oldest request is already late is slower than the model knows yet.
        if m.head < m.outstanding.count {
            let o = m.outstanding[m.head]
            let age = now - o.at
            if age > o.expect { t *= age / o.expect }
        }
        // Failures cost a timeout and a retry elsewhere.
        let pf = (m.fails + 0.02) / (m.trials + 1)
        if pf > 0.03 { t += pf / (1 - min(pf, 0.95)) * (2 * t + 0.5) }
        return t
    }

    public func choose(
        transfer: MultipathTransferID, bytes: Int, backlog: Int, among: [MultipathRouteID]?,
        excluding: MultipathRouteID?, now: Double
    ) -> MultipathRouteID? {
        decisions += 1
        var best = -1
        var bestT = Double.infinity
        for i in routes.indices where usable(i, among: among, excluding: excluding) {
            let t = completionTime(i, l: models[i].sL, theta: models[i].sT, bytes: bytes, now: now)
            if t < bestT { bestT = t; best = i }
        }
        guard best >= 0 else { return nil }
        guard excluding == nil else { return routes[best].id }
        guard isFull(best) else {
            notePending(transfer, backlog - bytes, now: now)
            return routes[best].id
        }
        // The fastest route is full. Waiting for it is right unless the chunk would finish
        // sooner on a route with room than the node's queue ahead of it — this transfer's
        // backlog and the earlier transfers' — drains through the full routes together (the
        // earliest-completion-first rule, ECF, with the queue the node holds back counted).
        // The slower route must win by a margin of its own uncertainty: the chunk it takes is
        // often its transfer's last, so its variance is the object's tail.
        var fullRate = 0.0, fullBytes = 0.0, fullL = Double.infinity
        for i in routes.indices where usable(i, among: among, excluding: nil) && isFull(i) {
            fullRate += 1 / max(models[i].sT, 1e-9)
            fullBytes += Double(routes[i].inFlightBytes)
            fullL = min(fullL, models[i].sL)
        }
        // Summed as integers: the dictionary's order differs between processes, the sum must not.
        var ahead = backlog
        for (u, p) in pending where u < transfer && now - p.at < settings.pendingExpiry { ahead += p.bytes }
        let drain = fullL + (fullBytes + Double(ahead)) / Self.mb / fullRate
        var alt = -1
        var altT = Double.infinity
        for i in routes.indices where usable(i, among: among, excluding: nil) && !isFull(i) {
            let t =
                completionTime(i, l: models[i].sL, theta: models[i].sT, bytes: bytes, now: now)
                + settings.ecfRiskSDs * spread(i, bytes: bytes)
            if t < altT { altT = t; alt = i }
        }
        guard alt >= 0 && altT <= drain else {
            notePending(transfer, backlog, now: now)
            return nil
        }
        notePending(transfer, backlog - bytes, now: now)
        return routes[alt].id
    }

    @inline(__always) private func notePending(_ t: MultipathTransferID, _ bytes: Int, now: Double) {
        if bytes > 0 { pending[t] = (bytes, now) } else { pending[t] = nil }
        // A transfer abandoned with chunks left never reports 0: drop the expired ones now and
        // then, so a long-lived node's table stays as small as its live transfers.
        if pending.count > pendingPurgeAt {
            pending = pending.filter { now - $0.value.at < settings.pendingExpiry }
            pendingPurgeAt = max(256, 2 * pending.count)
        }
    }

    /// One predictive standard deviation of a chunk's time on route i sent now: the posterior's
    /// uncertainty about (L, θ) at this queue, plus the noise.
    @inline(__always) private func spread(_ i: Int, bytes: Int) -> Double {
        let m = models[i]
        let x = Double(routes[i].inFlightBytes + bytes) / Self.mb
        let a = m.c11 + x * m.c21, b = x * m.c22
        return (a * a + b * b + m.sigma2).squareRoot()
    }

    /// More than the late-binding horizon of work already queued on route i.
    /// The horizon counts round trips of the route's least advertised RTT (its propagation), not
    /// of the learned L: L also holds standing queues and outages, and a horizon that grew with
    /// them committed seconds of chunks to the route that had just turned slow.
    @inline(__always) private func isFull(_ i: Int) -> Bool {
        let m = models[i]
        let rtt = routes[i].minRTT.isFinite ? routes[i].minRTT : m.l0
        return m.sT * Double(routes[i].inFlightBytes) / Self.mb > max(settings.queueHorizon, settings.queueHorizonRTTs * rtt)
    }

    public override func dispatched(transfer: MultipathTransferID, route: MultipathRouteID, bytes: Int, now: Double) {
        guard let i = index[route] else { return }
        let expect = expectedDuration(route: route, bytes: bytes, now: now)
        // The regressor: bytes ahead of and including this chunk on the route, at dispatch.
        let x = Double(routes[i].inFlightBytes + bytes) / Self.mb
        super.dispatched(transfer: transfer, route: route, bytes: bytes, now: now)
        models[i].outstanding.append((now, max(expect, 1e-4), bytes, x))
    }

    public override func completed(_ c: MultipathCompletion, now: Double) {
        guard let i = index[c.route] else { return }
        // Find the request (same route, time and size are indistinguishable, any will do).
        var x = Double(c.bytes) / Self.mb
        var expect = Double.infinity
        var found = -1
        var k = models[i].head
        while k < models[i].outstanding.count {
            let o = models[i].outstanding[k]
            if o.bytes >= 0 && o.at == c.requestedAt && o.bytes == c.bytes { found = k; x = o.x; expect = o.expect; break }
            k += 1
        }
        if found >= 0 { models[i].outstanding[found].bytes = -1 }
        while models[i].head < models[i].outstanding.count && models[i].outstanding[models[i].head].bytes < 0 {
            models[i].head += 1
        }
        if models[i].head > 64 && models[i].head * 2 > models[i].outstanding.count {
            models[i].outstanding.removeFirst(models[i].head)
            models[i].head = 0
        }
        super.completed(c, now: now)
        refresh(i, now: now)
        switch c.outcome {
        case .cancelled:
            // The copy lost to a hedge. If it was the stalled one (well past its expectation),
            // that is a censored observation — it would have taken at least this long — and a
            // failure to deliver in time; otherwise it says nothing.
            let age = c.endedAt - c.requestedAt
            guard age > 2 * expect else { return }
            models[i].fails += 1
            models[i].trials += 1
            observe(i, x: x, t: age)
        case .failed:
            models[i].fails += 1
            models[i].trials += 1
            // A timeout is a lower bound on the time: learn from it as an observation.
            observe(i, x: x, t: c.endedAt - c.requestedAt)
        case .delivered:
            models[i].trials += 1
            observe(i, x: x, t: c.endedAt - c.requestedAt)
        }
        refresh(i, now: now)
    }

    /// True when a link-state value moved by the change factor or more.
    @inline(__always) private func moved(_ a: Double, _ b: Double) -> Bool {
        let f = settings.advertChange
        return b > f * a || a > f * b
    }

    /// Drops a route's evidence down to `keepOnChange` of it (the network changed under it).
    private func forgetEvidence(_ i: Int) {
        let k = settings.keepOnChange
        models[i].n *= k; models[i].sx *= k; models[i].sxx *= k; models[i].st *= k; models[i].sxt *= k; models[i].rss *= k
        models[i].fails *= k; models[i].trials *= k
        models[i].cusumUp = 0; models[i].cusumDown = 0
        models[i].changes += 1
    }

    private func observe(_ i: Int, x: Double, t: Double) {
        let residual = t - (models[i].mL + models[i].mT * x)
        let z = residual / models[i].sigma2.squareRoot()
        models[i].cusumUp = max(0, models[i].cusumUp + z - settings.cusumSlack)
        models[i].cusumDown = max(0, models[i].cusumDown - z - settings.cusumSlack)
        if models[i].cusumUp > settings.cusumThreshold || models[i].cusumDown > settings.cusumThreshold {
            forgetEvidence(i)
        }
        var m = models[i]
        m.n += 1; m.sx += x; m.sxx += x * x; m.st += t; m.sxt += x * t
        m.rss += min(residual * residual, 25 * m.sigma2)
        models[i] = m
    }

    public override func expectedDuration(route: MultipathRouteID, bytes: Int, now: Double) -> Double {
        guard let i = index[route] else { return 1 }
        let m = models[i]
        return completionTime(i, l: m.mL, theta: m.mT, bytes: bytes, now: now)
    }

    /// The predictive standard deviation at the route's current queue: the transfer hedges a
    /// chunk once it is late for what the learner knows, not at a fixed multiple.
    public func expectedSpread(route: MultipathRouteID, bytes: Int, now: Double) -> Double {
        guard let i = index[route] else { return 0.5 }
        return spread(i, bytes: bytes)
    }

    public override func estimates(now: Double) -> [MultipathRouteEstimate] {
        routes.indices.map { i in
            let m = models[i]
            return MultipathRouteEstimate(
                route: routes[i].id, latency: max(m.mL, 0), rate: Self.mb / max(m.mT, 1e-9),
                failureProbability: (m.fails + 0.02) / (m.trials + 1),
                inFlightBytes: routes[i].inFlightBytes, chunkShare: routes[i].share,
                evidence: m.n)
        }
    }
}
