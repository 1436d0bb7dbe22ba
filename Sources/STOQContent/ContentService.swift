import CSTOQSystem
import Crypto
import Foundation
import Logging
import STOQChunking
import STOQCore
import STOQQUIC
import STOQEdge
import STOQMesh
import STOQStore
import STOQTracing
import Tracing
import STOQTransfer

/// Chunk-level transfer over HTTP/3, on the node's content-addressed store:
///
/// - `GET`/`HEAD /chunks/<sha256 hex>`: a chunk, verified as it is read (a chunk whose
///   bytes no longer match its id is quarantined and never served: 500).
/// - `PUT /chunks/<sha256 hex>`: stores a chunk once (201; 200 when the node already had
///   it); bytes that do not hash to the id are refused (400).
/// - `POST /_stoq/missing`: the have/want query; the body is a run of 32-byte chunk ids,
///   the response the ids among them the node lacks.
/// - `GET`/`HEAD`/`PUT`/`DELETE /manifests/<name>`: an object's manifest; a PUT is
///   refused unless the manifest parses (400, naming what is wrong), every chunk it
///   lists is stored (409), and they hash to the whole-object SHA-256 it claims (400, naming
///   both; checked on the store pool, since it reads the whole object, after the writer's
///   quota, and at most `ManifestChecks.limit` at once: 503 with `Retry-After` past them).
///
/// With the node's `ObjectGate`, manifest PUTs and DELETEs commit through it (`If-Match`
/// against the object's ETag, `access.overwrite`, the writer quota charged the object's
/// length) and chunk PUTs are held to `limits.storage_cap`; chunked objects are served
/// with their strong `ETag`.
///
/// One instance per worker, on that worker's thread; the store it shares is thread-safe.
/// Request bodies are collected in an anonymous memory file (memfd), never in the heap, and
/// never on the data disk: a full disk shows only when a chunk or a manifest is stored, which
/// then answers `507 Insufficient Storage` naming it and leaves nothing behind.
public final class ContentService: QUICApplication {
    /// What the service counted.
    public struct Counters: Sendable {
        public var chunksServed: UInt64 = 0
        public var chunksStored: UInt64 = 0
        public var chunksAlreadyPresent: UInt64 = 0
        public var chunkBytesReceived: UInt64 = 0
        public var manifestsStored: UInt64 = 0
        public var refused: UInt64 = 0
        /// Manifest PUTs answered 503: as many as `ManifestChecks.limit` were being verified.
        public var manifestChecksBusy: UInt64 = 0
        /// Manifests and chunked objects served (an origin's request counters).
        public var manifestsServed: UInt64 = 0
        public var objectsServed: UInt64 = 0
        /// Requests answered from the edge cache or by fetching from the origin.
        public var edgeRequests: UInt64 = 0
    }

    enum Kind { case chunk(ChunkID), missing, manifest(String), advert }

    struct Upload {
        var kind: Kind
        var fd: Int32
        var limit: UInt64
        /// What it holds of `bodyMemory` until it ends.
        var held: BodyMemory.Hold
        /// A manifest's writer, with the request's conditions (nil without a gate).
        var writer: ObjectGate.Writer?
    }

    /// The most chunks this node takes in a manifest (and ids in a query): as many as an object
    /// of `maxObjectSize` bytes can have when every chunk is as short as a manifest may make it
    /// (`ChunkingParameters.smallestMinSize`), at most `Manifest.maxListedChunks`.
    public static func chunkLimit(maxObjectSize: UInt64) -> Int {
        let bound = maxObjectSize / UInt64(ChunkingParameters.smallestMinSize) + 1
        return bound < UInt64(Manifest.maxListedChunks) ? Int(bound) : Manifest.maxListedChunks
    }

    /// Why a manifest PUT whose header lists more than `limit` chunks is refused (413), read
    /// from the header before anything is decoded or looked up; nil when the count is within
    /// it, or the body is too short to say (the decoder then names what is wrong).
    static func manifestCountRefusal(_ name: String, _ body: UnsafeRawBufferPointer, limit: Int, maxObjectSize: UInt64) -> String? {
        guard let count = Manifest.chunkCount(inHeader: body), count > limit else { return nil }
        return "manifest of \(name) lists \(count) chunks, more than this node takes (\(limit): "
            + Self.chunkLimitReason(limit, maxObjectSize: maxObjectSize) + ")"
    }

    /// What bounds `limit` (`chunkLimit`), for a refusal's message.
    static func chunkLimitReason(_ limit: Int, maxObjectSize: UInt64) -> String {
        limit < Manifest.maxListedChunks
            ? "storage.max_object_size of \(maxObjectSize) bytes in chunks of at least \(ChunkingParameters.smallestMinSize) bytes"
            : "at most \(Manifest.maxListedChunks) chunks a manifest"
    }

    /// A chunked object being sent as one body: the chunks still to go, and the byte range.
    struct ObjectSend {
        var name: String
        var chunks: [Manifest.Entry]
        var next: Int  // index of the next chunk to append
        var skip: Int  // bytes of that chunk before the range starts
        var remaining: UInt64  // body bytes still to append
        var edge = false  // chunks come from the edge cache (and its origin)
        var waiting = false  // the next chunk is being fetched from the origin
        var fetched: [UInt8]?  // the next chunk's verified bytes, as its fetch handed them over
        var readAhead = 0  // chunks up to here have been asked of the origin
        /// Sent for a relayed request (`RelayHint.whole`): its chunks are fetched for that
        /// request's holder, with its hops and `Via`, never as this node's own fetches.
        var hint: RelayHint?
        /// The response's head, held until the first chunk is at hand: a first chunk that
        /// cannot be had (the origin down, the store failing) is then an error answer naming
        /// why, not a 200 reset before its first byte.
        var head: (status: Int, headers: [(String, String)])?
        /// An edge object: the manifest it is sent from and the request, asked again once (the
        /// manifest first) when the upstream has none of a chunk the manifest lists, or once
        /// bytes went out, carried on if the manifest comes back the same; nil for a request
        /// asked again or carried on, and for this node's own objects.
        var again: (manifest: [UInt8], request: HTTPRequest)?
        /// Asked again or carried on: its chunks are fetched apart from fetches from before
        /// (`EdgeCache.fetch(revalidate:)`), whose 404s would end it.
        var afresh = false
    }

    /// A request waiting for the edge cache's fetcher (by ticket).
    enum EdgeWait {
        /// `again`: the request asked again for the manifest (`ObjectSend.again`).
        case object(String, HTTPRequest, RelayHint?, again: Bool, HTTPStream, QUICConnection)
        /// `relayed`: for a request another node addressed to a holder (`EdgeCache.manifest`).
        case manifest(String, head: Bool, relayed: Bool, HTTPStream, QUICConnection)
        case chunk(ChunkID, head: Bool, HTTPStream, QUICConnection)
        case objectChunk(HTTPStream, QUICConnection)
        /// An object whose chunk the upstream lacked after bytes went out: its manifest asked
        /// for again, the send carried on if it comes back as `manifest`.
        case resume(manifest: [UInt8], HTTPStream, QUICConnection)

        var stream: HTTPStream {
            switch self {
            case .object(_, _, _, _, let s, _), .manifest(_, _, _, let s, _), .chunk(_, _, let s, _), .objectChunk(let s, _),
                .resume(_, let s, _):
                return s
            }
        }
        var connection: QUICConnection {
            switch self {
            case .object(_, _, _, _, _, let c), .manifest(_, _, _, _, let c), .chunk(_, _, _, let c), .objectChunk(_, let c),
                .resume(_, _, let c):
                return c
            }
        }
    }


    let index: ObjectIndex
    private var sends: [HTTPStream: ObjectSend] = [:]
    private let maxChunkSize: UInt64
    /// `storage.max_object_size`: a manifest naming more bytes is refused (413), as a plain PUT is.
    private let maxObjectSize: UInt64
    /// `chunkLimit(maxObjectSize:)`: the most chunks a manifest lists, and ids a query asks about.
    let chunkLimit: Int
    /// The largest manifest body: `chunkLimit` entries.
    var maxManifestBytes: UInt64 { UInt64(Manifest.headerSize + Manifest.entrySize * chunkLimit) }
    /// The largest `/_stoq/missing` body: `chunkLimit` ids.
    var maxQueryBytes: UInt64 { UInt64(32 * chunkLimit) }
    private let logger: Logger
    private var uploads: [HTTPStream: Upload] = [:]
    public private(set) var counters = Counters()
    /// The node's edge cache (nil: not an edge node), and this worker's inbox for it.
    package let edge: EdgeCache?
    /// Serves `GET`/`HEAD /objects/<name>` from this node's own storage (a plain file or a
    /// chunked object) for a relayed request addressed to it; false when it has no such
    /// object. The router installs it: it owns both kinds.
    package var serveOwnObject: ((String, HTTPRequest, HTTPStream, QUICConnection) -> Bool)?
    package let inbox = EdgeCache.Inbox()
    var edgeWaits: [UInt64: EdgeWait] = [:]
    private var completions: [EdgeCache.Completion] = []
    /// `Cache-Control` sent with manifests and chunked objects (origin side), if any.
    private let cacheControl: (String, String)?
    /// The mesh service, when this node is in a mesh: probes, adverts and relays.
    package let mesh: MeshService?
    /// The worker's request spans when `[tracing]` is on (the router opens and closes them):
    /// store reads and writes are their children, edge fetches carry their context upstream.
    package var spans: StreamSpans?
    /// Conditions, overwrite policy and quotas for writes (nil: none; tests).
    package var gate: ObjectGate?
    /// The node's bound on request bodies held in memory (`limits.body_memory`; nil: none).
    package var bodyMemory: BodyMemory?
    /// Where chunk PUTs are verified, written and fsynced, off this worker's thread (the
    /// node's; nil: on it, for tests). Their answers come back through `storeInbox`.
    package var storePool: WorkPool?
    /// The node's bound on manifest PUTs being verified at once, shared by its workers (nil:
    /// none, for tests).
    package var manifestChecks: ManifestChecks?
    /// This worker's finished chunk writes; the worker drains it (`drainStores`) between batches.
    package let storeInbox = CompletionInbox<ChunkWrite>()
    /// Cuts of this node's plain files (the node's; nil: `chunking.cut_plain_files = false`),
    /// and this worker's inbox for the cuts it waits on (`drainCuts`).
    package var plainCuts: PlainCuts?
    package let cutInbox = CompletionInbox<PlainCuts.Done>()
    /// Manifest requests waiting for a cut, by ticket.
    private var cutWaits: [UInt64: (name: String, head: Bool, stream: HTTPStream, connection: QUICConnection)] = [:]
    private var nextCut: UInt64 = 1
    private var cutsDone: [PlainCuts.Done] = []
    /// Chunk PUTs being written, by ticket: whom to answer, and the request's store span.
    private var storing: [UInt64: (stream: HTTPStream, connection: QUICConnection, span: (any Span)?)] = [:]
    private var nextStore: UInt64 = 1
    private var written: [ChunkWrite] = []

    /// How writing one chunk PUT, or committing one manifest PUT, ended: its answer's status
    /// (201 stored, 200 the store had the chunk, or a refusal's) and, for a refusal, why.
    package struct ChunkWrite: Sendable {
        var ticket: UInt64
        var status: Int
        var reason: String
        /// A manifest PUT's: the object's ETag (its answer carries it); nil for a chunk PUT.
        var etag: String? = nil
    }

    /// Serves from `index` (and its chunk store); chunks larger than `maxChunkSize` are
    /// refused. With `edge`, what the node lacks is served through the edge cache.
    /// `maxAge` (seconds) is the `Cache-Control: max-age` put on manifests and objects.
    public init(
        index: ObjectIndex, maxChunkSize: UInt64, maxObjectSize: UInt64 = .max, logger: Logger, edge: EdgeCache? = nil,
        maxAge: UInt64? = nil, mesh: MeshService? = nil
    ) {
        self.mesh = mesh
        self.index = index
        self.maxChunkSize = maxChunkSize
        self.maxObjectSize = maxObjectSize
        self.chunkLimit = Self.chunkLimit(maxObjectSize: maxObjectSize)
        self.logger = logger
        self.edge = edge
        self.cacheControl = maxAge.map { ("cache-control", "public, max-age=\($0)") }
    }

    deinit { for u in uploads.values { release(u) } }

    /// An upload's body ended (however): its memory file closed, its `bodyMemory` given back.
    private func release(_ up: Upload) {
        close(up.fd)
        bodyMemory?.give(up.held)
    }

    /// Whether a request path belongs to this service.
    public static func handles(_ path: String) -> Bool {
        path.hasPrefix("/chunks/") || path.hasPrefix("/manifests/") || path == NodePaths.missing || MeshWire.handles(path)
    }

    public func request(_ request: HTTPRequest, stream: HTTPStream, connection: QUICConnection) {
        if let refused = request.refusal { return fail(stream, connection, refused.status, refused.reason) }
        let path = String(request.path.prefix { $0 != "?" })
        if MeshWire.handles(path) { return meshRequest(path, request, stream, connection) }
        if path == NodePaths.missing {
            guard request.method == "POST" else { return notAllowed(stream, connection, "POST") }
            return begin(.missing, limit: maxQueryBytes, request, stream, connection)
        }
        if path.hasPrefix("/chunks/") {
            guard let id = ChunkID(hex: path.dropFirst("/chunks/".count)) else {
                return fail(stream, connection, 400, "bad chunk id \(path.dropFirst(8).prefix(100)): expected 64 hex digits")
            }
            switch request.method {
            case "GET", "HEAD":
                let head = request.method == "HEAD"
                if let edge, (try? index.chunks.has(id)) != true {
                    if servePlainChunk(id, head: head, stream, connection) { return }
                    return serveEdgeChunk(edge, id, head: head, afresh: request.noCache, stream, connection)
                }
                return serveChunk(id, head: head, stream, connection)
            case "PUT":
                // Refused before the body is read when it cannot fit (storeChunk reserves the room).
                if let gate, gate.settings.storageCap > 0, let n = request.contentLength, (try? index.chunks.has(id)) != true,
                    let r = gate.checkChunk(size: UInt64(n))
                {
                    return fail(stream, connection, r.status, r.reason)
                }
                return begin(.chunk(id), limit: maxChunkSize, request, stream, connection)
            default: return notAllowed(stream, connection, "GET, HEAD, PUT")
            }
        }
        let name = String(path.dropFirst("/manifests/".count))
        do { try ObjectIndex.validateName(name) } catch { return fail(stream, connection, 400, "\(error)") }
        switch request.method {
        case "GET", "HEAD":
            let head = request.method == "HEAD"
            if let plainCuts, servePlainCut(plainCuts, name, head: head, stream, connection) { return }
            if let edge, !hasObject(name) { return serveEdgeManifest(edge, name, head: head, revalidate: request.noCache, stream, connection) }
            serveManifest(name, head: head, stream, connection)
        case "PUT":
            // Conditions and policy now (the length is known once the manifest is read).
            if let gate, let r = gate.check(name, by: gate.writer(request, peer: connection.peer), size: nil, physical: nil) {
                return fail(stream, connection, r.status, r.reason)
            }
            begin(.manifest(name), limit: maxManifestBytes, request, stream, connection)
        case "DELETE":
            if let gate {
                do {
                    if let r = try gate.delete(name, by: gate.writer(request, peer: connection.peer)) {
                        return fail(stream, connection, r.status, r.reason)
                    }
                    connection.respond(stream, status: 204, headers: [], body: nil)
                } catch { fail(stream, connection, 500, "\(error)") }
                return
            }
            do {
                try index.deleteObject(name)
                connection.respond(stream, status: 204, headers: [], body: nil)
            } catch let e as StoreError where e.code == .objectNotFound {
                fail(stream, connection, 404, e.message)
            } catch { fail(stream, connection, 500, "\(error)") }
        default: notAllowed(stream, connection, "GET, HEAD, PUT, DELETE")
        }
    }

    /// Whether the store has object `name` (a chunked upload's manifest).
    func hasObject(_ name: String) -> Bool { storedObject(name) != nil }

    /// Object `name`'s record (a chunked upload's manifest), if the store has it.
    func storedObject(_ name: String) -> ObjectRecord? { try? index.object(name) }

    /// `GET`/`HEAD /objects/<name>` for a chunked object, `record` (`storedObject`): one body
    /// (with a single `Range`), streamed chunk by chunk from the store, each verified as it is read.
    func serveObject(
        _ name: String, _ record: ObjectRecord, _ request: HTTPRequest, _ stream: HTTPStream, _ connection: QUICConnection
    ) {
        let span = storeSpan("store.read", stream, object: name)
        defer { span?.end() }
        let manifest: Manifest
        do { manifest = try Manifest(decoding: record.manifest) } catch {
            span?.recordError(error)
            return fail(stream, connection, 500, "object \(name): \(error)")
        }
        sendObject(name, manifest, edge: false, request, stream, connection)
    }

    private func sendObject(
        _ name: String, _ manifest: Manifest, edge: Bool, _ request: HTTPRequest, _ stream: HTTPStream,
        _ connection: QUICConnection, hint: RelayHint? = nil, again: (manifest: [UInt8], request: HTTPRequest)? = nil,
        reasked: Bool = false
    ) {
        guard
            let (status, headers, range) = ObjectService.bodyHead(
                size: manifest.totalLength, etag: manifest.etag, cacheControl: edge ? nil : cacheControl,
                request: request, stream: stream, connection: connection, fail: { fail(stream, connection, $0, $1) })
        else { return }
        if !reasked { counters.objectsServed += 1 }  // counted when first asked
        let length = range.map { $0.upperBound - $0.lowerBound + 1 } ?? 0
        if request.method == "HEAD" || length == 0 {
            connection.respond(stream, status: status, headers: headers, body: nil)
            return
        }
        // Find the chunk the range starts in.
        var first = 0, at: UInt64 = 0
        let start = range!.lowerBound
        while at + UInt64(manifest.chunks[first].length) <= start {
            at += UInt64(manifest.chunks[first].length)
            first += 1
        }
        sends[stream] = ObjectSend(
            name: name, chunks: manifest.chunks, next: first, skip: Int(start - at), remaining: length,
            edge: edge, readAhead: first, hint: hint, head: (status, headers), again: again, afresh: reasked)
        bodyWanted(stream: stream, connection: connection)
    }

    /// Ends `send` for a chunk that cannot be had: an error answer while its head is held,
    /// else (bytes went out) a reset stream.
    private func abandon(_ send: ObjectSend, _ status: Int, _ why: String, _ stream: HTTPStream, _ connection: QUICConnection) {
        logger.error("object \(send.name): \(why)")
        sends[stream] = nil
        if send.head != nil { return fail(stream, connection, status, why) }
        connection.reset(stream, errorCode: H3Error.internalError)
    }

    public func bodyWanted(stream: HTTPStream, connection: QUICConnection) {
        guard var send = sends[stream], send.remaining > 0, send.next < send.chunks.count, !send.waiting else { return }
        let entry = send.chunks[send.next]
        let id = ChunkID(bytes: entry.id.bytes)!
        let bytes: [UInt8]
        if send.edge, let edge {
            let have = send.fetched ?? edge.readChunk(id) ?? (try? index.chunks.read(id))
            if have == nil {
                // Asked for before the chunks ahead: the fetcher takes jobs in order.
                let ticket = edge.fetch(.chunk(id), inbox: inbox, hint: send.hint, trace: spans?.context(of: stream), revalidate: send.afresh)
                edgeWaits[ticket] = .objectChunk(stream, connection)
            }
            // Ask the origin for the chunks ahead now, so they arrive while these are sent.
            let horizon = min(send.chunks.count, send.next + 1 + edge.readAheadChunks)
            while send.readAhead < horizon {
                let ahead = ChunkID(bytes: send.chunks[send.readAhead].id.bytes)!
                if send.readAhead > send.next, (try? index.chunks.has(ahead)) != true, !edge.holds(ahead) {
                    edge.fetch(.chunk(ahead), inbox: nil, hint: send.hint, trace: spans?.context(of: stream), revalidate: send.afresh)
                }
                send.readAhead += 1
            }
            guard let b = have else {
                send.waiting = true
                sends[stream] = send
                return
            }
            bytes = b
            send.fetched = nil
        } else {
            // This node's own record: its lengths were checked against the chunks when it was
            // committed, so a file of another size is damage, quarantined without being read.
            do { bytes = try index.chunks.read(id, length: Int(entry.length)) } catch {
                // Never send bytes the store cannot vouch for: the client sees the request fail.
                return abandon(send, 500, "chunk \(id.hex) unavailable: \(error)", stream, connection)
            }
        }
        guard bytes.count == Int(entry.length) else {
            // Checked when a manifest is stored; an upstream's, or a record from before, may still lie.
            return abandon(
                send, send.edge ? 502 : 500, "chunk \(id.hex) is \(bytes.count) bytes, its manifest says \(entry.length)", stream, connection)
        }
        if let head = send.head {
            send.head = nil
            connection.respondStreamed(stream, status: head.status, headers: head.headers)
        }
        let take = Int(min(UInt64(bytes.count - send.skip), send.remaining))
        let piece =
            send.skip == 0 && take == bytes.count
            ? BodyRegion(copying: bytes) : BodyRegion(copying: bytes[send.skip..<send.skip + take])
        send.remaining -= UInt64(take)
        send.next += 1
        send.skip = 0
        counters.chunksServed += 1
        sends[stream] = send.remaining == 0 ? nil : send
        connection.appendBody(stream, piece, last: send.remaining == 0)
    }

    func serveChunk(_ id: ChunkID, head: Bool, _ stream: HTTPStream, _ connection: QUICConnection) {
        let span = storeSpan("store.read", stream, chunk: id)
        defer { span?.end() }
        let bytes: [UInt8]
        do { bytes = try index.chunks.read(id) } catch let e as StoreError {
            span?.recordError(e)
            switch e.code {
            case .chunkNotFound:
                if servePlainChunk(id, head: head, stream, connection) { return }
                return fail(stream, connection, 404, "no chunk \(id.hex)")
            case .corrupt: return fail(stream, connection, 500, "chunk \(id.hex) failed verification and was quarantined: \(e.message)")
            default: return fail(stream, connection, 500, e.message)
            }
        } catch { return fail(stream, connection, 500, "\(error)") }
        respondChunk(bytes, head: head, stream, connection)
    }

    /// A chunk the store lacks, from one of this node's plain files (`PlainCuts`): served,
    /// or a 503 when a file that lists it cannot be read; false, having answered nothing, when
    /// no current cut lists it.
    private func servePlainChunk(_ id: ChunkID, head: Bool, _ stream: HTTPStream, _ connection: QUICConnection) -> Bool {
        switch plainCuts?.chunk(id) ?? .none {
        case .bytes(let bytes): respondChunk(bytes, head: head, stream, connection)
        case .unreadable(let why): fail(stream, connection, 503, "chunk \(id.hex): \(why)")
        case .none: return false
        }
        return true
    }

    private func respondChunk(_ bytes: [UInt8], head: Bool, _ stream: HTTPStream, _ connection: QUICConnection) {
        counters.chunksServed += 1
        let headers = [
            ("content-length", "\(bytes.count)"), ("content-type", "application/octet-stream"),
            ("cache-control", "public, max-age=31536000, immutable"),
        ]
        connection.respond(stream, status: 200, headers: headers, body: head ? nil : BodyRegion(copying: bytes))
    }

    func serveManifest(_ name: String, head: Bool, _ stream: HTTPStream, _ connection: QUICConnection) {
        let span = storeSpan("store.read", stream, object: name)
        defer { span?.end() }
        let record: ObjectRecord
        do { record = try index.object(name) } catch let e as StoreError where e.code == .objectNotFound {
            span?.attributes["stoq.found"] = false
            return fail(stream, connection, 404, e.message)
        } catch { return fail(stream, connection, 500, "\(error)") }
        respondManifest(record.manifest, head: head, origin: true, stream, connection)
    }

    /// The manifest of this node's plain file `name` (a plain file comes first, as for
    /// `GET /objects/<name>`), cut (`PlainCuts`): at once when its current version
    /// is cut, else once the cut is done (`drainCuts`); a 404 when it will not be cut (the
    /// asker then fetches the object whole). False, having answered nothing, when the node has
    /// no plain file of that name.
    func servePlainCut(_ cuts: PlainCuts, _ name: String, head: Bool, _ stream: HTTPStream, _ connection: QUICConnection) -> Bool {
        let ticket = nextCut
        nextCut += 1
        switch cuts.manifest(of: name, ticket: ticket, inbox: cutInbox) {
        case .manifest(let bytes): respondManifest(bytes, head: head, origin: true, stream, connection)
        case .cutting: cutWaits[ticket] = (name, head, stream, connection)
        case .refused(let why): fail(stream, connection, 404, "no manifest of \(name): \(why)")
        case .noFile: return false
        }
        return true
    }

    /// Answers the manifest requests whose plain file's cut finished (called by the worker
    /// between batches).
    package func drainCuts() {
        cutInbox.drain(into: &cutsDone)
        guard !cutsDone.isEmpty else { return }
        for d in cutsDone {
            guard let wait = cutWaits.removeValue(forKey: d.ticket) else { continue }
            if let m = d.manifest {
                respondManifest(m, head: wait.head, origin: true, wait.stream, wait.connection)
            } else {
                fail(wait.stream, wait.connection, 404, "no manifest of \(wait.name): \(d.why)")
            }
        }
        cutsDone.removeAll(keepingCapacity: true)
    }

    private func respondManifest(_ bytes: [UInt8], head: Bool, origin: Bool, _ stream: HTTPStream, _ connection: QUICConnection) {
        counters.manifestsServed += 1
        var headers = [("content-length", "\(bytes.count)"), ("content-type", "application/vnd.stoq.manifest")]
        if origin, let cacheControl { headers.append(cacheControl) }
        connection.respond(stream, status: 200, headers: headers, body: head ? nil : BodyRegion(copying: bytes))
    }

    // MARK: - Edge cache

    /// `GET /objects/<name>` on an edge node for an object it does not store itself (`hint`:
    /// relayed for a holder, `RelayHint.whole`). `again`: the manifest listed a chunk its
    /// upstream no longer has, so it is asked for past every cache on the way (a relay's copy
    /// lists the same chunks; the holder or origin cuts its plain file again).
    func serveEdgeObject(
        _ name: String, _ request: HTTPRequest, _ stream: HTTPStream, _ connection: QUICConnection, hint: RelayHint? = nil, again: Bool = false
    ) {
        guard let edge else { return }
        if !again { counters.edgeRequests += 1 }
        if !again, let m = edge.manifest(name), m.fresh {
            return sendEdgeObject(name, m.bytes, request, stream, connection, hint: hint, again: again)
        }
        edgeWaits[edge.fetch(.manifest(name), inbox: inbox, hint: hint, trace: spans?.context(of: stream), revalidate: again)] =
            .object(name, request, hint, again: again, stream, connection)
    }

    private func sendEdgeObject(
        _ name: String, _ bytes: [UInt8], _ request: HTTPRequest, _ stream: HTTPStream, _ connection: QUICConnection, hint: RelayHint?,
        again: Bool
    ) {
        let manifest: Manifest
        do { manifest = try Manifest(decoding: bytes) } catch { return fail(stream, connection, 502, "edge: cached manifest of \(name): \(error)") }
        sendObject(name, manifest, edge: true, request, stream, connection, hint: hint, again: again ? nil : (bytes, request), reasked: again)
    }

    /// `GET /manifests/<name>` on an edge node that does not store the object. `revalidate`
    /// (the request's `Cache-Control: no-cache`): asked upstream even when a fresh copy is
    /// here, as `EdgeCache.manifest(askingPast:)` rules.
    func serveEdgeManifest(
        _ edge: EdgeCache, _ name: String, head: Bool, revalidate: Bool, _ stream: HTTPStream, _ connection: QUICConnection,
        hint: RelayHint? = nil
    ) {
        counters.edgeRequests += 1
        let relayed = hint != nil
        if let m = edge.manifest(name, relayed: relayed, askingPast: revalidate), m.fresh {
            return respondManifest(m.bytes, head: head, origin: false, stream, connection)
        }
        edgeWaits[edge.fetch(.manifest(name), inbox: inbox, hint: hint, trace: spans?.context(of: stream), revalidate: revalidate)] =
            .manifest(name, head: head, relayed: relayed, stream, connection)
    }

    /// `GET /chunks/<sha256>` on an edge node that does not store the chunk. `afresh` (the
    /// request's `Cache-Control: no-cache`, sent by a node re-asking after a 404): a fetch is
    /// never joined to one from before, whose 404 may predate the holder's new cut.
    func serveEdgeChunk(
        _ edge: EdgeCache, _ id: ChunkID, head: Bool, afresh: Bool, _ stream: HTTPStream, _ connection: QUICConnection,
        hint: RelayHint? = nil
    ) {
        counters.edgeRequests += 1
        if let bytes = edge.readChunk(id) { return respondChunk(bytes, head: head, stream, connection) }
        let ticket = edge.fetch(.chunk(id), inbox: inbox, hint: hint, trace: spans?.context(of: stream), revalidate: afresh)
        edgeWaits[ticket] = .chunk(id, head: head, stream, connection)
    }

    /// Completes what the edge cache's fetcher finished for this worker (called by the
    /// worker between batches).
    public func drainEdge() {
        inbox.drain(into: &completions)
        guard !completions.isEmpty else { return }
        for c in completions {
            guard let wait = edgeWaits.removeValue(forKey: c.ticket), let edge else { continue }
            switch wait {
            case .object(let name, let request, let hint, let again, let stream, let connection):
                if let f = c.failure {
                    if f.status != 404, let cached = edge.fallback(name, f.reason) {
                        sendEdgeObject(name, cached, request, stream, connection, hint: hint, again: again)
                    } else {
                        fail(stream, connection, f.status, f.reason)
                    }
                } else if let m = c.manifest {
                    sendEdgeObject(name, m, request, stream, connection, hint: hint, again: again)
                } else {
                    fail(stream, connection, 502, "edge: the fetch of the manifest of \(name) returned no bytes")
                }
            case .manifest(let name, let head, let relayed, let stream, let connection):
                if let f = c.failure {
                    if f.status != 404, let cached = edge.fallback(name, relayed: relayed, f.reason) {
                        respondManifest(cached, head: head, origin: false, stream, connection)
                    } else {
                        fail(stream, connection, f.status, f.reason)
                    }
                } else if let m = c.manifest {
                    respondManifest(m, head: head, origin: false, stream, connection)
                } else {
                    fail(stream, connection, 502, "edge: the fetch of the manifest of \(name) returned no bytes")
                }
            case .chunk(let id, let head, let stream, let connection):
                if let f = c.failure {
                    fail(stream, connection, f.status, f.reason)
                } else if let bytes = c.chunk ?? edge.readChunk(id) {
                    respondChunk(bytes, head: head, stream, connection)
                } else {
                    fail(stream, connection, 502, "edge: chunk \(id.hex) could not be kept in the cache")
                }
            case .objectChunk(let stream, let connection):
                guard var send = sends[stream] else { continue }
                send.waiting = false
                if let f = c.failure {
                    if f.status == 404, let again = send.again {
                        // The upstream lists no such chunk: its cut of a plain file went with a
                        // restart or its bound, or the object changed there. The manifest goes
                        // and is asked for again, once: a request that has sent nothing yet
                        // starts over with it; one that has goes on if it is the same (a cut
                        // made again), and is reset if not.
                        edge.forgetManifest(send.name, ifStill: again.manifest)
                        if send.head != nil {
                            logger.warning("object \(send.name): \(f.reason); asking for its manifest again")
                            sends[stream] = nil
                            serveEdgeObject(send.name, again.request, stream, connection, hint: send.hint, again: true)
                        } else {
                            logger.warning("object \(send.name): \(f.reason); asking for its manifest again to go on")
                            send.again = nil
                            send.waiting = true
                            sends[stream] = send
                            let ticket = edge.fetch(
                                .manifest(send.name), inbox: inbox, hint: send.hint, trace: spans?.context(of: stream), revalidate: true)
                            edgeWaits[ticket] = .resume(manifest: again.manifest, stream, connection)
                        }
                        continue
                    }
                    abandon(send, f.status, f.reason, stream, connection)
                    continue
                }
                let id = ChunkID(bytes: send.chunks[send.next].id.bytes)!
                // The fetch hands over the chunk's bytes: under cache pressure another fetch
                // may evict it before this worker drains its inbox.
                send.fetched = c.chunk
                if send.fetched == nil && !edge.holds(id) {
                    abandon(send, 502, "edge: chunk \(id.hex) could not be kept in the cache", stream, connection)
                    continue
                }
                sends[stream] = send
                bodyWanted(stream: stream, connection: connection)
            case .resume(let manifest, let stream, let connection):
                guard var send = sends[stream] else { continue }
                guard c.failure == nil, c.manifest == manifest else {
                    let why = c.failure?.reason ?? "its manifest changed while it was being sent"
                    abandon(send, 502, "edge: cannot go on: \(why)", stream, connection)
                    continue
                }
                // The same chunks: those asked for ahead failed too, so they are asked again.
                send.waiting = false
                send.readAhead = send.next
                send.afresh = true
                sends[stream] = send
                bodyWanted(stream: stream, connection: connection)
            }
        }
        completions.removeAll(keepingCapacity: true)
    }

    /// Forgets whom to answer for the chunk writes `gone` picks (their stream or connection
    /// is gone); the chunks are stored all the same.
    private func forgetWrites(_ gone: ((stream: HTTPStream, connection: QUICConnection, span: (any Span)?)) -> Bool) {
        for (ticket, wait) in storing where gone(wait) {
            wait.span?.end()
            storing[ticket] = nil
        }
    }

    /// Forgets what `connection`'s streams waited for (it is gone).
    func connectionClosed(_ connection: QUICConnection) {
        if !storing.isEmpty { forgetWrites { $0.connection === connection } }
        if !cutWaits.isEmpty { cutWaits = cutWaits.filter { $0.value.connection !== connection } }
        guard !edgeWaits.isEmpty else { return }
        edgeWaits = edgeWaits.filter { $0.value.connection !== connection }
    }

    func begin(_ kind: Kind, limit: UInt64, _ request: HTTPRequest, _ stream: HTTPStream, _ connection: QUICConnection) {
        if let n = request.contentLength, UInt64(n) > limit {
            return fail(stream, connection, 413, "body of \(n) bytes is over \(limitName(kind, limit))")
        }
        // Held from here to its end: its announced length (nghttp3 refuses a body longer
        // than that), else the most it may be.
        let wants = request.hasBody ? request.contentLength.map { UInt64($0) } ?? limit : 0
        var held = BodyMemory.Hold.nothing
        if let bodyMemory {
            switch bodyMemory.take(wants, client: clientIdentity(request, peer: connection.peer)) {
            case .success(let hold): held = hold
            case .failure(let refusal): return fail(stream, connection, 503, refusal.reason, headers: [("retry-after", "1")])
            }
        }
        let fd = stoq_memfd("stoq-upload")
        guard fd >= 0 else {
            bodyMemory?.give(held)
            return fail(stream, connection, 500, "memfd_create: \(String(cString: strerror(errno)))")
        }
        var writer: ObjectGate.Writer?
        if case .manifest = kind { writer = gate?.writer(request, peer: connection.peer) }
        uploads[stream] = Upload(kind: kind, fd: fd, limit: limit, held: held, writer: writer)
        stream.setBodySink(fd: fd, limit: limit)
        if !request.hasBody { requestEnded(stream: stream, connection: connection, aborted: false) }
    }

    public func requestEnded(stream: HTTPStream, connection: QUICConnection, aborted: Bool) {
        guard let up = uploads.removeValue(forKey: stream) else { return }
        // Its memory is held until here, or until the chunk write that takes on its mapping ends.
        var held = up.held
        defer {
            close(up.fd)
            bodyMemory?.give(held)
        }
        if aborted { return }
        if stream.sinkErrno != 0 {
            if case .advert = up.kind, stream.sinkErrno == EFBIG {
                mesh?.countRefusedAdvert("oversized", "a PUT of more than \(SignedAdvert.maxSize) bytes")
            }
            if stream.sinkErrno == EFBIG {
                return fail(stream, connection, 413, "body of more than \(up.limit) bytes is over \(limitName(up.kind, up.limit))")
            }
            return fail(stream, connection, 500, "receiving the body failed: \(String(cString: strerror(stream.sinkErrno)))")
        }
        let length = Int(stream.bytesReceived)
        guard let region = BodyRegion.mapping(fd: up.fd, offset: 0, length: length) else {
            // As ObjectService answers the same failure: room for mappings (the SIGBUS
            // guard's, vm.max_map_count) comes back as responses end.
            let e = errno
            let why = e == EBUSY ? "the SIGBUS guard holds \(BodyRegion.guardedMappingsMax) mappings" : String(cString: strerror(e))
            if e == EBUSY || e == ENOMEM {
                return fail(stream, connection, 503, "cannot map the received body of \(length) bytes now (\(why)); try again")
            }
            return fail(stream, connection, 500, "cannot map the received body of \(length) bytes: \(why)")
        }
        let body = UnsafeRawBufferPointer(start: region.base, count: region.count)
        // `body` points into the mapping, which Swift may release after the region's last use.
        defer { withExtendedLifetime(region) {} }
        switch up.kind {
        case .chunk(let id):
            storeChunk(id, region, stream, connection, held: held)
            held = .nothing
        case .missing: answerMissing(body, stream, connection)
        case .manifest(let name): storeManifest(name, body, up.writer, stream, connection)
        case .advert:
            if mesh?.receiveAdvert(Array(body), from: NodeRouter.node(connection.peerIdentity)) == false {
                return fail(stream, connection, 503, "mesh: too many adverts wait to be checked; send it again later")
            }
            connection.respond(stream, status: 202, headers: [("content-length", "0")], body: nil)
        }
    }

    /// The limit a body of `kind` is held to, named for a 413: the setting or bound, and its value.
    func limitName(_ kind: Kind, _ limit: UInt64) -> String {
        switch kind {
        case .chunk: return "chunking.max_chunk_size (\(limit) bytes)"
        case .missing:
            return "the limit of a /_stoq/missing query (\(limit) bytes, \(chunkLimit) ids: "
                + Self.chunkLimitReason(chunkLimit, maxObjectSize: maxObjectSize) + ")"
        case .manifest:
            return "the limit of a manifest (\(limit) bytes, \(chunkLimit) chunks: "
                + Self.chunkLimitReason(chunkLimit, maxObjectSize: maxObjectSize) + ")"
        case .advert: return "the limit of a signed advert (\(limit) bytes)"
        }
    }

    /// A chunk PUT's body, complete: verified, written and fsynced on the store pool (inline
    /// without one), room under the storage cap reserved meanwhile; answered when it is durable.
    /// Writes a chunk PUT's `body` (a mapping of its memory file), which holds `held` of
    /// `bodyMemory` until the write ends.
    private func storeChunk(_ id: ChunkID, _ body: BodyRegion, _ stream: HTTPStream, _ connection: QUICConnection, held: BodyMemory.Hold) {
        let span = storeSpan("store.write", stream, chunk: id)
        counters.chunkBytesReceived += UInt64(body.count)
        var reserved: UInt64 = 0
        if let gate, gate.settings.storageCap > 0, (try? index.chunks.has(id)) != true {
            if let r = gate.reserve(UInt64(body.count)) {
                bodyMemory?.give(held)
                span?.end()
                return fail(stream, connection, r.status, r.reason)
            }
            reserved = UInt64(body.count)
        }
        let chunks = index.chunks, gate = self.gate, memory = bodyMemory
        let write = { () -> (status: Int, reason: String) in
            defer {
                if reserved > 0 { gate?.release(reserved) }
                memory?.give(held)
            }
            return Self.put(id, body, into: chunks)
        }
        guard let storePool else {
            let (status, reason) = write()
            countWrite(status)
            span?.end()
            return answerWrite(status, reason, stream, connection)
        }
        let ticket = nextStore
        nextStore += 1
        storing[ticket] = (stream, connection, span)
        let inbox = storeInbox
        storePool.submit {
            let (status, reason) = write()
            inbox.post(ChunkWrite(ticket: ticket, status: status, reason: reason))
        }
    }

    /// Stores a chunk PUT's `body` as `id` (verifying it); the answer's status and reason.
    static func put(_ id: ChunkID, _ body: BodyRegion, into chunks: ChunkStore) -> (status: Int, reason: String) {
        do {
            switch try chunks.put(id: id, bytes: UnsafeRawBufferPointer(start: body.base, count: body.count)) {
            case .alreadyPresent: return (200, "")
            default: return (201, "")
            }
        } catch let e as StoreError where e.code == .digestMismatch || e.code == .chunkTooLarge {
            return (e.code == .chunkTooLarge ? 413 : 400, e.message)
        } catch let e as StoreError where e.code == .noSpace {
            // Counted by the store; the client may resend the chunk once space returns.
            return (507, e.message)
        } catch { return (500, "\(error)") }
    }

    private func countWrite(_ status: Int, manifest: Bool = false) {
        if manifest {
            if status == 201 { counters.manifestsStored += 1 }
        } else if status == 200 {
            counters.chunksAlreadyPresent += 1
        } else if status == 201 {
            counters.chunksStored += 1
        }
    }

    private func answerWrite(_ status: Int, _ reason: String, _ stream: HTTPStream, _ connection: QUICConnection, etag: String? = nil) {
        guard status == 200 || status == 201 else { return fail(stream, connection, status, reason) }
        connection.respond(stream, status: status, headers: [("content-length", "0")] + (etag.map { [("etag", $0)] } ?? []), body: nil)
    }

    /// Answers the chunk PUTs the store pool has written and the manifest PUTs it has
    /// committed (called by the worker between batches). A chunk or manifest whose client went
    /// away is stored all the same.
    package func drainStores() {
        storeInbox.drain(into: &written)
        guard !written.isEmpty else { return }
        for w in written {
            countWrite(w.status, manifest: w.etag != nil)
            guard let wait = storing.removeValue(forKey: w.ticket) else { continue }
            wait.span?.end()
            answerWrite(w.status, w.reason, wait.stream, wait.connection, etag: w.etag)
        }
        written.removeAll(keepingCapacity: true)
    }

    private func answerMissing(_ body: UnsafeRawBufferPointer, _ stream: HTTPStream, _ connection: QUICConnection) {
        guard body.count % 32 == 0 else {
            return fail(stream, connection, 400, "the body is \(body.count) bytes, not a whole number of 32-byte chunk ids")
        }
        var ids: [ChunkID] = []
        ids.reserveCapacity(body.count / 32)
        for i in stride(from: 0, to: body.count, by: 32) { ids.append(ChunkID(bytes: body[i..<i + 32])!) }
        do {
            let missing = try index.chunks.missing(ids)
            var out = [UInt8]()
            out.reserveCapacity(missing.count * 32)
            for id in missing { out += id.bytes }
            connection.respond(stream, status: 200, headers: [("content-length", "\(out.count)")], body: BodyRegion(copying: out))
        } catch { fail(stream, connection, 500, "\(error)") }
    }

    /// A manifest PUT's body, complete: parsed and checked here (`admitManifest`), then
    /// verified and committed on the store pool (inline without one), answered once the record
    /// is durable (201 with the object's ETag) or refused.
    private func storeManifest(
        _ name: String, _ body: UnsafeRawBufferPointer, _ writer: ObjectGate.Writer?, _ stream: HTTPStream, _ connection: QUICConnection
    ) {
        let span = storeSpan("store.write", stream, object: name)
        let m: AdmittedManifest
        switch admitManifest(name, body, writer) {
        case .success(let admitted): m = admitted
        case .failure(let r):
            span?.end()
            return fail(stream, connection, r.status, r.reason, headers: r.headers)
        }
        let index = self.index, gate = self.gate, checks = manifestChecks
        let commit = {
            defer { checks?.end() }
            return Self.commitManifest(name, m.manifest, m.bytes, m.ids, writer, index: index, gate: gate, sizes: m.sizes)
        }
        guard let storePool else {
            let (status, reason) = commit()
            countWrite(status, manifest: true)
            span?.end()
            return answerWrite(status, reason, stream, connection, etag: m.manifest.etag)
        }
        let ticket = nextStore
        nextStore += 1
        storing[ticket] = (stream, connection, span)
        let inbox = storeInbox, etag = m.manifest.etag
        storePool.submit {
            let (status, reason) = commit()
            inbox.post(ChunkWrite(ticket: ticket, status: status, reason: reason, etag: etag))
        }
    }

    /// A manifest PUT past the checks a worker makes (`admitManifest`), to be verified and
    /// committed: its bytes, decoded, its chunk ids, and the sizes the store held them at.
    struct AdmittedManifest {
        var manifest: Manifest
        var bytes: [UInt8]
        var ids: [ChunkID]
        var sizes: [ChunkID: Int]
    }

    /// Why a manifest PUT is answered before it is verified: the status, the reason, and the
    /// answer's headers (`Retry-After` for a busy node).
    struct ManifestRefusal: Error {
        var status: Int
        var reason: String
        var headers: [(String, String)] = []
    }

    /// The checks a manifest PUT's `body` for object `name` by `writer` passes on the worker
    /// before its chunks are read back, cheapest first: the chunk count in its header (413),
    /// its decoding (400), `storage.max_object_size` (413), the gate's conditions, policy and
    /// quota for an object of its length (412, 403, 409, 507: what the commit checks again, so
    /// that a write that cannot be stored costs no pass over the object), the lengths of the
    /// chunks the store has (400), and last a place among the verifications under way
    /// (`manifestChecks`; 503 with `Retry-After`, counted in `manifestChecksBusy`). Admitted, it
    /// holds that place until its commit gives it back (`ManifestChecks.end`).
    func admitManifest(_ name: String, _ body: UnsafeRawBufferPointer, _ writer: ObjectGate.Writer?) -> Result<AdmittedManifest, ManifestRefusal> {
        // Before anything is decoded, allocated or looked up per chunk.
        if let why = Self.manifestCountRefusal(name, body, limit: chunkLimit, maxObjectSize: maxObjectSize) {
            return .failure(ManifestRefusal(status: 413, reason: why))
        }
        let manifest: Manifest
        do { manifest = try Manifest(decoding: body) } catch { return .failure(ManifestRefusal(status: 400, reason: "\(error)")) }
        guard manifest.totalLength <= maxObjectSize else {
            return .failure(
                ManifestRefusal(
                    status: 413,
                    reason: "object \(name) of \(manifest.totalLength) bytes is larger than storage.max_object_size (\(maxObjectSize) bytes)"))
        }
        // A record adds no bytes to the store (its chunks are counted when put), so the cap
        // never refuses one: the quota does, as at the commit.
        if let gate, let writer, let r = gate.check(name, by: writer, size: manifest.totalLength, physical: 0) {
            return .failure(ManifestRefusal(status: r.status, reason: r.reason))
        }
        let ids = manifest.chunks.map { ChunkID(bytes: $0.id.bytes)! }
        // What the store holds of each chunk, by size, looked up once per chunk.
        var sizes: [ChunkID: Int] = [:]
        do {
            // A chunk's length is fixed by its id: one the store holds at another length than the
            // manifest says, at any of the places it lists it, would be sent short (or trap a
            // range past it). Missing ones are `putObject`'s to report.
            var missing = Set<ChunkID>()
            for (id, e) in zip(ids, manifest.chunks) where !missing.contains(id) {
                guard let size = try sizes[id] ?? index.chunks.size(id) else {
                    missing.insert(id)
                    continue
                }
                sizes[id] = size
                if size != Int(e.length) { return .failure(ManifestRefusal(status: 400, reason: Self.lengthRefusal(name, id, size, e.length))) }
            }
        } catch { return .failure(ManifestRefusal(status: 500, reason: "\(error)")) }
        if let manifestChecks, !manifestChecks.begin() {
            counters.manifestChecksBusy += 1
            return .failure(
                ManifestRefusal(
                    status: 503,
                    reason: "manifest of \(name): the node is verifying \(manifestChecks.limit) manifests already "
                        + "(each read back and hashed whole); try again",
                    headers: [("retry-after", "\(ManifestChecks.retryAfter)")]))
        }
        return .success(AdmittedManifest(manifest: manifest, bytes: Array(body), ids: ids, sizes: sizes))
    }

    /// Why a manifest of `name` is refused (400) for listing chunk `id` at `claimed` bytes, when
    /// the store holds it at `size`.
    static func lengthRefusal(_ name: String, _ id: ChunkID, _ size: Int, _ claimed: UInt32) -> String {
        "manifest of \(name): chunk \(id.hex) is \(size) bytes in the store, the manifest says \(claimed)"
    }

    /// Commits the manifest PUT of `name` (`bytes`, decoded as `manifest`, listing `ids`) by
    /// `writer`: the gate's checks first, then its whole-object SHA-256 and its lengths checked against its chunks
    /// (`digestRefusal`; `sizes`: the sizes the store held them at when the manifest arrived),
    /// then the record written, through `gate` when there is one. Blocking (the store pool's);
    /// the answer's status (201, or the refusal's) and the refusal's reason.
    static func commitManifest(
        _ name: String, _ manifest: Manifest, _ bytes: [UInt8], _ ids: [ChunkID], _ writer: ObjectGate.Writer?, index: ObjectIndex,
        gate: ObjectGate?, sizes: [ChunkID: Int] = [:]
    ) -> (status: Int, reason: String) {
        // The quota again before the pass over the object (it may have filled while this waited
        // for a store thread); the gate's commit below is what decides.
        if let gate, let writer, let r = gate.check(name, by: writer, size: manifest.totalLength, physical: 0) { return (r.status, r.reason) }
        if let refusal = digestRefusal(name, manifest, ids, chunks: index.chunks, sizes: sizes) { return refusal }
        do {
            if let gate, let writer {
                let put = { try index.putObject(name, manifest: bytes, chunkIDs: ids, owner: writer.identity) }
                if let r = try gate.commit(name, by: writer, size: manifest.totalLength, physical: 0, chunked: true, write: put) {
                    return (r.status, r.reason)
                }
            } else {
                try index.putObject(name, manifest: bytes, chunkIDs: ids)
            }
            return (201, "")
        } catch let e as StoreError where e.code == .missingChunks {
            return (409, e.message)
        } catch let e as StoreError where e.code == .noSpace {
            // Nothing replaced: the object is absent, or still its previous version.
            return (507, e.message)
        } catch { return (500, "\(error)") }
    }

    /// Why the manifest of `name` cannot be stored as it stands, from its chunks: its
    /// whole-object SHA-256 (the object's strong ETag from then on, and what `stoq get` checks
    /// a download against) must be what its chunks, read in order from `chunks` (each verified
    /// against its id), hash to — 400 naming both digests otherwise. A chunk the store lacks
    /// (or holds corrupt, now quarantined) is 409 naming the chunks to send, as `putObject`
    /// says it. Nil when the digest is the chunks'.
    ///
    /// One more SHA-256 pass over the object, on the store pool: a client could otherwise give
    /// an object any ETag it likes, and a later If-Match, a cache or a verifying client would
    /// trust it. The same pass holds every entry's length to its chunk's (400 otherwise, as on
    /// arrival), also for a chunk stored since: the record's lengths are then the chunks' own,
    /// which reads of the object rely on (`ChunkStore.read(_:length:)`). A chunk in `sizes` (its
    /// size when the manifest arrived) is read only if it still has that size: one that grew
    /// since is quarantined without being read.
    static func digestRefusal(
        _ name: String, _ manifest: Manifest, _ ids: [ChunkID], chunks: ChunkStore, sizes: [ChunkID: Int] = [:]
    ) -> (status: Int, reason: String)? {
        var hasher = SHA256()
        for (id, e) in zip(ids, manifest.chunks) {
            do {
                let bytes = try chunks.read(id, length: sizes[id])
                guard bytes.count == Int(e.length) else { return (400, lengthRefusal(name, id, bytes.count, e.length)) }
                hasher.update(data: bytes)
            } catch let e as StoreError where e.code == .chunkNotFound || e.code == .corrupt {
                guard let missing = try? chunks.missing(ids), !missing.isEmpty else { return (500, e.message) }
                return (409, ObjectIndex.missingChunks(name, missing).message)
            } catch { return (500, "\(error)") }
        }
        let computed = hasher.finalize().withUnsafeBytes { ContentDigest(bytes: $0) }
        guard computed == manifest.digest else {
            return (
                400,
                "manifest of \(name): it claims the object's SHA-256 is \(manifest.digest.hex), but its chunks hash to \(computed.hex)"
            )
        }
        return nil
    }

    public func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) {
        if let up = uploads.removeValue(forKey: stream) { release(up) }
        if !storing.isEmpty { forgetWrites { $0.stream == stream } }
        sends[stream] = nil
        if !edgeWaits.isEmpty { edgeWaits = edgeWaits.filter { $0.value.stream != stream } }
        if !cutWaits.isEmpty { cutWaits = cutWaits.filter { $0.value.stream != stream } }
    }

    /// A store read or write of `stream`'s request, when it is traced.
    private func storeSpan(_ name: String, _ stream: HTTPStream, chunk: ChunkID? = nil, object: String? = nil) -> (any Span)? {
        guard let spans, let span = spans.child(name, of: stream) else { return nil }
        if let chunk { span.attributes["stoq.chunk"] = chunk.hex }
        if let object { span.attributes["stoq.object"] = object }
        return span
    }

    func notAllowed(_ stream: HTTPStream, _ connection: QUICConnection, _ allow: String) {
        counters.refused += 1
        connection.respond(stream, status: 405, headers: [("allow", allow)], body: nil)
    }

    func fail(_ stream: HTTPStream, _ connection: QUICConnection, _ status: Int, _ why: String, headers: [(String, String)] = []) {
        counters.refused += 1
        logger.debug("content request refused", metadata: ["status": "\(status)", "reason": "\(why)"])
        let body = BodyRegion(copying: Array("\(why.prefix(2000))\n".utf8))
        connection.respond(
            stream, status: status,
            headers: headers + [("content-type", "text/plain"), ("content-length", "\(body.count)")], body: body)
    }
}
