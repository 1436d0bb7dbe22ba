import Logging
import STOQConfig

/// Builds the discovery backend `[mesh]` asks for. This is the only place that names a backend.
public enum DiscoverySelection {
    /// The backend for `config`. `listenPort` is the port DNS AAAA records mean (theirs carry
    /// none); `registration` is how this node lists itself where the backend has registration
    /// (etcd), nil to only watch.
    public static func backend(
        for config: NodeConfig.Mesh, listenPort: UInt16, registration: MeshMember?,
        logger: Logger
    ) -> DiscoveryBackend {
        switch config.discovery {
        case .static:
            return StaticDiscovery(peers: config.peers)
        case .dns:
            var o = DNSDiscovery.Options(name: config.dnsName, defaultPort: listenPort)
            o.server = config.dnsServer
            o.interval = Duration(nanoseconds: config.dnsInterval)
            return DNSDiscovery(options: o, logger: logger)
        case .etcd:
            var o = EtcdDiscovery.Options(endpoints: config.etcdEndpoints, prefix: config.etcdPrefix)
            o.leaseTTLSeconds = Int64(config.etcdLeaseTTL / 1_000_000_000)
            o.registration = registration
            return EtcdDiscovery(options: o, logger: logger)
        }
    }
}
