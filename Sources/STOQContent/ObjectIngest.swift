import Foundation
import Logging
import STOQChunking
import STOQEdge
import STOQStore

/// Dedup on ingest: a plain `PUT /objects/<name>`, once its body is complete, becomes a
/// chunked object exactly like one `stoq put --chunked` leaves — chunks in the node's
/// `ChunkStore` (each stored once), a manifest in the `ObjectIndex` under the object's name
/// — and the upload's temp file goes away. On when `chunking.dedup_enabled` is.
///
/// Chunking and hashing 256 MiB takes about a second, so it never runs on a worker: the
/// worker hands the finished upload over (`submit`), one of this pool's threads chunks it,
/// stores it and posts the outcome to that worker's `Inbox`, and the worker answers the
/// client (201 once the object is durable and indexed) when it drains the inbox between
/// batches. A client that went away meanwhile gets nothing, but its object is stored.
/// A large upload (announced at `followMinimum` or more, or sent without a length and past
/// it) is not waited for: a follower thread cuts and stores its body as the sink appends it
/// to the temp file (`follow`), so that by the end of the body only its last chunks remain.
///
/// Crash safety, step by step: the body is in `.upload-<random>` under `storage.path`
/// (removed at start if a crash leaves it); chunks are put (each crash-safe; a chunk no
/// object names is collected after the store's grace period); the object record is
/// replaced atomically (from here the new version is what `/manifests/` and `/objects/`
/// serve); then the flat file an earlier upload of the name may have left (it would shadow
/// the record) and the temp file are removed. A crash before the record leaves the old
/// version; after it, the new one: a flat copy a crash left beside a newer record is
/// removed when the pool starts (`removeShadowedFlatFiles`).
///
/// Thread-safe: workers call `submit` from their own threads.
public final class ObjectIngest: @unchecked Sendable {
    /// What ingesting one upload did, for the worker that received it.
    public struct Outcome: Sendable {
        /// The worker's ticket for the upload.
        public var ticket: UInt64
        /// Why the object was not stored (nil: it is stored and indexed).
        public var failure: String?
        /// The status that answers a failure: 500, 507 for a full disk (`failure` is then the
        /// message, naming the object), or the gate's refusal (412, 403, 409, 507).
        public var status = 500
        /// What was stored (zero on failure).
        public var report = Report()
    }

    /// What storing one object as chunks took.
    public struct Report: Sendable, Equatable {
        /// The object's length.
        public var bytes: UInt64 = 0
        /// Its chunks (repeats included).
        public var chunks = 0
        /// Chunks written, and their bytes: content the store did not have.
        public var newChunks = 0
        public var newBytes: UInt64 = 0
        /// Chunks the store already had (from another object, an earlier version, or earlier
        /// in this one), and their bytes: what deduplication saved.
        public var reusedChunks = 0
        public var reusedBytes: UInt64 = 0
        /// The manifest recorded under the object's name.
        public var manifest: [UInt8] = []

        /// All zero.
        public init() {}
    }

    /// One worker's finished ingests (posted from the pool's threads).
    public typealias Inbox = CompletionInbox<Outcome>

    struct Job {
        var fd: Int32
        var temp: String
        var name: String
        var ticket: UInt64
        var inbox: Inbox
        var gate: ObjectGate?
        var writer: ObjectGate.Writer?
        /// The upload's hold on `gate`'s limits: the commit turns it into usage; ended when the
        /// ingest ends otherwise.
        var hold: ObjectGate.Hold?
        /// Bytes `gate` reserved for the chunks (released once they are written).
        var reserved: UInt64
        /// The length is not known ahead: each chunk's room is reserved before it is put.
        var reservesChunks = false
        /// The body's SHA-256 as the sink computed it while writing, if it did.
        var digest: ContentDigest?
    }

    /// The store objects go to.
    public let index: ObjectIndex
    /// How objects are cut (the node's `[chunking]`).
    public let parameters: ChunkingParameters
    private let rootFD: Int32
    private let logger: Logger
    private let pool: WorkPool
    /// Followers running, and whether the pool is stopping (under `cond`).
    private let cond = NSCondition()
    private var followers = 0
    private var stopping = false

    /// Uploads announced at this length or more, or of unannounced length once this much has
    /// arrived, are ingested while they arrive (`follow`); below it a thread of their own costs
    /// more than the overlap saves.
    public static let followMinimum: UInt64 = 8 << 20
    /// At most this many uploads are followed at once; others are ingested once complete.
    /// A follower of a slow client sleeps on its thread for as long as the client takes.
    public static let maxFollowers = 8

    /// A pool of `threads` threads ingesting into `index`, cutting with `parameters`; uploads
    /// sit in `storagePath` (`storage.path`, where the flat files are).
    public init(index: ObjectIndex, parameters: ChunkingParameters, storagePath: String, threads: Int = 1, logger: Logger) throws {
        try FileManager.default.createDirectory(atPath: storagePath, withIntermediateDirectories: true)
        rootFD = open(storagePath, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard rootFD >= 0 else {
            throw StoreError(.io, "cannot open storage directory \(storagePath): \(String(cString: strerror(errno)))")
        }
        self.index = index
        self.parameters = parameters
        self.logger = logger
        pool = WorkPool(name: "stoq-ingest", threads: threads)
        let shadowed = removeShadowedFlatFiles()
        if !shadowed.isEmpty {
            logger.notice("removed flat copies older than their ingested objects: \(shadowed.joined(separator: ", "))")
        }
    }

    /// Removes every flat file in the storage directory that an object record of the same
    /// name is newer than: what a crash between an ingest's record and its removal of the
    /// older flat copy leaves (the flat file would keep serving the old version). A flat file
    /// newer than the record (stored while dedup was off, or put there by an operator) stays.
    /// Newer by status change time, which no copy keeps: `cp -a`, `rsync -a` and restores set
    /// a file's modification time to its source's, and an operator's newer file would go.
    /// Returns the names removed.
    func removeShadowedFlatFiles() -> [String] {
        guard let dir = fdopendir(dup(rootFD)) else { return [] }
        defer { closedir(dir) }
        var removed: [String] = []
        while let e = readdir(dir) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if Self.isShadowed(name, in: rootFD, by: index), unlinkat(rootFD, name, 0) == 0 { removed.append(name) }
        }
        if !removed.isEmpty { fsync(rootFD) }
        return removed.sorted()
    }

    /// Whether the flat file `name` in the storage directory `dirFD` is older than the object
    /// record of the same name in `index`: a copy an ingest meant to remove, which the next
    /// start does.
    static func isShadowed(_ name: String, in dirFD: Int32, by index: ObjectIndex) -> Bool {
        guard !name.hasPrefix("."), (try? ObjectIndex.validateName(name)) != nil else { return false }
        var flat = stat(), record = stat()
        // The record's file (the store's documented layout: <content>/objects/<name>).
        guard fstatat(dirFD, name, &flat, AT_SYMLINK_NOFOLLOW) == 0, (flat.st_mode & S_IFMT) == S_IFREG,
            stat(index.chunks.root + "/objects/" + name, &record) == 0
        else { return false }
        return record.st_ctim.tv_sec > flat.st_ctim.tv_sec
            || (record.st_ctim.tv_sec == flat.st_ctim.tv_sec && record.st_ctim.tv_nsec > flat.st_ctim.tv_nsec)
    }

    /// Takes over a finished upload: `fd` (readable, positioned anywhere; closed here) holds
    /// the body, `temp` is its name in the storage directory (removed here). The outcome is
    /// posted to `inbox` with `ticket`. With `gate`, the object is committed through it as
    /// `writer`'s, turning the upload's `hold` into usage (or ending it, however the ingest
    /// ends), and the `reserved` bytes are released once its chunks are written.
    /// `digest`: the body's SHA-256 if the sink already computed it (saves a pass over it).
    /// Called on a worker thread; returns at once.
    public func submit(
        fd: Int32, temp: String, name: String, ticket: UInt64, inbox: Inbox, gate: ObjectGate? = nil, writer: ObjectGate.Writer? = nil,
        hold: ObjectGate.Hold? = nil, reserved: UInt64 = 0, digest: ContentDigest? = nil
    ) {
        let job = Job(
            fd: fd, temp: temp, name: name, ticket: ticket, inbox: inbox, gate: gate, writer: writer, hold: hold, reserved: reserved,
            digest: digest)
        pool.submit { [self] in if let outcome = run(job) { inbox.post(outcome) } }
    }

    /// Starts ingesting an upload while it arrives, on a thread of its own, so that chunking
    /// and hashing overlap receiving instead of following it: `fd` (readable; closed here)
    /// is the upload's temp file `temp`, which the worker's body sink is still writing, in
    /// order. The follower cuts and stores what has landed, sleeping when it has caught up,
    /// until the worker says how the upload ended (`Follower.complete` or `abandon`, once).
    /// Complete, the object is committed as `submit` would and the outcome posted with
    /// `ticket`; abandoned, nothing is posted and what was stored is left to garbage
    /// collection (chunks no object names). `reserved` bytes of `gate` are released, and its
    /// `hold` ended if the commit did not take it, at the end either way. `sinkHashes`: the sink computes the body's SHA-256 (passed at
    /// `complete`), so the chunker need not. `reservesChunks` (an upload of unannounced
    /// length under a storage cap): the follower reserves each chunk's room in `gate` before
    /// putting it, and a refusal ends the ingest with it. Returns nil, taking nothing over,
    /// when `maxFollowers` uploads are being followed already or the pool is stopping.
    public func follow(
        fd: Int32, temp: String, name: String, ticket: UInt64, inbox: Inbox, gate: ObjectGate? = nil,
        writer: ObjectGate.Writer? = nil, hold: ObjectGate.Hold? = nil, reserved: UInt64 = 0, reservesChunks: Bool = false,
        sinkHashes: Bool
    ) -> Follower? {
        let admitted = cond.withLock {
            guard !stopping, followers < Self.maxFollowers else { return false }
            followers += 1
            return true
        }
        guard admitted else { return nil }
        let follower = Follower()
        let job = Job(
            fd: fd, temp: temp, name: name, ticket: ticket, inbox: inbox, gate: gate, writer: writer, hold: hold, reserved: reserved,
            reservesChunks: reservesChunks && gate != nil, digest: nil)
        let t = Thread { [self] in
            if let outcome = run(job, following: follower, sinkHashes: sinkHashes) { inbox.post(outcome) }
            cond.withLock {
                followers -= 1
                cond.broadcast()
            }
        }
        t.name = "stoq-ingest-follow"
        t.start()
        return follower
    }

    /// Lets the threads finish what was submitted, then end them (tests; a node's pool lives
    /// as long as the process).
    public func stop() {
        pool.stop()
        cond.withLock {
            stopping = true
            while followers > 0 { cond.wait() }
        }
    }

    deinit { close(rootFD) }

    /// Ingests `job`: the complete file, or with `follower` the file as it grows. Returns the
    /// outcome to post, or nil for an upload its worker abandoned.
    private func run(_ job: Job, following follower: Follower? = nil, sinkHashes: Bool = false) -> Outcome? {
        var reserved = job.reserved
        defer {
            close(job.fd)
            unlinkat(rootFD, job.temp, 0)
            if reserved > 0 { job.gate?.release(reserved) }
            job.gate?.end(job.hold)
        }
        // An upload of unannounced length takes each chunk's room as it comes.
        let reserve: ((Int) throws -> Void)? =
            job.reservesChunks
            ? { bytes in
                if let refusal = job.gate?.reserve(UInt64(bytes)) { throw refusal }
                reserved += UInt64(bytes)
            } : nil
        let t0 = DispatchTime.now().uptimeNanoseconds
        let result = Result {
            guard let follower else {
                return try Self.ingest(
                    fd: job.fd, as: job.name, into: index, parameters: parameters, gate: job.gate, writer: job.writer,
                    hold: job.hold, digest: job.digest)
            }
            let chunker = StreamingChunker(
                source: GrowingFileSource(fd: job.fd, follower: follower), parameters: parameters, digestObject: !sinkHashes)
            return try Self.store(
                chunker, as: job.name, into: index, sizeHint: 0, gate: job.gate, writer: job.writer, hold: job.hold, reserve: reserve
            ) { try follower.ending() }
        }
        // Whatever stopped a follower early, its worker has the last word: an abandoned upload
        // is answered by no one.
        if let follower, case .abandoned = follower.awaitVerdict() { return nil }
        do {
            let report = try result.get()
            // The record is durable: a flat copy of the name from before would shadow it.
            if unlinkat(rootFD, job.name, 0) == 0 { fsync(rootFD) }
            logger.debug(
                "upload ingested",
                metadata: [
                    "object": "\(job.name)", "bytes": "\(report.bytes)", "chunks": "\(report.chunks)",
                    "new_bytes": "\(report.newBytes)", "reused_bytes": "\(report.reusedBytes)",
                    "followed": "\(follower != nil)", "ms": "\((DispatchTime.now().uptimeNanoseconds - t0) / 1_000_000)",
                ])
            return Outcome(ticket: job.ticket, failure: nil, report: report)
        } catch let e as StoreError where e.code == .noSpace {
            // The store counted it and logs once per episode. The chunks put before it stay
            // until garbage collection (unreferenced, after the grace period) or a retry reuses them.
            return Outcome(ticket: job.ticket, failure: e.message, status: 507)
        } catch let r as ObjectGate.Refusal {
            return Outcome(ticket: job.ticket, failure: r.reason, status: r.status)
        } catch {
            logger.error("ingesting upload failed", metadata: ["object": "\(job.name)", "error": "\(error)"])
            return Outcome(ticket: job.ticket, failure: "\(error)")
        }
    }

    /// The ingest step: cuts the whole file open at `fd` (read from its start) with
    /// `parameters`, puts every chunk into `index`'s chunk store, and records the manifest
    /// under `name` (replacing any object of that name). Blocking; returns what was stored.
    /// With `gate`, the record is committed through it as `writer`'s (conditions, overwrite
    /// policy, writer quota; the chunks are already stored, charged to the cap only), and a
    /// refusal is thrown as the `ObjectGate.Refusal`; the commit takes the upload's `hold`.
    /// `digest` is the file's SHA-256 when the caller knows it; otherwise the chunker computes
    /// it alongside the chunks' ids.
    /// Throws the store's errors (`StoreError`), or a `ChunkSourceError` for a failed read.
    public static func ingest(
        fd: Int32, as name: String, into index: ObjectIndex, parameters: ChunkingParameters, gate: ObjectGate? = nil,
        writer: ObjectGate.Writer? = nil, hold: ObjectGate.Hold? = nil, digest known: ContentDigest? = nil
    ) throws -> Report {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw StoreError(.io, "fstat of the upload of \(name): \(String(cString: strerror(errno)))") }
        guard lseek(fd, 0, SEEK_SET) == 0 else {
            throw StoreError(.io, "lseek of the upload of \(name): \(String(cString: strerror(errno)))")
        }
        let size = UInt64(st.st_size)
        let chunker = StreamingChunker(source: FileDescriptorSource(fd: fd), parameters: parameters, digestObject: known == nil)
        return try store(chunker, as: name, into: index, sizeHint: size, gate: gate, writer: writer, hold: hold) { (size, known) }
    }

    /// Stores what `chunker` cuts as the object `name`: each chunk put from the chunker's
    /// buffer, the bytes its id was just computed from (so the store need not hash them
    /// again), then the record. `reserve`, when given, is asked for each chunk's room before
    /// it is put (and throws a refusal). `ending`, asked once the chunker has reached its
    /// source's end, says how long the object is and its SHA-256 if known (else the chunker's).
    /// `hold` (the upload's) covers the new chunks as they are stored (`ObjectGate.stored`), and
    /// the commit turns it into usage.
    static func store<Source: STOQChunking.ChunkSource>(
        _ chunker: StreamingChunker<Source>, as name: String, into index: ObjectIndex, sizeHint: UInt64, gate: ObjectGate?,
        writer: ObjectGate.Writer?, hold: ObjectGate.Hold? = nil, reserve: ((Int) throws -> Void)? = nil,
        ending: () throws -> (size: UInt64, digest: ContentDigest?)
    ) throws -> Report {
        try ObjectIndex.validateName(name)
        let parameters = chunker.parameters
        var report = Report()
        var ids: [ChunkID] = []
        ids.reserveCapacity(Int(min(sizeHint, 1 << 40)) / parameters.avgSize + 1)
        var written = 0  // bytes of new chunks put so far, for a full disk's message
        // However long the upload takes, garbage collection leaves its chunks until it ends.
        let pin = index.pinChunks()
        defer { index.unpin(pin) }
        func noSpace(_ e: StoreError) -> StoreError {
            StoreError.noSpace(storing: name, written: written, errno: e.message.hasPrefix("disk quota") ? EDQUOT : ENOSPC)
        }
        let entries: [Manifest.Entry]
        do {
            entries = try index.chunks.put(cutBy: chunker, sizeHint: sizeHint, reserve: reserve) { id, bytes, put in
                let length = bytes.count
                ids.append(id)
                pin.add(id)
                switch put {
                case .stored:
                    written += length
                    report.newChunks += 1
                    report.newBytes += UInt64(length)
                    // Inside the upload's hold from here, not counted again as stored.
                    if let hold { gate?.stored(UInt64(length), by: hold) }
                case .alreadyPresent:
                    report.reusedChunks += 1
                    report.reusedBytes += UInt64(length)
                }
            }
        } catch let e as StoreError where e.code == .noSpace {
            throw noSpace(e)
        }
        let (size, known) = try ending()
        guard chunker.bytesConsumed == size, let digest = known ?? chunker.objectDigest else {
            throw StoreError(.io, "the upload of \(name) changed size while it was ingested (\(chunker.bytesConsumed) of \(size) bytes)")
        }
        let manifest: Manifest
        do { manifest = try Manifest(totalLength: size, digest: digest, parameters: parameters, chunks: entries) } catch {
            throw StoreError(.io, "the manifest of \(name): \(error)")
        }
        report.manifest = manifest.encode()
        do {
            if let gate, let writer {
                let encoded = report.manifest
                let put = { try index.putObject(name, manifest: encoded, chunkIDs: ids, owner: writer.identity) }
                if let refusal = try gate.commit(name, by: writer, size: size, physical: 0, chunked: true, hold: hold, write: put) {
                    throw refusal
                }
            } else {
                try index.putObject(name, manifest: report.manifest, chunkIDs: ids)
            }
        } catch let e as StoreError where e.code == .noSpace {
            throw noSpace(e)
        }
        report.bytes = size
        report.chunks = entries.count
        return report
    }
}

extension ObjectIngest {
    /// The worker's side of an upload being followed (`ObjectIngest.follow`): how it ended,
    /// said once, from the worker's thread.
    public final class Follower: @unchecked Sendable {
        enum Verdict {
            case pending
            case complete(size: UInt64, digest: ContentDigest?)
            case abandoned
        }
        /// Thrown to the chunker when the worker abandoned the upload.
        struct Abandoned: Error {}

        private let cond = NSCondition()
        private var verdict = Verdict.pending

        /// Every byte of the body has landed in the file (`size` of them) and the worker
        /// accepted it: commit it. `digest`: the body's SHA-256, if the sink computed it.
        public func complete(size: UInt64, digest: ContentDigest?) { say(.complete(size: size, digest: digest)) }

        /// The upload will not be stored (aborted, too large, refused, a write failed).
        public func abandon() { say(.abandoned) }

        private func say(_ v: Verdict) {
            cond.withLock {
                guard case .pending = verdict else { return }
                verdict = v
                cond.broadcast()
            }
        }

        /// The verdict, waiting at most `nanoseconds` for one while there is none.
        func verdict(waitingUpTo nanoseconds: UInt64) -> Verdict {
            cond.withLock {
                if case .pending = verdict {
                    _ = cond.wait(until: Date(timeIntervalSinceNow: Double(nanoseconds) / 1e9))
                }
                return verdict
            }
        }

        /// The verdict, once there is one.
        func awaitVerdict() -> Verdict {
            cond.withLock {
                while case .pending = verdict { cond.wait() }
                return verdict
            }
        }

        /// The object's length and the sink's digest, for a completed upload.
        func ending() throws -> (size: UInt64, digest: ContentDigest?) {
            guard case .complete(let size, let digest) = awaitVerdict() else { throw Abandoned() }
            return (size, digest)
        }
    }

    /// Reads an upload's temp file while the body sink is still appending to it. The sink
    /// writes in order from one thread, and a read never returns bytes past the file's size,
    /// so what a read returns is final. Caught up, it sleeps (0.25 ms at first, doubling to
    /// 16 ms while nothing arrives) until more has landed or the worker's verdict says the
    /// file is complete (then it reads to the end) or abandoned (then it throws).
    struct GrowingFileSource: STOQChunking.ChunkSource {
        let fd: Int32
        let follower: Follower
        private var offset: off_t = 0
        private static let firstNap: UInt64 = 250_000, longestNap: UInt64 = 16_000_000

        init(fd: Int32, follower: Follower) {
            self.fd = fd
            self.follower = follower
        }

        mutating func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
            var nap = Self.firstNap, complete = false
            while true {
                let n = pread(fd, buffer.baseAddress, buffer.count, offset)
                if n > 0 {
                    offset += off_t(n)
                    return n
                }
                if n < 0 {
                    if errno == EINTR { continue }
                    throw ChunkSourceError(errno: errno, call: "pread")
                }
                if complete { return 0 }
                switch follower.verdict(waitingUpTo: nap) {
                case .pending: nap = min(nap * 2, Self.longestNap)
                case .abandoned: throw Follower.Abandoned()
                // Every write landed before the verdict: reading again sees the rest.
                case .complete: complete = true
                }
            }
        }
    }
}
