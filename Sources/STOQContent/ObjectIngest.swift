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
        /// Bytes `gate` reserved for the chunks (released once they are written).
        var reserved: UInt64
        /// The body's SHA-256 as the sink computed it while writing, if it did.
        var digest: ContentDigest?
    }

    /// The store objects go to.
    public let index: ObjectIndex
    /// How objects are cut (the node's `[chunking]`).
    public let parameters: ChunkingParameters
    private let rootFD: Int32
    private let logger: Logger
    private let cond = NSCondition()
    private var jobs: [Job] = []
    private var stopping = false
    private var running = 0

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
        let shadowed = removeShadowedFlatFiles()
        if !shadowed.isEmpty {
            logger.notice("removed flat copies older than their ingested objects: \(shadowed.joined(separator: ", "))")
        }
        running = max(1, threads)
        for i in 0..<running {
            let t = Thread { [self] in work() }
            t.name = "stoq-ingest-\(i)"
            t.start()
        }
    }

    /// Removes every flat file in the storage directory that an object record of the same
    /// name is newer than: what a crash between an ingest's record and its removal of the
    /// older flat copy leaves (the flat file would keep serving the old version). A flat file
    /// newer than the record (stored while dedup was off) stays. Returns the names removed.
    func removeShadowedFlatFiles() -> [String] {
        guard let dir = fdopendir(dup(rootFD)) else { return [] }
        defer { closedir(dir) }
        var removed: [String] = []
        while let e = readdir(dir) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard !name.hasPrefix("."), (try? ObjectIndex.validateName(name)) != nil else { continue }
            var flat = stat(), record = stat()
            // The record's file (the store's documented layout: <content>/objects/<name>).
            guard fstatat(rootFD, name, &flat, AT_SYMLINK_NOFOLLOW) == 0, (flat.st_mode & S_IFMT) == S_IFREG,
                stat(index.chunks.root + "/objects/" + name, &record) == 0
            else { continue }
            let newer =
                record.st_mtim.tv_sec > flat.st_mtim.tv_sec
                || (record.st_mtim.tv_sec == flat.st_mtim.tv_sec && record.st_mtim.tv_nsec > flat.st_mtim.tv_nsec)
            if newer, unlinkat(rootFD, name, 0) == 0 { removed.append(name) }
        }
        if !removed.isEmpty { fsync(rootFD) }
        return removed.sorted()
    }

    /// Takes over a finished upload: `fd` (readable, positioned anywhere; closed here) holds
    /// the body, `temp` is its name in the storage directory (removed here). The outcome is
    /// posted to `inbox` with `ticket`. With `gate`, the object is committed through it as
    /// `writer`'s, and the `reserved` bytes are released once its chunks are written.
    /// `digest`: the body's SHA-256 if the sink already computed it (saves a pass over it).
    /// Called on a worker thread; returns at once.
    public func submit(
        fd: Int32, temp: String, name: String, ticket: UInt64, inbox: Inbox, gate: ObjectGate? = nil, writer: ObjectGate.Writer? = nil,
        reserved: UInt64 = 0, digest: ContentDigest? = nil
    ) {
        cond.withLock {
            jobs.append(
                Job(
                    fd: fd, temp: temp, name: name, ticket: ticket, inbox: inbox, gate: gate, writer: writer, reserved: reserved,
                    digest: digest))
            cond.signal()
        }
    }

    /// Lets the threads finish what was submitted, then end them (tests; a node's pool lives
    /// as long as the process).
    public func stop() {
        cond.withLock {
            stopping = true
            cond.broadcast()
            while running > 0 { cond.wait() }
        }
    }

    deinit { close(rootFD) }

    private func work() {
        while true {
            cond.lock()
            while jobs.isEmpty && !stopping { cond.wait() }
            if jobs.isEmpty {
                running -= 1
                cond.broadcast()
                cond.unlock()
                return
            }
            let job = jobs.removeFirst()
            cond.unlock()
            job.inbox.post(run(job))
        }
    }

    private func run(_ job: Job) -> Outcome {
        defer {
            close(job.fd)
            unlinkat(rootFD, job.temp, 0)
            if job.reserved > 0 { job.gate?.release(job.reserved) }
        }
        let t0 = DispatchTime.now().uptimeNanoseconds
        do {
            let report = try Self.ingest(
                fd: job.fd, as: job.name, into: index, parameters: parameters, gate: job.gate, writer: job.writer,
                digest: job.digest)
            // The record is durable: a flat copy of the name from before would shadow it.
            if unlinkat(rootFD, job.name, 0) == 0 { fsync(rootFD) }
            logger.debug(
                "upload ingested",
                metadata: [
                    "object": "\(job.name)", "bytes": "\(report.bytes)", "chunks": "\(report.chunks)",
                    "new_bytes": "\(report.newBytes)", "reused_bytes": "\(report.reusedBytes)",
                    "ms": "\((DispatchTime.now().uptimeNanoseconds - t0) / 1_000_000)",
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
    /// refusal is thrown as the `ObjectGate.Refusal`. `digest` is the file's SHA-256 when
    /// the caller knows it; otherwise the chunker computes it alongside the chunks' ids.
    /// Throws the store's errors (`StoreError`), or a `ChunkSourceError` for a failed read.
    public static func ingest(
        fd: Int32, as name: String, into index: ObjectIndex, parameters: ChunkingParameters, gate: ObjectGate? = nil,
        writer: ObjectGate.Writer? = nil, digest known: ContentDigest? = nil
    ) throws -> Report {
        try ObjectIndex.validateName(name)
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw StoreError(.io, "fstat of the upload of \(name): \(String(cString: strerror(errno)))") }
        let size = Int(st.st_size)
        guard lseek(fd, 0, SEEK_SET) == 0 else {
            throw StoreError(.io, "lseek of the upload of \(name): \(String(cString: strerror(errno)))")
        }
        // The chunker reads the file; each chunk is put from the chunker's buffer, the bytes
        // its id was just computed from (so the store need not hash them again).
        let chunker = StreamingChunker(source: FileDescriptorSource(fd: fd), parameters: parameters, digestObject: known == nil)
        var report = Report()
        var entries: [Manifest.Entry] = []
        var ids: [ChunkID] = []
        entries.reserveCapacity(size / parameters.avgSize + 1)
        ids.reserveCapacity(size / parameters.avgSize + 1)
        var written = 0  // bytes of new chunks put so far, for a full disk's message
        func noSpace(_ e: StoreError) -> StoreError {
            StoreError.noSpace(storing: name, written: written, errno: e.message.hasPrefix("disk quota") ? EDQUOT : ENOSPC)
        }
        while let (c, bytes) = try chunker.nextWithBytes() {
            guard c.offset + UInt64(c.length) <= UInt64(size) else {
                throw StoreError(.io, "the upload of \(name) grew while it was ingested")
            }
            let id = ChunkID(bytes: c.id.bytes)!
            let put: ChunkStore.PutResult
            do { put = try index.chunks.put(id: id, hashedBytes: bytes) } catch let e as StoreError where e.code == .noSpace {
                throw noSpace(e)
            }
            switch put {
            case .stored:
                written += c.length
                report.newChunks += 1
                report.newBytes += UInt64(c.length)
            case .alreadyPresent:
                report.reusedChunks += 1
                report.reusedBytes += UInt64(c.length)
            }
            entries.append(Manifest.Entry(id: c.id, length: UInt32(c.length)))
            ids.append(id)
        }
        guard chunker.bytesConsumed == UInt64(size), let digest = known ?? chunker.objectDigest else {
            throw StoreError(.io, "the upload of \(name) changed size while it was ingested")
        }
        let manifest: Manifest
        do { manifest = try Manifest(totalLength: UInt64(size), digest: digest, parameters: parameters, chunks: entries) } catch {
            throw StoreError(.io, "the manifest of \(name): \(error)")
        }
        report.manifest = manifest.encode()
        do {
            if let gate, let writer {
                let encoded = report.manifest
                let put = { try index.putObject(name, manifest: encoded, chunkIDs: ids, owner: writer.identity) }
                if let refusal = try gate.commit(name, by: writer, size: UInt64(size), physical: 0, chunked: true, write: put) {
                    throw refusal
                }
            } else {
                try index.putObject(name, manifest: report.manifest, chunkIDs: ids)
            }
        } catch let e as StoreError where e.code == .noSpace {
            throw noSpace(e)
        }
        report.bytes = UInt64(size)
        report.chunks = entries.count
        return report
    }
}
