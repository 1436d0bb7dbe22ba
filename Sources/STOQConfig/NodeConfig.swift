import Logging
import STOQChunking
import STOQCore
import STOQRouting
import STOQStore
import STOQQUIC

/// A node's whole configuration: plain values, validated, immutable once loaded, every
/// choice already a type. Every default here is also written, with its documentation, in
/// config/node.toml (a test holds the two together); the transport's defaults are
/// `QUICSettings`' own.
public struct NodeConfig: Sendable, Equatable {
    public struct Node: Sendable, Equatable {
        /// Identity and state live here.
        public var dataDir = NodeConfig.defaultDataDirectory
    }
    /// `network.datapath`.
    public enum Datapath: String, Sendable, CaseIterable {
        /// AF_XDP when the XDP program is attached to `network.interface`, io_uring otherwise.
        case auto
        case ioURing = "io_uring"
        case afXDP = "af_xdp"
    }
    /// `network.xdp_mode`: how the XDP program must be attached.
    public enum XDPMode: String, Sendable, CaseIterable {
        case auto, native, skb
    }
    /// `network.zero_copy`: the AF_XDP bind.
    public enum ZeroCopy: String, Sendable, CaseIterable {
        /// Zero-copy where the driver supports it, else copy mode.
        case auto
        /// Zero-copy or fail.
        case on
        /// Copy mode always.
        case off
    }
    /// AF_XDP socket sizing.
    public struct XDP: Sendable, Equatable {
        public var frameSize = 2048
        public var frames = 16384
        public var ringSize = 8192
        public var busyPollMicroseconds = 0
    }
    public struct Network: Sendable, Equatable {
        public var listenAddress = IPv6Endpoint(address: .any, port: 4433)
        /// 0 = one per available core.
        public var workers = 0
        public var datapath = Datapath.auto
        /// Mutual TLS: whether clients are asked for a certificate.
        public var clientAuth = ClientAuthentication.Mode.none
        /// The interface AF_XDP binds ("" = none; `auto` then uses io_uring).
        public var interface = ""
        /// AF_XDP queues (= workers) to bind; 0 = every receive queue of the interface.
        public var queues = 0
        public var xdpMode = XDPMode.auto
        public var zeroCopy = ZeroCopy.auto
        public var xdp = XDP()
        /// On SIGTERM, how long requests open may take to finish before their connections are
        /// closed (nanoseconds; 0: closed at once).
        public var drainTimeout: UInt64 = 15_000_000_000
        /// The transport: `network.cc`, `network.retry`, `network.max_connections` and
        /// `network.quic_config` (a table or a `QUICProfile`). Its defaults are the defaults.
        public var quic = QUICSettings()
    }
    public struct Storage: Sendable, Equatable {
        public var path = NodeConfig.defaultDataDirectory + "/objects"
        /// The content-addressed chunk store and object index (chunked transfers).
        public var contentPath = NodeConfig.defaultDataDirectory + "/content"
        public var maxObjectSize: UInt64 = 64 << 30
        /// `gc_interval` (ns): how often garbage collection of the content store runs; 0: never
        /// on a schedule (the admin API's `POST /store/collect` still runs one).
        public var gcInterval: UInt64 = 3_600_000_000_000
        /// `gc_grace_period` (ns): chunks no object names are collected only once older than
        /// this (a client's chunked upload puts its chunks before its manifest). Default: the
        /// store's own (`ChunkStore.Options.defaultCollectGracePeriod`, 1 h).
        public var gcGracePeriod = Self.nanoseconds(ChunkStore.Options.defaultCollectGracePeriod)

        /// `d` in whole nanoseconds (the unit of this config's durations).
        static func nanoseconds(_ d: Duration) -> UInt64 {
            UInt64(d.components.seconds) * Nanos.second + UInt64(d.components.attoseconds / 1_000_000_000)
        }
    }
    public struct TLS: Sendable, Equatable {
        public var certFile = ""
        public var keyFile = ""
        /// The TLS 1.3 suites the node accepts (`tls.cipher_suites`, validated names); by
        /// default all of the TLS shim's. A client's order picks among them.
        public var cipherSuites = TLSCredentials.cipherSuiteTable.map(\.gnutls)
    }
    /// Where the node's certificate comes from and how it rotates (unless `tls.cert_file`
    /// names fixed files).
    public struct Trust: Sendable, Equatable {
        /// Where the node's certificates come from (`trust.mode`).
        public enum Mode: String, Sendable, CaseIterable {
            /// The node runs its own TrustChain CA under data_dir/trust and issues itself certificates.
            case embedded
            /// An RFC 8555 CA issues them.
            case acme
        }
        public var mode = Mode.embedded
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
    /// How the mesh computes routes and, with `ml_optimized`, spreads chunks over them.
    public struct Routing: Sendable, Equatable {
        public var algorithm = RoutingAlgorithm.adaptive
        public var updateInterval: UInt64 = 5_000_000_000
        public var maxHops = 8
        /// With `ml_optimized`: which scheduler spreads a fetch's chunks over the routes. The
        /// learner by default; the baselines are there to compare against (bench-multipath).
        public var multipathScheduler = MultipathSchedulerKind.mlOptimized
        /// The schedulers `multipath_scheduler` may name (a fixed split needs weights from outside).
        public static let multipathSchedulers: [MultipathSchedulerKind] = [.mlOptimized, .minRTT, .roundRobin, .bestSingle]

        public init(
            algorithm: RoutingAlgorithm = .adaptive, updateInterval: UInt64 = 5_000_000_000, maxHops: Int = 8,
            multipathScheduler: MultipathSchedulerKind = .mlOptimized
        ) {
            (self.algorithm, self.updateInterval, self.maxHops, self.multipathScheduler) = (algorithm, updateInterval, maxHops, multipathScheduler)
        }
    }
    public struct Chunking: Sendable, Equatable {
        public var algorithm = ChunkingAlgorithm.contentAware
        public var minChunkSize: UInt64 = 64 << 10
        public var avgChunkSize: UInt64 = 256 << 10
        public var maxChunkSize: UInt64 = 1 << 20
        public var dedupEnabled = true
        /// A node asked for the manifest of an object it keeps as a plain file (an edge, a
        /// mesh relay or a `--chunked` client) cuts the file with these parameters and answers
        /// with the cut (`PlainCuts`), so the object travels chunk by chunk; false: a 404, and
        /// an edge or a mesh node fetches the object whole.
        public var cutPlainFiles = true
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
        public var level = Logger.Level.info
        /// Where sampled connections write their qlog, `<odcid-hex>.server.sqlog` each
        /// (created at start, and at a reload that names a new one); "" = off.
        public var qlogDir = ""
        /// The fraction of connections (0 … 1), each drawn once when it is made, that write a
        /// qlog when `qlogDir` is set.
        public var qlogSample = 1.0
    }
    /// The admin API (HTTP/1.1 over TCP): `/metrics` (Prometheus text) and `/status` (JSON).
    public struct Admin: Sendable, Equatable {
        /// `admin.auth`: what a request must show. Anything but `none` is required when
        /// `listen` is not loopback (`::1`): the loader refuses the file otherwise.
        public enum Auth: String, Sendable, CaseIterable {
            /// Nobody is asked anything: loopback only.
            case none
            /// `Authorization: Bearer <token>`: a token with the admin role the access check
            /// accepts, or the secret in `token_file`.
            case token
            /// HTTPS with a client certificate that chains to the node's trust (its CA's root in
            /// embedded mode, and `trust.bundle`); the server presents the node's identity.
            case mtls
        }
        /// Where it listens; nil = off.
        public var listen: IPv6Endpoint?
        public var auth = Auth.none
        /// With `auth = "token"`, optionally: a file whose content (surrounding whitespace
        /// trimmed) is a fixed bearer token accepted too, read at start.
        public var tokenFile = ""
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
    /// `[tracing]`: TracingConfig.swift.
    public var tracing = Tracing()
    /// `[limits]`: LimitsConfig.swift.
    public var limits = Limits()
    /// `access.overwrite`: LimitsConfig.swift.
    public var overwrite = Overwrite.owner
    /// `[access]`: AccessConfig.swift.
    public var access = Access()

    /// `node.data_dir`'s default, relative to where the node starts: also where `stoq` on the
    /// same machine looks for the operator token.
    public static let defaultDataDirectory = "stoq-data"

    /// The embedded default: what `stoq-node` runs with no config file.
    public static let `default` = NodeConfig()
    public init() {}

    /// What this configuration asks for that the node cannot do (yet), one line each: the node
    /// logs them at start and `stoq config check` prints them, so nothing is silently ignored.
    public var notices: [String] {
        var n: [String] = []
        if !mesh.enabled {
            n.append(
                "routing: algorithm = \(routing.algorithm.rawValue), update_interval and max_hops have no effect without a mesh: no [mesh] peers or discovery are configured, so every request is served from this node's store (or its edge origin)"
            )
        }
        if edge.enableCaching && edge.origin.isEmpty && !mesh.enabled {
            n.append(
                "edge: enable_caching = true with neither edge.origin nor [mesh]: this node has nowhere to fetch from, so it caches nothing and serves only its own content"
            )
        }
        if log.qlogDir.isEmpty && log.qlogSample != 1.0 {
            n.append("log: qlog_sample = \(log.qlogSample) has no effect while log.qlog_dir is empty (qlog is off)")
        }
        if mesh.enabled && network.clientAuth == .none && (limits.requestsPerSecond > 0 || limits.bytesPerSecond > 0) {
            n.append(
                "limits: network.client_auth = \"none\", so neighbours show no certificate and the mesh's probes, adverts and relays are limited like any client's requests; set it to \"optional\" to exempt them"
            )
        }
        if !edge.origin.isEmpty && !edge.enableCaching {
            n.append("edge: origin = \"\(edge.origin)\" has no effect while enable_caching = false")
        }
        if !admin.tokenFile.isEmpty && admin.auth != .token {
            n.append("admin: token_file has no effect unless auth = \"token\" (it is \"\(admin.auth.rawValue)\")")
        }
        if !tls.certFile.isEmpty && trust.mode == .acme {
            n.append(
                "trust: mode = \"acme\" has no effect while tls.cert_file is set: the node serves that fixed certificate and asks no ACME server ([trust.acme] is unused)"
            )
        }
        if network.quic.earlyData && !network.quic.sessionTickets {
            n.append("tls: early_data = true has no effect with session_tickets = false (0-RTT resumes a ticket)")
        }
        return n
    }
}
