import STOQCore

/// What a node fetches from elsewhere: a chunk by its SHA-256, or an object's manifest.
public enum UpstreamResource: Hashable, Sendable, CustomStringConvertible {
    case chunk(hex: String)
    case manifest(name: String)

    /// The path a node serves it under.
    public var path: String {
        switch self {
        case .chunk(let hex): "/chunks/\(hex)"
        case .manifest(let name): "/manifests/\(name)"
        }
    }

    public var description: String { path }
}

/// Where a relayed request is headed and how far it came: the node that holds the resource,
/// and the hops the request has taken to reach this node.
public struct RelayHint: Sendable, Hashable {
    /// The holder's node id (hex).
    public var holder: String
    /// Hops taken so far (1 when a node's neighbour asked it).
    public var hops: Int
    /// The request's `Via`: the nodes it already passed, which it is never sent back to
    /// (split horizon), and which the next hop's request names with this node added.
    public var via: String
    /// The relayed request asked for an object whole (`…/objects/<name>`), not its manifest:
    /// if the holder has no manifest of it, it is fetched whole and cut here (as for this
    /// node's own requests). A relayed manifest request never is: the chunks of such a cut
    /// exist only at the node that cut it, so its manifest is not handed on.
    public var whole: Bool

    public init(holder: String, hops: Int, via: String = "", whole: Bool = false) {
        self.holder = holder
        self.hops = hops
        self.via = via
        self.whole = whole
    }
}

/// One place to ask for a resource: whom to connect to, and what to request there.
public struct UpstreamAttempt: Sendable {
    /// The upstream connected to (an origin, or the neighbour that is the next hop).
    public var url: STOQURL
    /// The path requested there.
    public var path: String
    /// Extra request headers (a relay's hop count).
    public var headers: [(String, String)]
    /// The node that holds the resource, when the upstream is a mesh (for learning); nil for an origin.
    public var holder: String?
    /// How logs and errors name it ("origin https://…", "node 3f2a… via https://[…]").
    public var label: String

    public init(url: STOQURL, path: String, headers: [(String, String)] = [], holder: String? = nil, label: String) {
        (self.url, self.path, self.headers, self.holder, self.label) = (url, path, headers, holder, label)
    }

    /// Whether two attempts ask the same upstream for the same path.
    public func same(as other: UpstreamAttempt) -> Bool { url.endpoint == other.url.endpoint && path == other.path }

    /// The same request for object `name` whole: `/objects/<name>` in place of the
    /// `/manifests/<name>` it ends with, after a relay's prefix if it has one. Nil when it asks
    /// for something else.
    public func whole(_ name: String) -> UpstreamAttempt? {
        let manifest = UpstreamResource.manifest(name: name).path
        guard path.hasSuffix(manifest) else { return nil }
        var a = self
        a.path = path.dropLast(manifest.count) + "/objects/" + name
        return a
    }
}

/// Where a fetcher's misses go: the edge cache's origin, or the mesh (the next hop towards a
/// node that holds what is missing). The fetcher asks for attempts one at a time as earlier
/// ones fail, so a route that changed in between is taken into account.
public protocol FetchUpstream: AnyObject, Sendable, CustomStringConvertible {
    /// Where to ask for `resource`, best first. `hint` is set when this node relays a request
    /// another node addressed to a holder. Empty: nowhere (the fetch fails with 404, or 502
    /// when `unreachable` says why).
    func attempts(for resource: UpstreamResource, hint: RelayHint?) -> [UpstreamAttempt]
    /// Why no attempt can be made for `resource`, when `attempts` is empty for a reason other
    /// than "nobody has it" (no route to the holder); nil otherwise.
    func unreachable(_ resource: UpstreamResource, hint: RelayHint?) -> String?
    /// Whether requests in flight to `url` should be abandoned now (its link is down).
    func isDown(_ url: STOQURL) -> Bool
    /// A fetch through `attempt` succeeded: `body` verified, `seconds` after this attempt was
    /// sent (not after the fetch began: an earlier attempt's stall, or a hedge's wait, is not
    /// this route's time).
    func fetched(_ resource: UpstreamResource, via attempt: UpstreamAttempt, body: UnsafeRawBufferPointer, seconds: Double)
    /// A request went out through `attempt`.
    func dispatched(_ resource: UpstreamResource, via attempt: UpstreamAttempt)
    /// The request through `attempt` failed, stalled or answered 404 (`notFound`).
    func failed(_ resource: UpstreamResource, via attempt: UpstreamAttempt, notFound: Bool)
    /// The request through `attempt` was cancelled: its hedge partner delivered first.
    func cancelled(_ resource: UpstreamResource, via attempt: UpstreamAttempt)
    /// How long a request through `attempt` may go without a byte before a second one is sent
    /// on another route (a hedge: the first to deliver wins); nil for never.
    func hedgeDelay(_ resource: UpstreamResource, via attempt: UpstreamAttempt) -> UInt64?
}

extension FetchUpstream {
    public func dispatched(_ resource: UpstreamResource, via attempt: UpstreamAttempt) {}
    public func failed(_ resource: UpstreamResource, via attempt: UpstreamAttempt, notFound: Bool) {}
    public func cancelled(_ resource: UpstreamResource, via attempt: UpstreamAttempt) {}
    public func hedgeDelay(_ resource: UpstreamResource, via attempt: UpstreamAttempt) -> UInt64? { nil }
}

/// The edge cache's upstream of old: one origin, asked for everything.
public final class OriginUpstream: FetchUpstream {
    /// `edge.origin`.
    public let origin: STOQURL

    public init(_ origin: STOQURL) { self.origin = origin }

    public var description: String { "origin \(origin)" }

    public func attempts(for resource: UpstreamResource, hint: RelayHint?) -> [UpstreamAttempt] {
        [UpstreamAttempt(url: origin, path: resource.path, label: "origin \(origin)")]
    }

    public func unreachable(_ resource: UpstreamResource, hint: RelayHint?) -> String? { nil }
    public func isDown(_ url: STOQURL) -> Bool { false }
    public func fetched(_ resource: UpstreamResource, via attempt: UpstreamAttempt, body: UnsafeRawBufferPointer, seconds: Double) {}
}
