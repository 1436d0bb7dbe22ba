import Foundation
import Logging
import STOQChunking
import STOQCore
import STOQQUIC
import STOQStore

/// Serves `/objects/<name>` from one directory: GET/HEAD (with a single `Range`)
/// zero-copy from an mmap of the file, and PUT stored atomically (temp file, fsync,
/// rename, directory fsync) so that an interrupted upload leaves nothing visible.
/// With an `ObjectIngest` (`chunking.dedup_enabled`), a finished upload is chunked into the
/// content store instead, off this thread, and answered when it is durable and indexed.
/// `DELETE` removes the object (plain or chunked). Every write and delete commits through
/// the node's `ObjectGate` when it has one: `If-Match`/`If-None-Match`, `access.overwrite`
/// and the quotas; responses carry the object's strong `ETag` (its content's SHA-256).
/// A full disk at any step (the temp file, its fsync, the rename, the ingest's chunks or
/// record) answers `507 Insufficient Storage` naming the object and the bytes written, removes
/// the temp file and leaves the object as it was.
/// One instance per worker; it runs on that worker's thread only.
public final class ObjectService: QUICApplication {
    struct Upload {
        var fd: Int32
        var temp: String
        var name: String
        /// Who uploads, under what conditions (nil without a gate).
        var writer: ObjectGate.Writer?
        /// The body sink stops at the room the quotas leave (`ObjectGate.Hold.limit`) when that
        /// is below `storage.max_object_size`: EFBIG then means 507, not 413.
        var quotaLimit: UInt64?
        /// What the upload holds of the quotas while it runs (nil: the node has none), and how
        /// many bytes: it ends with the upload, at the commit or when the upload is discarded.
        var hold: ObjectGate.Hold?
        var held: UInt64 = 0
        /// Of unannounced length under a quota: the hold grows as the body reaches `held`.
        var growing = false
        /// Of unannounced length with dedup on: followed by the ingest once it reaches
        /// `ObjectIngest.followMinimum` (tried once).
        var followPending = false
        /// The ingest following the upload as it arrives (large uploads, with dedup on), and
        /// the ticket its outcome will carry.
        var follower: ObjectIngest.Follower?
        var ticket: UInt64 = 0
    }

    /// What the service counted.
    public struct Counters: Sendable {
        /// HTTP requests the node was given (counted by `NodeRouter`, for every service).
        public var requests: UInt64 = 0
        public var badRequests: UInt64 = 0
        public var notFound: UInt64 = 0
        public var uploadsStored: UInt64 = 0
        public var uploadsAborted: UInt64 = 0
        /// Uploads refused with 507 because the disk was full (also in `uploadsAborted`).
        public var uploadsNoSpace: UInt64 = 0
        /// Uploads chunked into the content store (dedup on ingest), and those that failed.
        public var ingests: UInt64 = 0
        public var ingestFailures: UInt64 = 0
        /// Uploads whose ingest started while they arrived (`ObjectIngest.follow`), however
        /// they ended.
        public var ingestsFollowed: UInt64 = 0
        /// Bytes of the ingested objects; of those, bytes of chunks written (new to the
        /// store) and of chunks the store already had (deduplicated).
        public var ingestBytes: UInt64 = 0
        public var ingestNewBytes: UInt64 = 0
        public var ingestDedupBytes: UInt64 = 0
    }

    private let rootFD: Int32
    private let maxObjectSize: UInt64
    private let logger: Logger
    private var uploads: [HTTPStream: Upload] = [:]
    public private(set) var counters = Counters()
    /// Where finished uploads are chunked (nil: they are stored as flat files).
    private let ingest: ObjectIngest?
    /// This worker's finished ingests; the worker drains it (`drainIngest`) between batches.
    package let ingestInbox = ObjectIngest.Inbox()
    /// Uploads being ingested, by ticket: whom to answer.
    private var ingesting: [UInt64: (stream: HTTPStream, connection: QUICConnection)] = [:]
    private var nextTicket: UInt64 = 1
    private var outcomes: [ObjectIngest.Outcome] = []
    /// Where uploads refused for want of space are counted (the node's, shared by every writer).
    private let diskFull: DiskFullMonitor
    /// Conditions, overwrite policy and quotas for writes (nil: none; tests).
    package var gate: ObjectGate?

    /// Serves from `root` (created if missing); with `ingest`, uploads become chunked objects.
    /// `diskFull` counts uploads refused for want of space (default: the ingest's store's).
    public init(root: String, maxObjectSize: UInt64, logger: Logger, ingest: ObjectIngest? = nil, diskFull: DiskFullMonitor? = nil) throws {
        self.diskFull = diskFull ?? ingest?.index.chunks.diskFull ?? DiskFullMonitor(logger: logger)
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        rootFD = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard rootFD >= 0 else { throw NodeError(.storage, "cannot open storage directory \(root): \(String(cString: strerror(errno)))") }
        self.maxObjectSize = maxObjectSize
        self.logger = logger
        self.ingest = ingest
    }

    deinit {
        for u in uploads.values { discard(u) }
        close(rootFD)
    }

    /// Removes temp files left by uploads a crash interrupted.
    public static func removeStaleUploads(in root: String) -> Int {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []
        var n = 0
        for name in names where name.hasPrefix(".upload-") {
            if unlink(root + "/" + name) == 0 { n += 1 }
        }
        return n
    }

    /// The object `/objects/<name>` names, or why it names none: names are the store's
    /// (`ObjectIndex.validateName`: 1 to 255 bytes of `[A-Za-z0-9._-]`, not starting with a
    /// dot), one path segment, so nothing a client sends can name a file outside the storage
    /// directory. Nil for a path outside `/objects/`.
    static func objectName(checking path: String) -> Result<String, StoreError>? {
        guard path.hasPrefix("/objects/") else { return nil }
        let name = String(path.dropFirst("/objects/".count).prefix { $0 != "?" })
        do { try ObjectIndex.validateName(name) } catch { return .failure(error) }
        return .success(name)
    }

    /// The object `/objects/<name>` names (nil: none, or not an object path).
    static func objectName(fromPath path: String) -> String? { try? objectName(checking: path)?.get() }

    /// Whether `/objects/<name>` names a plain file here (else the content store may have it).
    func hasFile(_ name: String) -> Bool {
        var st = stat()
        return fstatat(rootFD, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && (st.st_mode & S_IFMT) == S_IFREG
    }

    /// The request's `Range` against `size` (HTTPRange's rules): the range, `nil` for "no range",
    /// or why it cannot be served.
    static func parseRange(_ header: String, size: UInt64) -> Result<ClosedRange<UInt64>, RangeError>? {
        HTTPRange.resolve(header, size: size)
    }

    typealias RangeError = HTTPRangeError

    /// The head of a response to GET/HEAD of an object of `size` bytes whose ETag is `etag`,
    /// with the request's conditions and `Range`: status, headers (content-length, `etag` and
    /// `cacheControl` included) and the byte range to send (nil: none). Answers itself and
    /// returns nil when there is nothing to send: 304 (with `etag` and `cacheControl`) for a
    /// matching `If-None-Match`, 412 for a failing `If-Match`, 416 or 400 for a range that
    /// cannot be served.
    static func bodyHead(
        size: UInt64, etag: String, cacheControl: (String, String)? = nil, request: HTTPRequest, stream: HTTPStream,
        connection: QUICConnection, fail: (Int, String) -> Void
    ) -> (status: Int, headers: [(String, String)], range: ClosedRange<UInt64>?)? {
        let validators = [("etag", etag)] + (cacheControl.map { [$0] } ?? [])
        switch ObjectGate.readPrecondition(ifMatch: request.ifMatch, ifNoneMatch: request.ifNoneMatch, current: etag) {
        case nil: break
        case (304, _)?:
            connection.respond(stream, status: 304, headers: validators, body: nil)
            return nil
        case (let status, let why)?:
            fail(status, "precondition failed: \(why)")
            return nil
        }
        var status = 200
        var range = size == 0 ? nil : Optional(0...(size - 1))
        var headers = [("accept-ranges", "bytes")]
        switch parseRange(request.range, size: size) {
        case nil: break
        case .success(let r):
            status = 206
            range = r
            headers.append(("content-range", "bytes \(r.lowerBound)-\(r.upperBound)/\(size)"))
        case .failure(let e) where e.code == .unsatisfiable:
            connection.respond(stream, status: 416, headers: [("content-range", "bytes */\(size)")], body: nil)
            return nil
        case .failure(let e):
            fail(400, e.message)
            return nil
        }
        headers.append(("content-length", "\(range.map { $0.upperBound - $0.lowerBound + 1 } ?? 0)"))
        return (status, headers + validators, range)
    }

    /// One more HTTP request reached the node (`NodeRouter` counts every one, whichever service answers it).
    func countRequest() { counters.requests &+= 1 }

    public func request(_ request: HTTPRequest, stream: HTTPStream, connection: QUICConnection) {
        if let refused = request.refusal { return refuse(refused, stream: stream, connection: connection) }
        let name: String
        switch Self.objectName(checking: request.path) {
        case .success(let n)?: name = n
        case .failure(let why)?: return fail(stream, connection, 400, "bad object path \(request.path.prefix(200)): \(why)")
        case nil: return fail(stream, connection, 404, "bad object path \(request.path.prefix(200))")
        }
        switch request.method {
        case "GET", "HEAD": serve(name, request, stream, connection)
        case "PUT": beginUpload(name, request, stream, connection)
        case "DELETE": delete(name, request, stream, connection)
        default:
            connection.respond(stream, status: 405, headers: [("allow", "GET, HEAD, PUT, DELETE")], body: nil)
        }
    }

    /// Answers a head refused as it was parsed (`HTTPRequest.refusal`) with its status and
    /// reason, counted as a bad request: the one answer every service's refused head gets.
    func refuse(_ refusal: HTTPRefusal, stream: HTTPStream, connection: QUICConnection) {
        fail(stream, connection, refusal.status, refusal.reason)
    }

    private func fail(_ stream: HTTPStream, _ connection: QUICConnection, _ status: Int, _ why: String) {
        if status == 404 { counters.notFound += 1 } else { counters.badRequests += 1 }
        logger.debug("request refused", metadata: ["status": "\(status)", "reason": "\(why)"])
        let body = BodyRegion(copying: Array("\(why)\n".utf8))
        connection.respond(
            stream, status: status,
            headers: [("content-type", "text/plain"), ("content-length", "\(body.count)")], body: body)
    }

    private func serve(_ name: String, _ request: HTTPRequest, _ stream: HTTPStream, _ connection: QUICConnection) {
        let fd = openat(rootFD, name, StoredFile.readFlags)
        guard fd >= 0 else { return fail(stream, connection, 404, "no object \(name)") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { return fail(stream, connection, 500, "fstat of \(name): \(String(cString: strerror(errno)))") }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            return fail(
                stream, connection, 404,
                "no object \(name): storage.path holds \(StoreError.fileKind(st.st_mode)) of that name, and only regular files are served")
        }
        let plain = ObjectGate.plainFile(fd, st)
        if !plain.digested { gate?.digests.request(name, st) }
        guard
            let (status, headers, range) = Self.bodyHead(
                size: UInt64(st.st_size), etag: plain.etag,
                request: request, stream: stream, connection: connection, fail: { fail(stream, connection, $0, $1) })
        else { return }
        let length = range.map { Int($0.upperBound - $0.lowerBound + 1) } ?? 0
        if request.method == "HEAD" {
            connection.respond(stream, status: status, headers: headers, body: nil)
            return
        }
        guard let region = BodyRegion.mapping(fd: fd, offset: range?.lowerBound ?? 0, length: length) else {
            let e = errno
            let why = e == EBUSY ? "the SIGBUS guard holds \(BodyRegion.guardedMappingsMax) mappings" : String(cString: strerror(e))
            // Room for mappings (the guard's, vm.max_map_count) comes back as responses end.
            if e == EBUSY || e == ENOMEM {
                return fail(stream, connection, 503, "cannot map \(name) now (\(why)): too many responses are being sent from files at once; try again")
            }
            return fail(stream, connection, 500, "cannot map \(name): \(why)")
        }
        connection.respond(stream, status: status, headers: headers, body: region)
    }

    private func beginUpload(_ name: String, _ request: HTTPRequest, _ stream: HTTPStream, _ connection: QUICConnection) {
        if let n = request.contentLength, UInt64(n) > maxObjectSize {
            return fail(stream, connection, 413, "object larger than storage.max_object_size (\(maxObjectSize) bytes)")
        }
        let writer = gate?.writer(request, peer: connection.peer)
        var limit = maxObjectSize
        var hold: ObjectGate.Hold?
        if let gate, let writer {
            // A head without a body is an empty upload; a body without a length grows its hold.
            let n = request.contentLength.map { UInt64($0) } ?? (request.hasBody ? nil : 0)
            switch gate.hold(name, by: writer, size: n) {
            case .failure(let r): return fail(stream, connection, r.status, r.reason)
            case .success(let h?):
                hold = h
                // Nothing left to hold for a body of unannounced length: its first byte is refused.
                limit = min(limit, n == nil && h.bytes == 0 ? 0 : h.limit)
            case .success(nil): break
            }
        }
        let temp = ".upload-\(UInt64.random(in: 0...UInt64.max))"
        let fd = openat(rootFD, temp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            let e = errno
            gate?.end(hold)
            // No inode left is a full disk too.
            if StoreError.isNoSpace(e) { return noSpace(stream, connection, name, written: 0, errno: e) }
            return fail(stream, connection, 500, "cannot create upload file: \(String(cString: strerror(e)))")
        }
        var up = Upload(fd: fd, temp: temp, name: name, writer: writer, quotaLimit: limit < maxObjectSize ? limit : nil)
        if let hold {
            (up.hold, up.held) = (hold, hold.bytes)
            up.growing = request.contentLength == nil && request.hasBody && hold.bytes > 0
        }
        if let n = request.contentLength, UInt64(n) >= ObjectIngest.followMinimum, let ingest {
            if let r = follow(&up, size: UInt64(n), ingest: ingest) {
                discard(up)
                return fail(stream, connection, r.status, r.reason)
            }
        }
        // A body of unannounced length is followed once it proves large, and grows its hold
        // as it arrives (`bodyReachedMark`).
        up.followPending = request.contentLength == nil && request.hasBody && ingest != nil
        uploads[stream] = up
        // Hashed as it arrives: the SHA-256 is the object's ETag.
        stream.setBodySink(fd: fd, limit: limit, hash: gate != nil)
        stream.setBodyMark(Self.nextMark(up))
        if !request.hasBody { requestEnded(stream: stream, connection: connection, aborted: false) }
    }

    /// Where the body of `up` next needs the worker (0: nowhere): where its hold must grow,
    /// or where the ingest starts following it, whichever comes first.
    static func nextMark(_ up: Upload) -> UInt64 {
        let mark = min(up.growing ? up.held : .max, up.followPending ? ObjectIngest.followMinimum : .max)
        return mark == .max ? 0 : mark
    }

    /// An upload sent without a content-length reached its mark (`nextMark`). Past what it
    /// holds, its hold grows (`ObjectGate.grow`); when nothing is left to grow into, the sink's
    /// limit comes down to what it received, so that its next byte is refused (507, saying
    /// what the other uploads held then). Past
    /// `ObjectIngest.followMinimum`, it is followed from here like one announced that large
    /// (with no quota or cap, the room under the cap is then reserved chunk by chunk).
    public func bodyReachedMark(stream: HTTPStream, connection: QUICConnection) {
        guard var up = uploads[stream] else { return }
        let received = stream.bytesReceived
        if up.growing, received >= up.held, let gate, let hold = up.hold {
            switch gate.grow(hold, received: received) {
            case .success(let bytes): up.held = bytes
            case .failure:
                (up.held, up.growing) = (received, false)
                // Setting the sink again waits for its queued writes (at most a stream window):
                // once per upload, when it runs out of room.
                if up.quotaLimit.map({ $0 > received }) ?? true {
                    up.quotaLimit = received
                    stream.setBodySink(fd: up.fd, limit: received, hash: true)
                }
            }
        }
        if up.followPending, received >= ObjectIngest.followMinimum, let ingest {
            up.followPending = false
            if up.follower == nil { _ = follow(&up, size: nil, ingest: ingest) }
        }
        uploads[stream] = up
        stream.setBodyMark(Self.nextMark(up))
    }

    /// Hands a large upload to the ingest pool, so that it is chunked while it arrives
    /// (`ObjectIngest.follow`). Its hold (any quota or cap) covers the chunks until the commit;
    /// without one (no gate; tests), room under the storage cap is reserved for its announced
    /// `size` until the chunks are written (nil: not announced; the follower reserves each
    /// chunk's room as it goes). The gate's refusal when the cap has no room for it. Nil with
    /// nothing started when the pool follows as many uploads as it may: this one is then
    /// ingested once complete.
    private func follow(_ up: inout Upload, size: UInt64?, ingest: ObjectIngest) -> ObjectGate.Refusal? {
        var reserved: UInt64 = 0
        let capped = up.hold == nil && (gate?.settings.storageCap ?? 0) > 0
        if capped, let size, let gate {
            if let r = gate.reserve(size) { return r }
            reserved = size
        }
        let copy = dup(up.fd)
        if copy >= 0,
            let follower = ingest.follow(
                fd: copy, temp: up.temp, name: up.name, ticket: nextTicket, inbox: ingestInbox, gate: gate, writer: up.writer,
                hold: up.hold, reserved: reserved, reservesChunks: capped && size == nil, sinkHashes: gate != nil)
        {
            up.follower = follower
            up.ticket = nextTicket
            nextTicket += 1
            counters.ingestsFollowed += 1
            return nil
        }
        if copy >= 0 { close(copy) }
        if reserved > 0 { gate?.release(reserved) }
        return nil
    }

    public func requestEnded(stream: HTTPStream, connection: QUICConnection, aborted: Bool) {
        guard let up = uploads.removeValue(forKey: stream) else { return }
        if aborted || stream.sinkErrno != 0 {
            let written = Self.size(up.fd)
            // The body passed the sink's limit: a quota's room (why: asked while the upload
            // still holds its bytes), or storage.max_object_size.
            var over: ObjectGate.Refusal?
            if !aborted, stream.sinkErrno == EFBIG, let limit = up.quotaLimit, let gate, let w = up.writer {
                over = gate.overHeadroom(up.name, by: w, limit: limit, hold: up.hold)
            }
            discard(up)
            counters.uploadsAborted += 1
            if aborted { return }
            if stream.sinkErrno == EFBIG {
                guard let r = over else {
                    return fail(stream, connection, 413, "object larger than storage.max_object_size (\(maxObjectSize) bytes)")
                }
                return fail(stream, connection, r.status, r.reason)
            }
            if StoreError.isNoSpace(stream.sinkErrno) {
                return noSpace(stream, connection, up.name, written: written, errno: stream.sinkErrno)
            }
            fail(stream, connection, 500, "storing the upload failed: \(String(cString: strerror(stream.sinkErrno)))")
            return
        }
        let size = stream.bytesReceived
        // A request with no body at all ends before the sink ever finishes a digest: its
        // SHA-256 is that of nothing.
        let digest = stream.bodySHA256() ?? (size == 0 ? Self.emptySHA256 : nil)
        if let ingest {
            // Before the pool writes chunks: the conditions and the limits now (the commit
            // decides); the hold, now exactly the body's length, covers the chunks until the
            // commit. Without a hold no limit applies.
            if let gate, let w = up.writer {
                let refusal = up.hold.map { gate.settle($0, up.name, by: w, size: size) } ?? gate.check(up.name, by: w, size: size, physical: nil)
                if let r = refusal {
                    discard(up)
                    counters.uploadsAborted += 1
                    return fail(stream, connection, r.status, r.reason)
                }
            }
            // The pool owns the file from here; the answer comes when it posts the outcome.
            if let follower = up.follower {
                ingesting[up.ticket] = (stream, connection)
                close(up.fd)
                follower.complete(size: size, digest: digest.flatMap(ContentDigest.init))
                return
            }
            let ticket = nextTicket
            nextTicket += 1
            ingesting[ticket] = (stream, connection)
            ingest.submit(
                fd: up.fd, temp: up.temp, name: up.name, ticket: ticket, inbox: ingestInbox, gate: gate, writer: up.writer,
                hold: up.hold, digest: digest.flatMap(ContentDigest.init))
            return
        }
        var headers = [("content-length", "0")]
        // Durable before visible: data, then the name, then the directory entry.
        let written = Self.size(up.fd)
        var failed: Int32 = 0
        if let w = up.writer, let sha = digest {
            headers.append(("etag", ContentETag.of(sha256Hex: Hex.encode(sha))))
            if !ObjectGate.writeMeta(up.fd, sha256: sha, owner: w.identity) {
                let e = errno
                if e == ENOTSUP || e == EOPNOTSUPP {
                    logger.warning("cannot keep the owner of \(up.name): the storage filesystem has no user xattrs (\(String(cString: strerror(e))))")
                } else {
                    // A full disk (or quota) refuses the attribute like the data: stored without
                    // it, the object would have no owner and not the ETag the 201 names.
                    failed = e
                }
            }
        }
        if failed == 0, fsync(up.fd) != 0 { failed = errno }
        // Closed once, whatever happened: closing it again (`discard`) could close a file
        // another thread opened under the same number since.
        if close(up.fd) != 0, failed == 0 { failed = errno }
        guard failed == 0 else {
            let e = failed
            up.follower?.abandon()
            gate?.end(up.hold)
            unlinkat(rootFD, up.temp, 0)
            counters.uploadsAborted += 1
            if StoreError.isNoSpace(e) { return noSpace(stream, connection, up.name, written: written, errno: e) }
            return fail(stream, connection, 500, "storing the upload failed: \(String(cString: strerror(e)))")
        }
        var renameErrno: Int32 = 0
        let rename = { [rootFD] in
            guard renameat(rootFD, up.temp, rootFD, up.name) == 0 else {
                renameErrno = errno
                throw StoreError(.io, "storing the upload failed: \(String(cString: strerror(errno)))")
            }
        }
        do {
            if let gate, let w = up.writer {
                if let r = try gate.commit(up.name, by: w, size: size, physical: size, hold: up.hold, write: rename) {
                    unlinkat(rootFD, up.temp, 0)
                    counters.uploadsAborted += 1
                    return fail(stream, connection, r.status, r.reason)
                }
            } else {
                try rename()
            }
        } catch {
            unlinkat(rootFD, up.temp, 0)
            counters.uploadsAborted += 1
            if StoreError.isNoSpace(renameErrno) { return noSpace(stream, connection, up.name, written: written, errno: renameErrno) }
            return fail(stream, connection, 500, "\(error)")
        }
        guard fsync(rootFD) == 0 else {
            // The object is in place but may not survive a crash: not a 201.
            let e = errno
            return fail(stream, connection, 500, "fsync of the storage directory: \(String(cString: strerror(e))) (errno \(e))")
        }
        diskFull.stored()
        counters.uploadsStored += 1
        connection.respond(stream, status: 201, headers: headers, body: nil)
    }

    /// `DELETE /objects/<name>`: the plain file and the chunked object of the name, through
    /// the gate (conditions, overwrite policy); 204, or 404 when there is neither.
    private func delete(_ name: String, _ request: HTTPRequest, _ stream: HTTPStream, _ connection: QUICConnection) {
        guard let gate else {
            connection.respond(stream, status: 405, headers: [("allow", "GET, HEAD, PUT")], body: nil)
            return
        }
        do {
            if let r = try gate.delete(name, by: gate.writer(request, peer: connection.peer)) {
                return fail(stream, connection, r.status, r.reason)
            }
        } catch { return fail(stream, connection, 500, "deleting \(name) failed: \(error)") }
        connection.respond(stream, status: 204, headers: [], body: nil)
    }

    public func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) {
        if let up = uploads.removeValue(forKey: stream) {
            discard(up)
            counters.uploadsAborted += 1
        }
        // An upload being ingested is still stored; there is just no one left to tell.
        if !ingesting.isEmpty { ingesting = ingesting.filter { $0.value.stream != stream } }
    }

    /// Forgets whom to answer on `connection` (it is gone).
    package func connectionClosed(_ connection: QUICConnection) {
        if !ingesting.isEmpty { ingesting = ingesting.filter { $0.value.connection !== connection } }
    }

    /// Answers the uploads whose ingest finished (called by the worker between batches).
    package func drainIngest() {
        ingestInbox.drain(into: &outcomes)
        guard !outcomes.isEmpty else { return }
        for o in outcomes {
            let wait = ingesting.removeValue(forKey: o.ticket)
            if let failure = o.failure {
                if o.status == 500 { counters.ingestFailures += 1 }
                counters.uploadsAborted += 1
                if o.status == 507 { counters.uploadsNoSpace += 1 }
                // A full disk was counted by the store, and its message names the object.
                if let wait {
                    fail(wait.stream, wait.connection, o.status, o.status == 500 ? "storing the upload failed: \(failure)" : failure)
                }
                continue
            }
            counters.ingests += 1
            counters.uploadsStored += 1
            counters.ingestBytes += o.report.bytes
            counters.ingestNewBytes += o.report.newBytes
            counters.ingestDedupBytes += o.report.reusedBytes
            var headers = [("content-length", "0")]
            if let m = try? Manifest(decoding: o.report.manifest) { headers.append(("etag", m.etag)) }
            if let wait { wait.connection.respond(wait.stream, status: 201, headers: headers, body: nil) }
        }
        outcomes.removeAll(keepingCapacity: true)
    }

    /// 507 for an upload the disk had no room for (counted, and logged once per episode).
    private func noSpace(_ stream: HTTPStream, _ connection: QUICConnection, _ name: String, written: Int, errno e: Int32) {
        let refusal = StoreError.noSpace(storing: name, written: written, errno: e)
        diskFull.refused(refusal.message)
        counters.uploadsNoSpace += 1
        fail(stream, connection, 507, refusal.message)
    }

    /// The SHA-256 of no bytes: the digest of an empty upload.
    static let emptySHA256 = ContentDigest.sha256([]).bytes

    /// The size of the open file `fd` (what an upload wrote so far).
    private static func size(_ fd: Int32) -> Int {
        var st = stat()
        return fstat(fd, &st) == 0 ? Int(st.st_size) : 0
    }

    /// Drops an upload that will not be stored: its follower (if any) is told, its hold ends,
    /// its temp file goes.
    private func discard(_ up: Upload) {
        up.follower?.abandon()
        gate?.end(up.hold)
        close(up.fd)
        unlinkat(rootFD, up.temp, 0)
    }
}
