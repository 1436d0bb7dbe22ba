import Foundation
import STOQChunking
import STOQCore
import STOQRouting
import STOQTransfer
import Synchronization

/// The edge fetcher's upstream when the node is in a mesh: a chunk or manifest this node lacks
/// is asked of a node that holds it, through the next hop of the route to that node.
///
/// Where things are (docs/mesh.md "Where chunks are"):
/// - A **relayed** request names its holder; this node asks the next hop on its primary route
///   to the holder, then the backup route's.
/// - A **manifest** this node is asked for first is looked for at every node it has a route
///   to, nearest first, over its primary route, then over the backup routes in the same
///   order, until one has it (404s are cheap: a relay answers from its index).
/// - Its **chunks** are then asked of the node that had the manifest (it stores them), over
///   the primary route and then the backup; if that fails, of every other node, nearest first.
public final class MeshUpstream: FetchUpstream {
    let service: MeshService
    /// Who had what: manifest names and chunk ids (hex) → the node that served them, and a
    /// chunk's length. Bounded: forgotten wholesale when full (they are only hints; a search
    /// finds them again).
    private let holders = Mutex<[String: (node: NodeIdentity, length: Int)]>([:])
    /// The learner, with `routing.algorithm = "ml_optimized"`.
    let multipath: MeshMultipath?
    /// Smoothed time a chunk fetch took (seconds; weight 1/8), nil before the first.
    private let chunkSeconds = Mutex<Double?>(nil)
    static let maxHints = 1 << 20
    /// At most this many attempts for one fetch.
    static let maxAttempts = 12

    public init(service: MeshService) {
        self.service = service
        multipath = service.settings.algorithm == .mlOptimized ? MeshMultipath(kind: service.settings.multipathScheduler) : nil
        if let multipath { service.multipathSource = { multipath.estimates() } }
    }

    public var description: String { "the mesh" }

    static func hintKey(_ r: UpstreamResource) -> String {
        switch r {
        case .chunk(let hex): hex
        case .manifest(let name): "/" + name
        }
    }

    public func attempts(for resource: UpstreamResource, hint: RelayHint?) -> [UpstreamAttempt] {
        let view = service.view
        if let hint {
            guard let holder = view.node(hex: hint.holder), hint.hops < view.maxHops else { return [] }
            return via(view, holder, hops: hint.hops + 1, resource, after: hint.via, within: view.maxHops - hint.hops)
        }
        var out: [UpstreamAttempt] = []
        if let known = holders.withLock({ $0[Self.hintKey(resource)] }) {
            if let multipath, case .chunk = resource {
                out += multipath.order(choices(view, known.node, resource), bytes: known.length)
            } else {
                out += via(view, known.node, hops: 1, resource)
            }
        }
        return Self.search(after: out, routes: view.reachable.map { via(view, $0, hops: 1, resource) })
    }

    /// A search's attempts after `first`: each node's primary route (`routes[i]` holds the
    /// nearest node's, first hop first), nearest node first, then their backups in the same
    /// order, each once, `maxAttempts` in all. A relay that fails a primary route (up but
    /// broken) then leaves the backup to try instead of the search giving up on that node.
    static func search(after first: [UpstreamAttempt], routes: [[UpstreamAttempt]]) -> [UpstreamAttempt] {
        var out = first
        for rank in 0..<2 {
            for node in routes where out.count < maxAttempts && node.count > rank {
                let a = node[rank]
                if !out.contains(where: { $0.same(as: a) }) { out.append(a) }
            }
        }
        return out
    }

    /// Through the next hops towards `holder`, none of them a node the request came through
    /// (`after`: the incoming `Via`, "" when this node asks first), naming this node in `Via`;
    /// for a relay, on routes of at most `within` links (what `max_hops` leaves the request).
    private func via(
        _ view: MeshView, _ holder: NodeIdentity, hops: Int, _ resource: UpstreamResource, after: String = "", within: Int? = nil
    ) -> [UpstreamAttempt] {
        view.nextHops(to: holder, avoiding: MeshWire.viaNodes(after), within: within).map { url in
            Self.attempt(view, through: url, to: holder, hops: hops, resource, after: after)
        }
    }

    /// The request asking `holder` for `resource` through the neighbour at `url`: its relay
    /// path, its `Via` (`after`, then this node), its label.
    private static func attempt(
        _ view: MeshView, through url: STOQURL, to holder: NodeIdentity, hops: Int, _ resource: UpstreamResource, after: String = ""
    ) -> UpstreamAttempt {
        UpstreamAttempt(
            url: url, path: MeshWire.relayPath(holder: holder, hops: hops, resource),
            headers: [("via", MeshWire.via(after, adding: view.me))], holder: holder.hex, label: "node \(holder) via \(url.endpoint)")
    }

    /// The routes to `holder` (primary, backup) whose first hop is up, with their attempts.
    private func choices(_ view: MeshView, _ holder: NodeIdentity, _ resource: UpstreamResource)
        -> [(holder: NodeIdentity, path: MeshView.PathChoice, attempt: UpstreamAttempt)]
    {
        (view.paths[holder.routingID] ?? []).compactMap { p in
            guard let url = view.neighbourURLs[p.nextHop], !view.down.contains(url.endpoint) else { return nil }
            return (holder, p, Self.attempt(view, through: url, to: holder, hops: 1, resource))
        }
    }

    private func nextHop(_ attempt: UpstreamAttempt) -> NodeID? {
        service.view.neighbourURLs.first { $0.value.endpoint == attempt.url.endpoint }?.key
    }

    public func dispatched(_ resource: UpstreamResource, via attempt: UpstreamAttempt) {
        // Chunks only: a manifest's time may hold a search or the holder cutting a plain file.
        guard case .chunk = resource else { return }
        service.deliveryStarted(at: attempt.url.endpoint)
        guard let multipath else { return }
        let length = holders.withLock { $0[Self.hintKey(resource)]?.length } ?? 256 << 10
        multipath.dispatched(attempt, nextHop: nextHop(attempt), bytes: length)
    }

    public func failed(_ resource: UpstreamResource, via attempt: UpstreamAttempt, notFound: Bool) {
        if case .chunk = resource { service.deliveryEnded(at: attempt.url.endpoint, bytes: 0) }
        multipath?.ended(attempt, delivered: false)
    }

    public func cancelled(_ resource: UpstreamResource, via attempt: UpstreamAttempt) {
        if case .chunk = resource { service.deliveryEnded(at: attempt.url.endpoint, bytes: 0) }
        multipath?.cancelled(attempt)
    }

    /// A chunk with no byte when it is late is hedged on another route. With a scheduler
    /// (`ml_optimized`), late is the simulator's rule on what the scheduler expects of its
    /// route and its spread; without one, three times the smoothed time of the chunks fetched
    /// so far (at least 200 ms). Never past the fetcher's 5 s stall timeout. A link cut beyond
    /// the first hop shows up here well before any neighbour declares it down.
    public func hedgeDelay(_ resource: UpstreamResource, via attempt: UpstreamAttempt) -> UInt64? {
        guard case .chunk = resource else { return nil }
        let after: Double
        if let multipath {
            guard let a = multipath.hedgeAfter(attempt) else { return nil }
            after = a
        } else {
            guard let mean = chunkSeconds.withLock({ $0 }) else { return nil }
            after = max(3 * mean, 0.2)
        }
        // A learner's estimate that is not a positive number (NaN would pass `min`) hedges nothing.
        guard after.isFinite, after > 0 else { return nil }
        return UInt64(min(after, 5) * 1e9)
    }

    /// Whether a fetch of `resource` by `attempt` shows its holder has it under its own name.
    /// Not a chunk fetched as a byte range of an object (an edge's own cut of a plain object):
    /// the holder has the object, and may have no chunk of that id.
    static func teachesHolder(_ resource: UpstreamResource, _ attempt: UpstreamAttempt) -> Bool {
        guard case .chunk = resource else { return true }
        return attempt.path.hasSuffix(resource.path)
    }

    public func unreachable(_ resource: UpstreamResource, hint: RelayHint?) -> String? {
        let view = service.view
        if let hint {
            guard let holder = view.node(hex: hint.holder) else { return "mesh: node \(hint.holder.prefix(16)) is unknown here" }
            if hint.hops >= view.maxHops { return "mesh: \(resource) for node \(holder) would exceed routing.max_hops (\(view.maxHops))" }
            return "mesh: no route to node \(holder) within routing.max_hops (\(view.maxHops)) with a live first hop"
        }
        return view.reachable.isEmpty ? "mesh: no other node is reachable yet" : nil
    }

    public func isDown(_ url: STOQURL) -> Bool { service.view.down.contains(url.endpoint) }

    public func fetched(_ resource: UpstreamResource, via attempt: UpstreamAttempt, body: UnsafeRawBufferPointer, seconds: Double) {
        multipath?.ended(attempt, delivered: true)
        if case .chunk = resource {
            service.deliveryEnded(at: attempt.url.endpoint, bytes: body.count)
            chunkSeconds.withLock { $0 = $0.map { $0 + (seconds - $0) / 8 } ?? seconds }
        }
        guard Self.teachesHolder(resource, attempt), let hex = attempt.holder, let bytes = Hex.decode(hex), bytes.count == 32 else { return }
        let holder = NodeIdentity(bytes)
        var keys = [(Self.hintKey(resource), body.count)]
        // A manifest's chunks, as many as the table holds: one listing millions (a holder's
        // lie, or a huge object) must not take the table far past its bound.
        if case .manifest = resource, let m = try? Manifest(decoding: body) {
            keys += m.chunks.prefix(Self.maxHints - 1).map { (Hex.encode($0.id.bytes), Int($0.length)) }
        }
        holders.withLock { h in
            if h.count + keys.count > Self.maxHints { h.removeAll() }
            for (k, length) in keys { h[k] = (holder, length) }
        }
    }
}
