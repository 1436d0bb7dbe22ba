import Crypto
import Foundation
import Logging
import STOQAccess
import STOQAdmin
import STOQConfig
import STOQContent
import STOQCore
import STOQDatapath
import STOQEdge
import STOQMesh
import STOQQUIC
import STOQRenewal
import STOQStore
import STOQTracing
import STOQTransfer
import STOQTrust
import STOQWorker
import Synchronization
import X509

/// A running node: its identity, one pinned worker thread per core (each with its own
/// datapath queue, QUIC endpoint and object service), and a clean drain on stop.
public final class Node: @unchecked Sendable {
    /// The configuration in force (a reload updates what it applies).
    public private(set) var config: NodeConfig
    public let logger: Logger
    /// Whether `start` has returned: the node listens, and a reload may look at what it runs
    /// (`ReloadService` waits for it; before, a reload read what `start` was still setting).
    public var isStarted: Bool { started.load(ordering: .acquiring) }
    private let started = Atomic<Bool>(false)
    /// The certificate clients should trust (the embedded CA's root, or the configured chain).
    public private(set) var certificatePath = ""
    /// The chain the node presents (its key is key.pem beside it).
    public private(set) var servingCertificatePath = ""
    private var certificates: CertificateManager?
    /// The credentials the workers serve with, as they change: the manager's, or those of
    /// `tls.cert_file`, loaded again when a reload changes the client-certificate rules.
    private var identity: CertificateManager.Published?
    /// Under `admin.auth = "mtls"`: how the admin API checks client certificates now (a
    /// reload that changes `[trust]` replaces it).
    private let adminVerifier = Replaceable<PeerVerifier?>(nil)
    /// The serials this node's CA revoked, which every check of a client certificate applies
    /// (read at start and at each reload).
    let revocations: RevocationList
    /// The `[trust]` the edge's upstreams and the mesh's neighbours are verified with now. A
    /// reload hands them its `[trust]` even when the rest of it waits for a restart (and
    /// `config.trust` stays the old one): only when it differs from this, not again at every
    /// later reload, each of which closed every upstream and neighbour connection.
    private(set) var peersTrust: NodeConfig.Trust
    public private(set) var listenAddress: IPv6Endpoint
    /// The content store's object index (chunks and manifests), shared by every worker.
    public private(set) var contentIndex: ObjectIndex?
    /// Its garbage collection (`storage.gc_interval`), on a thread of its own.
    public private(set) var collector: GarbageCollector?
    /// The edge cache, when `edge.enable_caching` is on.
    public private(set) var edge: EdgeCache?
    /// The mesh service, when `[mesh]` is configured.
    public private(set) var mesh: MeshService?
    private var snapshots: [WorkerSnapshot] = []
    /// Conditional writes, the overwrite policy and quotas (shared by the workers and ingest).
    public private(set) var gate: ObjectGate?
    /// Per-client rate limits (nil: `[limits]` sets none).
    private var rates: RateLimiter?
    /// Request bodies the workers hold in memory (`limits.body_memory`).
    private var bodyMemory: BodyMemory?
    private var admin: AdminServer?
    private let stopFlag = StopFlag()
    private var threads: [Thread] = []
    /// The threads that write chunk PUTs for the workers; ended once the workers have.
    private var storePool: WorkPool?
    private var plainCuts: PlainCuts?
    private let finished = DispatchGroup()
    /// `log.qlog_dir`/`log.qlog_sample` as the workers are to apply them (reloadable).
    private let qlog: QLogControl

    /// `[access]` and the accepted token keys as the workers are to apply them (reloadable).
    private var access: AccessControl?
    /// The node's token-signing key (`data_dir/access/token-key.pem`).
    private var tokenKey: P256.Signing.PrivateKey?
    /// The operator's credential (`data_dir/access/operator.token`).
    public private(set) var operatorTokenPath = ""

    /// What configuration reloads did (the admin API's `stoq_config_*`): the daemon records them.
    public let reloads = ReloadRecord(loadedAt: Date())

    /// The request tracer (`[tracing]`, NodeTracing), nil when tracing is off.
    let tracer: RequestTracer?
    /// `data_dir/node.lock`, held (`flock`) while this process runs: one node per data directory.
    private var dataLock: Int32 = -1

    public init(config: NodeConfig, logger: Logger, tracer: RequestTracer? = nil) {
        self.config = config
        self.logger = logger
        self.tracer = tracer
        self.listenAddress = config.network.listenAddress
        self.qlog = QLogControl(config.log)
        self.peersTrust = config.trust
        self.revocations = RevocationList(dataDir: config.node.dataDir)
    }

    /// The file of serials this node's CA revoked (`data_dir/trust/revoked.txt`): a reload reads
    /// it again, so a change to it is one to watch (`ReloadService`).
    public var revocationListPath: String { revocations.path }

    /// The node's IPv6 addresses (for the certificate's SANs).
    static func localAddresses() -> [IPv6Address] {
        var out: [IPv6Address] = []
        var ifa: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&ifa) == 0 else { return [] }
        defer { freeifaddrs(ifa) }
        var p = ifa
        while let cur = p {
            if let sa = cur.pointee.ifa_addr, sa.pointee.sa_family == sa_family_t(AF_INET6) {
                let a = sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { IPv6Address($0.pointee.sin6_addr) }
                let linkLocal = withUnsafeBytes(of: a.bytes) { $0[0] == 0xfe && ($0[1] & 0xc0) == 0x80 }
                if !linkLocal { out.append(a) }
            }
            p = cur.pointee.ifa_next
        }
        return out
    }

    /// Mutual TLS from the config: the roots client certificates must chain to (the node's
    /// own CA in embedded mode, plus trust.bundle) and the serials `revocations` holds at each
    /// handshake (the CA's list).
    static func clientAuthentication(_ cfg: NodeConfig, revocations: RevocationList) throws(NodeError) -> ClientAuthentication? {
        guard case let mode = cfg.network.clientAuth, mode != .none else { return nil }
        let verifier = try clientVerifier(cfg, for: "network.client_auth")
        return ClientAuthentication(
            mode: mode,
            policy: PeerCertificateCheck(identity: verifier.fingerprint, identify: certificateIdentity) { chain, name in
                revocations.applied(to: verifier).refusal(derChain: chain, serverName: name)
            })
    }

    /// How a client certificate is checked (QUIC mutual TLS and `admin.auth = "mtls"`): it must
    /// chain to the node's own CA in embedded mode and/or `trust.bundle` and carry clientAuth;
    /// the caller applies the CA's revocations (`RevocationList.applied(to:)`) at each check.
    /// `key` names the setting in errors.
    static func clientVerifier(_ cfg: NodeConfig, for key: String) throws(NodeError) -> PeerVerifier {
        var roots: [String] = []
        let caDirectory = cfg.node.dataDir + "/trust"
        let embedded = cfg.tls.certFile.isEmpty && cfg.trust.mode == .embedded
        if embedded { roots.append(caDirectory + "/root.pem") }
        if !cfg.trust.bundle.isEmpty { roots.append(cfg.trust.bundle) }
        do {
            // The node's CA signs its clients: it must exist before its root can be trusted.
            if embedded && !FileManager.default.fileExists(atPath: roots[0]) { _ = try TrustAuthority.create(in: caDirectory) }
            return PeerVerifier(
                roots: try roots.flatMap { try PEMFiles.readCertificates($0) }, role: .client,
                transparencyLogs: try transparencyLogKeys(cfg))
        } catch let e as NodeError {
            throw e
        } catch {
            throw NodeError(.identity, "\(key): \(error)")
        }
    }

    /// How this node connects to a peer (its edge origin): it verifies the peer's certificate
    /// against `trust.bundle` (the system store when empty) and its name, requires an SCT from
    /// `trust.transparency_logs` (default: this node's CA log) when `trust.require_transparency`
    /// is on, and presents its own certificate for mutual TLS. The files are read when a pool
    /// is made, on a reload's retrust and after each renewal, so a rotated certificate is
    /// presented from the next connection on.
    static func peerTrust(_ cfg: NodeConfig) -> ClientTrust {
        var t = ClientTrust(caFile: cfg.trust.bundle.isEmpty ? nil : cfg.trust.bundle)
        if cfg.tls.certFile.isEmpty {
            t.certificateFile = cfg.node.dataDir + "/identity/cert.pem"
            t.keyFile = cfg.node.dataDir + "/identity/key.pem"
        } else {
            t.certificateFile = cfg.tls.certFile
            t.keyFile = cfg.tls.keyFile
        }
        if cfg.trust.requireTransparency {
            t.transparencyLogs =
                cfg.trust.transparencyLogs.isEmpty
                ? [cfg.node.dataDir + "/trust/" + TrustAuthority.FileName.logKey]
                : cfg.trust.transparencyLogs
        }
        return t
    }

    /// `trust.require_transparency`: the log keys a client certificate's embedded SCT must
    /// verify with, from `trust.transparency_logs` (default: the node's own CA log); nil when
    /// transparency is not required. A refusal is logged as "client certificate refused: sct…".
    static func transparencyLogKeys(_ cfg: NodeConfig) throws(NodeError) -> [P256.Signing.PublicKey]? {
        guard cfg.trust.requireTransparency else { return nil }
        do {
            if cfg.trust.transparencyLogs.isEmpty {
                return [try TransparencyLog.authorityLogKey(caDirectory: cfg.node.dataDir + "/trust").publicKey]
            }
            return try CertificateTransparency.loadLogKeys(cfg.trust.transparencyLogs)
        } catch {
            throw NodeError(.identity, "trust.transparency_logs: \(error)")
        }
    }

    /// The cutter of this node's plain files (`chunking.cut_plain_files`), kept here to be
    /// stopped with the node and its counters shown.
    private func makePlainCuts(_ cfg: NodeConfig) throws -> PlainCuts? {
        guard cfg.chunking.cutPlainFiles else { return nil }
        let cuts = try PlainCuts(
            root: cfg.storage.path, parameters: cfg.chunking.parameters(), maxObjectSize: cfg.storage.maxObjectSize,
            digests: gate?.digests, logger: logger)
        plainCuts = cuts
        return cuts
    }

    /// Starts the node: its identity, the content store and edge cache, one datapath queue
    /// and pinned worker per core, then the admin API. Returns once every worker is
    /// listening. Each step's error names what failed (a worker or admin failure also stops
    /// the workers already started).
    public func start() throws {
        let cfg = config
        try lockDataDirectory(cfg.node.dataDir)
        BodyRegion.guardFileMappings()
        try QLogControl.prepare(cfg.log)
        if RevocationList.needed(by: cfg) { try revocations.reload() }
        let access = try startAccess(cfg)
        let credentials = try startIdentity(cfg)
        let content = try openContentStore(cfg)
        // Before the limits count what is stored: ingest's start removes the flat copies its
        // records replaced (a crash between the two), which they would count.
        let ingest = try WorkerAssembly.makeIngest(cfg, content: content, logger: logger)
        try openLimits(cfg, content: content)
        for line in cfg.notices { logger.notice("\(line)") }
        let meshService = try Self.makeMesh(
            cfg, certificate: servingCertificatePath,
            key: cfg.tls.certFile.isEmpty ? (certificates?.identityDirectory ?? cfg.node.dataDir + "/identity") + "/key.pem" : cfg.tls.keyFile,
            revocations: revocations, logger: logger)
        mesh = meshService
        let edge = try openEdgeCache(cfg, mesh: meshService)
        // Adverts carry the certificate as renewed (for the same key): one signed with the
        // first, once it expired, was refused by every node. New neighbour and upstream
        // connections present it (mutual TLS), not the one read at start.
        if meshService != nil || edge != nil {
            certificates?.onRenew = { [weak meshService, weak edge] chain in
                meshService?.renewChain(chain)
                edge?.renewCredentials()
            }
        }
        if let preferred = cfg.network.quic.preferredAddress, !STOQClient.isOwnAddress(preferred.address) {
            throw NodeError(
                .config,
                "network.preferred_address = \"\(preferred)\": not an address of this host (a socket cannot bind to it), so clients sent there would never be heard"
            )
        }
        let queues = try DatapathSelection(config: cfg, logger: logger).open()
        listenAddress = queues[0].localEndpoint
        let mesh = try connectWorkers(queues)
        let storePool = WorkerAssembly.makeStorePool(workers: queues.count)
        self.storePool = storePool
        bodyMemory = BodyMemory(limit: cfg.limits.bodyMemory, perClient: cfg.limits.bodyMemoryPerClient)
        let assembly = WorkerAssembly(
            config: cfg, credentials: credentials, settings: Self.workerSettings(cfg), secret: StaticSecret.random(),
            content: content, ingest: ingest,
            storePool: storePool, edge: edge,
            originMaxAge: cfg.edge.originMaxAge.map { $0 / 1_000_000_000 },
            certificates: certificates, identity: identity, qlog: qlog, access: access, mesh: mesh, meshService: meshService,
            plainCuts: try makePlainCuts(cfg), gate: gate,
            rates: rates, bodyMemory: bodyMemory!, manifestChecks: WorkerAssembly.makeManifestChecks(workers: queues.count),
            fallback: FallbackQueues(
                selection: DatapathSelection(config: cfg, logger: logger), workers: queues.count,
                port: listenAddress.port),
            stop: stopFlag, finished: finished, tracer: tracer, logger: logger)
        try startWorkers(assembly, queues: queues)
        if let meshService {
            // max_connections is each worker's: the node holds that many times its workers.
            let snapshots = self.snapshots, most = Double(max(1, cfg.network.quic.maxConnections) * queues.count)
            meshService.loadSource = { Double(snapshots.compactMap(\.latest).reduce(0) { $0 + $1.connections }) / most }
            do { try meshService.start() } catch {
                stop()
                throw error
            }
        }
        let collector = GarbageCollector(
            index: content, interval: .nanoseconds(Int64(cfg.storage.gcInterval)), logger: Logger(label: "stoq.store.gc"))
        self.collector = collector
        try startAdmin(cfg, content: content, edge: edge)
        collector.start()
        started.store(true, ordering: .releasing)
    }

    /// What an accepted client certificate makes its holder (`QUICConnection.peerIdentity`):
    /// its roles (SAN `urn:stoq:role:…`), its key id when it is a node's (`NodeCertificate`),
    /// and its name, in `CertificateIdentity.encoded` form.
    @Sendable static func certificateIdentity(_ chain: [[UInt8]]) -> String {
        guard let der = chain.first, let leaf = try? Certificate(derEncoded: der) else { return "" }
        let id = CertificateSummary.clientIdentity(leaf)
        let roles = id.uris.compactMap(CertificateIdentity.role(fromURI:))
        return CertificateIdentity(subject: id.subject, roles: roles, key: NodeCertificate.refusal(leaf) == nil ? Hex.encode(id.key) : "").encoded
    }

    /// The node's token key (made at first start), its operator token (made, or re-issued when
    /// expiring or signed by another key), and the access settings the workers start with.
    private func startAccess(_ cfg: NodeConfig) throws -> AccessControl {
        let key: P256.Signing.PrivateKey
        do {
            key = try AccessFiles.loadOrCreateTokenKey(dataDir: cfg.node.dataDir)
            let path = AccessFiles.operatorToken(dataDir: cfg.node.dataDir)
            if try AccessFiles.ensureOperatorToken(dataDir: cfg.node.dataDir, key: key, now: Int64(time(nil))) {
                logger.notice("issued the operator token (admin, every path, one year)", metadata: ["path": "\(path)"])
            }
            operatorTokenPath = path
        } catch {
            throw NodeError(.identity, "access: \(error)")
        }
        tokenKey = key
        let settings = try Self.accessSettings(cfg.access, key: key)
        if cfg.access.write == .public {
            logger.warning("access.write = \"public\": anyone who can reach this node may upload, overwrite and delete")
        }
        let control = AccessControl(settings)
        access = control
        return control
    }

    /// `[access]` with the node's own key first and `token_keys` after it.
    static func accessSettings(_ a: NodeConfig.Access, key: P256.Signing.PrivateKey) throws(NodeError) -> AccessSettings {
        var keys = [key.publicKey]
        for path in a.tokenKeys {
            do { keys.append(try AccessFiles.readPublicKey(path)) } catch {
                throw NodeError(.config, "access.token_keys: \(error.message)")
            }
        }
        return AccessSettings(policy: a.policy, keys: keys)
    }

    /// The node's TLS identity: fixed files (`tls.cert_file`), or certificates the node keeps
    /// renewing (its own CA, or ACME), published to the workers as they change.
    private func startIdentity(_ cfg: NodeConfig) throws -> TLSCredentials {
        let clientAuth = try Self.clientAuthentication(cfg, revocations: revocations)
        guard cfg.tls.certFile.isEmpty else {
            let creds: TLSCredentials
            do {
                creds = try TLSCredentials(
                    certificateFile: cfg.tls.certFile, keyFile: cfg.tls.keyFile, clientAuth: clientAuth,
                    cipherSuites: cfg.tls.cipherSuites)
            } catch {
                throw NodeError(.identity, "\(error)")
            }
            certificatePath = cfg.tls.certFile
            servingCertificatePath = cfg.tls.certFile
            identity = CertificateManager.Published(creds)
            return creds
        }
        var names = [ProcessInfo.processInfo.hostName]
        if names[0].isEmpty { names = [] }
        let manager = CertificateManager(
            trust: cfg.trust, clientAuth: clientAuth, cipherSuites: cfg.tls.cipherSuites, dataDirectory: cfg.node.dataDir,
            names: names, addresses: Self.localAddresses(), logger: logger)
        // A mesh node's id is its key's hash: renewals keep the key, so the id (and every
        // neighbour's view of it) outlives each certificate.
        manager.keepsKey = cfg.mesh.enabled
        let creds: TLSCredentials
        do { creds = try manager.start() } catch {
            throw NodeError(.identity, "cannot obtain the node's certificate (trust.mode = \"\(cfg.trust.mode)\"): \(error)")
        }
        certificates = manager
        identity = manager.published
        certificatePath = manager.trustAnchorPath
        servingCertificatePath = manager.identityDirectory + "/cert.pem"
        return creds
    }

    /// The content store (chunks and manifests) every worker shares, after removing the
    /// uploads a previous run left half-written.
    /// Before anything is written: a second node started on a running node's `data_dir`
    /// issued itself a certificate over the running node's, logged it, and removed its
    /// uploads in progress before the content store's lock stopped it.
    private func lockDataDirectory(_ dir: String) throws {
        do { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) } catch {
            throw NodeError(.storage, "node.data_dir \(dir): cannot create it: \(error.localizedDescription)")
        }
        do { dataLock = try OwnerLock.take(dir + "/node.lock") } catch {
            throw NodeError(
                .storage,
                error == .held
                    ? "node.data_dir \(dir) is in use by another stoq-node (\(dir)/node.lock is locked): one node per data directory"
                    : "node.data_dir \(dir): \(dir)/node.lock: \(error.reason)")
        }
    }

    private func openContentStore(_ cfg: NodeConfig) throws -> ObjectIndex {
        let stale = ObjectService.removeStaleUploads(in: cfg.storage.path)
        if stale > 0 { logger.notice("removed \(stale) interrupted upload(s) from \(cfg.storage.path)") }
        let content: ObjectIndex
        do {
            let store = try ChunkStore(
                root: cfg.storage.contentPath,
                options: .init(
                    dedup: cfg.chunking.dedupEnabled, collectGracePeriod: .nanoseconds(Int64(cfg.storage.gcGracePeriod)),
                    maxChunkSize: Int(cfg.chunking.maxChunkSize)),
                logger: Logger(label: "stoq.store"), diskFull: DiskFullMonitor(logger: logger))
            content = try ObjectIndex(chunks: store)
        } catch {
            throw NodeError(.storage, "cannot open the content store at \(cfg.storage.contentPath): \(error)")
        }
        if !content.recovery.incompleteObjects.isEmpty {
            logger.warning(
                "content store: \(content.recovery.incompleteObjects.count) object(s) miss chunks: \(content.recovery.incompleteObjects.keys.sorted().joined(separator: ", "))"
            )
        }
        contentIndex = content
        return content
    }

    /// The object gate (`access.overwrite`, `limits.storage_cap`, `limits.writer_quota`), which
    /// computes who stores what at start, and the rate limiter when `[limits]` sets a rate.
    ///
    /// Admins (a token or certificate with the admin role, as the router's access check found)
    /// may replace and delete others' objects.
    private func openLimits(_ cfg: NodeConfig, content: ObjectIndex) throws {
        let settings = ObjectGate.Settings(
            overwrite: ObjectGate.Overwrite(rawValue: cfg.overwrite.rawValue) ?? .owner,
            storageCap: cfg.limits.storageCap, writerQuota: cfg.limits.writerQuota)
        do {
            gate = try ObjectGate(
                settings: settings, storagePath: cfg.storage.path, index: content, isAdmin: { $0.isAdmin }, logger: logger)
        } catch {
            throw NodeError(.storage, "cannot account for the stored objects in \(cfg.storage.path): \(error)")
        }
        let l = cfg.limits
        let rate = RateLimiter.Settings(
            requestsPerSecond: l.requestsPerSecond, requestBurst: l.effectiveBurst, bytesPerSecond: Double(l.bytesPerSecond))
        rates = rate.enabled ? RateLimiter(settings: rate) : nil
        if let c = gate?.counters, l.storageCap > 0 || l.writerQuota > 0 {
            logger.info("limits", metadata: ["stored_bytes": "\(c.storedBytes)", "writers": "\(c.owners)"])
        }
    }

    /// The edge cache and its fetcher: with `edge.origin`, misses go to the origin; in a mesh
    /// (without an origin), through the mesh, and the cache also carries what this node relays.
    private func openEdgeCache(_ cfg: NodeConfig, mesh: MeshService?) throws -> EdgeCache? {
        let upstream: FetchUpstream
        if cfg.edge.enableCaching && !cfg.edge.origin.isEmpty {
            do { upstream = OriginUpstream(try STOQURL(cfg.edge.origin)) } catch {
                throw NodeError(.storage, "edge.origin \(cfg.edge.origin): \(error)")
            }
        } else if let mesh {
            upstream = MeshUpstream(service: mesh)
        } else {
            return nil
        }
        let opened: EdgeCache
        do {
            opened = try EdgeCache(
                root: cfg.storage.contentPath + "/edge", capacity: cfg.edge.cacheSize,
                ttlDefault: cfg.edge.ttlDefault, upstream: upstream,
                trust: Self.peerTrust(cfg), datapath: DatapathSelection.originFetch,
                chunking: try cfg.chunking.parameters(), logger: logger, diskFull: contentIndex?.chunks.diskFull)
        } catch {
            throw NodeError(.storage, "cannot open the edge cache at \(cfg.storage.contentPath)/edge: \(error)")
        }
        opened.tracer = tracer
        opened.start()
        edge = opened
        return opened
    }


    /// The workers' mesh: datagrams that reach a worker other than their connection's go to
    /// the owner, and it is how others wake a worker (finished origin fetches, new credentials).
    private func connectWorkers(_ queues: [DatapathQueue]) throws -> WorkerMesh {
        let mesh: WorkerMesh
        do { mesh = try WorkerMesh(workers: queues.count) } catch {
            for q in queues { q.close() }
            throw NodeError(.datapath, "\(error)")
        }
        identity?.onPublish = { for w in 0..<mesh.count { mesh.wake(w) } }
        return mesh
    }

    /// One pinned thread per queue, in worker order; returns once each is serving (or
    /// stops them all and throws the first worker's error).
    private func startWorkers(_ assembly: WorkerAssembly, queues: [DatapathQueue]) throws {
        let ready = DispatchGroup()
        let errors = ErrorBox()
        snapshots = queues.map { _ in WorkerSnapshot() }
        for (i, queue) in queues.enumerated() {
            let box = QueueBox(queue)
            let snapshot = snapshots[i]
            ready.enter()
            finished.enter()
            let t = Thread {
                assembly.run(worker: i, queue: box.queue, snapshot: snapshot, ready: ready, errors: errors)
            }
            t.name = "stoq-worker-\(i)"
            threads.append(t)
            t.start()
        }
        ready.wait()
        if let e = errors.value {
            stop()
            throw NodeError(.storage, e)
        }
    }

    /// The admin API (`admin.listen`): metrics and status from the workers' snapshots.
    private func startAdmin(_ cfg: NodeConfig, content: ObjectIndex, edge: EdgeCache?) throws {
        guard let listen = cfg.admin.listen else { return }
        let store = content.chunks, snapshots = self.snapshots, certificates = self.certificates, meshService = mesh
        let reloads = self.reloads
        let gate = self.gate, rates = self.rates, cuts = plainCuts, bodyMemory = self.bodyMemory, collector = self.collector
        // network.* is not reloaded (the workers keep their queues), so the start-up values hold.
        let configured = NodeMetrics.ConfiguredDatapath(datapath: cfg.network.datapath.rawValue, interface: cfg.network.interface)
        // A fixed tls.cert_file is loaded once, at start: its expiry is read once too (the
        // file was just loaded, so a failure here would have failed the start).
        let fixedNotAfter = cfg.tls.certFile.isEmpty ? nil : (try? PEMFiles.readCertificates(cfg.tls.certFile))?.first?.notValidAfter
        let protection: AdminProtection
        do { protection = try adminProtection(cfg) } catch {
            stop()
            throw error
        }
        var collect: (@Sendable () throws -> ObjectIndex.CollectResult)?
        if let collector { collect = { try collector.collectNow() } }
        do {
            admin = try AdminServer(
                listen: listen, protection: protection, logger: logger, act: Self.adminAction(edge: edge, collect: collect)
            ) { path in
                let certificate = certificates.map {
                    let c = $0.counters
                    return NodeMetrics.Certificate(
                        rotations: c.rotations, failures: c.failures, notAfter: c.notAfter, rootNotAfter: c.rootNotAfter,
                        intermediateNotAfter: c.intermediateNotAfter)
                }
                let edgeCounters = edge?.counters
                var meshStatus = meshService?.status
                // The edge fetcher is where relayed fetches fail over.
                meshStatus?.counters.failovers = edgeCounters?.failovers ?? 0
                let metrics = NodeMetrics(
                    workers: snapshots.compactMap(\.latest), store: store.counters,
                    certificate: certificate, edge: edgeCounters, mesh: meshStatus, configuredDatapath: configured,
                    fixedCertificateNotAfter: fixedNotAfter,
                    diskFull: .init(refusals: store.diskFull.refusals, episodes: store.diskFull.episodes, full: store.diskFull.full),
                    limits: gate.map {
                        NodeMetrics.Limits(
                            gate: $0.counters, rateLimited: rates?.limited, rateClients: rates?.clients,
                            bodyMemory: bodyMemory.map { ($0.held, $0.limit) })
                    },
                    plainCuts: cuts?.counters, collection: collector?.counters, reloads: reloads.current)
                switch path {
                case "/metrics": return (metrics.prometheus(), "text/plain; version=0.0.4; charset=utf-8")
                case "/status": return (metrics.json(), "application/json")
                default: return nil
                }
            }
        } catch {
            stop()
            throw error
        }
    }

    /// The admin API's actions: `POST /edge/purge/<name>` drops the edge cache's manifest of
    /// `name` (`EdgeCache.purge`), so the next request for it asks the upstream again;
    /// `POST /store/collect` runs a garbage collection of the content store now (`collect`:
    /// `GarbageCollector.collectNow`) on the admin API's own thread, not its event loop, and
    /// answers with what it did once done; one at a time: a second meanwhile gets 409.
    static func adminAction(edge: EdgeCache?, collect: (@Sendable () throws -> ObjectIndex.CollectResult)?) -> AdminServer.Action {
        let collecting = AdminCollection()
        return { path in
            if path == "/store/collect" {
                guard let collect else { return .now(status: 409, text: "this node has no content store to collect") }
                guard collecting.begin() else {
                    return .now(
                        status: 409,
                        text: "a garbage collection asked for by POST /store/collect is already running: try again once it has answered")
                }
                return .blocking {
                    defer { collecting.end() }
                    do {
                        let r = try collect()
                        return (
                            200,
                            "garbage collection: \(r.objectsScanned) object(s) scanned, \(r.chunksReferenced) chunk(s) referenced, "
                                + "\(r.chunksInGracePeriod) unreferenced kept for the grace period, \(r.chunksRemoved) removed "
                                + "(\(r.bytesFreed) bytes freed)"
                        )
                    } catch {
                        return (500, "garbage collection failed: \(error)")
                    }
                }
            }
            let prefix = "/edge/purge/"
            guard path.hasPrefix(prefix) else { return nil }
            guard let edge else { return .now(status: 409, text: "this node has no edge cache ([edge] enable_caching, or a mesh)") }
            let name = String(path.dropFirst(prefix.count)).removingPercentEncoding ?? ""
            do { try ObjectIndex.validateName(name) } catch { return .now(status: 400, text: "\(error)") }
            return edge.purge(name)
                ? .now(status: 200, text: "purged \(name) from the edge cache") : .now(status: 404, text: "the edge cache holds no manifest of \(name)")
        }
    }

    /// Whether a `POST /store/collect` is under way (`adminAction`): set by the request on the
    /// admin API's event loop, cleared on its thread when the collection returns.
    private final class AdminCollection: Sendable {
        private let running = Atomic<Bool>(false)
        /// True when none was running and this one may start.
        func begin() -> Bool { running.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged }
        func end() { running.store(false, ordering: .releasing) }
    }

    /// `admin.auth` made concrete. A token is a bearer token with the admin role that the
    /// access check would accept (signed by the node's token key or a `[access] token_keys`
    /// issuer: the operator token, or `stoq trust token --role admin`), or the fixed secret in
    /// `admin.token_file` when one is set (compared in constant time). Under mutual TLS the
    /// server presents the node's certificate (re-read when renewal replaces it) and checks
    /// clients as `network.client_auth` does.
    private func adminProtection(_ cfg: NodeConfig) throws(NodeError) -> AdminProtection {
        switch cfg.admin.auth {
        case .none:
            return .none
        case .token:
            var fixed: AdminBearerToken?
            if !cfg.admin.tokenFile.isEmpty {
                do { fixed = try AdminBearerToken(file: cfg.admin.tokenFile) } catch { throw NodeError(.config, "\(error)") }
            }
            let control = access
            return .token { [fixed] header in
                if let fixed, case .allow = fixed.authorize(header) { return .allow }
                let h = header.trimmingCharacters(in: .whitespaces)
                guard !h.isEmpty else { return .deny("no Authorization header: send Authorization: Bearer <token>") }
                guard let token = AccessToken.bearer(h), let control else {
                    return .deny("the Authorization header is not a Bearer token")
                }
                do {
                    let claims = try AccessToken.verify(token, keys: control.settings.keys, now: Int64(time(nil)))
                    return claims.role == .admin ? .allow : .deny("the token's role is \(claims.role.rawValue), not admin")
                } catch {
                    return .deny(fixed != nil && !token.contains(".") ? "wrong bearer token" : "invalid bearer token: \(error)")
                }
            }
        case .mtls:
            let verifier = try Self.clientVerifier(cfg, for: "admin.auth = \"mtls\"")
            adminVerifier.replace(verifier)
            let identity = certificates?.identityDirectory ?? cfg.node.dataDir + "/identity"
            let (cert, key) = cfg.tls.certFile.isEmpty ? (identity + "/cert.pem", identity + "/key.pem") : (cfg.tls.certFile, cfg.tls.keyFile)
            do {
                return .mtls(
                    try AdminTLS(certificateFile: cert, keyFile: key) { [adminVerifier, revocations] chain in
                        adminVerifier.current.flatMap { revocations.applied(to: $0).refusal(derChain: chain, serverName: nil) }
                    })
            } catch {
                throw NodeError(.identity, "\(error)")
            }
        }
    }

    /// Reads the CA's revoked serials again (`revocationListPath`) when something checks client
    /// certificates, and applies them from the next handshake; whether they changed (reported as
    /// `trust.revocations`). `reload` does it too: this is for a reload whose file does not load.
    /// A line that is not a serial throws, naming the file and the line, and changes nothing.
    public func reloadRevocations() throws(NodeError) -> Bool {
        RevocationList.needed(by: config) ? try revocations.reload() : false
    }

    /// Where the admin API listens, if it is on.
    public var adminAddress: IPv6Endpoint? { admin?.localAddress }

    /// The admin API's base URL (`https` under `admin.auth = "mtls"`), if it is on.
    public var adminURL: String? { admin.map { "\($0.scheme)://\($0.localAddress)" } }

    /// Each worker's latest published numbers.
    public var workerStats: [WorkerStats] { snapshots.compactMap(\.latest) }

    /// What a reload did: the keys it applied while running, and those that need a restart.
    public struct ReloadReport: Sendable {
        public var applied: [String] = []
        public var restartNeeded: [String] = []
    }

    /// Applies a new, already validated configuration where it can while running: mutual-TLS
    /// rules and `[access]` (at once), certificate lifetimes (from the next renewal) and qlog (for
    /// connections made from then on). `log.level` is the caller's (it owns the log handler).
    /// Everything else is reported as needing a restart. A qlog directory that cannot be made
    /// throws before anything is applied. The CA's revoked serials are read again too
    /// (`reloadRevocations`), first: they are not the file's, and apply whatever it says.
    public func reload(_ fresh: NodeConfig) throws(NodeError) -> ReloadReport {
        var report = ReloadReport()
        var next = config
        let old = config
        // client_auth is the one of the settings that check client certificates a reload may
        // turn on: the serials must be there for it.
        var checking = old
        checking.network.clientAuth = fresh.network.clientAuth
        if RevocationList.needed(by: checking), try revocations.reload() { report.applied.append("trust.revocations") }
        let qlogChanged = (fresh.log.qlogDir, fresh.log.qlogSample) != (old.log.qlogDir, old.log.qlogSample)
        if qlogChanged { try QLogControl.prepare(fresh.log) }
        // Token keys that do not load refuse the whole reload, before anything is applied.
        var freshAccess: AccessSettings?
        if fresh.access != old.access, let tokenKey { freshAccess = try Self.accessSettings(fresh.access, key: tokenKey) }
        func note(_ key: String, _ changed: Bool, live: Bool) {
            guard changed else { return }
            if live { report.applied.append(key) } else { report.restartNeeded.append(key) }
        }
        let manager = certificates
        let trustChanged = fresh.trust != old.trust, authChanged = fresh.network.clientAuth != old.network.clientAuth
        // What is applied live is the new [trust] and client rules with this node's own CA and
        // certificate as they run: data_dir and [tls] change only at a restart. (Judged from a
        // new data_dir, clients met a CA the reload had just made there, and going back to the
        // old data_dir, "unchanged", did not undo it.)
        var running = fresh
        (running.node, running.tls) = (old.node, old.tls)
        // How the edge's upstreams and the mesh's neighbours (and adverts' signers) are verified
        // under the new trust: loaded first, so that files which do not load refuse the reload
        // before anything is applied; applied whatever else of [trust] waits for a restart.
        var peers: (trust: ClientTrust, adverts: (@Sendable ([Certificate]) throws -> Void)?)?
        if fresh.trust != peersTrust && (edge != nil || mesh != nil) {
            let t = Self.peerTrust(running)
            do { _ = try ClientRig.credentials(t) } catch {
                throw NodeError(.identity, "the new [trust] for the edge's upstreams and mesh neighbours: \(error)")
            }
            peers = (t, mesh == nil ? nil : try Self.advertVerifier(t, revocations: revocations))
        }
        // A node with its own certificate files loads them again with the new client rules,
        // when [tls] itself did not change (that needs a restart).
        let fixedIdentity = fresh.tls.certFile.isEmpty || fresh.tls != old.tls ? nil : identity
        let freshAdminVerifier =
            trustChanged && adminVerifier.current != nil
            ? try Self.clientVerifier(running, for: "admin.auth = \"mtls\"") : nil
        // [tls] changed (suites, or certificate files newly named) waits for a restart: the
        // rules must judge clients for the identity the node will present, not the one it had.
        if manager != nil || fixedIdentity != nil, trustChanged || authChanged, fresh.trust.mode == old.trust.mode, fresh.tls == old.tls {
            do {
                let clientAuth = try Self.clientAuthentication(running, revocations: revocations)
                if let manager { try manager.update(trust: fresh.trust, clientAuth: clientAuth) }
                if let fixedIdentity {
                    fixedIdentity.publish(
                        try TLSCredentials(
                            certificateFile: fresh.tls.certFile, keyFile: fresh.tls.keyFile, clientAuth: clientAuth,
                            cipherSuites: fresh.tls.cipherSuites))
                }
            } catch {
                throw NodeError(.identity, "applying the new trust settings: \(error)")
            }
            if let freshAdminVerifier { adminVerifier.replace(freshAdminVerifier) }
            next.trust = fresh.trust
            next.network.clientAuth = fresh.network.clientAuth
            note("trust", trustChanged, live: true)
            note("network.client_auth", authChanged, live: true)
        } else {
            note("trust", trustChanged, live: false)
            note("network.client_auth", authChanged, live: false)
        }
        if let freshAccess, let access {
            access.publish(freshAccess)
            next.access = fresh.access
            report.applied.append("access")
            if fresh.access.write == .public && old.access.write != .public {
                logger.warning("access.write = \"public\": anyone who can reach this node may upload, overwrite and delete")
            }
        }
        if fresh.log.level != old.log.level { next.log.level = fresh.log.level; report.applied.append("log.level") }
        if qlogChanged {
            (next.log.qlogDir, next.log.qlogSample) = (fresh.log.qlogDir, fresh.log.qlogSample)
            qlog.publish(next.log)
            if fresh.log.qlogDir != old.log.qlogDir { report.applied.append("log.qlog_dir") }
            if fresh.log.qlogSample != old.log.qlogSample { report.applied.append("log.qlog_sample") }
        }
        var restOld = old, restNew = fresh
        (restOld.trust, restNew.trust, restOld.log, restNew.log) = (old.trust, old.trust, old.log, old.log)
        (restOld.access, restNew.access) = (old.access, old.access)
        restOld.network.clientAuth = .none
        restNew.network.clientAuth = .none
        // tls.session_tickets, ticket_lifetime and early_data live in the QUIC settings: named
        // as the operator wrote them.
        func tickets(_ q: QUICSettings) -> (Bool, UInt64, Bool) { (q.sessionTickets, q.ticketLifetime, q.earlyData) }
        let ticketsChanged = tickets(fresh.network.quic) != tickets(old.network.quic)
        (restNew.network.quic.sessionTickets, restNew.network.quic.ticketLifetime, restNew.network.quic.earlyData) = tickets(old.network.quic)
        note("network", restNew.network != restOld.network, live: false)
        note("node", restNew.node != restOld.node, live: false)
        note("storage", restNew.storage != restOld.storage, live: false)
        note("tls", restNew.tls != restOld.tls || ticketsChanged, live: false)
        note("admin", restNew.admin != restOld.admin, live: false)
        note("chunking", restNew.chunking != restOld.chunking, live: false)
        note("edge", restNew.edge != restOld.edge, live: false)
        note("routing", restNew.routing != restOld.routing, live: false)
        note("mesh", restNew.mesh != restOld.mesh, live: false)
        note("tracing", restNew.tracing != restOld.tracing, live: false)
        note("limits", restNew.limits != restOld.limits, live: false)
        note("access.overwrite", restNew.overwrite != restOld.overwrite, live: false)
        if let peers {
            edge?.retrust(peers.trust)
            if let adverts = peers.adverts { mesh?.retrust(peers.trust, verifyChain: adverts) }
            peersTrust = fresh.trust
            // Back to the [trust] the node runs with (a restart was needed for the one before):
            // the upstreams and neighbours are judged by it again.
            if !trustChanged { report.applied.append("trust") }
            if report.restartNeeded.contains("trust") {
                logger.warning(
                    "reload: the new [trust] verifies the edge's upstreams and mesh neighbours now; clients and this node's own certificate are judged with the old one until a restart"
                )
            }
        }
        config = next
        return report
    }

    /// The workers' QUIC settings: `[network]`'s, with `[limits]`'s timeouts for stalled
    /// requests and responses, which the endpoint enforces (`StallTimeouts`).
    static func workerSettings(_ cfg: NodeConfig) -> QUICSettings {
        var s = cfg.network.quic
        (s.bodyTimeout, s.sendTimeout, s.minSendRate) = (cfg.limits.bodyTimeout, cfg.limits.sendTimeout, cfg.limits.minSendRate)
        return s
    }

    /// Asks every worker to drain (`network.drain_timeout`: the requests open may finish),
    /// close its connections and stop. The edge cache's fetches go on for the draining
    /// requests: it stops once the workers have (`wait`).
    public func stop() {
        certificates?.stop()
        mesh?.stop()
        stopFlag.stop()
    }

    /// Certificate rotations done and failed, and the current certificate's expiry.
    public var certificateStatus: (rotations: UInt64, failures: UInt64, notAfter: Date)? {
        certificates.map {
            let c = $0.counters; return (c.rotations, c.failures, c.notAfter)
        }
    }

    /// Waits until every worker has stopped, at most `timeout` seconds.
    @discardableResult
    public func wait(timeout: Double = .infinity) -> Bool {
        let done =
            timeout.isInfinite
            ? {
                finished.wait(); return true
            }() : finished.wait(timeout: .now() + timeout) == .success
        if done {
            collector?.stop()
            edge?.stop()
            admin?.shutdown()
            storePool?.stop()
            plainCuts?.stop()
        }
        return done
    }

    deinit { if dataLock >= 0 { close(dataLock) } }
}

/// Hands a queue to the worker thread that will own it from then on.
final class QueueBox: @unchecked Sendable {
    let queue: DatapathQueue
    init(_ q: DatapathQueue) { queue = q }
}

final class ErrorBox: @unchecked Sendable {
    private let lock = NSLock()
    private var _value: String?
    var value: String? { lock.withLock { _value } }
    func set(_ v: String) { lock.withLock { _value = v } }
}
