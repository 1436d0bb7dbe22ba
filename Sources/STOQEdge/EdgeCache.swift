import CSTOQSystem
import Foundation
import Logging
import STOQCache
import STOQCore
import STOQChunking
import STOQQUIC
import STOQStore
import STOQTracing
import STOQTransfer
import Tracing
import Synchronization

/// The edge cache: a node with `edge.enable_caching` serves objects it lacks from its
/// origin, fetching each manifest and chunk from the origin once and keeping them.
///
/// - **Chunks** live in a chunk store of their own (`<content_path>/edge`), so eviction
///   never touches the node's own objects. Which chunks stay is decided by S3-FIFO
///   (`STOQCache`) over their sizes, bounded by `edge.cache_size`. A chunk is content
///   addressed, so it never goes stale: it leaves only by eviction. Every chunk from the
///   origin is verified (SHA-256 = its id) by the store's put before it is cached or
///   served; one that is not is refused, logged and counted. Served chunks are verified
///   again as they are read, like every chunk the node serves.
/// - **Manifests** (name → chunks) are what changes at an origin: each is fresh for the
///   origin's `Cache-Control: max-age`, else `edge.ttl_default`, then fetched again. If the
///   origin cannot be reached, a stale manifest is served (and counted) rather than none.
///   They take at most a sixteenth of `edge.cache_size` (`EdgeManifests`, least recently
///   used out first) and the chunks the rest, so the bound holds for both together.
/// - **Plain objects**: an upstream that answers 404 for a manifest may hold the object as
///   a plain file (an operator's, or a flat upload). The edge then asks for the object whole
///   (into a temp file under its root; checked against a SHA-256 ETag, if the upstream sends
///   one), cuts it into its own chunk store with the node's chunking parameters on a thread
///   of its own, and keeps the manifest it made (`EdgeManifests.Entry.plain`). Those chunks
///   exist nowhere upstream as chunks: one evicted since is fetched again as the byte range
///   of the object it was cut from (`Range` on `/objects/<name>`), checked against its id
///   like any chunk. A range whose bytes are not that chunk means the object changed
///   upstream: the manifest goes, and the next request fetches the object whole.
/// - **Fetching** happens on one thread of its own (`EdgeFetcher`) with one QUIC connection to the origin
///   (up to `maxInFlight` requests at once), never on a worker. Concurrent requests for the
///   same chunk or manifest join the fetch in flight. A worker hands a request off with a
///   ticket and picks the completion up from its `Inbox` between batches.
/// - **A full disk**: a chunk that cannot be stored for want of space is still served, once,
///   to the requests waiting for it (its bytes verified in memory), and not cached; a manifest
///   that cannot be saved is served and kept in memory only. Both are counted with the node's
///   other refused writes (`DiskFullMonitor`), logged once per episode, and the cache stores
///   again as soon as a write succeeds. Nothing half-written stays: the store's temp file is
///   removed, and the index snapshot is retried at the next tick.
/// - **Restart**: the policy's entries (and ghost keys) are snapshotted crash-safely (`CacheIndexFile`) every
///   couple of seconds when they changed and at stop; on open the snapshot is checked
///   against the chunks actually on disk (missing ones dropped, strays adopted), so the
///   bound holds and nothing leaks whatever moment the node died at.
public final class EdgeCache: @unchecked Sendable {
    /// What the cache counted since the node started.
    public struct Counters: Sendable {
        /// Chunk reads served from the cache, and chunk requests it did not hold.
        public var hits: UInt64 = 0
        public var misses: UInt64 = 0
        public var manifestHits: UInt64 = 0
        public var manifestMisses: UInt64 = 0
        /// Requests sent upstream (to the origin, or through the mesh), retries included.
        public var originChunkFetches: UInt64 = 0
        public var originManifestFetches: UInt64 = 0
        /// Plain objects asked for whole (the upstream had no manifest for them) that the
        /// upstream sent (200, 206, 304): its 404s, the misses of a search, are not counted.
        public var originObjectFetches: UInt64 = 0
        /// Of those, expired ones the upstream said were unchanged (304): kept, fresh again.
        public var notModified: UInt64 = 0
        /// Manifests an operator purged (`purge`).
        public var purges: UInt64 = 0
        /// Manifests dropped because the upstream had none of a chunk they list
        /// (`forgetManifest`).
        public var manifestsForgotten: UInt64 = 0
        /// Fresh manifests a `Cache-Control: no-cache` request asked past (`manifest(askingPast:)`).
        public var revalidations: UInt64 = 0
        /// Requests that joined a fetch already in flight instead of starting one.
        public var coalesced: UInt64 = 0
        /// Chunks, and manifests, evicted to keep within `edge.cache_size`.
        public var evictions: UInt64 = 0
        public var manifestEvictions: UInt64 = 0
        public var bytesFromOrigin: UInt64 = 0
        /// Chunks from the origin whose bytes did not hash to their id (refused).
        public var verificationFailures: UInt64 = 0
        /// Fetches that failed on every upstream attempt: unreachable, connection lost, timed
        /// out, bad answers.
        public var originErrors: UInt64 = 0
        /// Fetches moved to another attempt (route or holder) after one failed or stalled.
        public var failovers: UInt64 = 0
        /// Hedges: second requests for a late chunk on another route, and those that won.
        public var hedges: UInt64 = 0
        public var hedgeWins: UInt64 = 0
        /// Expired manifests served because the origin could not be asked.
        public var staleServed: UInt64 = 0
        /// Bytes held, chunks and manifests together (bounded by `capacity`).
        public var cachedBytes: UInt64 = 0
        public var cachedChunks: UInt64 = 0
        public var cachedManifests: UInt64 = 0
        public var capacity: UInt64 = 0
    }

    /// What is fetched from the origin.
    public enum Key: Hashable, Sendable {
        case chunk(ChunkID)
        case manifest(String)
    }

    /// Why a fetch failed: the status and message the waiting client gets.
    ///
    /// The shape of every STOQ error (a nested `Code`); the code follows from the status the
    /// client is answered with, so the two cannot disagree.
    public struct Failure: Sendable, Error, CustomStringConvertible {
        /// The kind of failure.
        public struct Code: Hashable, Sendable, CustomStringConvertible {
            /// Stable name.
            public let name: String
            /// Creates a code; STOQ's own are the static members.
            public init(name: String) { self.name = name }
            /// The origin has no such object (404).
            public static let notFound = Code(name: "not found")
            /// The origin did not answer in time (504).
            public static let originTimeout = Code(name: "origin timeout")
            /// The edge itself failed, e.g. could not make a buffer (500).
            public static let local = Code(name: "local")
            /// The origin is unreachable, reset the request, answered an error or sent bytes
            /// that do not verify (502).
            public static let originFailed = Code(name: "origin failed")
            public var description: String { name }
        }

        /// The HTTP status the waiting client gets.
        public var status: Int
        /// The message the waiting client gets.
        public var reason: String
        /// The kind of failure, from `status`.
        public var code: Code {
            switch status {
            case 404: .notFound
            case 504: .originTimeout
            case 500: .local
            default: .originFailed
            }
        }
        /// Same as `reason`.
        public var message: String { reason }
        public var description: String { reason }
    }

    /// A finished fetch, for the worker that asked (`failure` nil: it is in the cache now).
    public struct Completion: Sendable {
        public var ticket: UInt64
        public var failure: Failure?
        /// A fetched manifest's bytes, handed over with the completion so that the worker
        /// does not depend on it still being cached when it drains its inbox.
        public var manifest: [UInt8]? = nil
        /// A fetched chunk's verified bytes, likewise: a small cache may evict the chunk (for
        /// another fetch) before the worker that asked for it drains its inbox.
        public var chunk: [UInt8]? = nil
    }

    /// One worker's completions: posted from the fetcher thread, drained on the worker
    /// between batches (`CompletionInbox`, shared with plain-upload ingest).
    public typealias Inbox = CompletionInbox<Completion>

    struct Waiter {
        var inbox: Inbox
        var ticket: UInt64
    }

    /// Requests in flight upstream at once.
    public static let maxInFlight = 32
    /// How long connecting to an upstream may take, and one fetch (all its attempts).
    public static let connectTimeout = 3.0
    /// After a connect timed out, fetches from that upstream fail at once for this long
    /// (seconds): an origin that is down costs one connect timeout a second, not one a miss.
    public static let holdUnreachable = 1.0
    /// How long one fetch (a chunk, a manifest, a plain object whole) may take, all its
    /// attempts together, unless its bytes keep coming at `slowestFetchRate` on average.
    public static let requestTimeout: UInt64 = 30_000_000_000
    /// Bytes a second a fetch must average, from its start, to go on past
    /// `requestTimeout`: 64 KiB/s (512 kbit/s). A large manifest (9.4 MB for a 64 GiB object)
    /// over a slow link goes on; an upstream that sends a byte every few seconds, which never
    /// stalls, is cut off at `requestTimeout`.
    public static let slowestFetchRate: UInt64 = 64 << 10
    /// An attempt that receives no byte for this long is abandoned for the next one. Relays
    /// verify a whole chunk before they send its first byte, so this is generous; a link known
    /// to be down (`FetchUpstream.isDown`) is abandoned at once.
    public static let stallTimeout: UInt64 = 5_000_000_000
    /// The same for a manifest, which the origin or a holder may be cutting from a plain file
    /// before it answers (`chunking.cut_plain_files`): longer than a stall, shorter than
    /// `requestTimeout` so that the next route is still tried. A holder that stops answering its
    /// neighbours' probes is caught sooner, by `isDown`. An origin that answers nothing is
    /// given up on after this long, or after the stall when the cache holds an expired manifest
    /// of the name, which is then served stale (docs/content.md "Origin down").
    public static let manifestTimeout: UInt64 = 20_000_000_000

    /// Where misses are fetched from: `edge.origin`, or the mesh.
    public let upstream: FetchUpstream
    /// The cache's own chunk store (`<content_path>/edge`).
    public let store: ChunkStore
    /// Chunks a streamed object asks for ahead of the one being sent: up to 16, and no more
    /// than a quarter of the cache's bound in max-size chunks, so that read-ahead cannot evict
    /// what it fetched before it is sent.
    public let readAheadChunks: Int
    let root: String
    let manifestDir: String
    /// How plain objects are cut (the node's `[chunking]`).
    let chunking: ChunkingParameters
    /// Cuts plain objects, off the fetcher thread; at most `maxCutsWaiting` fetched ones wait
    /// (each holds its temp file).
    private let cutQueue = DispatchQueue(label: "stoq-edge-cut")
    private let cutsWaiting = Atomic<Int>(0)
    static let maxCutsWaiting = 4
    /// The chunks' share of the bound: no plain object larger than this is fetched whole.
    let chunkCapacity: UInt64
    /// `requestTimeout`, which tests shorten. Set before `start`.
    var fetchDeadline = EdgeCache.requestTimeout
    let ttlDefault: Double
    /// How upstreams are verified, and the change a reload asked for that the fetcher has not
    /// applied yet (`retrust`).
    private var trust: ClientTrust
    private var freshTrust: ClientTrust?
    /// The node's certificate was renewed: for the fetcher to tell its pool.
    private var credentialsRenewed = false
    /// The datapath the origin connection runs on (the node's assembly picks it).
    let datapath: ClientDatapath
    let logger: Logger
    private let lock = NSLock()
    private var policy: S3FIFO<ChunkID>
    private var manifests: EdgeManifests
    /// For each chunk cut here from a plain object, the names whose manifest (cut here) listed
    /// it: where to fetch it again once it is evicted (`plainSource`). An entry outlives its
    /// chunk; a name whose manifest no longer lists the chunk is dropped when a lookup finds
    /// it, and the map is rebuilt from the plain manifests when it outgrows `plainChunksBound`
    /// (twice its size after the last rebuild), off the lock (`rebuildPlainChunks`).
    private var plainChunks: [ChunkID: Set<String>] = [:]
    private var plainChunksBound = 1 << 16
    private var rebuildingPlainChunks = false
    /// A fetch in flight: what, for which holder when it relays a request addressed to one,
    /// and whether a manifest the holder lacks may be fetched as the object whole and cut here
    /// (`RelayHint.whole`; always for this node's own requests). Relays for a holder never join
    /// this node's own search for the same key: a request that came back around a loop would
    /// otherwise wait on itself. `revalidate`: past every cache on the way (`fetch`), never
    /// joined by a fetch that a cache may answer, nor the other way round.
    /// What makes two fetches one. A relayed request joins only one that came through the same
    /// nodes (`Via`): one that came another way may be on its way through the joiner's own
    /// previous hop, which then waits for it in turn, both stalled until they time out.
    struct FetchKey: Hashable {
        var key: Key
        var holder: String?
        var via: String
        var whole: Bool
        var revalidate: Bool

        init(_ key: Key, _ hint: RelayHint?, revalidate: Bool) {
            (self.key, holder, via, whole, self.revalidate) = (key, hint?.holder, hint?.via ?? "", hint?.whole ?? true, revalidate)
        }
    }
    private var inflight: [FetchKey: [Waiter]] = [:]
    /// A fetch to start: what, for which relay, the trace of the request that asked, and
    /// whether it goes past every cache on the way.
    typealias Job = (key: Key, hint: RelayHint?, trace: ServiceContext?, revalidate: Bool)
    private var jobs: [Job] = []
    /// When `[tracing]` is on: each upstream request is a client span in the trace of the
    /// request that started the fetch, and carries it on in `traceparent`. Set before `start`.
    public var tracer: RequestTracer?
    /// Wakes the fetcher's connection pool when it is driving connections (set by the fetcher).
    var onPoolWake: (() -> Void)? {
        get { lock.withLock { poolWake } }
        set { lock.withLock { poolWake = newValue } }
    }
    private var poolWake: (() -> Void)?
    private var counterValues = Counters()
    private var dirty = false
    /// Wakes the fetcher when it sleeps with no pool (`fetch`, `retrust`, `renewCredentials`,
    /// `stop`), and tells it to stop.
    let wake = DispatchSemaphore(value: 0)
    let stopFlag = Atomic<Bool>(false)
    private let finished = DispatchGroup()
    private let tickets = Atomic<UInt64>(1)

    /// Opens the cache under `root` (creating it), reconciles its index with the chunks on
    /// disk, and loads the cached manifests. `start()` starts the fetcher.
    public init(
        root: String, capacity: UInt64, ttlDefault: UInt64, upstream: FetchUpstream, trust: ClientTrust,
        datapath: ClientDatapath, chunking: ChunkingParameters, logger: Logger, diskFull: DiskFullMonitor? = nil
    ) throws {
        let maxChunkSize = chunking.maxSize
        self.chunking = chunking
        self.upstream = upstream
        self.root = root
        manifestDir = root + "/manifests"
        self.ttlDefault = Double(ttlDefault) / 1e9
        self.trust = trust
        self.datapath = datapath
        self.logger = logger
        store = try ChunkStore(
            root: root, options: .init(dedup: true, maxChunkSize: maxChunkSize, durable: false),
            logger: Logger(label: "stoq.edge.store"), diskFull: diskFull)
        let manifestBudget = EdgeManifests.budget(of: capacity)
        policy = S3FIFO(capacity: capacity - manifestBudget)
        chunkCapacity = capacity - manifestBudget
        readAheadChunks = Int(min(16, max(1, capacity / 4 / UInt64(max(1, maxChunkSize)))))
        manifests = try EdgeManifests(dir: manifestDir, capacity: manifestBudget, logger: logger)
        counterValues.manifestEvictions = UInt64(manifests.evictedOnLoad)
        try loadIndex()
        (plainChunks, plainChunksBound) = Self.chunkNames(manifests.plainEntries)
        counterValues.capacity = capacity
    }

    var indexPath: String { root + "/index" }

    /// The snapshot, checked against the store: entries whose chunk is gone are dropped,
    /// chunks the snapshot does not know (fetched after it, before a crash) join the small
    /// queue, and anything over the bound is evicted now.
    private func loadIndex() throws {
        CacheIndexFile.removeTemps(of: indexPath)
        var entries: [S3FIFO<ChunkID>.Entry] = []
        do {
            if let bytes = try CacheIndexFile.read(indexPath) {
                entries = try CacheIndexFile.decode(bytes) { ChunkID(bytes: $0) }
            }
        } catch {
            logger.warning("edge cache index unreadable, rebuilding it from the chunks on disk: \(error)")
            entries = []
        }
        let onDisk = try store.allChunkIDs()
        let present = Set(onDisk)
        var known = Set<ChunkID>()
        var kept: [S3FIFO<ChunkID>.Entry] = []
        // Ghosts are keys without bytes: nothing on disk to check them against.
        let ghosts = entries.filter { $0.queue == .ghost }
        for e in entries where e.queue != .ghost && present.contains(e.key) && known.insert(e.key).inserted {
            if let size = try store.size(e.key) { var e = e; e.size = UInt64(size); kept.append(e) }
        }
        var adopted = 0
        for id in onDisk where !known.contains(id) {
            if let size = try store.size(id) {
                kept.append(.init(key: id, size: UInt64(size), frequency: 0, queue: .small))
                adopted += 1
            }
        }
        var evicted: [ChunkID] = []
        policy.restore(kept + ghosts) { evicted.append($0) }
        for id in evicted { _ = try? store.remove(id) }
        // Chunks the policy declined (larger than the whole cache) do not stay either.
        for e in kept where !policy.contains(e.key) && !evicted.contains(e.key) { _ = try? store.remove(e.key) }
        counterValues.evictions += UInt64(evicted.count)
        logger.info(
            "edge cache opened",
            metadata: [
                "root": "\(root)", "chunks": "\(policy.count)", "bytes": "\(policy.usedBytes)", "capacity": "\(policy.capacity)",
                "from_index": "\(kept.count - adopted)", "adopted": "\(adopted)",
                "dropped": "\(entries.count - ghosts.count - (kept.count - adopted))", "ghosts": "\(ghosts.count)",
                "upstream": "\(upstream)",
            ])
        dirty = adopted > 0 || kept.count + ghosts.count != entries.count || !evicted.isEmpty
    }

    /// Writes the policy's entries if they changed since the last snapshot.
    public func persist() {
        let entries: [S3FIFO<ChunkID>.Entry]? = lock.withLock {
            guard dirty else { return nil }
            dirty = false
            return policy.snapshot()
        }
        guard let entries else { return }
        do {
            try CacheIndexFile.write(CacheIndexFile.encode(entries, keyLength: 32) { $0.bytes }, to: indexPath)
            store.diskFull.stored()
        } catch {
            // A full disk is counted and logged once per episode; the snapshot is retried.
            if !store.diskFull.refusedIfNoSpace(error) { logger.error("edge cache: cannot write the index: \(error)") }
            lock.withLock { dirty = true }
        }
    }

    /// What the cache counted, with its current size.
    public var counters: Counters {
        lock.withLock {
            var c = counterValues
            c.cachedBytes = policy.usedBytes + manifests.usedBytes
            c.cachedChunks = UInt64(policy.count)
            c.cachedManifests = UInt64(manifests.count)
            return c
        }
    }

    // MARK: - Worker side

    /// A cached chunk's bytes (verified as they are read), counted as a hit; nil when the
    /// cache does not hold it (or its copy failed verification and was dropped).
    ///
    /// The read runs outside the lock, so the chunk may be evicted between the policy's touch
    /// and the read (its file removed), and fetched and admitted again before the failure is
    /// handled. A chunk not found is therefore a plain miss, nothing to log; and after any
    /// failure the policy entry is dropped only if the file is still absent, checked under the
    /// lock that eviction and admission take: an entry admitted again meanwhile has its file,
    /// which must stay tracked.
    ///
    /// The read is held to the size the policy knows the chunk by (of the verified bytes it was
    /// admitted with, or of its file when the cache was opened): a file grown since is dropped
    /// as corrupt without being read on the worker.
    public func readChunk(_ id: ChunkID) -> [UInt8]? {
        guard let size = lock.withLock({ policy.touch(id) ? policy.size(of: id) : nil }) else { return nil }
        do {
            let bytes = try store.read(id, length: Int(size))
            lock.withLock { counterValues.hits += 1 }
            return bytes
        } catch let e as StoreError where e.code == .chunkNotFound {
            // Evicted since the touch.
        } catch {
            logger.error("edge cache: cached chunk \(id.hex) unreadable, dropping it: \(error)")
        }
        lock.withLock {
            // A file that cannot even be looked up is dropped too: it cannot be served.
            if policy.contains(id), (try? store.has(id)) != true {
                policy.remove(id)
                dirty = true
            }
        }
        return nil
    }

    /// Whether the cache holds chunk `id` (no hit counted).
    public func holds(_ id: ChunkID) -> Bool { lock.withLock { policy.contains(id) } }

    /// The cached manifest of `name` and whether it is fresh: may answer without asking the
    /// upstream. `relayed`: for a request another node addressed to a holder, which never gets a
    /// manifest cut here from a plain object (its chunks are in this cache only; `RelayHint.whole`).
    /// `askingPast`: for a request with `Cache-Control: no-cache`, which a fresh copy answers
    /// only if it was cut here (revalidating it could mean fetching the object whole again; its
    /// TTL and `If-None-Match` keep it current); otherwise counted as a revalidation.
    public func manifest(_ name: String, relayed: Bool = false, askingPast: Bool = false) -> (bytes: [UInt8], fresh: Bool)? {
        let now = Date().timeIntervalSince1970
        return lock.withLock {
            guard let m = manifests.get(name), !(relayed && m.plain) else { counterValues.manifestMisses += 1; return nil }
            var fresh = m.expires > now
            if fresh, askingPast, !m.plain {
                fresh = false
                counterValues.revalidations += 1
            }
            if fresh { counterValues.manifestHits += 1 } else { counterValues.manifestMisses += 1 }
            return (m.bytes, fresh)
        }
    }

    /// Drops the manifest of `name` (an operator's purge): the next request for the object asks
    /// the upstream again. Its chunks stay: they are named by their content, so they are still
    /// right for whatever version comes next. False when the cache held no manifest of `name`.
    public func purge(_ name: String) -> Bool {
        dropManifest(name, counted: \.purges) { _ in true }
    }

    /// Drops the manifest of `name` if it is still `bytes`: the upstream answered 404 for a chunk
    /// it lists. Its cut of a plain file went with a restart or its bound, or the object changed
    /// there; either way the next request asks for the manifest again instead of failing until it
    /// expires. A newer manifest, kept since, stays. Returns whether it was dropped.
    @discardableResult
    public func forgetManifest(_ name: String, ifStill bytes: [UInt8]) -> Bool {
        dropManifest(name, counted: \.manifestsForgotten) { $0.bytes == bytes }
    }

    /// Drops the manifest of `name` (and its file) when `which` holds for it, counting it in
    /// `counted` if given; returns whether it did.
    func dropManifest(
        _ name: String, counted: WritableKeyPath<Counters, UInt64>? = nil, where which: (EdgeManifests.Entry) -> Bool
    ) -> Bool {
        lock.withLock { () -> Bool in
            guard let e = manifests.peek(name), which(e) else { return false }
            manifests.remove(name)
            // Under the lock, as `keep` changes the file: a keep of the same name in between
            // must not lose its file to this unlink.
            unlink(manifestFile(name))
            if let counted { counterValues[keyPath: counted] += 1 }
            return true
        }
    }

    /// The cached manifest of `name` to serve when its fetch failed (`why`), or nil: an expired
    /// one is served stale (counted, logged); a fresh one (a `no-cache` request asked past it,
    /// or another fetch kept it meanwhile) only logged. No hit or miss is counted: the request
    /// was counted when it asked.
    public func fallback(_ name: String, relayed: Bool = false, _ why: String) -> [UInt8]? {
        let now = Date().timeIntervalSince1970
        let found = lock.withLock { () -> (bytes: [UInt8], fresh: Bool)? in
            guard let m = manifests.peek(name), !(relayed && m.plain) else { return nil }
            if m.expires <= now { counterValues.staleServed += 1 }
            return (m.bytes, m.expires > now)
        }
        guard let found else { return nil }
        if found.fresh {
            logger.notice("edge cache: serving the cached manifest of \(name), still fresh: origin failed: \(why)")
        } else {
            logger.warning("edge cache: serving the expired manifest of \(name): origin failed: \(why)")
        }
        return found.bytes
    }

    /// Asks for `key` from upstream. With an `inbox`, returns the ticket its completion
    /// will carry; without one (read-ahead), nothing will be posted. A chunk the cache
    /// already holds completes at once; a key already in flight is joined, not refetched.
    /// `hint` names the holder when this node relays a request addressed to it; `trace` is the
    /// context of the traced request that asked (a fetch joined later stays in the first one's trace).
    /// `revalidate`: each request upstream carries `Cache-Control: no-cache`, so edges and relays
    /// on the way ask their own upstream for a manifest instead of answering from a cached copy,
    /// and the holder or origin answers (which cuts a plain file again if its cut is gone); a
    /// chunk so fetched never joins a fetch from before (whose 404 may predate that cut).
    @discardableResult
    public func fetch(
        _ key: Key, inbox: Inbox?, hint: RelayHint? = nil, trace: ServiceContext? = nil, revalidate: Bool = false
    ) -> UInt64 {
        let ticket = inbox == nil ? 0 : tickets.add(1, ordering: .relaxed).newValue
        var immediate = false
        var signal = false
        lock.withLock {
            if case .chunk(let id) = key, policy.contains(id) {
                immediate = true
                return
            }
            let fk = FetchKey(key, hint, revalidate: revalidate)
            if inflight[fk] != nil {
                if let inbox { inflight[fk]!.append(Waiter(inbox: inbox, ticket: ticket)); counterValues.coalesced += 1 }
                return
            }
            if case .chunk = key { counterValues.misses += 1 }
            inflight[fk] = inbox.map { [Waiter(inbox: $0, ticket: ticket)] } ?? []
            jobs.append((key, hint, trace, revalidate))
            signal = true
        }
        if immediate { inbox?.post(Completion(ticket: ticket, failure: nil)) }
        if signal {
            wake.signal()
            onPoolWake?()
        }
        return ticket
    }

    // MARK: - Fetcher side

    /// Starts the fetcher thread.
    public func start() {
        finished.enter()
        let t = Thread { [self] in
            EdgeFetcher(cache: self).run()
            persist()
            finished.leave()
        }
        t.name = "stoq-edge-fetcher"
        t.start()
    }

    /// Verifies upstreams with `trust` from now on (a reload changed the node's `[trust]`).
    /// The fetches in flight finish on the connections they have; new ones wait for them, then
    /// go over connections verified with `trust` (the old ones are closed). Any thread.
    public func retrust(_ trust: ClientTrust) {
        lock.withLock { freshTrust = trust }
        wake.signal()
        onPoolWake?()
    }

    /// The node's certificate was renewed: upstream connections made from now on present it
    /// (mutual TLS); those open keep theirs. Any thread.
    public func renewCredentials() {
        lock.withLock { credentialsRenewed = true }
        wake.signal()
        onPoolWake?()
    }

    /// Stops the fetcher (failing what is in flight) and writes the index; waits up to 10 s.
    public func stop() {
        stopFlag.store(true, ordering: .releasing)
        wake.signal()
        onPoolWake?()
        _ = finished.wait(timeout: .now() + 10)
    }

    /// The fetches asked for since the last call, and, when the fetcher is `idle` (nothing in
    /// flight), the trust a reload asked for (`retrust`), which it then applies. Fetcher thread.
    func takeJobs(idle: Bool) -> (jobs: [Job], trust: ClientTrust?) {
        lock.withLock {
            let taken = jobs
            jobs.removeAll()
            guard idle, let t = freshTrust else { return (taken, nil) }
            freshTrust = nil
            return (taken, t)
        }
    }

    /// Whether a reload's trust waits for the fetches in flight to finish (`takeJobs`).
    var retrustPending: Bool { lock.withLock { freshTrust != nil } }

    /// Whether the node's certificate was renewed since the last call (`renewCredentials`).
    func takeRenewal() -> Bool {
        lock.withLock { () -> Bool in
            defer { credentialsRenewed = false }
            return credentialsRenewed
        }
    }

    /// The trust upstreams are verified with: the fetcher's pool opens with it, and the
    /// fetcher sets it once a reload's has loaded.
    var currentTrust: ClientTrust {
        get { lock.withLock { trust } }
        set { lock.withLock { trust = newValue } }
    }

    /// Adds `n` to `counter`: what the fetcher counts as it goes.
    func count(_ counter: WritableKeyPath<Counters, UInt64>, _ n: UInt64 = 1) {
        lock.withLock { counterValues[keyPath: counter] += n }
    }

    /// The cached manifest of `name`, neither counted nor made more recent.
    func peekManifest(_ name: String) -> EdgeManifests.Entry? { lock.withLock { manifests.peek(name) } }

    /// Ends the fetch `key`: every worker waiting for it gets its completion (`failure` nil:
    /// it is in the cache, or in `manifest` or `chunk`).
    func complete(_ key: FetchKey, _ failure: Failure?, manifest: [UInt8]? = nil, chunk: UnsafeRawBufferPointer? = nil) {
        let waiters = lock.withLock { inflight.removeValue(forKey: key) ?? [] }
        let bytes = waiters.isEmpty ? nil : chunk.map { Array($0) }  // read-ahead fetches have no waiter: no copy
        for w in waiters { w.inbox.post(Completion(ticket: w.ticket, failure: failure, manifest: manifest, chunk: bytes)) }
    }

    /// Ends the fetch `key` with `failure`, counted as an origin error.
    func originFailed(_ key: FetchKey, _ failure: Failure) {
        lock.withLock { counterValues.originErrors += 1 }
        complete(key, failure)
    }

    /// A cached manifest's file (the fetcher's own copy of `EdgeManifests`' directory, so
    /// that it never reads the struct another thread may be changing under the lock).
    private func manifestFile(_ name: String) -> String { manifestDir + "/" + name }

    /// What a revalidating fetch (`fetch(revalidate:)`) adds to each request upstream.
    static let revalidateHeader = ("cache-control", HTTPCacheControl.noCache)

    static func resource(_ key: Key) -> UpstreamResource {
        switch key {
        case .chunk(let id): .chunk(hex: id.hex)
        case .manifest(let name): .manifest(name: name)
        }
    }

    /// Admits chunk `id`, fetched and stored (`put`), to the policy, evicting what it must;
    /// false when it is larger than the whole cache and was not admitted.
    func admit(_ id: ChunkID, _ bytes: UnsafeRawBufferPointer, put: ChunkStore.PutResult) -> Bool {
        var out: [ChunkID] = []
        let (admitted, wasHeld) = lock.withLock {
            let held = policy.contains(id)
            let ok = policy.insert(id, size: UInt64(bytes.count)) { out.append($0) }
            counterValues.evictions += UInt64(out.count)
            dirty = true
            return (ok, held)
        }
        evicted(out)
        if admitted && !wasHeld && put == .alreadyPresent { restore(id, bytes) }
        return admitted
    }

    /// Cuts the plain object `name`, fetched from `from` into `fd` (closed when done), on the cut
    /// queue (`cutPlain`), then completes `key`; fails `key` at once when `maxCutsWaiting`
    /// fetched objects wait to be cut already.
    func cut(_ name: String, fd: Int32, size: UInt64, digest: ContentDigest?, maxAge: Int64?, from: String, completing key: FetchKey) {
        guard cutsWaiting.add(1, ordering: .relaxed).newValue <= Self.maxCutsWaiting else {
            cutsWaiting.subtract(1, ordering: .relaxed)
            close(fd)
            complete(key, Failure(status: 503, reason: "edge: \(Self.maxCutsWaiting) plain objects are being cut into the cache already; try \(name) again"))
            return
        }
        cutQueue.async(group: finished) { [self] in
            defer { close(fd); cutsWaiting.subtract(1, ordering: .relaxed) }
            let cut = cutPlain(name, fd: fd, size: size, digest: digest, maxAge: maxAge, from: from)
            complete(key, cut.failure, manifest: cut.manifest)
        }
    }

    /// Cuts the plain object `name` (`size` bytes at `fd`, whose SHA-256 is `digest` when the
    /// fetch computed it) into the cache's chunk store and keeps the manifest made of it.
    /// Returns how the fetch completes: with the manifest, or the failure. On the cut queue.
    private func cutPlain(
        _ name: String, fd: Int32, size: UInt64, digest: ContentDigest?, maxAge: Int64?, from: String
    ) -> (failure: Failure?, manifest: [UInt8]?) {
        let room = chunkCapacity
        guard size <= room else {
            return (
                Failure(
                    status: 502,
                    reason:
                        "edge: \(name) from \(from) is a plain object of \(size) bytes, more than this edge's cache holds (\(room) bytes of chunks): not served"
                ), nil
            )
        }
        guard lseek(fd, 0, SEEK_SET) == 0 else {
            return (Failure(status: 500, reason: "edge: lseek of the fetched \(name): \(String(cString: strerror(errno)))"), nil)
        }
        let chunker = StreamingChunker(source: FileDescriptorSource(fd: fd), parameters: chunking, digestObject: digest == nil)
        var ids: [ChunkID] = []
        let entries: [Manifest.Entry]
        do {
            let stopping = { [self] (_: Int) throws in
                if stopFlag.load(ordering: .relaxed) { throw StoreError(.io, "the node is stopping") }
            }
            entries = try store.put(cutBy: chunker, sizeHint: size, reserve: stopping) { id, bytes, put in
                ids.append(id)
                var out: [ChunkID] = []
                let wasHeld = lock.withLock {
                    let held = policy.contains(id)
                    policy.insert(id, size: UInt64(bytes.count)) { out.append($0) }
                    // A hit, as if read: otherwise an object larger than S3-FIFO's small queue
                    // (a tenth of the cache) would evict its own first chunks before the
                    // requests waiting for it read them. So a cut goes to the main queue.
                    policy.touch(id)
                    counterValues.evictions += UInt64(out.count)
                    dirty = true
                    return held
                }
                evicted(out)
                if !wasHeld && put == .alreadyPresent { restore(id, bytes) }
            }
        } catch {
            // The store counted the refusal as it made it.
            if let e = error as? StoreError, e.code == .noSpace {
                return (Failure(status: 507, reason: "edge: no space left to cache \(name) from \(from): \(error)"), nil)
            }
            logger.error("edge cache: cannot cut \(name) from \(from) into the cache: \(error)")
            return (Failure(status: 500, reason: "edge: cannot cache \(name) from \(from): \(error)"), nil)
        }
        let manifest: [UInt8]
        do {
            guard chunker.bytesConsumed == size, let digest = digest ?? chunker.objectDigest else {
                throw StoreError(.io, "read \(chunker.bytesConsumed) of its \(size) bytes")
            }
            manifest = try Manifest(totalLength: size, digest: digest, parameters: chunking, chunks: entries).encode()
        } catch {
            return (Failure(status: 500, reason: "edge: the manifest of \(name) from \(from): \(error)"), nil)
        }
        // Chunks it evicted of its own while it was cut are fetched again as ranges when read.
        return (nil, keep(name, manifest, maxAge: maxAge, plainChunks: ids))
    }

    /// Writes chunk `id` again after the policy took it: a put that found the file may have
    /// raced an eviction that removed it just before (`evicted` removes only what the policy
    /// no longer holds, under the lock, so after this insert nothing removes it).
    private func restore(_ id: ChunkID, _ bytes: UnsafeRawBufferPointer) {
        guard (try? store.has(id)) != true else { return }
        do { _ = try store.put(id: id, hashedBytes: bytes) } catch {
            logger.error("edge cache: cannot write chunk \(id.hex) again: \(error)")
            lock.withLock {
                policy.remove(id); dirty = true
            }
        }
    }

    /// The longest a manifest is held fresh, in seconds: a year, as `edge.ttl_default` and
    /// `edge.origin_max_age` allow; an upstream may say more (`max-age` up to 2^63 s).
    static let maxTTL: Double = 365 * 86_400

    /// Keeps `bytes` as the manifest of `name` (in memory and in its file), fresh for the
    /// upstream's `maxAge` (at most `maxTTL`) or `edge.ttl_default`; returns them. A manifest cut here from a
    /// plain object names its chunks (`plainChunks`), so that they can be fetched again.
    @discardableResult
    func keep(_ name: String, _ bytes: [UInt8], maxAge: Int64?, plainChunks chunks: [ChunkID]? = nil) -> [UInt8] {
        let ttl = min(maxAge.map { Double($0) } ?? ttlDefault, Self.maxTTL)
        let m = EdgeManifests.Entry(bytes: bytes, expires: Date().timeIntervalSince1970 + ttl, plain: chunks != nil)
        let file = manifestFile(name)
        var staged: CacheIndexFile.Staged?
        do {
            staged = try CacheIndexFile.stage(EdgeManifests.encode(m), for: file)
        } catch {
            // Kept in memory all the same: only a restart loses it.
            if !store.diskFull.refusedIfNoSpace(error) { logger.error("edge cache: cannot save the manifest of \(name): \(error)") }
        }
        let (kept, rebuild, failed) = lock.withLock { () -> (Bool, Bool, CacheIndexFile.Error?) in
            var rebuild = false
            if let chunks {
                for id in chunks { plainChunks[id, default: []].insert(name) }
                rebuild = plainChunks.count > plainChunksBound && !rebuildingPlainChunks
                if rebuild { rebuildingPlainChunks = true }
            }
            let r = manifests.insert(name, m)
            counterValues.manifestEvictions += UInt64(r.evicted.count)
            // The files change with the memory, under the lock: a drop or another keep of the
            // same name in between would otherwise leave on disk what memory no longer holds.
            for n in r.evicted { unlink(manifestFile(n)) }
            var failed: CacheIndexFile.Error?
            if r.kept, let staged {
                do throws(CacheIndexFile.Error) { try staged.commit() } catch { failed = error }
            } else {
                staged?.discard()
            }
            // No older version on disk than in memory.
            if !r.kept || staged == nil || failed != nil { unlink(file) }
            return (r.kept, rebuild, failed)
        }
        if let failed {
            logger.error("edge cache: cannot save the manifest of \(name): \(failed)")
        } else if kept, staged != nil {
            CacheIndexFile.syncDirectory(of: file)
            store.diskFull.stored()
        }
        if rebuild { rebuildPlainChunks() }
        if !kept {
            logger.warning("edge cache: the manifest of \(name) (\(bytes.count) bytes) is larger than the manifests' share of edge.cache_size; not cached")
        }
        return bytes
    }

    /// Removes the files of chunks the policy let go.
    private func evicted(_ ids: [ChunkID]) {
        guard !ids.isEmpty else { return }
        lock.withLock {
            // Under the lock, and only what the policy no longer holds: a cut or a fetch that
            // took the chunk back meanwhile keeps its file (see `restore`).
            for id in ids where !policy.contains(id) { _ = try? store.remove(id) }
        }
    }

    /// Drops the manifest cut here from the plain object `name` (the object changed or went
    /// upstream), if it is still `cut` (a newer cut, kept since, stays).
    func dropCut(_ name: String, ifStill cut: [UInt8]) {
        _ = dropManifest(name) { $0.plain && $0.bytes == cut }
    }

    /// Rebuilds `plainChunks` from the plain manifests held now, decoding them outside the
    /// lock; what cuts kept meanwhile added is merged in.
    private func rebuildPlainChunks() {
        let held = lock.withLock { manifests.plainEntries }
        let (fresh, bound) = Self.chunkNames(held)
        lock.withLock {
            // Names cut (again) since the snapshot keep what `keep` added for them.
            var same = Set<String>()
            for (name, entry) in held where manifests.peek(name)?.bytes == entry.bytes { same.insert(name) }
            var merged = fresh
            for (id, n) in plainChunks {
                let added = n.subtracting(same)
                if !added.isEmpty { merged[id, default: []].formUnion(added) }
            }
            plainChunks = merged
            plainChunksBound = max(bound, 2 * merged.count)
            rebuildingPlainChunks = false
        }
    }

    /// For each chunk the plain manifests `entries` list, their names; and the size past which
    /// such a map is rebuilt.
    private static func chunkNames(_ entries: [(name: String, entry: EdgeManifests.Entry)]) -> ([ChunkID: Set<String>], Int) {
        var out: [ChunkID: Set<String>] = [:]
        for (name, entry) in entries {
            guard let m = try? Manifest(decoding: entry.bytes) else { continue }
            for c in m.chunks { out[ChunkID(bytes: c.id.bytes)!, default: []].insert(name) }
        }
        return (out, max(1 << 16, 2 * out.count))
    }

    /// Where chunk `id`, cut here from a plain object, is now: the name of an object whose
    /// current manifest (cut here) lists it, and its byte range there. Nil for any other
    /// chunk. `offsets` holds the last few manifests' chunk offsets (the fetcher's own), so
    /// that the chunks of one object missed one after another decode its manifest once.
    func plainSource(_ id: ChunkID, _ offsets: inout PlainOffsets) -> PlainSource? {
        for name in lock.withLock({ plainChunks[id] ?? [] }).sorted() {
            let e = lock.withLock { manifests.peek(name) }
            if let e, e.plain, let at = offsets.lookup(name, e.bytes, id) { return PlainSource(name: name, range: at, cut: e.bytes) }
            // Not (or no longer) a cut listing it: forget the name, unless a new cut came meanwhile.
            lock.withLock {
                if manifests.peek(name)?.bytes == e?.bytes { _ = plainChunks[id]?.remove(name) }
            }
        }
        return nil
    }
}
