// One object's chunks fetched over several routes: which chunk to request next, on which
// route (asked of the scheduler), when a chunk is stalled and gets a hedge on another route
// (at most one per chunk, within a byte budget), when a request has failed and is retried,
// and what to cancel when a copy wins. Sans-IO: the caller sends the requests `poll` returns,
// reports answers to `receive`, and calls `poll` again at `nextDeadline`.

/// Settings of a multipath transfer.
public struct MultipathTransferSettings: Sendable, Equatable {
    /// Requests (first copies) outstanding at once per transfer.
    public var window: Int = 16
    /// Extra bytes hedges may cost, as a fraction of the bytes requested (when the transfer
    /// has its own budget).
    public var hedgeBudget: Double = 0.05
    /// A request is stalled, and hedged, once older than its expected duration plus
    /// hedgeSpreads × the scheduler's spread of it (`expectedSpread`), at most hedgeFactor × its
    /// expected duration, plus hedgeSlack seconds. One rule for every scheduler: a scheduler
    /// that knows its uncertainty hedges when a request is late for what it knows, one that
    /// does not (spread = half the expectation) at twice the expectation.
    public var hedgeSpreads: Double = 2
    public var hedgeFactor: Double = 2
    public var hedgeSlack: Double = 0.02

    /// How long after dispatch a request with this expected duration and spread (seconds) is
    /// hedged: the rule above. The simulator's transfers and the node's edge fetcher both use it.
    public func hedgeAfter(expected: Double, spread: Double) -> Double {
        stallAfter(expected: max(expected, 1e-4), spread: max(spread, 0)) + hedgeSlack
    }

    /// The rule without the slack.
    func stallAfter(expected: Double, spread: Double) -> Double {
        min(hedgeFactor * expected, expected + hedgeSpreads * spread)
    }
    /// A request has failed once older than failFactor × its expected duration, and at least
    /// failFloor seconds.
    public var failFactor: Double = 6
    public var failFloor: Double = 1
    /// Creates the defaults.
    public init() {}
}

/// Bytes hedges may still spend, shared by every transfer of a node: each first request earns
/// `fraction` of its bytes, each hedge spends its chunk's bytes (so hedges stay within ~5 %
/// extra bytes overall, while a single small object can still hedge its one stalled chunk).
public final class MultipathHedgeBudget {
    /// Share of requested bytes hedges may add.
    public let fraction: Double
    /// Bytes available now.
    public private(set) var available: Double
    /// Bytes spent on hedges so far.
    public private(set) var spent = 0.0
    /// Starts with `initial` bytes (one chunk lets the very first transfer hedge).
    public init(fraction: Double = 0.05, initial: Double = 0) {
        self.fraction = fraction
        self.available = initial
    }
    func earn(_ bytes: Int) { available += fraction * Double(bytes) }
    func canSpend(_ bytes: Int) -> Bool { Double(bytes) <= available }
    func spend(_ bytes: Int) {
        available -= Double(bytes)
        spent += Double(bytes)
    }
}

/// One chunk request to send.
public struct MultipathChunkRequest: Sendable, Equatable {
    /// Unique within the transfer; echo it back in `receive`.
    public var request: Int
    /// Index of the chunk in the object's manifest.
    public var chunk: Int
    /// The route to send it on.
    public var route: MultipathRouteID
    /// Chunk size in bytes.
    public var bytes: Int
    /// True for the second copy of a stalled chunk.
    public var isHedge: Bool
}

/// The state of one object's multipath fetch.
public struct MultipathTransfer {
    struct Outstanding: Sendable {
        var request: Int
        var chunk: Int
        var route: MultipathRouteID
        var at: Double
        var expect: Double
        var isHedge: Bool
        /// When this request counts as stalled; pushed back when no other route could take a hedge.
        var hedgeAt: Double
    }

    /// The transfer's id at the scheduler.
    public let id: MultipathTransferID
    /// Chunk sizes, in manifest order.
    public let chunkBytes: [Int]
    /// Routes that may serve this object (nil: any route of the scheduler).
    public let routes: [MultipathRouteID]?
    private let settings: MultipathTransferSettings
    private var done: [Bool]
    private var hedged: [Bool]
    private var copies: [UInt8]
    private var queue: [Int]
    private var queueHead = 0
    private var outstanding: [Outstanding] = []
    private var nextRequest = 0
    private let budget: MultipathHedgeBudget
    /// Bytes of chunks not requested yet (retries included).
    private var pendingBytes: Int
    /// Chunks verified so far.
    public private(set) var completedChunks = 0
    /// Hedge requests sent, retries after failures, and bytes received twice.
    public private(set) var hedges = 0
    public private(set) var retries = 0
    public private(set) var duplicateBytes = 0

    /// Starts a transfer of chunks of the given sizes.
    /// `budget` is shared by the transfers of a node; by default the transfer has its own.
    public init(
        id: MultipathTransferID, chunkBytes: [Int], routes: [MultipathRouteID]? = nil,
        settings: MultipathTransferSettings = MultipathTransferSettings(), budget: MultipathHedgeBudget? = nil
    ) {
        self.id = id
        self.chunkBytes = chunkBytes
        self.routes = routes
        self.settings = settings
        done = Array(repeating: false, count: chunkBytes.count)
        hedged = done
        copies = Array(repeating: 0, count: chunkBytes.count)
        queue = Array(chunkBytes.indices)
        self.budget = budget ?? MultipathHedgeBudget(fraction: settings.hedgeBudget)
        pendingBytes = chunkBytes.reduce(0, +)
    }

    /// Every chunk verified.
    public var isComplete: Bool { completedChunks == chunkBytes.count }

    /// Requests currently unanswered.
    public var outstandingCount: Int { outstanding.count }

    /// Declares failed requests, hedges stalled ones, fills the window; returns what to send.
    /// Failed requests are reported to the scheduler here.
    public mutating func poll(now: Double, scheduler: some MultipathChunkScheduler) -> [MultipathChunkRequest] {
        var out: [MultipathChunkRequest] = []
        // 1. Failures: give up on a request that is far past its expectation.
        var k = 0
        while k < outstanding.count {
            let o = outstanding[k]
            if now - o.at >= max(settings.failFactor * o.expect, settings.failFloor) {
                outstanding.remove(at: k)
                copies[o.chunk] -= 1
                scheduler.completed(
                    MultipathCompletion(
                        route: o.route, transfer: id, bytes: chunkBytes[o.chunk], requestedAt: o.at,
                        endedAt: now, outcome: .failed), now: now)
                if copies[o.chunk] == 0 && !done[o.chunk] {
                    retries += 1
                    // Retried first, ahead of fresh chunks: the object waits for it.
                    queue.insert(o.chunk, at: queueHead)
                    pendingBytes += chunkBytes[o.chunk]
                }
            } else {
                k += 1
            }
        }
        // 2. Hedges: one extra copy of a stalled chunk on another route, within the budget.
        for (k, o) in outstanding.enumerated() where !o.isHedge && !hedged[o.chunk] && copies[o.chunk] == 1 {
            let bytes = chunkBytes[o.chunk]
            guard budget.canSpend(bytes), now >= o.hedgeAt else { continue }
            guard
                let route = scheduler.choose(
                    transfer: id, bytes: bytes, backlog: pendingBytes + bytes, among: routes,
                    excluding: o.route, now: now)
            else {
                outstanding[k].hedgeAt = now + max(o.expect, 0.05)
                continue
            }
            hedged[o.chunk] = true
            budget.spend(bytes)
            hedges += 1
            out.append(send(chunk: o.chunk, route: route, isHedge: true, now: now, scheduler: scheduler))
        }
        // 3. Fresh chunks while the window has room.
        while queueHead < queue.count && outstanding.count(where: { !$0.isHedge }) < settings.window {
            let chunk = queue[queueHead]
            if done[chunk] || copies[chunk] > 0 { queueHead += 1; continue }
            guard
                let route = scheduler.choose(
                    transfer: id, bytes: chunkBytes[chunk], backlog: pendingBytes, among: routes,
                    excluding: nil, now: now)
            else { break }
            queueHead += 1
            pendingBytes -= chunkBytes[chunk]
            out.append(send(chunk: chunk, route: route, isHedge: false, now: now, scheduler: scheduler))
        }
        return out
    }

    private mutating func send(
        chunk: Int, route: MultipathRouteID, isHedge: Bool, now: Double,
        scheduler: some MultipathChunkScheduler
    ) -> MultipathChunkRequest {
        let bytes = chunkBytes[chunk]
        let expect = max(scheduler.expectedDuration(route: route, bytes: bytes, now: now), 1e-4)
        let spread = max(scheduler.expectedSpread(route: route, bytes: bytes, now: now), 0)
        let stall = settings.stallAfter(expected: expect, spread: spread)
        scheduler.dispatched(transfer: id, route: route, bytes: bytes, now: now)
        if !isHedge { budget.earn(bytes) }
        let r = nextRequest
        nextRequest += 1
        copies[chunk] += 1
        outstanding.append(
            Outstanding(
                request: r, chunk: chunk, route: route, at: now, expect: expect, isHedge: isHedge,
                hedgeAt: now + stall + settings.hedgeSlack))
        return MultipathChunkRequest(request: r, chunk: chunk, route: route, bytes: bytes, isHedge: isHedge)
    }

    /// Reports the answer to a request (`verified` false: reset or digest mismatch). Returns the
    /// requests to cancel (the losing copy of a hedged chunk). Answers to requests already
    /// declared failed or cancelled are ignored.
    public mutating func receive(
        request: Int, verified: Bool, now: Double,
        scheduler: some MultipathChunkScheduler
    ) -> [MultipathChunkRequest] {
        guard let k = outstanding.firstIndex(where: { $0.request == request }) else { return [] }
        let o = outstanding.remove(at: k)
        copies[o.chunk] -= 1
        let bytes = chunkBytes[o.chunk]
        scheduler.completed(
            MultipathCompletion(
                route: o.route, transfer: id, bytes: bytes, requestedAt: o.at, endedAt: now,
                outcome: verified ? .delivered : .failed), now: now)
        guard verified else {
            if copies[o.chunk] == 0 && !done[o.chunk] {
                retries += 1
                queue.insert(o.chunk, at: queueHead)
                pendingBytes += chunkBytes[o.chunk]
            }
            return []
        }
        if done[o.chunk] {
            duplicateBytes += bytes
            return []
        }
        done[o.chunk] = true
        completedChunks += 1
        var cancelled: [MultipathChunkRequest] = []
        while let j = outstanding.firstIndex(where: { $0.chunk == o.chunk }) {
            let c = outstanding.remove(at: j)
            copies[c.chunk] -= 1
            scheduler.completed(
                MultipathCompletion(
                    route: c.route, transfer: id, bytes: bytes, requestedAt: c.at, endedAt: now,
                    outcome: .cancelled), now: now)
            cancelled.append(
                MultipathChunkRequest(
                    request: c.request, chunk: c.chunk, route: c.route, bytes: bytes,
                    isHedge: c.isHedge))
        }
        return cancelled
    }

    /// When `poll` next has work that no answer will trigger (a hedge or a failure), if any.
    public var nextDeadline: Double? {
        var t = Double.infinity
        for o in outstanding {
            t = min(t, o.at + max(settings.failFactor * o.expect, settings.failFloor))
            if !o.isHedge && !hedged[o.chunk] && copies[o.chunk] == 1 && budget.canSpend(chunkBytes[o.chunk]) {
                t = min(t, o.hedgeAt)
            }
        }
        return t.isFinite ? t : nil
    }
}
