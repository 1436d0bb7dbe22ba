import STOQCore

/// A node's whole configuration: plain values, validated, immutable once loaded.
/// Every default here is also written, with its documentation, in config/node.toml.
public struct NodeConfig: Sendable, Equatable {
    public struct Node: Sendable, Equatable {
        /// Identity and state live here.
        public var dataDir = "stoq-data"
    }
    public struct QUIC: Sendable, Equatable {
        public var idleTimeout: UInt64 = 30_000_000_000
        public var handshakeTimeout: UInt64 = 10_000_000_000
        public var maxStreamsBidi: Int = 256
        public var initialMaxData: UInt64 = 16 << 20
        public var initialMaxStreamData: UInt64 = 8 << 20
        public var maxWindow: UInt64 = 64 << 20
        public var maxStreamWindow: UInt64 = 32 << 20
        public var maxUDPPayloadSize: Int = 1452
        public var ackThreshold: Int = 2
    }
    /// AF_XDP socket sizing.
    public struct XDP: Sendable, Equatable {
        public var frameSize = 2048
        public var frames = 16384
        public var ringSize = 2048
        public var busyPollMicroseconds = 0
    }
    public struct Network: Sendable, Equatable {
        public var listenAddress = IPv6Endpoint(address: .any, port: 4433)
        public var maxConnections = 10_000
        /// 0 = one per available core.
        public var workers = 0
        public var retry = false
        public var congestionControl = "cubic"
        public var datapath = "auto"
        /// Mutual TLS: "none", "optional" or "required" client certificates.
        public var clientAuth = "none"
        /// The interface AF_XDP binds ("" = none; `auto` then uses io_uring).
        public var interface = ""
        /// AF_XDP queues (= workers) to bind; 0 = every receive queue of the interface.
        public var queues = 0
        /// How the XDP program must be attached: "native", "skb", or "auto" (either).
        public var xdpMode = "auto"
        /// Zero-copy bind: "auto" (where the driver can), "on" (or fail), "off".
        public var zeroCopy = "auto"
        public var xdp = XDP()
        public var quic = QUIC()
    }
    public struct Storage: Sendable, Equatable {
        public var path = "stoq-data/objects"
        /// The content-addressed chunk store and object index (chunked transfers).
        public var contentPath = "stoq-data/content"
        public var maxObjectSize: UInt64 = 64 << 30
    }
    public struct TLS: Sendable, Equatable {
        public var certFile = ""
        public var keyFile = ""
    }
    /// Where the node's certificate comes from and how it rotates (unless `tls.cert_file`
    /// names fixed files).
    public struct Trust: Sendable, Equatable {
        /// "embedded": the node runs its own TrustChain CA under data_dir/trust and issues
        /// itself certificates; "acme": an RFC 8555 CA issues them.
        public var mode = "embedded"
        public var certLifetime: UInt64 = 86_400_000_000_000
        /// Renew this long before expiry; 0 = a third of the lifetime.
        public var renewBefore: UInt64 = 0
        /// PEM file of extra roots peers' certificates may chain to ("" = none).
        public var bundle = ""
        /// Refuse peer certificates (client certificates under client_auth) without a valid
        /// embedded SCT from a trusted log.
        public var requireTransparency = false
        /// PEM files of trusted logs' public keys; empty = this node's own CA log (embedded mode).
        public var transparencyLogs: [String] = []
        public var acme = ACME()
    }
    public struct ACME: Sendable, Equatable {
        public var directory = ""
        public var eabKid = ""
        public var eabHmacKey = ""
        /// PEM file that verifies the ACME server's HTTPS certificate ("" = the system's).
        public var ca = ""
    }
    public struct Routing: Sendable, Equatable {
        public var algorithm = "adaptive"
        public var updateInterval: UInt64 = 5_000_000_000
        public var maxHops = 8
    }
    public struct Chunking: Sendable, Equatable {
        public var algorithm = "content_aware"
        public var minChunkSize: UInt64 = 64 << 10
        public var avgChunkSize: UInt64 = 256 << 10
        public var maxChunkSize: UInt64 = 1 << 20
        public var dedupEnabled = true
    }
    public struct Edge: Sendable, Equatable {
        public var enableCaching = false
        public var cacheSize: UInt64 = 10 << 30
        public var ttlDefault: UInt64 = 3_600_000_000_000
        public var origin = ""
        /// As an origin: the `Cache-Control: max-age` (nanoseconds, sent in whole seconds)
        /// this node puts on manifests and chunked objects; nil = none (caches then use
        /// their own `ttl_default`).
        public var originMaxAge: UInt64? = nil
    }
    public struct Log: Sendable, Equatable {
        public var level = "info"
    }
    /// The admin API (HTTP/1.1 over TCP): `/metrics` (Prometheus text) and `/status` (JSON).
    public struct Admin: Sendable, Equatable {
        /// Where it listens; nil = off.
        public var listen: IPv6Endpoint?
    }

    public var node = Node()
    public var network = Network()
    public var storage = Storage()
    public var tls = TLS()
    public var trust = Trust()
    public var routing = Routing()
    public var chunking = Chunking()
    public var edge = Edge()
    public var log = Log()
    public var admin = Admin()
    /// `[mesh]`: MeshConfig.swift.
    public var mesh = Mesh()

    /// The embedded default: what `stoq-node` runs with no config file.
    public static let `default` = NodeConfig()
    public init() {}
}
