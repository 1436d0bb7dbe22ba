import Foundation
import Logging
import STOQAccess
import STOQAdmin
import STOQConfig
import STOQContent
import STOQChunking
import STOQCore
import STOQDatapath
import STOQEdge
import STOQMesh
import STOQQUIC
import STOQRenewal
import STOQStore
import STOQTracing
import STOQWorker

/// Everything one worker thread is built from, fixed at start: the node's shared parts
/// (credentials, content store, edge cache, certificate renewal, the workers' mesh) and how
/// to make the worker-owned ones (endpoint, HTTP applications). `run` is the thread's body.
struct WorkerAssembly: @unchecked Sendable {
    let config: NodeConfig
    let credentials: TLSCredentials
    let settings: QUICSettings
    let secret: StaticSecret
    let content: ObjectIndex
    /// Where plain uploads are chunked (`chunking.dedup_enabled`; nil: stored flat).
    let ingest: ObjectIngest?
    /// Where chunk PUTs are written and fsynced, off the workers (`makeStorePool`).
    let storePool: WorkPool
    let edge: EdgeCache?
    /// `Cache-Control: max-age` (seconds) on manifests and chunked objects, if set.
    let originMaxAge: UInt64?
    let certificates: CertificateManager?
    /// The credentials as they change (rotations, reloads), taken again between batches.
    let identity: CertificateManager.Published?
    /// qlog settings, applied at start and taken again between batches after a reload.
    let qlog: QLogControl
    /// `[access]` and the accepted token keys, taken again between batches after a reload.
    let access: AccessControl
    let mesh: WorkerMesh
    /// The mesh service (probes, adverts, relays), when `[mesh]` is configured.
    let meshService: MeshService?
    /// Cuts of the node's plain files (`chunking.cut_plain_files`).
    let plainCuts: PlainCuts?
    /// Conditions, overwrite policy and quotas for every write (shared).
    let gate: ObjectGate?
    /// Per-client rate limits (shared; nil: none).
    let rates: RateLimiter?
    /// Request bodies held in memory, all workers together (`limits.body_memory`).
    let bodyMemory: BodyMemory
    /// Manifest PUTs being verified on `storePool`, all workers together (`makeManifestChecks`).
    let manifestChecks: ManifestChecks
    let fallback: FallbackQueues
    let stop: StopFlag
    let finished: DispatchGroup
    /// `[tracing]`: each worker keeps its requests' spans with it (nil: off).
    let tracer: RequestTracer?
    let logger: Logger

    /// Worker `i`'s thread: pins itself, builds its endpoint and applications, reports
    /// `ready`, runs until `stop`, then settles its datapath and reports what it did.
    func run(worker i: Int, queue: DatapathQueue, snapshot: WorkerSnapshot, ready: DispatchGroup, errors: ErrorBox) {
        defer { finished.leave() }
        Worker.pinCurrentThread(to: i % max(1, Worker.availableCPUs))
        let endpoint = QUICEndpoint(
            isServer: true, credentials: credentials, settings: settings,
            workerID: UInt8(i), secret: secret)
        let router: NodeRouter
        var qlogVersion = 0
        do {
            if let q = qlog.take(after: &qlogVersion) { try QLogControl.apply(q, to: endpoint) }
            router = try makeRouter()
        } catch {
            errors.set("\(error)")
            ready.leave()
            return
        }
        endpoint.application = router
        let worker = Worker(queue: queue, endpoint: endpoint)
        worker.fallback = { _ in fallback.queue(for: i) }
        worker.join(mesh, as: i)
        worker.onTurn = turnHook(worker: i, endpoint: endpoint, router: router, qlogVersion: qlogVersion)
        let publish = {
            let q = worker.queue
            var stats = WorkerStats(
                index: i, backend: q.backendName, features: "\(q.features)",
                diagnostics: Dictionary(q.diagnostics, uniquingKeysWith: { a, _ in a }),
                endpoint: endpoint.counters, datapath: q.counters, handoff: worker.handoff,
                connections: endpoint.connectionCount,
                objects: router.objects.counters, content: router.content.counters, access: router.accessCounters)
            stats.memoryReleases = worker.memoryReleases
            stats.shedding = worker.shedding
            snapshot.publish(stats)
        }
        worker.onTick = publish
        publish()
        ready.leave()
        worker.run(stop: stop, drainTimeout: config.network.drainTimeout, logger: logger)
        settle(worker, endpoint: endpoint, index: i)
        publish()
        worker.queue.close()
    }

    /// The worker's HTTP/3 applications: objects, content (through the edge cache when on),
    /// and the CA's transparency log when this node keeps one.
    private func makeRouter() throws -> NodeRouter {
        let objects = try ObjectService(
            root: config.storage.path, maxObjectSize: config.storage.maxObjectSize,
            logger: logger, ingest: ingest, diskFull: content.chunks.diskFull)
        let chunks = ContentService(
            index: content, maxChunkSize: config.chunking.maxChunkSize, maxObjectSize: config.storage.maxObjectSize, logger: logger,
            edge: edge, maxAge: originMaxAge, mesh: meshService)
        objects.gate = gate
        chunks.gate = gate
        chunks.bodyMemory = bodyMemory
        chunks.storePool = storePool
        chunks.manifestChecks = manifestChecks
        chunks.plainCuts = plainCuts
        var version = 0
        let router = NodeRouter(objects: objects, content: chunks, access: AccessGate(access.take(after: &version)!), logger: logger)
        router.rates = rates
        if let log = certificates?.log { router.log = { log.handle(path: $0) } }
        if let tracer { router.spans = StreamSpans(tracer: tracer) }
        return router
    }

    /// What the worker does between batches: take rotated credentials, and complete the
    /// requests whose origin fetches, upload ingests or chunk writes finished (those wake it
    /// through the mesh).
    private func turnHook(worker i: Int, endpoint: QUICEndpoint, router: NodeRouter, qlogVersion: Int) -> () -> Void {
        var credentialsVersion = 0
        var qlogVersion = qlogVersion
        // The router started with the settings in force; the first turn takes them again (cheap).
        var accessVersion = 0
        let access = self.access
        let qlog = self.qlog, logger = self.logger
        let published = identity
        let content = router.content, objects = router.objects
        let edgeOn = edge != nil, ingestOn = ingest != nil
        if edgeOn { content.inbox.onPost = { [mesh] in mesh.wake(i) } }
        if ingestOn { objects.ingestInbox.onPost = { [mesh] in mesh.wake(i) } }
        content.storeInbox.onPost = { [mesh] in mesh.wake(i) }
        let cutsOn = plainCuts != nil
        if cutsOn { content.cutInbox.onPost = { [mesh] in mesh.wake(i) } }
        return {
            // A rotated or reloaded certificate: new handshakes use it from now on.
            if let next = published?.take(after: &credentialsVersion) { endpoint.replaceCredentials(next) }
            // A reloaded qlog setting: connections made from now on follow it.
            if let q = qlog.take(after: &qlogVersion) {
                do { try QLogControl.apply(q, to: endpoint) } catch { logger.error("worker \(i): \(error)") }
            }
            // A reloaded [access]: the next request is judged by it.
            if let a = access.take(after: &accessVersion) { router.access.settings = a }
            // Origin fetches finish on the edge cache's thread; responses complete here.
            if edgeOn { content.drainEdge() }
            // Uploads are chunked on the ingest pool's threads, chunk PUTs written on the
            // store pool's; their answers go out here.
            if ingestOn { objects.drainIngest() }
            content.drainStores()
            // Plain files are cut on the cutter's thread.
            if cutsOn { content.drainCuts() }
        }
    }

    /// The threads that write and fsync chunk PUTs for every worker (and verify manifest PUTs):
    /// as many as the node has workers (a disk's fsyncs then overlap across them), at most four.
    static func storeThreads(workers: Int) -> Int { min(4, max(1, workers)) }

    /// The pool of `storeThreads` threads.
    static func makeStorePool(workers: Int) -> WorkPool {
        WorkPool(name: "stoq-store", threads: storeThreads(workers: workers))
    }

    /// The bound on manifest PUTs verified at once on that pool (`ManifestChecks.limit`).
    static func makeManifestChecks(workers: Int) -> ManifestChecks {
        ManifestChecks(limit: ManifestChecks.limit(storeThreads: storeThreads(workers: workers)))
    }

    /// The pool that chunks plain uploads into `content` when `chunking.dedup_enabled` is
    /// on (nil otherwise): one thread per four CPUs, at least one, at most four, since a
    /// node's cores belong to its workers first.
    static func makeIngest(_ cfg: NodeConfig, content: ObjectIndex, logger: Logger) throws -> ObjectIngest? {
        guard cfg.chunking.dedupEnabled else { return nil }
        do {
            return try ObjectIngest(
                index: content, parameters: try cfg.chunking.parameters(), storagePath: cfg.storage.path,
                threads: min(4, max(1, Worker.availableCPUs / 4)), logger: logger)
        } catch {
            throw NodeError(.storage, "cannot start ingest (chunking.dedup_enabled): \(error)")
        }
    }

    /// Lets transmit completions come back before the frames are accounted for, then logs
    /// the worker's totals.
    private func settle(_ worker: Worker, endpoint: QUICEndpoint, index i: Int) {
        let settle = monotonicNow() + 200_000_000
        while monotonicNow() < settle { try? worker.queue.flush(); usleep(10_000) }
        let c = endpoint.counters, d = worker.queue.counters
        var meta: Logger.Metadata = [:]
        for (k, v) in worker.queue.diagnostics { meta[k] = "\(v)" }
        logger.info(
            "worker \(i) stopped",
            metadata: meta.merging([
                "rx_datagrams": "\(d.rxDatagrams)", "rx_buffers": "\(d.rxBuffers)",
                "tx_datagrams": "\(d.txDatagrams)", "tx_sends": "\(d.txSends)", "tx_errors": "\(d.txErrors)",
                "accepted": "\(c.connectionsAccepted)", "datagrams_in": "\(c.datagramsIn)",
                "datagrams_out": "\(c.datagramsOut)", "dropped_malformed": "\(c.droppedMalformed)",
                "datapath": "\(worker.queue.backendName)",
            ]) { a, _ in a })
    }
}

extension NodeConfig.Chunking {
    /// The chunker's parameters these settings name (validated with the config, so this
    /// throws only for a config that skipped validation).
    func parameters() throws -> ChunkingParameters {
        try ChunkingParameters(algorithm: algorithm, minSize: Int(minChunkSize), avgSize: Int(avgChunkSize), maxSize: Int(maxChunkSize))
    }
}
