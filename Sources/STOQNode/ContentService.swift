import CSTOQSystem
import Foundation
import Logging
import STOQChunking
import STOQQUIC
import STOQStore

/// Chunk-level transfer over HTTP/3, on the node's content-addressed store:
///
/// - `GET`/`HEAD /chunks/<sha256 hex>`: a chunk, verified as it is read (a chunk whose
///   bytes no longer match its id is quarantined and never served: 500).
/// - `PUT /chunks/<sha256 hex>`: stores a chunk once (201; 200 when the node already had
///   it); bytes that do not hash to the id are refused (400).
/// - `POST /_stoq/missing`: the have/want query; the body is a run of 32-byte chunk ids,
///   the response the ids among them the node lacks.
/// - `GET`/`HEAD`/`PUT`/`DELETE /manifests/<name>`: an object's manifest; a PUT is
///   refused unless the manifest parses (400, naming what is wrong) and every chunk it
///   lists is stored (409).
///
/// One instance per worker, on that worker's thread; the store it shares is thread-safe.
/// Request bodies are collected in an anonymous memory file (memfd), never in the heap.
public final class ContentService: QUICApplication {
    /// What the service counted.
    public struct Counters: Sendable {
        public var chunksServed: UInt64 = 0
        public var chunksStored: UInt64 = 0
        public var chunksAlreadyPresent: UInt64 = 0
        public var chunkBytesReceived: UInt64 = 0
        public var manifestsStored: UInt64 = 0
        public var refused: UInt64 = 0
    }

    enum Kind { case chunk(ChunkID), missing, manifest(String) }

    struct Upload {
        var kind: Kind
        var fd: Int32
        var limit: UInt64
    }

    /// The largest `/_stoq/missing` body: a million ids.
    static let maxQueryBytes: UInt64 = 32 << 20
    /// The largest manifest body.
    static let maxManifestBytes: UInt64 = UInt64(Manifest.headerSize + Manifest.entrySize * Manifest.maxChunkCount)

    /// A chunked object being sent as one body: the chunks still to go, and the byte range.
    struct ObjectSend {
        var name: String
        var chunks: [Manifest.Entry]
        var next: Int          // index of the next chunk to append
        var skip: Int          // bytes of that chunk before the range starts
        var remaining: UInt64  // body bytes still to append
    }

    private let index: ObjectIndex
    private var sends: [HTTPStream: ObjectSend] = [:]
    private let maxChunkSize: UInt64
    private let logger: Logger
    private var uploads: [HTTPStream: Upload] = [:]
    public private(set) var counters = Counters()

    /// Serves from `index` (and its chunk store); chunks larger than `maxChunkSize` are refused.
    public init(index: ObjectIndex, maxChunkSize: UInt64, logger: Logger) {
        self.index = index
        self.maxChunkSize = maxChunkSize
        self.logger = logger
    }

    deinit { for u in uploads.values { close(u.fd) } }

    /// Whether a request path belongs to this service.
    public static func handles(_ path: String) -> Bool {
        path.hasPrefix("/chunks/") || path.hasPrefix("/manifests/") || path == "/_stoq/missing"
    }

    public func request(_ request: HTTPRequest, stream: HTTPStream, connection: QUICConnection) {
        if request.malformed { return fail(stream, connection, 400, "malformed request") }
        if request.pathTooLong { return fail(stream, connection, 414, "path too long") }
        if request.headersTooLarge { return fail(stream, connection, 431, "request header fields too large") }
        let path = String(request.path.prefix { $0 != "?" })
        if path == "/_stoq/missing" {
            guard request.method == "POST" else { return notAllowed(stream, connection, "POST") }
            return begin(.missing, limit: Self.maxQueryBytes, request, stream, connection)
        }
        if path.hasPrefix("/chunks/") {
            guard let id = ChunkID(hex: path.dropFirst("/chunks/".count)) else {
                return fail(stream, connection, 400, "bad chunk id \(path.dropFirst(8).prefix(100)): expected 64 hex digits")
            }
            switch request.method {
            case "GET", "HEAD": return serveChunk(id, head: request.method == "HEAD", stream, connection)
            case "PUT": return begin(.chunk(id), limit: maxChunkSize, request, stream, connection)
            default: return notAllowed(stream, connection, "GET, HEAD, PUT")
            }
        }
        let name = String(path.dropFirst("/manifests/".count))
        do { try ObjectIndex.validateName(name) } catch { return fail(stream, connection, 400, "\(error)") }
        switch request.method {
        case "GET", "HEAD": serveManifest(name, head: request.method == "HEAD", stream, connection)
        case "PUT": begin(.manifest(name), limit: Self.maxManifestBytes, request, stream, connection)
        case "DELETE":
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
    func hasObject(_ name: String) -> Bool { (try? index.object(name)) != nil }

    /// `GET`/`HEAD /objects/<name>` for a chunked object: one body (with a single `Range`),
    /// streamed chunk by chunk from the store, each verified as it is read.
    func serveObject(_ name: String, _ request: HTTPRequest, _ stream: HTTPStream, _ connection: QUICConnection) {
        let manifest: Manifest
        do { manifest = try Manifest(decoding: index.object(name).manifest) } catch {
            return fail(stream, connection, 500, "object \(name): \(error)")
        }
        guard let (status, headers, range) = ObjectService.bodyHead(
            size: manifest.totalLength, request: request, stream: stream, connection: connection,
            fail: { fail(stream, connection, $0, $1) })
        else { return }
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
        sends[stream] = ObjectSend(name: name, chunks: manifest.chunks, next: first, skip: Int(start - at), remaining: length)
        connection.respondStreamed(stream, status: status, headers: headers)
    }

    public func bodyWanted(stream: HTTPStream, connection: QUICConnection) {
        guard var send = sends[stream], send.remaining > 0, send.next < send.chunks.count else { return }
        let entry = send.chunks[send.next]
        let id = ChunkID(bytes: entry.id.bytes)!
        let bytes: [UInt8]
        do { bytes = try index.chunks.read(id) } catch {
            // Never send bytes the store cannot vouch for: the client sees the stream fail.
            logger.error("object \(send.name): chunk \(id.hex) unavailable mid-response: \(error)")
            sends[stream] = nil
            connection.reset(stream, errorCode: H3Error.internalError)
            return
        }
        let take = Int(min(UInt64(bytes.count - send.skip), send.remaining))
        let piece = send.skip == 0 && take == bytes.count
            ? BodyRegion(copying: bytes) : BodyRegion(copying: bytes[send.skip..<send.skip + take])
        send.remaining -= UInt64(take)
        send.next += 1
        send.skip = 0
        counters.chunksServed += 1
        sends[stream] = send.remaining == 0 ? nil : send
        connection.appendBody(stream, piece, last: send.remaining == 0)
    }

    private func serveChunk(_ id: ChunkID, head: Bool, _ stream: HTTPStream, _ connection: QUICConnection) {
        let bytes: [UInt8]
        do { bytes = try index.chunks.read(id) } catch let e as StoreError {
            switch e.code {
            case .chunkNotFound: return fail(stream, connection, 404, "no chunk \(id.hex)")
            case .corrupt: return fail(stream, connection, 500, "chunk \(id.hex) failed verification and was quarantined")
            default: return fail(stream, connection, 500, e.message)
            }
        } catch { return fail(stream, connection, 500, "\(error)") }
        counters.chunksServed += 1
        let headers = [("content-length", "\(bytes.count)"), ("content-type", "application/octet-stream"),
                       ("cache-control", "public, max-age=31536000, immutable")]
        connection.respond(stream, status: 200, headers: headers, body: head ? nil : BodyRegion(copying: bytes))
    }

    private func serveManifest(_ name: String, head: Bool, _ stream: HTTPStream, _ connection: QUICConnection) {
        let record: ObjectRecord
        do { record = try index.object(name) } catch let e as StoreError where e.code == .objectNotFound {
            return fail(stream, connection, 404, e.message)
        } catch { return fail(stream, connection, 500, "\(error)") }
        connection.respond(stream, status: 200, headers: [("content-length", "\(record.manifest.count)"),
                                                          ("content-type", "application/vnd.stoq.manifest")],
                           body: head ? nil : BodyRegion(copying: record.manifest))
    }

    private func begin(_ kind: Kind, limit: UInt64, _ request: HTTPRequest, _ stream: HTTPStream, _ connection: QUICConnection) {
        if let n = request.contentLength, UInt64(n) > limit {
            return fail(stream, connection, 413, "body of \(n) bytes is over the limit of \(limit)")
        }
        let fd = stoq_memfd("stoq-upload")
        guard fd >= 0 else { return fail(stream, connection, 500, "memfd_create: \(String(cString: strerror(errno)))") }
        uploads[stream] = Upload(kind: kind, fd: fd, limit: limit)
        stream.setBodySink(fd: fd, limit: limit)
        if !request.hasBody { requestEnded(stream: stream, connection: connection, aborted: false) }
    }

    public func requestEnded(stream: HTTPStream, connection: QUICConnection, aborted: Bool) {
        guard let up = uploads.removeValue(forKey: stream) else { return }
        defer { close(up.fd) }
        if aborted { return }
        if stream.sinkErrno != 0 {
            return fail(stream, connection, stream.sinkErrno == EFBIG ? 413 : 500,
                        "receiving the body failed: \(String(cString: strerror(stream.sinkErrno)))")
        }
        let length = Int(stream.bytesReceived)
        guard let region = BodyRegion.mapping(fd: up.fd, offset: 0, length: length) else {
            return fail(stream, connection, 500, "cannot map the received body")
        }
        let body = UnsafeRawBufferPointer(start: region.base, count: region.count)
        switch up.kind {
        case .chunk(let id): storeChunk(id, body, stream, connection)
        case .missing: answerMissing(body, stream, connection)
        case .manifest(let name): storeManifest(name, body, stream, connection)
        }
    }

    private func storeChunk(_ id: ChunkID, _ body: UnsafeRawBufferPointer, _ stream: HTTPStream, _ connection: QUICConnection) {
        counters.chunkBytesReceived += UInt64(body.count)
        do {
            switch try index.chunks.put(id: id, bytes: body) {
            case .alreadyPresent:
                counters.chunksAlreadyPresent += 1
                connection.respond(stream, status: 200, headers: [("content-length", "0")], body: nil)
            default:
                counters.chunksStored += 1
                connection.respond(stream, status: 201, headers: [("content-length", "0")], body: nil)
            }
        } catch let e as StoreError where e.code == .digestMismatch || e.code == .chunkTooLarge {
            fail(stream, connection, e.code == .chunkTooLarge ? 413 : 400, e.message)
        } catch { fail(stream, connection, 500, "\(error)") }
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

    private func storeManifest(_ name: String, _ body: UnsafeRawBufferPointer, _ stream: HTTPStream, _ connection: QUICConnection) {
        let manifest: Manifest
        do { manifest = try Manifest(decoding: body) } catch { return fail(stream, connection, 400, "\(error)") }
        let ids = manifest.chunks.map { ChunkID(bytes: $0.id.bytes)! }
        do {
            try index.putObject(name, manifest: Array(body), chunkIDs: ids)
            counters.manifestsStored += 1
            connection.respond(stream, status: 201, headers: [("content-length", "0")], body: nil)
        } catch let e as StoreError where e.code == .missingChunks {
            fail(stream, connection, 409, e.message)
        } catch { fail(stream, connection, 500, "\(error)") }
    }

    public func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) {
        if let up = uploads.removeValue(forKey: stream) { close(up.fd) }
        sends[stream] = nil
    }

    private func notAllowed(_ stream: HTTPStream, _ connection: QUICConnection, _ allow: String) {
        counters.refused += 1
        connection.respond(stream, status: 405, headers: [("allow", allow)], body: nil)
    }

    private func fail(_ stream: HTTPStream, _ connection: QUICConnection, _ status: Int, _ why: String) {
        counters.refused += 1
        logger.debug("content request refused", metadata: ["status": "\(status)", "reason": "\(why)"])
        let body = BodyRegion(copying: Array("\(why.prefix(2000))\n".utf8))
        connection.respond(stream, status: status,
                           headers: [("content-type", "text/plain"), ("content-length", "\(body.count)")], body: body)
    }
}

/// Sends each request to the service that owns its path: content (chunks, manifests,
/// have/want) or objects. Both ignore stream events for streams they do not own.
final class NodeRouter: QUICApplication {
    let objects: ObjectService
    let content: ContentService

    let logger: Logger

    init(objects: ObjectService, content: ContentService, logger: Logger) {
        self.objects = objects
        self.content = content
        self.logger = logger
    }

    /// The embedded CA's transparency log, served under /_stoq/log/ (nil: not this node's).
    var log: CertificateLogService?

    func request(_ request: HTTPRequest, stream: HTTPStream, connection: QUICConnection) {
        if request.path.hasPrefix("/_stoq/log/") {
            guard let log, request.method == "GET" || request.method == "HEAD" else {
                let body = BodyRegion(copying: Array("this node keeps no transparency log\n".utf8))
                connection.respond(stream, status: log == nil ? 404 : 405, headers: [("content-length", "\(body.count)")], body: body)
                return
            }
            let (status, type, bytes) = log.handle(path: request.path)
            connection.respond(stream, status: status, headers: [("content-type", type), ("content-length", "\(bytes.count)")],
                               body: request.method == "HEAD" ? nil : BodyRegion(copying: bytes))
        } else if ContentService.handles(request.path) {
            content.request(request, stream: stream, connection: connection)
        } else if request.method == "GET" || request.method == "HEAD",
                  let name = ObjectService.objectName(fromPath: request.path),
                  !request.malformed, !request.headersTooLarge, !objects.hasFile(name), content.hasObject(name) {
            content.serveObject(name, request, stream, connection)
        } else {
            objects.request(request, stream: stream, connection: connection)
        }
    }

    func bodyWanted(stream: HTTPStream, connection: QUICConnection) {
        content.bodyWanted(stream: stream, connection: connection)
    }

    func connectionClosed(connection: QUICConnection, reason: String) {
        if reason.hasPrefix("client certificate refused") {
            logger.notice("\(reason)", metadata: ["peer": "\(connection.peer)"])
            return
        }
        let s = connection.stats
        logger.debug("connection closed", metadata: [
            "peer": "\(connection.peer)", "reason": "\(reason.isEmpty ? "clean" : reason)",
            "cwnd": "\(s.cwnd)", "srtt_us": "\(s.smoothed_rtt_ns / 1000)", "min_rtt_us": "\(s.min_rtt_ns / 1000)",
            "body_sent": "\(s.body_bytes_sent)", "body_received": "\(s.body_bytes_received)",
        ])
    }

    func requestEnded(stream: HTTPStream, connection: QUICConnection, aborted: Bool) {
        objects.requestEnded(stream: stream, connection: connection, aborted: aborted)
        content.requestEnded(stream: stream, connection: connection, aborted: aborted)
    }

    func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) {
        objects.streamClosed(stream: stream, connection: connection, errorCode: errorCode)
        content.streamClosed(stream: stream, connection: connection, errorCode: errorCode)
    }
}
