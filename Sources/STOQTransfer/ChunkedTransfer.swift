import CSTOQSystem
import Crypto
import Foundation
import STOQChunking
import STOQCore
import STOQQUIC
#if canImport(Glibc)
import Glibc
#endif

/// What a chunked upload did.
public struct ChunkedPutResult: Sendable, Codable {
    /// Chunks in the object, and how many distinct ones the node lacked and were sent.
    public var chunks: Int
    public var chunksSent: Int
    /// Chunk bytes sent (the manifest and the have/want query are not counted).
    public var bytesSent: UInt64
    public var totalBytes: UInt64
    public var seconds: Double
    /// SHA-256 of the whole object, hex.
    public var sha256: String
}

/// What a chunked download did.
public struct ChunkedGetResult: Sendable, Codable {
    public var chunks: Int
    /// Chunks fetched now, and chunks found already verified in a previous partial download.
    public var chunksFetched: Int
    public var chunksReused: Int
    public var bytesFetched: UInt64
    public var totalBytes: UInt64
    public var seconds: Double
    /// SHA-256 of the file written, hex (checked against the manifest's).
    public var sha256: String
}

/// Several requests in flight on one connection, each with its own body sink.
package final class MultiRequestApp: QUICApplication {
    /// Where a response body goes; error bodies are discarded unless `keepErrors`.
    struct Sink { var fd: Int32; var offset: UInt64; var limit: UInt64; var hash: Bool; var tag: Int; var keepErrors = false }
    package struct Done {
        package var tag: Int; package var status: Int?; package var errorCode: UInt64; package var received: UInt64; package var sha256: [UInt8]?
        /// The response's Cache-Control max-age (seconds), if it had one.
        package var maxAge: Int64? = nil
        /// errno of a failed write of the body (EFBIG: more than the sink's limit); 0: none.
        package var sinkErrno: Int32 = 0
    }
    var sinks: [HTTPStream: Sink] = [:]
    var statuses: [HTTPStream: Int] = [:]
    package var done: [Done] = []
    package var connectionError: String?

    package func response(_ head: HTTPResponseHead, stream: HTTPStream, connection: QUICConnection) {
        let status = head.status
        statuses[stream] = status
        let s = sinks[stream]
        let ok = status / 100 == 2
        let keep = ok || s?.keepErrors == true
        // An error body kept is read for its message only: its first
        // `ConnectionPool.errorBodyLimit` bytes, the rest refused (EFBIG) as the pool does. Its
        // own bound, not the answer's: a 32-byte /missing query still hears the whole reason.
        let limit = keep && !ok ? ConnectionPool.errorBodyLimit : s?.limit ?? .max
        stream.setBodySink(fd: keep ? (s?.fd ?? -1) : -1, offset: s?.offset ?? 0, limit: limit, hash: s?.hash ?? false)
    }

    package func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) {
        guard let s = sinks.removeValue(forKey: stream) else { return }
        done.append(
            Done(
                tag: s.tag, status: statuses.removeValue(forKey: stream), errorCode: errorCode,
                received: stream.bytesReceived, sha256: stream.bodySHA256(), maxAge: stream.maxAge, sinkErrno: stream.sinkErrno))
    }

    package func connectionClosed(connection: QUICConnection, reason: String) {
        connectionError = reason.isEmpty ? "connection closed by the server" : reason
    }
}

/// One connection carrying many requests, driven on the calling thread.
package final class ClientSession {
    package let app = MultiRequestApp()
    package let rig: ClientRig
    package let connection: QUICConnection
    package let url: STOQURL
    let deadline: Timestamp
    /// Seconds from the start to `deadline` (the transfer's `--timeout`), for messages.
    let timeout: Double
    /// Sent with every request (e.g. W3C `traceparent`).
    package var headers: [(String, String)] = []

    package init(_ url: STOQURL, trust: ClientTrust, datapath: ClientDatapath, timeout: Double) throws(ClientError) {
        self.url = url
        self.timeout = timeout
        rig = try ClientRig(trust: trust, datapath: datapath, application: app)
        let start = monotonicNow()
        deadline = start + UInt64(timeout * 1e9)
        do {
            let source = IPv6Endpoint(address: STOQClient.sourceAddress(toward: url.endpoint), port: rig.queue.localEndpoint.port)
            connection = try rig.endpoint.connect(to: url.endpoint, from: source, serverName: url.host, now: start)
            try rig.worker.run(timeout: deadline - start) { [app, connection] in
                connection.isEstablished || app.connectionError != nil
            }
        } catch {
            rig.queue.close()
            throw ClientError(.connect, "\(error)")
        }
        guard connection.isEstablished else {
            rig.queue.close()
            throw ClientError(.connect, "cannot connect to \(url.endpoint): \(app.connectionError ?? "timed out")")
        }
    }

    /// Sends a request whose response body goes to `sinkFD` at `offset` (-1: discard), at
    /// most `limit` bytes of it; past it the rest is refused and `Done.sinkErrno` is EFBIG.
    /// With `keepErrors` an error's body goes there too, its first
    /// `ConnectionPool.errorBodyLimit` bytes (for its message).
    package func submit(
        _ method: String, _ path: String, body: BodyRegion? = nil, sinkFD: Int32 = -1, offset: UInt64 = 0, limit: UInt64 = .max,
        hash: Bool = false, tag: Int = 0, keepErrors: Bool = false
    ) throws(ClientError) {
        let stream: HTTPStream
        do {
            stream = try connection.request(
                method: method, authority: url.authority, path: path,
                headers: headers + [("content-length", "\(body?.count ?? 0)")], body: body)
        } catch { throw ClientError(.transfer, "\(method) \(path): \(error)") }
        app.sinks[stream] = MultiRequestApp.Sink(fd: sinkFD, offset: offset, limit: limit, hash: hash, tag: tag, keepErrors: keepErrors)
    }

    /// Drives the connection until `done` holds; throws on timeout or a lost connection. A
    /// timeout says how far the transfer got: `progress`.
    package func run(until done: () -> Bool, progress: () -> String = { "" }) throws(ClientError) {
        let now = monotonicNow()
        guard now < deadline else { throw ClientError.timedOut(after: timeout, progress()) }
        let ok: Bool
        do { ok = try rig.worker.run(timeout: deadline - now) { done() || app.connectionError != nil } } catch {
            throw ClientError(.transfer, "\(error)")
        }
        if let e = app.connectionError { throw ClientError(.transfer, "connection lost: \(e)") }
        if !ok { throw ClientError.timedOut(after: timeout, progress()) }
    }

    /// One request, waited for; the response body (if any) comes back in memory, at most
    /// `limit` bytes of it: the most a legitimate answer can be (an error's: its first
    /// `ConnectionPool.errorBodyLimit` bytes, enough for its message, whatever `limit`). A
    /// longer 2xx body is refused as it arrives, never held whole, and throws "`tooLarge`
    /// (`limit` bytes)". A 2xx answer cut short by a reset stream throws too: it is not all
    /// of the answer.
    package func call(
        _ method: String, _ path: String, body: BodyRegion? = nil, limit: UInt64, tooLarge: @autoclosure () -> String
    ) throws(ClientError) -> (status: Int, body: [UInt8]) {
        let fd = stoq_memfd("stoq-response")
        guard fd >= 0 else { throw ClientError(.io, "memfd_create: \(String(cString: strerror(errno)))") }
        defer { Glibc.close(fd) }
        let tag = -1 - app.done.count
        try submit(method, path, body: body, sinkFD: fd, limit: limit, tag: tag, keepErrors: true)
        try run { app.done.contains { $0.tag == tag } }
        let d = app.done.first { $0.tag == tag }!
        app.done.removeAll { $0.tag == tag }
        guard let status = d.status else {
            throw ClientError(.transfer, "\(method) \(path): stream reset (\(H3Error.Code(rawValue: d.errorCode).resetReason))")
        }
        if status / 100 == 2 {
            if d.sinkErrno == EFBIG { throw ClientError(.transfer, "\(tooLarge()) (\(limit) bytes)") }
            if d.sinkErrno != 0 {
                throw ClientError(.io, "\(method) \(path): keeping the answer failed: \(String(cString: strerror(d.sinkErrno)))")
            }
            if d.errorCode != H3Error.noError {
                throw ClientError(
                    .transfer, "\(method) \(path): stream reset (\(H3Error.Code(rawValue: d.errorCode).resetReason)) after \(d.received) bytes")
            }
        }
        // What the memfd holds: at most the limit (an error's own), whatever `received` says.
        var bytes = [UInt8](repeating: 0, count: Int(min(d.received, status / 100 == 2 ? limit : ConnectionPool.errorBodyLimit)))
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        guard n >= 0, status / 100 != 2 || n == bytes.count else {
            throw ClientError(.io, "reading the response of \(method) \(path) back failed")
        }
        return (status, Array(bytes.prefix(n)))
    }

    /// Drives the connection for at most `nanoseconds`, or until `done` holds (a long-lived
    /// session, as the edge cache's origin fetcher keeps, has no overall deadline). Returns
    /// whether `done` held; throws only when the datapath fails.
    package func drive(forNanoseconds nanoseconds: UInt64, until done: () -> Bool) throws(ClientError) -> Bool {
        do { return try rig.worker.run(timeout: nanoseconds) { done() || app.connectionError != nil } } catch {
            throw ClientError(.transfer, "\(error)")
        }
    }

    package func close() {
        rig.close(connection)
        rig.queue.close()
    }
}

extension STOQClient {
    /// The object name and the node's base from `https://host:port/objects/<name>`.
    static func objectName(_ url: STOQURL) throws(ClientError) -> String {
        guard url.path.hasPrefix("/objects/"), url.path.count > 9 else {
            throw ClientError(.badURL, "\(url): a chunked transfer needs https://[ipv6]:port/objects/<name>")
        }
        return String(url.path.dropFirst(9))
    }

    /// Times a chunk or manifest PUT answered 503 (the node is busy) is sent again, a second
    /// apart.
    static let busyRetries = 5

    /// Uploads `file` as object `<name>` in chunks: chunks it locally, asks the node which
    /// chunks it lacks (POST /_stoq/missing), sends only those (PUT /chunks/<id>, several in
    /// flight; one the node answers 503 again a second later, up to `busyRetries` times), then
    /// the manifest (again a second later while the node answers 503, as many times: it is
    /// busy verifying other manifests, `limits` in docs/content.md).
    public static func putChunked(
        file: String, to url: STOQURL, parameters: ChunkingParameters, trust: ClientTrust,
        datapath: ClientDatapath,
        concurrency: Int = 16, timeout: Double = 600, headers: [(String, String)] = []
    ) throws(ClientError) -> ChunkedPutResult {
        let name = try objectName(url)
        let fd = open(file, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw ClientError(.io, "\(file): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let t0 = monotonicNow()
        let manifest: Manifest
        do { manifest = try Manifest(chunking: FileDescriptorSource(fd: fd), parameters: parameters) } catch {
            throw ClientError(.io, "\(file): \(error)")
        }
        var offsets: [UInt64] = []
        offsets.reserveCapacity(manifest.chunks.count)
        var at: UInt64 = 0
        for c in manifest.chunks { offsets.append(at); at += UInt64(c.length) }

        let session = try ClientSession(url, trust: trust, datapath: datapath, timeout: timeout)
        session.headers = headers
        defer { session.close() }
        var query = [UInt8]()
        query.reserveCapacity(manifest.chunks.count * 32)
        for c in manifest.chunks { query += c.id.bytes }
        // The ids the node lacks are some of those asked about: never more bytes than the query.
        let answer = try session.call(
            "POST", NodePaths.missing, body: BodyRegion(copying: query), limit: UInt64(query.count),
            tooLarge: "POST \(NodePaths.missing): the node's answer is longer than the query it answers")
        guard answer.status == 200, answer.body.count % 32 == 0 else {
            throw ClientError(.http, "POST /_stoq/missing: HTTP \(answer.status) \(String(decoding: answer.body.prefix(300), as: UTF8.self))")
        }
        var missing = Set<ContentDigest>()
        for i in stride(from: 0, to: answer.body.count, by: 32) { missing.insert(ContentDigest(Array(answer.body[i..<i + 32]))!) }

        // The first place each missing chunk occurs in the file, in file order.
        var sends: [Int] = []
        var queued = Set<ContentDigest>()
        for (i, c) in manifest.chunks.enumerated() where missing.contains(c.id) && queued.insert(c.id).inserted { sends.append(i) }
        var next = 0, inFlight = 0, bytesSent: UInt64 = 0
        // Chunks a busy node answered 503 (its memory for bodies is taken: `limits.body_memory`)
        // go again a second later, each at most `busyRetries` times, before any new one.
        var busy: [(chunk: Int, due: UInt64)] = [], tries: [Int: Int] = [:]
        while next < sends.count || inFlight > 0 || !busy.isEmpty {
            // The clock read once: a second read could pass `due` and underflow.
            if inFlight == 0, let due = busy.first?.due {
                let now = monotonicNow()
                if due > now { usleep(UInt32((due - now) / 1_000)) }
            }
            while (next < sends.count || busy.first.map { $0.due <= monotonicNow() } == true) && inFlight < concurrency {
                let i: Int
                if let b = busy.first, b.due <= monotonicNow() {
                    i = b.chunk
                    busy.removeFirst()
                } else {
                    i = sends[next]
                    next += 1
                }
                let length = Int(manifest.chunks[i].length)
                guard let region = readChunk(fd: fd, offset: offsets[i], length: length) else {
                    throw ClientError(
                        .io, "\(file): changed while it was sent: chunk \(i) (\(length) bytes at \(offsets[i])) cannot be read whole")
                }
                try session.submit("PUT", "/chunks/\(manifest.chunks[i].id.hex)", body: region, tag: i)
                inFlight += 1
            }
            if inFlight == 0 { continue }
            try session.run(until: { !session.app.done.isEmpty }) {
                "\(next - inFlight) of \(sends.count) missing chunks stored (\(bytesSent) bytes)"
            }
            for d in session.app.done {
                inFlight -= 1
                if d.status == 503, tries[d.tag, default: 0] < Self.busyRetries {
                    tries[d.tag, default: 0] += 1
                    busy.append((d.tag, monotonicNow() + 1_000_000_000))
                    continue
                }
                guard let status = d.status, status == 200 || status == 201 else {
                    throw ClientError(.http, "PUT /chunks/\(manifest.chunks[d.tag].id.hex): HTTP \(d.status.map(String.init) ?? "reset")")
                }
                bytesSent += UInt64(manifest.chunks[d.tag].length)
            }
            session.app.done.removeAll()
        }
        // The node answers 201 with no body, or an error whose message is all that is read.
        let encoded = manifest.encode()
        var stored = try putManifest(session, name, encoded)
        for _ in 0..<Self.busyRetries where stored.status == 503 {
            usleep(1_000_000)
            stored = try putManifest(session, name, encoded)
        }
        guard stored.status == 201 else {
            throw ClientError(.http, "PUT /manifests/\(name): HTTP \(stored.status) \(String(decoding: stored.body.prefix(500), as: UTF8.self))")
        }
        return ChunkedPutResult(
            chunks: manifest.chunks.count, chunksSent: sends.count, bytesSent: bytesSent,
            totalBytes: manifest.totalLength, seconds: Double(monotonicNow() - t0) / 1e9,
            sha256: manifest.digest.hex)
    }

    private static func putManifest(_ session: ClientSession, _ name: String, _ encoded: [UInt8]) throws(ClientError) -> (status: Int, body: [UInt8]) {
        let answer = try session.call(
            "PUT", "/manifests/\(name)", body: BodyRegion(copying: encoded), limit: ConnectionPool.errorBodyLimit,
            tooLarge: "PUT /manifests/\(name): the node's answer is longer than any this client reads")
        return (answer.status, answer.body)
    }

    /// Downloads object `<name>` in chunks into `output`: fetches the manifest, then the
    /// chunks (several in flight, each written in place at its offset and verified against
    /// its id). Work goes to `output.part`; a chunk already there and verified is not
    /// fetched again, so an interrupted download resumes. The finished file is checked
    /// against the manifest's digest, made durable and renamed into place. A server without a
    /// manifest of the object throws `ClientError.Code.noManifest`.
    public static func getChunked(
        _ url: STOQURL, output: String, trust: ClientTrust, datapath: ClientDatapath, concurrency: Int = 16,
        timeout: Double = 600, headers: [(String, String)] = []
    ) throws(ClientError) -> ChunkedGetResult {
        let name = try objectName(url)
        let t0 = monotonicNow()
        let session = try ClientSession(url, trust: trust, datapath: datapath, timeout: timeout)
        session.headers = headers
        defer { session.close() }
        // No node takes a manifest larger than `Manifest.maxListedSize`: a longer answer is
        // refused as it arrives, not held whole in memory first.
        let m = try session.call(
            "GET", "/manifests/\(name)", limit: UInt64(Manifest.maxListedSize),
            tooLarge: "the node's manifest for \(name) is larger than any manifest can be")
        guard m.status == 200 else {
            let why = "GET /manifests/\(name): HTTP \(m.status) \(String(decoding: m.body.prefix(300), as: UTF8.self))"
            throw ClientError(m.status == 404 ? .noManifest : .http, why)
        }
        let manifest: Manifest
        do { manifest = try Manifest(decoding: m.body) } catch { throw ClientError(.transfer, "the node's manifest for \(name): \(error)") }

        let part = output + ".part"
        // Never through a link planted at FILE.part: that would write chunks where it points.
        let fd = open(part, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw ClientError(.io, "\(part): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        fstat(fd, &st)
        let existing = UInt64(st.st_size)
        guard ftruncate(fd, off_t(manifest.totalLength)) == 0 else {
            throw ClientError(.io, "\(part): \(String(cString: strerror(errno)))")
        }

        // What a previous attempt already wrote and verifies stays.
        var offsets: [UInt64] = []
        var todo: [Int] = []
        var at: UInt64 = 0
        for (i, c) in manifest.chunks.enumerated() {
            offsets.append(at)
            if at + UInt64(c.length) <= existing, chunkVerifies(fd: fd, offset: at, length: Int(c.length), id: c.id) {
                // reused
            } else {
                todo.append(i)
            }
            at += UInt64(c.length)
        }
        var next = 0, inFlight = 0, bytesFetched: UInt64 = 0
        while next < todo.count || inFlight > 0 {
            while next < todo.count && inFlight < concurrency {
                let i = todo[next]
                // At most the chunk's length lands: a longer body would overwrite the next chunk.
                try session.submit(
                    "GET", "/chunks/\(manifest.chunks[i].id.hex)", sinkFD: fd, offset: offsets[i], limit: UInt64(manifest.chunks[i].length),
                    hash: true, tag: i)
                next += 1
                inFlight += 1
            }
            try session.run(until: { !session.app.done.isEmpty }) {
                "\(next - inFlight) of \(todo.count) chunks fetched (\(bytesFetched) bytes); run again to resume from \(part)"
            }
            for d in session.app.done {
                inFlight -= 1
                let c = manifest.chunks[d.tag]
                guard d.status == 200 else {
                    throw ClientError(.http, "GET /chunks/\(c.id.hex): HTTP \(d.status.map(String.init) ?? "reset")")
                }
                // This side's failure (a full disk), said before a short chunk is blamed on the node.
                if d.sinkErrno != 0 && d.sinkErrno != EFBIG {
                    throw ClientError(.io, "\(part): writing chunk \(c.id.hex) failed: \(String(cString: strerror(d.sinkErrno)))")
                }
                guard d.sinkErrno == 0, d.received == UInt64(c.length), let sha = d.sha256, sha == c.id.bytes else {
                    throw ClientError(.transfer, "chunk \(c.id.hex) from the node does not match its id (\(d.received) bytes)")
                }
                bytesFetched += d.received
            }
            session.app.done.removeAll()
        }
        let digest = fileDigest(fd: fd, length: manifest.totalLength)
        guard digest == manifest.digest else {
            throw ClientError(.transfer, "\(part): the assembled object's SHA-256 \(digest.hex) is not the manifest's \(manifest.digest.hex)")
        }
        guard fsync(fd) == 0 else { throw ClientError(.io, "\(part): fsync: \(String(cString: strerror(errno)))") }
        guard rename(part, output) == 0 else {
            throw ClientError(.io, "\(output): cannot put the object in place (from \(part)): \(String(cString: strerror(errno)))")
        }
        return ChunkedGetResult(
            chunks: manifest.chunks.count, chunksFetched: todo.count,
            chunksReused: manifest.chunks.count - todo.count, bytesFetched: bytesFetched,
            totalBytes: manifest.totalLength, seconds: Double(monotonicNow() - t0) / 1e9,
            sha256: digest.hex)
    }

    /// `length` bytes of `fd` from `offset`, copied (a chunk is at most
    /// `ChunkingParameters.maxSize`): nil when the file no longer has them all. A mapping
    /// would send straight from the page cache, and die of SIGBUS if the file shrank.
    static func readChunk(fd: Int32, offset: UInt64, length: Int) -> BodyRegion? {
        let p = UnsafeMutableRawPointer.allocate(byteCount: max(length, 1), alignment: 4096)
        var done = 0
        while done < length {
            let n = pread(fd, p + done, length - done, off_t(offset) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            done += n
        }
        guard done == length else {
            p.deallocate()
            return nil
        }
        return BodyRegion(base: UnsafeRawPointer(p), count: length) { p, _ in UnsafeMutableRawPointer(mutating: p)?.deallocate() }
    }

    static func chunkVerifies(fd: Int32, offset: UInt64, length: Int, id: ContentDigest) -> Bool {
        guard let region = BodyRegion.mapping(fd: fd, offset: offset, length: length) else { return false }
        return ContentDigest.sha256(UnsafeRawBufferPointer(start: region.base, count: region.count)) == id
    }

    static func fileDigest(fd: Int32, length: UInt64) -> ContentDigest {
        var h = SHA256()
        var at: UInt64 = 0
        while at < length {
            let n = Int(min(64 << 20, length - at))
            guard let region = BodyRegion.mapping(fd: fd, offset: at, length: n) else { break }
            h.update(bufferPointer: UnsafeRawBufferPointer(start: region.base, count: region.count))
            at += UInt64(n)
        }
        return ContentDigest(h.finalize())
    }
}

extension STOQClient {
    /// The most `fetch` keeps of an answer by default: 64 KiB, several times the largest a
    /// transparency log sends `stoq trust audit` (a consistency proof of a 2^63-entry log is
    /// at most 126 hashes, 8.5 KB of JSON; a tree head or a PEM key, a few hundred bytes).
    public static let fetchLimit: UInt64 = 64 << 10

    /// One GET whose response body comes back in memory: for small documents (transparency-log
    /// heads and proofs). A 2xx body longer than `limit` is refused as it arrives and throws;
    /// an error's is kept to its first `ConnectionPool.errorBodyLimit` bytes.
    public static func fetch(
        _ url: STOQURL, trust: ClientTrust, datapath: ClientDatapath, timeout: Double = 30, limit: UInt64 = fetchLimit
    ) throws(ClientError) -> (status: Int, body: [UInt8]) {
        let session = try ClientSession(url, trust: trust, datapath: datapath, timeout: timeout)
        defer { session.close() }
        return try session.call("GET", url.path, limit: limit, tooLarge: "GET \(url.path): the answer is larger than this client reads whole")
    }
}
