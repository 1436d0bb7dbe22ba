import Foundation
import STOQContent
import STOQDatapath
import STOQEdge
import STOQMesh
import STOQQUIC
import STOQStore
import STOQWorker

/// What one worker last published (about once a second, from its own thread): the
/// control plane reads these snapshots and never touches a worker's live state.
public struct WorkerStats: Sendable {
    public var index: Int
    public var backend: String
    public var features: String
    /// Backend detail: AF_XDP bind mode and where every UMEM frame is.
    public var diagnostics: [String: String]
    public var endpoint: EndpointCounters
    public var datapath: DatapathCounters
    /// Datagrams passed between workers (to the worker owning their connection).
    public var handoff: HandoffCounters
    /// Times the worker gave the heap's free memory back to the kernel (`Worker.memoryReleases`).
    public var memoryReleases: UInt64 = 0
    /// What the worker's Initial shedding did (`Worker.shedding`).
    public var shedding = SheddingCounters()
    public var connections: Int
    public var objects: ObjectService.Counters
    public var content: ContentService.Counters
    /// The router's access check: refusals (401, 403) and writes let through.
    public var access: AccessCounters

    package init(
        index: Int, backend: String, features: String, diagnostics: [String: String], endpoint: EndpointCounters,
        datapath: DatapathCounters, handoff: HandoffCounters, connections: Int, objects: ObjectService.Counters,
        content: ContentService.Counters, access: AccessCounters = .init()
    ) {
        (self.index, self.backend, self.features, self.diagnostics) = (index, backend, features, diagnostics)
        (self.endpoint, self.datapath, self.handoff, self.connections) = (endpoint, datapath, handoff, connections)
        (self.objects, self.content, self.access) = (objects, content, access)
    }
}

/// The latest snapshot of each worker, behind one lock each (taken once a second by the
/// worker, and by the admin API when asked).
package final class WorkerSnapshot: @unchecked Sendable {
    private let lock = NSLock()
    private var value: WorkerStats?
    package init() {}
    package func publish(_ s: WorkerStats) { lock.withLock { value = s } }
    package var latest: WorkerStats? { lock.withLock { value } }
}

/// Renders the node's numbers for the admin API.
package struct NodeMetrics {
    /// What certificate renewal reports (the admin API knows no more of it).
    package struct Certificate: Sendable {
        package var rotations: UInt64
        package var failures: UInt64
        package var notAfter: Date
        /// The embedded CA's root and intermediate ends; nil in ACME mode.
        package var rootNotAfter: Date?
        package var intermediateNotAfter: Date?
        package init(rotations: UInt64, failures: UInt64, notAfter: Date, rootNotAfter: Date? = nil, intermediateNotAfter: Date? = nil) {
            (self.rotations, self.failures, self.notAfter) = (rotations, failures, notAfter)
            (self.rootNotAfter, self.intermediateNotAfter) = (rootNotAfter, intermediateNotAfter)
        }
    }
    var workers: [WorkerStats]
    var store: StoreCounters?
    var certificate: Certificate?
    var edge: EdgeCache.Counters?
    /// What the node's cutter of plain files did; nil when it cuts none
    /// (`chunking.cut_plain_files = false`).
    var plainCuts: PlainCuts.Counters?
    /// What the mesh service last published; nil when the node runs no mesh.
    var mesh: MeshStatus?
    /// What the configuration asked for (`network.datapath`, `network.interface`): next to
    /// `stoq_datapath_info` (what each worker got), it tells a fallback from a choice.
    var configuredDatapath: ConfiguredDatapath?
    /// Expiry of a fixed certificate (`tls.cert_file`), which no renewal reports; ignored when
    /// `certificate` is set.
    var fixedCertificateNotAfter: Date?
    /// Writes refused for want of space (`DiskFullMonitor`, node-wide); nil: not reported.
    var diskFull: DiskFull?
    /// What the content store's garbage collector did (`storage.gc_interval`); nil: not reported.
    var collection: GarbageCollector.Counters?
    /// What the node's configuration reloads did; nil: not reported.
    var reloads: Reloads?

    /// Configuration reloads (SIGHUP, or a file a reload reads changing), as the daemon records them.
    package struct Reloads: Sendable, Equatable {
        /// Reloads refused: the file did not parse, or something it names did not load.
        package var failures: UInt64 = 0
        /// Whether the last reload applied (true until one is tried: the start loaded the file).
        package var lastSucceeded = true
        /// When the configuration in force was loaded: the start, or the last reload that applied.
        package var lastSuccess: Date
        package init(lastSuccess: Date) { self.lastSuccess = lastSuccess }
    }

    /// What the node's `DiskFullMonitor` reports.
    package struct DiskFull: Sendable {
        package var refusals: UInt64
        package var episodes: UInt64
        package var full: Bool
        package init(refusals: UInt64, episodes: UInt64, full: Bool) { (self.refusals, self.episodes, self.full) = (refusals, episodes, full) }
    }

    /// What the object gate and the rate limiter counted (node-wide: both are shared by the
    /// workers); nil when the node has neither.
    var limits: Limits?

    /// The gate's and the rate limiter's numbers.
    package struct Limits: Sendable {
        package var gate: ObjectGate.Counters
        /// Requests answered 429, and clients tracked now (nil: no rate limits).
        package var rateLimited: UInt64?
        package var rateClients: Int?
        /// Request body bytes held in memory now, and `limits.body_memory` (`BodyMemory`).
        package var bodyMemory: (held: UInt64, limit: UInt64)?
        package init(
            gate: ObjectGate.Counters, rateLimited: UInt64?, rateClients: Int?, bodyMemory: (held: UInt64, limit: UInt64)? = nil
        ) {
            (self.gate, self.rateLimited, self.rateClients, self.bodyMemory) = (gate, rateLimited, rateClients, bodyMemory)
        }
    }

    /// `network.datapath` and `network.interface` as written.
    package struct ConfiguredDatapath: Sendable {
        package var datapath: String
        package var interface: String
        package init(datapath: String, interface: String) { (self.datapath, self.interface) = (datapath, interface) }
    }

    package init(
        workers: [WorkerStats], store: StoreCounters?, certificate: Certificate?, edge: EdgeCache.Counters?,
        mesh: MeshStatus? = nil, configuredDatapath: ConfiguredDatapath? = nil, fixedCertificateNotAfter: Date? = nil,
        diskFull: DiskFull? = nil,
        limits: Limits? = nil, plainCuts: PlainCuts.Counters? = nil, collection: GarbageCollector.Counters? = nil,
        reloads: Reloads? = nil
    ) {
        (self.diskFull, self.plainCuts, self.collection, self.reloads) = (diskFull, plainCuts, collection, reloads)
        (self.workers, self.store, self.certificate, self.edge, self.mesh) = (workers, store, certificate, edge, mesh)
        (self.configuredDatapath, self.fixedCertificateNotAfter, self.limits) = (configuredDatapath, fixedCertificateNotAfter, limits)
    }

    /// Prometheus text exposition format (version 0.0.4).
    package func prometheus() -> String {
        var out = ""
        func family(_ name: String, _ type: String, _ help: String, _ samples: [(String, UInt64)]) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
            for (labels, v) in samples { out += "\(name)\(labels) \(v)\n" }
        }
        func perWorker(_ name: String, _ help: String, type: String = "counter", _ f: (WorkerStats) -> UInt64) {
            family(name, type, help, workers.map { ("{worker=\"\($0.index)\"}", f($0)) })
        }
        let libraries = STOQVersion.libraries.map { ",\($0.name.lowercased())=\"\($0.version)\"" }.joined()
        family(
            "stoq_build_info", "gauge", "Always 1: this node's version and the libraries it runs, as labels.",
            [("{version=\"\(STOQVersion.number)\"\(libraries)}", 1)])
        perWorker("stoq_quic_datagrams_received_total", "Datagrams the QUIC endpoint handled.") { $0.endpoint.datagramsIn }
        perWorker("stoq_quic_datagrams_sent_total", "Datagrams the QUIC endpoint wrote.") { $0.endpoint.datagramsOut }
        perWorker("stoq_quic_dropped_malformed_total", "Datagrams dropped as malformed.") { $0.endpoint.droppedMalformed }
        perWorker("stoq_quic_dropped_initials_total", "Initial packets dropped (not an Initial, unacceptable, no room to answer).") {
            $0.endpoint.droppedInitials
        }
        perWorker("stoq_quic_invalid_tokens_total", "Initials with a forged or stale Retry token, answered INVALID_TOKEN.") {
            $0.endpoint.invalidTokens
        }
        perWorker("stoq_quic_connections_refused_total", "Initials answered CONNECTION_REFUSED: the worker held max_connections.") {
            $0.endpoint.connectionsRefused
        }
        perWorker(
            "stoq_quic_connections_refused_per_client_total",
            "Initials answered CONNECTION_REFUSED: their /64 held max_connections_per_client established connections on the worker."
        ) {
            $0.endpoint.connectionsRefusedPerClient
        }
        perWorker("stoq_quic_dropped_unknown_total", "Datagrams for no known connection that got no answer.") { $0.endpoint.droppedUnknown }
        perWorker("stoq_quic_version_negotiations_total", "Version Negotiation packets sent.") { $0.endpoint.versionNegotiations }
        perWorker("stoq_quic_retries_total", "Stateless Retry packets sent.") { $0.endpoint.retriesSent }
        perWorker("stoq_quic_retries_forced_total", "Retry packets sent because retry_threshold connections were mid-handshake.") {
            $0.endpoint.retriesForced
        }
        perWorker(
            "stoq_quic_replies_withheld_total",
            "Packets left without their stateless reply (Retry, Version Negotiation, reset, refusal): stateless_reply_rate was spent."
        ) { $0.endpoint.repliesWithheld }
        perWorker("stoq_quic_sheddable_initials_total", "v1 Initials without a token for no known connection, answered, accepted or withheld.") {
            $0.endpoint.sheddableInitials
        }
        perWorker("stoq_quic_sheddable_initials_withheld_total", "Of those, the ones left unanswered: stateless_reply_rate (or its per-/64 share) was spent.") {
            $0.endpoint.sheddableWithheld
        }
        perWorker("stoq_datapath_initial_shedding_prefixes", "/64s whose Initials without a token the kernel sheds now (an Initial flood).", type: "gauge") {
            UInt64($0.shedding.prefixes)
        }
        perWorker(
            "stoq_datapath_initial_shedding_everyone", "1 while the kernel sheds everyone's Initials without a token (a flood across prefixes).", type: "gauge"
        ) {
            $0.shedding.everyone ? 1 : 0
        }
        perWorker("stoq_datapath_initial_shedding_episodes_total", "Times the worker started shedding an Initial flood in the kernel.") {
            $0.shedding.episodes
        }
        perWorker("stoq_datapath_socket_drops_total", "Datagrams the kernel dropped for the worker's socket: shed Initials, or its receive buffer full.") {
            $0.shedding.kernelDrops
        }
        perWorker("stoq_quic_connections_half_open", "Connections mid-handshake.", type: "gauge") { $0.endpoint.halfOpenConnections }
        perWorker("stoq_quic_stateless_resets_total", "Stateless resets sent.") { $0.endpoint.statelessResets }
        perWorker("stoq_quic_connections_accepted_total", "Connections accepted.") { $0.endpoint.connectionsAccepted }
        perWorker("stoq_quic_connections_closed_total", "Connections closed.") { $0.endpoint.connectionsClosed }
        perWorker("stoq_quic_connection_errors_total", "Connections that ended with an error (handshake, protocol, timeout).") {
            $0.endpoint.connectionErrors
        }
        perWorker("stoq_quic_handshake_failures_total", "Connections that ended before their handshake completed.") {
            $0.endpoint.handshakeFailures
        }
        perWorker("stoq_quic_preferred_address_datagrams_total", "Datagrams received on network.preferred_address (clients that moved there).") {
            $0.endpoint.datagramsToPreferredAddress
        }
        perWorker("stoq_quic_path_validations_total", "Path validations that succeeded on closed connections (peers that moved: NAT rebinding, migration).") {
            $0.endpoint.pathsValidated
        }
        perWorker("stoq_quic_path_validation_failures_total", "Path validations that failed on closed connections.") {
            $0.endpoint.pathsFailed
        }
        perWorker("stoq_quic_connections", "Connections open now.", type: "gauge") { UInt64($0.connections) }
        perWorker(
            "stoq_http_bodies_cut_short_total",
            "Responses reset because the file they were sent from shrank under them (replaced in place, not renamed)."
        ) { $0.endpoint.bodiesCutShort }
        family(
            "stoq_http_requests_timed_out_total", "counter",
            "Stalled streams: request heads not complete \(StallTimeouts.duration(StallTimeouts.headTimeout)) after they began (reset), request bodies that received no byte for limits.body_timeout (answered 408), responses the client acknowledged nothing of for limits.send_timeout (reset).",
            workers.flatMap { w in
                [
                    ("{worker=\"\(w.index)\",what=\"head\"}", w.endpoint.requestsTimedOutHead),
                    ("{worker=\"\(w.index)\",what=\"body\"}", w.endpoint.requestsTimedOutBody),
                    ("{worker=\"\(w.index)\",what=\"send\"}", w.endpoint.requestsTimedOutSend),
                ]
            })
        perWorker("stoq_ngtcp2_heap_bytes", "Heap ngtcp2 holds for the worker's connections now.", type: "gauge") {
            $0.endpoint.ngtcp2HeapBytes
        }
        perWorker("stoq_nghttp3_heap_bytes", "Heap nghttp3 holds for the worker's connections now.", type: "gauge") {
            $0.endpoint.nghttp3HeapBytes
        }
        perWorker("stoq_library_pages_warm_bytes", "Freed ngtcp2 and nghttp3 blocks of a page and more kept resident for reuse.", type: "gauge") {
            $0.endpoint.libraryPagesWarmBytes
        }
        perWorker("stoq_library_blocks_released_total", "Freed ngtcp2 and nghttp3 blocks of a page and more whose pages went back to the kernel.") {
            $0.endpoint.libraryBlocksReleased
        }
        perWorker("stoq_tls_peer_certificates_refused_total", "Handshakes refused: the peer's certificate did not verify.") {
            $0.endpoint.peerCertificatesRefused
        }
        perWorker("stoq_tls_resumed_total", "Handshakes that resumed a session from a ticket (tls.session_tickets).") {
            $0.endpoint.tlsResumed
        }
        perWorker("stoq_tls_early_data_total", "Handshakes whose 0-RTT data the node accepted (tls.early_data).") {
            $0.endpoint.tlsEarlyData
        }
        // The anti-replay table is the process's, shared by the workers.
        let replay = AntiReplay.counters
        family(
            "stoq_tls_anti_replay_total", "counter",
            "ClientHellos with early data, by what the anti-replay table said: accepted (0-RTT), replay, over_share (its /64's share full), full (refused 0-RTT but the last).",
            [
                ("{verdict=\"accepted\"}", replay.accepted), ("{verdict=\"replay\"}", replay.replays),
                ("{verdict=\"over_share\"}", replay.overShare), ("{verdict=\"full\"}", replay.full),
            ])
        family("stoq_tls_anti_replay_entries", "gauge", "ClientHellos the anti-replay table remembers now.", [("", replay.live)])
        perWorker("stoq_http_too_early_total", "Requests in 0-RTT that are not GET/HEAD, answered 425 Too Early.") {
            $0.endpoint.requestsTooEarly
        }
        perWorker("stoq_http_early_requests_total", "Requests in 0-RTT (GET/HEAD) served before the handshake completed.") {
            $0.endpoint.requestsEarly
        }
        perWorker("stoq_qlog_connections_total", "Connections that wrote a qlog (log.qlog_dir, sampled).") { $0.endpoint.qlogConnections }
        perWorker("stoq_qlog_bytes_total", "Bytes written to qlog files.") { $0.endpoint.qlogBytes }
        perWorker("stoq_qlog_errors_total", "qlog files that could not be opened or written (a full disk).") { $0.endpoint.qlogErrors }
        perWorker("stoq_qlog_skipped_total", "Connections sampled but not logged: 1024 logged ones were open on the worker.") { $0.endpoint.qlogSkipped }
        perWorker("stoq_sink_bytes_written_total", "Received body bytes the worker's writer thread wrote to files.") {
            $0.endpoint.sinkBytesWritten
        }
        perWorker("stoq_sink_bytes_queued", "Received body bytes not yet written (their flow control credit is held).", type: "gauge") {
            $0.endpoint.sinkBytesQueued
        }
        perWorker("stoq_sink_peak_bytes_queued", "The most received body the worker ever held unwritten (at most one stream window).", type: "gauge") {
            $0.endpoint.sinkPeakBytesQueued
        }
        perWorker("stoq_sink_waits_total", "Times the worker waited for its writer: uploads together filled its ring, or a closing stream's last writes.") {
            $0.endpoint.sinkWaits + $0.endpoint.sinkDrainWaits
        }
        perWorker("stoq_datapath_rx_datagrams_total", "Datagrams the datapath received.") { $0.datapath.rxDatagrams }
        perWorker("stoq_datapath_tx_datagrams_total", "Datagrams the datapath sent.") { $0.datapath.txDatagrams }
        perWorker("stoq_datapath_rx_bytes_total", "UDP payload bytes received.") { $0.datapath.rxBytes }
        perWorker("stoq_datapath_tx_bytes_total", "UDP payload bytes sent.") { $0.datapath.txBytes }
        perWorker("stoq_datapath_rx_dropped_total", "Datagrams the datapath dropped on receive.") { $0.datapath.rxDropped }
        perWorker("stoq_datapath_tx_errors_total", "Sends the kernel refused or could not address.") { $0.datapath.txErrors }
        perWorker("stoq_datapath_offload_fallbacks_total", "Offloads turned off at run time.") { $0.datapath.offloadFallbacks }
        perWorker("stoq_worker_handoff_sent_total", "Datagrams passed to the worker owning their connection.") { $0.handoff.sent }
        perWorker("stoq_worker_handoff_received_total", "Datagrams other workers passed to this one.") { $0.handoff.received }
        perWorker("stoq_worker_handoff_dropped_total", "Datagrams not passed on: the owner's inbox was full.") { $0.handoff.dropped }
        perWorker(
            "stoq_worker_memory_releases_total",
            "Times the worker gave the heap's free memory back to the kernel, once connections had closed and handshakes paused."
        ) { $0.memoryReleases }
        perWorker("stoq_http_requests_total", "HTTP requests, whichever service answered them (objects, chunks, manifests, the mesh, the log).") {
            $0.objects.requests
        }
        perWorker("stoq_http_uploads_stored_total", "Object uploads stored.") { $0.objects.uploadsStored }
        perWorker("stoq_http_uploads_no_space_total", "Object uploads answered 507: the disk was full (also in stoq_store_disk_full_total).") {
            $0.objects.uploadsNoSpace
        }
        perWorker("stoq_ingest_objects_total", "Plain uploads chunked into the content store (dedup on ingest).") { $0.objects.ingests }
        perWorker("stoq_ingest_failures_total", "Plain uploads whose ingest failed (answered 500).") { $0.objects.ingestFailures }
        perWorker("stoq_ingest_followed_total", "Plain uploads chunked while they arrived, however they ended.") {
            $0.objects.ingestsFollowed
        }
        perWorker("stoq_ingest_bytes_total", "Bytes of the plain uploads ingested.") { $0.objects.ingestBytes }
        perWorker("stoq_ingest_new_bytes_total", "Ingested bytes in chunks the store did not have (written).") { $0.objects.ingestNewBytes }
        perWorker("stoq_ingest_dedup_bytes_total", "Ingested bytes in chunks the store already had (not written again).") {
            $0.objects.ingestDedupBytes
        }
        perWorker("stoq_content_chunks_served_total", "Chunks served.") { $0.content.chunksServed }
        perWorker("stoq_content_chunks_stored_total", "Chunks stored.") { $0.content.chunksStored }
        perWorker("stoq_content_chunks_already_present_total", "Chunk uploads the node already had.") { $0.content.chunksAlreadyPresent }
        perWorker("stoq_content_manifests_served_total", "Manifests served.") { $0.content.manifestsServed }
        perWorker(
            "stoq_content_manifest_checks_busy_total",
            "Manifest PUTs answered 503 with Retry-After: as many manifests as the node verifies at once (half its store threads) were being read back and hashed."
        ) { $0.content.manifestChecksBusy }
        perWorker("stoq_content_objects_served_total", "Chunked objects served as one body (GET/HEAD /objects/).") { $0.content.objectsServed }
        perWorker("stoq_content_edge_requests_total", "Requests answered through the edge cache.") { $0.content.edgeRequests }
        if let p = plainCuts {
            family(
                "stoq_content_plain_cuts_total", "counter",
                "Plain files cut into a manifest when one was asked for (chunking.cut_plain_files); failed: a cut refused (too large, too many waiting) or given up (changed, unreadable).",
                [("{outcome=\"cut\"}", p.cut), ("{outcome=\"failed\"}", p.failed)])
            family(
                "stoq_content_plain_chunks_total", "counter", "Chunks of those cuts asked for: served from the file, or stale (the file changed since).",
                [("{outcome=\"served\"}", p.chunksServed), ("{outcome=\"stale\"}", p.chunksStale)])
        }
        family(
            "stoq_access_refused_total", "counter", "Requests the access policy refused ([access]): 401 no or invalid credential, 403 not enough.",
            workers.flatMap { w in
                [
                    ("{worker=\"\(w.index)\",status=\"401\"}", w.access.refusedUnauthenticated),
                    ("{worker=\"\(w.index)\",status=\"403\"}", w.access.refusedForbidden),
                ]
            })
        perWorker("stoq_access_allowed_writes_total", "Writes (PUT, DELETE, POST) the access policy let through.") { $0.access.allowedWrites }
        // The datapath each worker got, as an info metric: backend, features, AF_XDP mode.
        out += "# HELP stoq_datapath_info The datapath a worker runs on.\n# TYPE stoq_datapath_info gauge\n"
        for w in workers {
            var labels = "worker=\"\(w.index)\",backend=\"\(w.backend)\",features=\"\(w.features)\""
            if let m = w.diagnostics["xdp_mode"] { labels += ",xdp_mode=\"\(m)\"" }
            if let z = w.diagnostics["zero_copy"] { labels += ",zero_copy=\"\(z)\"" }
            out += "stoq_datapath_info{\(labels)} 1\n"
        }
        if let c = configuredDatapath {
            family(
                "stoq_datapath_configured_info", "gauge", "The datapath the configuration asked for (network.datapath, network.interface).",
                [("{datapath=\"\(MeshMetrics.label(c.datapath))\",interface=\"\(MeshMetrics.label(c.interface))\"}", 1)])
        }
        let frameKeys = ["frames_kernel_rx", "frames_held", "frames_tx_free", "frames_tx_reserved", "frames_tx_in_flight"]
        let xdp = workers.filter { $0.diagnostics["frames_total"] != nil }
        if !xdp.isEmpty {
            out += "# HELP stoq_xdp_frames Where each AF_XDP UMEM frame is.\n# TYPE stoq_xdp_frames gauge\n"
            for w in xdp {
                for k in frameKeys {
                    let place = k.dropFirst("frames_".count)
                    out += "stoq_xdp_frames{worker=\"\(w.index)\",place=\"\(place)\"} \(w.diagnostics[k] ?? "0")\n"
                }
            }
        }
        if let s = store {
            family("stoq_store_chunks_written_total", "counter", "Chunks written to the store.", [("", s.chunksWritten)])
            family("stoq_store_bytes_written_total", "counter", "Chunk bytes written to the store.", [("", s.bytesWritten)])
            family("stoq_store_dedup_hits_total", "counter", "Chunk puts the store already had.", [("", s.dedupHits)])
            family(
                "stoq_store_corrupt_quarantined_total", "counter", "Chunks that failed verification and were quarantined.",
                [("", s.corruptQuarantined)])
            family(
                "stoq_store_gc_chunks_removed_total", "counter", "Chunks garbage collection removed (named by no object, past the grace period).",
                [("", s.chunksCollected)])
            family(
                "stoq_store_gc_bytes_freed_total", "counter", "Bytes those chunks held (no longer counted against limits.storage_cap).",
                [("", s.bytesCollected)])
        }
        if let g = collection {
            family(
                "stoq_store_gc_runs_total", "counter",
                "Garbage collections of the content store, scheduled or asked for: completed, or failed (a damaged record refuses one).",
                [("{outcome=\"completed\"}", g.runs), ("{outcome=\"failed\"}", g.failures)])
        }
        if let d = diskFull {
            family(
                "stoq_store_disk_full_total", "counter",
                "Writes refused because the filesystem was full (ENOSPC/EDQUOT): uploads answered 507, edge fills served uncached.",
                [("", d.refusals)])
            family("stoq_store_disk_full_episodes_total", "counter", "Runs of such refusals with no successful write between them.", [("", d.episodes)])
            family("stoq_store_disk_full", "gauge", "1 while the last write was refused for want of space.", [("", d.full ? 1 : 0)])
        }
        if let e = edge {
            family("stoq_edge_hits_total", "counter", "Chunk reads served from the edge cache.", [("", e.hits)])
            family("stoq_edge_misses_total", "counter", "Chunks asked of the edge cache that it did not hold.", [("", e.misses)])
            family("stoq_edge_manifest_hits_total", "counter", "Fresh cached manifests used.", [("", e.manifestHits)])
            family(
                "stoq_edge_manifest_misses_total", "counter",
                "Manifests absent or expired in the edge cache, or fresh but asked past (Cache-Control: no-cache).", [("", e.manifestMisses)])
            family("stoq_edge_origin_chunk_fetches_total", "counter", "Chunk requests sent to the origin.", [("", e.originChunkFetches)])
            family("stoq_edge_origin_manifest_fetches_total", "counter", "Manifest requests sent to the origin.", [("", e.originManifestFetches)])
            family(
                "stoq_edge_origin_object_fetches_total", "counter",
                "Plain objects fetched whole from the origin (it had no manifest for them): answers 200, 206 or 304.",
                [("", e.originObjectFetches)])
            family(
                "stoq_edge_origin_not_modified_total", "counter", "Expired plain objects the origin answered 304 for: kept, fresh again.", [("", e.notModified)]
            )
            family("stoq_edge_purges_total", "counter", "Manifests dropped by POST /edge/purge/<name> on the admin API.", [("", e.purges)])
            family(
                "stoq_edge_manifests_forgotten_total", "counter",
                "Manifests dropped because the origin answered 404 for a chunk they list (its cut went with a restart, or the object changed): asked for again.",
                [("", e.manifestsForgotten)])
            family(
                "stoq_edge_manifest_revalidations_total", "counter",
                "Fresh manifests asked for upstream all the same: the request said Cache-Control: no-cache (a node re-asking after a chunk 404, or any client).",
                [("", e.revalidations)])
            family("stoq_edge_coalesced_total", "counter", "Requests that joined an origin fetch already in flight.", [("", e.coalesced)])
            family("stoq_edge_evictions_total", "counter", "Chunks evicted from the edge cache.", [("", e.evictions)])
            family("stoq_edge_manifest_evictions_total", "counter", "Manifests evicted from the edge cache.", [("", e.manifestEvictions)])
            family("stoq_edge_origin_bytes_total", "counter", "Body bytes received from the origin.", [("", e.bytesFromOrigin)])
            family(
                "stoq_edge_verification_failures_total", "counter", "Chunks from the origin refused: bytes not matching their id.",
                [("", e.verificationFailures)])
            family("stoq_edge_origin_errors_total", "counter", "Origin fetches that failed (unreachable, lost, timed out, bad answer).", [("", e.originErrors)])
            family("stoq_edge_stale_served_total", "counter", "Expired manifests served because the origin failed.", [("", e.staleServed)])
            family(
                "stoq_edge_failovers_total", "counter", "Fetches moved to another route or holder after the one in use failed or stalled.",
                [("", e.failovers)])
            family("stoq_edge_hedges_total", "counter", "Second requests for a late chunk on another route.", [("", e.hedges)])
            family("stoq_edge_hedge_wins_total", "counter", "Hedges that delivered before the request they hedged.", [("", e.hedgeWins)])
            family("stoq_edge_cached_bytes", "gauge", "Chunk and manifest bytes in the edge cache.", [("", e.cachedBytes)])
            family("stoq_edge_cached_chunks", "gauge", "Chunks in the edge cache.", [("", e.cachedChunks)])
            family("stoq_edge_cached_manifests", "gauge", "Manifests in the edge cache.", [("", e.cachedManifests)])
            family("stoq_edge_capacity_bytes", "gauge", "edge.cache_size.", [("", e.capacity)])
        }
        if let c = certificate {
            family(
                "stoq_tls_certificates_issued_total", "counter", "Certificates the node obtained (first and renewals).",
                [("", c.rotations)])
            family(
                "stoq_tls_renewal_failures_total", "counter", "Certificate renewals that failed (the current one stays).",
                [("", c.failures)])
        }
        if let notAfter = certificate?.notAfter ?? fixedCertificateNotAfter {
            family(
                "stoq_tls_certificate_not_after_seconds", "gauge", "Expiry of the certificate new handshakes get (Unix time).",
                [("", UInt64(max(0, notAfter.timeIntervalSince1970)))])
        }
        if let r = reloads {
            family(
                "stoq_config_reload_failures_total", "counter",
                "Reloads refused (the file invalid, or a file it names not loading): the running configuration stayed.", [("", r.failures)])
            family(
                "stoq_config_last_reload_successful", "gauge",
                "0 while the last reload was refused (the node tries it again until it applies), else 1.", [("", r.lastSucceeded ? 1 : 0)])
            family(
                "stoq_config_last_reload_success_timestamp_seconds", "gauge",
                "When the configuration in force was loaded (Unix time): the start, or the last reload that applied.",
                [("", UInt64(max(0, r.lastSuccess.timeIntervalSince1970)))])
        }
        if let c = certificate, let root = c.rootNotAfter, let intermediate = c.intermediateNotAfter {
            // Alert well ahead on the root: nothing renews it, and replacing it is fleet-wide work.
            family(
                "stoq_trust_ca_not_after_seconds", "gauge", "Expiry of the embedded CA's root and intermediate (Unix time).",
                [
                    ("{ca=\"root\"}", UInt64(max(0, root.timeIntervalSince1970))),
                    ("{ca=\"intermediate\"}", UInt64(max(0, intermediate.timeIntervalSince1970))),
                ])
        }
        if let l = limits {
            family(
                "stoq_limits_quota_refused_total", "counter", "Writes refused 507: limits.storage_cap or limits.writer_quota.",
                [("{kind=\"storage_cap\"}", l.gate.storageCapRefused), ("{kind=\"writer_quota\"}", l.gate.writerQuotaRefused)])
            family(
                "stoq_precondition_failed_total", "counter", "Writes and deletes refused 412 by If-Match / If-None-Match.",
                [("", l.gate.preconditionFailed)])
            family(
                "stoq_overwrite_refused_total", "counter", "Replacements and deletes refused by access.overwrite (403, or 409 under never).",
                [("", l.gate.overwriteRefused)])
            family(
                "stoq_stored_bytes", "gauge",
                "Bytes the node stores: plain objects and chunks, but for chunks of uploads in progress (in stoq_limits_in_flight_bytes); with those, what limits.storage_cap caps.",
                [("", l.gate.storedBytes)])
            family("stoq_limits_writers", "gauge", "Writers with objects stored (what limits.writer_quota applies to).", [("", UInt64(l.gate.owners))])
            family(
                "stoq_limits_in_flight_bytes", "gauge",
                "Bytes held by uploads in progress: counted against limits.writer_quota and limits.storage_cap until they end.",
                [("", l.gate.inFlightBytes)])
            family("stoq_limits_in_flight_uploads", "gauge", "Uploads in progress holding bytes of the limits.", [("", UInt64(l.gate.inFlightUploads))])
            if let m = l.bodyMemory {
                family(
                    "stoq_limits_body_memory_bytes", "gauge",
                    "Request bodies held in memory now (chunks, manifests, queries), each at its announced or largest length: what limits.body_memory bounds.",
                    [("", m.held)])
            }
            family(
                "stoq_plain_digests_total", "counter",
                "Plain files without a SHA-256 hashed in the background (after a GET) or by a cut: recorded (their ETag since), changed while read, or not recordable.",
                [
                    ("{outcome=\"recorded\"}", l.gate.digests.recorded), ("{outcome=\"changed\"}", l.gate.digests.changed),
                    ("{outcome=\"unrecorded\"}", l.gate.digests.unrecorded),
                ])
            if let limited = l.rateLimited {
                family("stoq_limits_rate_limited_total", "counter", "Requests answered 429 by the per-client rate limits.", [("", limited)])
                family("stoq_limits_rate_clients", "gauge", "Clients the rate limiter tracks now.", [("", UInt64(l.rateClients ?? 0))])
            }
        }
        if let m = mesh { out += MeshMetrics.prometheus(m) }
        return out
    }

    /// The same numbers as JSON, per worker.
    package func json() -> String {
        var list: [[String: Any]] = []
        for w in workers {
            list.append([
                "worker": w.index, "backend": w.backend, "features": w.features, "diagnostics": w.diagnostics,
                "connections": w.connections, "datagrams_in": w.endpoint.datagramsIn, "datagrams_out": w.endpoint.datagramsOut,
                "connections_accepted": w.endpoint.connectionsAccepted, "rx_datagrams": w.datapath.rxDatagrams,
                "tx_datagrams": w.datapath.txDatagrams, "requests": w.objects.requests,
                "chunks_served": w.content.chunksServed, "chunks_stored": w.content.chunksStored,
                "ingests": w.objects.ingests, "ingests_followed": w.objects.ingestsFollowed, "ingest_bytes": w.objects.ingestBytes,
                "ingest_new_bytes": w.objects.ingestNewBytes, "ingest_dedup_bytes": w.objects.ingestDedupBytes,
                "access_refused_401": w.access.refusedUnauthenticated, "access_refused_403": w.access.refusedForbidden,
                "access_allowed_writes": w.access.allowedWrites,
                "requests_timed_out_head": w.endpoint.requestsTimedOutHead,
                "requests_timed_out_body": w.endpoint.requestsTimedOutBody, "requests_timed_out_send": w.endpoint.requestsTimedOutSend,
            ])
        }
        var obj: [String: Any] = ["workers": list]
        if let s = store {
            obj["store"] = [
                "chunks_written": s.chunksWritten, "bytes_written": s.bytesWritten, "dedup_hits": s.dedupHits,
                "corrupt_quarantined": s.corruptQuarantined, "gc_chunks_removed": s.chunksCollected, "gc_bytes_freed": s.bytesCollected,
            ]
        }
        if let g = collection { obj["gc"] = ["runs": g.runs, "failures": g.failures] }
        if let r = reloads {
            obj["config"] = [
                "reload_failures": r.failures, "last_reload_successful": r.lastSucceeded,
                "last_reload_success": UInt64(max(0, r.lastSuccess.timeIntervalSince1970)),
            ]
        }
        if let d = diskFull { obj["disk_full"] = ["refusals": d.refusals, "episodes": d.episodes, "full": d.full] }
        if let p = plainCuts {
            obj["plain_cuts"] = ["cut": p.cut, "failed": p.failed, "chunks_served": p.chunksServed, "chunks_stale": p.chunksStale]
        }
        if let m = mesh { obj["mesh"] = MeshMetrics.json(m) }
        if let l = limits {
            var o: [String: Any] = [
                "stored_bytes": l.gate.storedBytes, "writers": l.gate.owners, "storage_cap_refused": l.gate.storageCapRefused,
                "writer_quota_refused": l.gate.writerQuotaRefused, "precondition_failed": l.gate.preconditionFailed,
                "overwrite_refused": l.gate.overwriteRefused, "in_flight_bytes": l.gate.inFlightBytes,
                "in_flight_uploads": l.gate.inFlightUploads,
            ]
            if let m = l.bodyMemory { (o["body_memory_held"], o["body_memory_limit"]) = (m.held, m.limit) }
            if let limited = l.rateLimited { (o["rate_limited"], o["rate_clients"]) = (limited, l.rateClients ?? 0) }
            obj["limits"] = o
        }
        let data = (try? JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys])) ?? Data("{}".utf8)
        return String(decoding: data, as: UTF8.self)
    }
}
