import STOQConfig

/// `mesh.discovery = "static"`: the members are `mesh.peers`, reported once. Nothing to register,
/// nothing that can fail.
public final class StaticDiscovery: DiscoveryBackend {
    /// The configured neighbours.
    public let peers: [MeshURL]
    private let box = CounterBox()

    /// A backend over a fixed list.
    public init(peers: [MeshURL]) { self.peers = peers }

    public var backendName: String { "static" }
    public var counters: DiscoveryCounters { box.snapshot }

    public func run(_ report: @escaping @Sendable (Set<MeshMember>) async -> Void) async {
        let set = Set(peers.map { MeshMember(url: $0) })
        box.update {
            $0.updates += 1
            $0.members = set.count
        }
        await report(set)
        while await pause(.seconds(3600)) {}
    }
}
