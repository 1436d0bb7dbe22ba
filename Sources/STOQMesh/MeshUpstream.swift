import Foundation
import STOQChunking
import STOQCore
import STOQTransfer
import Synchronization

/// The edge fetcher's upstream when the node is in a mesh: a chunk or manifest this node lacks
/// is asked of a node that holds it, through the next hop of the route to that node.
///
/// Where things are (docs/mesh.md "Where chunks are"):
/// - A **relayed** request names its holder; this node asks the next hop on its primary route
///   to the holder, then the backup route's.
/// - A **manifest** this node is asked for first is looked for at every node it has a route
///   to, nearest first, until one has it (404s are cheap: a relay answers from its index).
/// - Its **chunks** are then asked of the node that had the manifest (it stores them), over
///   the primary route and then the backup; if that fails, of every other node, nearest first.
public final class MeshUpstream: FetchUpstream {
    let service: MeshService
    /// Who had what: manifest names and chunk ids (hex) → the node that served them. Bounded:
    /// forgotten wholesale when full (they are only hints; a search finds them again).
    private let holders = Mutex<[String: NodeIdentity]>([:])
    static let maxHints = 1 << 20
    /// At most this many attempts for one fetch.
    static let maxAttempts = 12

    public init(service: MeshService) { self.service = service }

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
            return via(view, holder, hops: hint.hops + 1, resource).filter { $0.url.endpoint.address != hint.from }
        }
        var out: [UpstreamAttempt] = []
        if let known = holders.withLock({ $0[Self.hintKey(resource)] }) { out += via(view, known, hops: 1, resource) }
        for node in view.reachable where out.count < Self.maxAttempts {
            for a in via(view, node, hops: 1, resource).prefix(1) where !out.contains(where: { $0.same(as: a) }) { out.append(a) }
        }
        return out
    }

    private func via(_ view: MeshView, _ holder: NodeIdentity, hops: Int, _ resource: UpstreamResource) -> [UpstreamAttempt] {
        view.nextHops(to: holder).map { url in
            UpstreamAttempt(
                url: url, path: MeshWire.relayPath(holder: holder, hops: hops, resource), holder: holder.hex,
                label: "node \(holder) via \(url.endpoint)")
        }
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
        service.delivered(from: attempt.url.endpoint, bytes: body.count, nanos: UInt64(seconds * 1e9))
        guard let hex = attempt.holder, let bytes = Hex.decode(hex), bytes.count == 32 else { return }
        let holder = NodeIdentity(bytes)
        var keys = [Self.hintKey(resource)]
        if case .manifest = resource, let m = try? Manifest(decoding: body) {
            keys += m.chunks.map { Hex.encode($0.id.bytes) }
        }
        holders.withLock { h in
            if h.count + keys.count > Self.maxHints { h.removeAll() }
            for k in keys { h[k] = holder }
        }
    }
}
