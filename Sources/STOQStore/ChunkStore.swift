import Foundation
import Logging
import STOQChunking
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Content-addressed chunks on disk: each chunk is a file named after the SHA-256 of its
/// bytes, stored once.
///
/// Layout under `root`:
/// - `chunks/ab/cd/<64 hex>` — the chunk whose id starts `abcd…` (two levels of 256 so no
///   directory grows past what ext4/xfs list quickly);
/// - `quarantine/<64 hex>.<UTC timestamp>` — copies found corrupt, kept for inspection;
/// - `largest_chunk` — the largest `maxChunkSize` the store has been opened with, in decimal
///   (`largestChunk`);
/// - `lock` — held (`flock`) by the one process that has the store open.
///
/// Guarantees:
/// - A write is crash-safe: temp file `.tmp-…` in the chunk's own directory, write, fsync,
///   rename, fsync the directory (and, the first time, the new directories' parents). After
///   a crash a chunk is either absent or complete; temp files are removed on the next open.
/// - Bytes are verified against the id when put and every time they are read. A chunk whose
///   bytes no longer match is never returned: it is moved to `quarantine/`, logged, counted,
///   and the read throws `.corrupt` — unless a `ChunkSource` supplies bytes that verify.
/// - Reads make one buffer of the file's size and fill it with `pread` (one call when the
///   file is in the page cache); that buffer is hashed and returned as is, so a read costs
///   one copy (kernel to user) and no more. mmap would save that copy but hands out memory
///   whose file can be quarantined or collected underneath the caller; chunks are small
///   enough that the copy is cheaper than the mapping anyway.
///
/// Thread-safe; blocking file I/O (run it off the cooperative pool in async code).
public final class ChunkStore: @unchecked Sendable {
    /// How the store behaves. Defaults suit a node.
    public struct Options: Sendable {
        /// Store each chunk once (default). Off, every put rewrites the file — for
        /// measuring, or to force a fresh copy; `[chunking] dedup_enabled` in node.toml.
        public var dedup: Bool
        /// Garbage collection leaves unreferenced chunks younger than this (by mtime)
        /// alone, because an upload puts its chunks before the object that references
        /// them. Default `defaultCollectGracePeriod`.
        public var collectGracePeriod: Duration
        /// The largest chunk a put accepts. Default 64 MiB, far above any content-defined
        /// chunk size. Reads do not check it: a store keeps the chunks it took under a larger
        /// limit when reopened with a smaller one (`chunking.max_chunk_size` lowered), and
        /// those are still good chunks (`largestChunk`, the largest limit it ever had, bounds
        /// what a read loads).
        public var maxChunkSize: Int
        /// fsync each chunk and its directory before a put returns (default). Off for a cache:
        /// after a crash a chunk may be missing or torn, and a torn one fails verification
        /// when read and is dropped like any corrupt chunk.
        public var durable: Bool
        /// The `write(2)` chunk and record files are written with. Tests pass one that fails
        /// with ENOSPC at a chosen byte, to see what a full disk leaves behind.
        public var write: @Sendable (Int32, UnsafeRawPointer, Int) -> Int

        /// One hour: the one home of this default, which a node's `storage.gc_grace_period`
        /// takes too (`NodeConfig.Storage`).
        public static let defaultCollectGracePeriod: Duration = .seconds(3600)

        /// Options with the defaults above, or the values given.
        public init(
            dedup: Bool = true, collectGracePeriod: Duration = defaultCollectGracePeriod, maxChunkSize: Int = 64 << 20, durable: Bool = true,
            write: (@Sendable (Int32, UnsafeRawPointer, Int) -> Int)? = nil
        ) {
            self.write = write ?? Directory.systemWrite
            self.durable = durable
            self.dedup = dedup
            self.collectGracePeriod = collectGracePeriod
            self.maxChunkSize = maxChunkSize
        }
    }

    /// What a put did.
    public enum PutResult: Sendable, Equatable {
        /// The chunk was written.
        case stored
        /// The store already had a copy that verified; nothing was written (its mtime was
        /// refreshed so garbage collection's grace period starts again).
        case alreadyPresent
    }

    /// What opening the store repaired.
    public struct Recovery: Sendable, Equatable {
        /// Temp files of writes a crash interrupted, removed.
        public var tempFilesRemoved: Int
    }

    /// What `verifyAll()` found.
    public struct VerifyReport: Sendable, Equatable {
        /// Chunks read and hashed.
        public var checked: Int
        /// Chunks whose bytes did not match their id (now quarantined).
        public var corrupt: [ChunkID]
    }

    /// What a sweep did (garbage collection's second half).
    struct SweepResult {
        var kept = 0
        var young = 0
        var removed = 0
        var bytesFreed: UInt64 = 0
    }

    /// The largest chunk the format allows (`ChunkingParameters.largestMaxSize`, 1 GiB;
    /// manifests carry chunk lengths as 32-bit integers): no store's `largestChunk` is above it.
    public static let largestChunkFile = ChunkingParameters.largestMaxSize

    /// The file in the store's root that keeps `largestChunk`.
    static let largestChunkName = "largest_chunk"

    /// The store's root directory.
    public let root: String
    /// The options it was opened with.
    public let options: Options
    /// Where writes refused for want of space are counted (shared with the node's other
    /// writers; the object index over this store reports to it too).
    public let diskFull: DiskFullMonitor
    /// What opening it repaired.
    public let recovery: Recovery
    /// The largest file a read loads: the largest chunk this store has ever taken a put of, by
    /// its limits — the largest `Options.maxChunkSize` it has been opened with (kept in
    /// `largest_chunk`, raised when opened with a larger one, never lowered), at most
    /// `largestChunkFile`. A bigger file cannot be a chunk this store wrote (one grown on disk),
    /// so a read without a length (`GET /chunks/<id>`, the scrub) quarantines it as corrupt
    /// after its `fstat`, unread. Not `Options.maxChunkSize` itself: that limit may have been
    /// lowered since a chunk was stored, and such a chunk is still good. A store that has chunks
    /// but no `largest_chunk` (made before the file was kept) cannot know, and takes
    /// `largestChunkFile`.
    public let largestChunk: Int

    let rootDir: Directory
    let lock: StoreLock
    private let chunksDir: Directory
    private let quarantineDir: Directory
    private let source: (any ChunkSource)?
    private let logger: Logger
    private let state = NSLock()
    private var counterValues = StoreCounters()
    /// Shard directories known to exist durably, so `mkdir` + parent fsyncs happen once each.
    private var durableShards = Set<UInt16>()

    /// Opens (creating if needed) the store at `root`, takes its lock, and removes temp
    /// files of interrupted writes. `source`, when given, is asked for chunks that are
    /// missing or corrupt on read.
    public init(
        root: String, options: Options = Options(), source: (any ChunkSource)? = nil,
        logger: Logger = Logger(label: "stoq.store"), diskFull: DiskFullMonitor? = nil
    ) throws {
        self.diskFull = diskFull ?? DiskFullMonitor(logger: logger)
        do {
            try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        } catch {
            throw StoreError(.io, "cannot create store directory \(root): \(error)")
        }
        self.root = root
        self.options = options
        self.source = source
        self.logger = logger
        rootDir = try Directory(root)
        lock = try StoreLock(root: rootDir)
        chunksDir = try Directory("chunks", in: rootDir, create: true)
        quarantineDir = try Directory("quarantine", in: rootDir, create: true)
        largestChunk = try Self.keepLargestChunk(options, in: rootDir, chunks: chunksDir, logger: logger)
        try rootDir.sync()
        let removed = try Self.removeTempFiles(in: chunksDir)
        recovery = Recovery(tempFilesRemoved: removed)
        counterValues.staleTempFilesRemoved = UInt64(removed)
        if removed > 0 {
            logger.notice("removed temp files of interrupted chunk writes", metadata: ["count": "\(removed)", "root": "\(root)"])
        }
    }

    /// Reads `largest_chunk` in `root` and raises it to `options.maxChunkSize` if that is larger
    /// (capped at `largestChunkFile`; durably, with `options.durable`); the resulting
    /// `largestChunk`. Missing, it is written: for a new store (no shard under `chunks`) with the
    /// options' limit, for one that has chunks with `largestChunkFile`, as for a damaged one.
    private static func keepLargestChunk(_ options: Options, in root: Directory, chunks: Directory, logger: Logger) throws -> Int {
        let temp = ".tmp-" + largestChunkName
        unlinkat(root.fd, temp, 0)
        var kept: Int?
        var written = false
        let fd = openat(root.fd, largestChunkName, StoredFile.readFlags)
        if fd >= 0 {
            defer { close(fd) }
            let text = try Directory.readWhole(fd, size: 32, path: root.path + "/" + largestChunkName)
            kept = Int(String(decoding: text, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)).flatMap { $0 > 0 ? $0 : nil }
            written = kept != nil
            if kept == nil {
                logger.warning(
                    "store's largest chunk record is damaged; reads load files up to the format's largest chunk",
                    metadata: ["path": "\(root.path)/\(largestChunkName)", "bytes": "\(largestChunkFile)"])
                kept = largestChunkFile
            }
        } else if errno == ENOENT {
            if try chunks.names().contains(where: isShardName) { kept = largestChunkFile }
        } else {
            throw StoreError.io("open", root.path + "/" + largestChunkName)
        }
        let largest = min(max(kept ?? 0, options.maxChunkSize), largestChunkFile)
        if !written || largest != kept {
            try Array("\(largest)\n".utf8).withUnsafeBytes {
                try root.replace(largestChunkName, tempName: temp, with: $0, durable: options.durable)
            }
        }
        return largest
    }

    /// A snapshot of what the store counted since it was opened.
    public var counters: StoreCounters { state.withLock { counterValues } }

    // MARK: - Writing

    /// Stores `bytes` as chunk `id`, durably, after checking that they hash to `id`
    /// (`.digestMismatch` names both digests otherwise). With dedup on, a chunk already
    /// stored and still verifying is not rewritten (`.alreadyPresent`); a stored copy that
    /// no longer verifies is quarantined and replaced. Chunks over `maxChunkSize` are
    /// refused (`.chunkTooLarge`).
    @discardableResult
    public func put(id: ChunkID, bytes: some ContiguousBytes) throws -> PutResult {
        try checkSize(id, bytes.withUnsafeBytes { $0.count })
        let actual = ChunkID(digestOf: bytes)
        guard actual == id else {
            throw StoreError(.digestMismatch, "chunk bytes do not match their id: expected digest \(id), actual digest \(actual)")
        }
        return try bytes.withUnsafeBytes { try putVerified(id: id, bytes: $0) }
    }

    /// Stores `bytes` as chunk `id` like `put(id:bytes:)`, for a caller that has just computed
    /// `id` as the SHA-256 of these very bytes (ingest, from the chunker's own buffer): the
    /// check would hash every byte a second time.
    @discardableResult
    public func put(id: ChunkID, hashedBytes bytes: UnsafeRawBufferPointer) throws -> PutResult {
        try checkSize(id, bytes.count)
        return try putVerified(id: id, bytes: bytes)
    }

    private func checkSize(_ id: ChunkID, _ count: Int) throws {
        guard count <= options.maxChunkSize else {
            throw StoreError(.chunkTooLarge, "chunk \(id) is \(count) bytes, over the store's limit of \(options.maxChunkSize) bytes")
        }
    }

    private func putVerified(id: ChunkID, bytes: UnsafeRawBufferPointer) throws -> PutResult {
        try lock.shared {
            let (shard, name) = Self.location(id)
            if options.dedup, try existingVerifies(id, length: bytes.count, touch: true) {
                state.withLock { counterValues.dedupHits += 1 }
                return .alreadyPresent
            }
            do {
                let dir = try shardDirectory(id, shard)
                let temp = ".tmp-\(name)-\(String(UInt64.random(in: 0...UInt64.max), radix: 16))"
                try dir.replace(name, tempName: temp, with: bytes, durable: options.durable, what: "chunk \(id.hex)", write: options.write)
            } catch let e as StoreError where e.code == .noSpace {
                // The file's own steps name the chunk and its bytes; a new shard directory's
                // mkdir or fsync does not, and nothing of the chunk was written then.
                let refusal = e.message.contains(id.hex + " (") ? e : StoreError.noSpace(storing: "chunk \(id.hex)", written: 0)
                diskFull.refused(refusal.message)
                throw refusal
            }
            diskFull.stored()
            state.withLock {
                counterValues.chunksWritten += 1
                counterValues.bytesWritten += UInt64(bytes.count)
            }
            return .stored
        }
    }

    /// Whether a stored copy of `id` exists and verifies; a copy that does not is quarantined,
    /// one of another size than `length` (the put's, whose bytes hash to `id`) without being read.
    /// `touch` refreshes its mtime, restarting garbage collection's grace period.
    private func existingVerifies(_ id: ChunkID, length: Int, touch: Bool) throws -> Bool {
        switch try readLocal(id, length: length, countRead: false) {
        case .missing: return false
        case .corrupt: return false
        case .ok(_, let fd):
            defer { close(fd) }
            if touch { futimens(fd, nil) }
            return true
        }
    }

    /// Deletes chunk `id` (an edge cache evicting it). Returns whether there was one. The
    /// caller makes sure nothing still needs it: no object record is checked here. A
    /// reader that already opened the file keeps reading it.
    @discardableResult
    public func remove(_ id: ChunkID) throws -> Bool {
        let (shard, name) = Self.location(id)
        if unlinkat(chunksDir.fd, shard + "/" + name, 0) == 0 { return true }
        if errno == ENOENT { return false }
        throw StoreError.io("unlink", "\(chunksDir.path)/\(shard)/\(name)")
    }

    // MARK: - Reading

    /// Whether the store has chunk `id` (by name; bytes are verified when read).
    public func has(_ id: ChunkID) throws -> Bool {
        let (shard, name) = Self.location(id)
        return try chunksDir.stat(shard + "/" + name) != nil
    }

    /// The size in bytes of chunk `id`, or nil if the store does not have it.
    public func size(_ id: ChunkID) throws -> Int? {
        let (shard, name) = Self.location(id)
        return try chunksDir.stat(shard + "/" + name).map { Int($0.st_size) }
    }

    /// Which of `ids` the store lacks, in the order given, each once: the "want" half of
    /// have/want. The answer is by name, not verified; and it does not pin the chunks it
    /// reports present, so a `putObject` long after (beyond the collection grace period)
    /// can still fail with `.missingChunks`, which tells the uploader what to resend.
    public func missing(_ ids: [ChunkID]) throws -> [ChunkID] {
        var seen = Set<ChunkID>()
        var out: [ChunkID] = []
        for id in ids where seen.insert(id).inserted {
            if try !has(id) { out.append(id) }
        }
        return out
    }

    /// The bytes of chunk `id`, verified against it.
    ///
    /// A stored copy that does not verify is moved to `quarantine/`, logged and counted
    /// (`corruptQuarantined`). Missing or corrupt, the chunk is then asked of the
    /// `ChunkSource`, if any; what it returns is verified, stored and returned. Otherwise
    /// this throws `.corrupt` (the copy was bad) or `.chunkNotFound` (there was none).
    ///
    /// `length`: the chunk's length, when the caller knows it for certain (an object record
    /// the store took, whose lengths were checked against the chunks; an edge cache's entry,
    /// sized from verified bytes). A file of any other size cannot be the chunk: it is
    /// quarantined as corrupt without being read, so that a file grown on disk costs a
    /// `fstat`, not a read and a hash of up to `largestChunk` bytes. Never pass a length
    /// only a client claims: a wrong one would quarantine a good chunk.
    public func read(_ id: ChunkID, length: Int? = nil) throws -> [UInt8] {
        switch try readLocal(id, length: length, countRead: true) {
        case .ok(let bytes, let fd):
            close(fd)
            return bytes
        case .missing:
            if let bytes = refetch(id, because: "missing") { return bytes }
            throw StoreError(
                .chunkNotFound,
                "chunk \(id) is not in the store"
                    + (source == nil ? "" : ", and the chunk source did not supply it"))
        case .corrupt(let why, let quarantined):
            if let bytes = refetch(id, because: "corrupt") { return bytes }
            let whereTo = quarantined.map { "moved to quarantine/\($0)" } ?? "already moved away by another reader"
            throw StoreError(
                .corrupt,
                "chunk \(id) is corrupt on disk: \(why); \(whereTo)"
                    + (source == nil ? "" : "; the chunk source did not supply a good copy"))
        }
    }

    private enum LocalRead {
        /// The verified bytes and the still-open descriptor (the caller closes it).
        case ok([UInt8], Int32)
        case missing
        /// What was wrong, and the quarantine name if this call moved the file.
        case corrupt(String, String?)
    }

    /// Opens chunk `id` and checks the open file before reading any of it (its kind, then its
    /// size: `length` when given, else `largestChunk`), then reads and verifies it: the one
    /// place a chunk file's size is checked.
    private func readLocal(_ id: ChunkID, length: Int? = nil, countRead: Bool) throws -> LocalRead {
        let (shard, name) = Self.location(id)
        let rel = shard + "/" + name
        let fd = openat(chunksDir.fd, rel, StoredFile.readFlags)
        guard fd >= 0 else {
            if errno == ENOENT || errno == ENOTDIR { return .missing }
            throw StoreError.io("open", chunksDir.path + "/" + rel)
        }
        var st = Glibc.stat()
        let bytes: [UInt8]
        do {
            guard fstat(fd, &st) == 0 else { throw StoreError.io("fstat", chunksDir.path + "/" + rel) }
            if st.st_mode & S_IFMT != S_IFREG {
                close(fd)
                let why = "it is not a regular file but \(StoreError.fileKind(st.st_mode))"
                return .corrupt(why, quarantine(id, rel: rel, file: st, why: why))
            }
            if let length, st.st_size != length {
                // Not loaded: the chunk is `length` bytes, so this file is not it.
                close(fd)
                let why = "it is \(st.st_size) bytes, and the chunk is \(length) bytes"
                return .corrupt(why, quarantine(id, rel: rel, file: st, why: why))
            }
            if st.st_size > largestChunk {
                // Not loaded: no chunk this store took is that big.
                close(fd)
                let why = "it is \(st.st_size) bytes, larger than any chunk this store takes (\(largestChunk) bytes)"
                return .corrupt(why, quarantine(id, rel: rel, file: st, why: why))
            }
            bytes = try Directory.readWhole(fd, size: Int(st.st_size), path: chunksDir.path + "/" + rel)
        } catch {
            close(fd)
            throw error
        }
        let actual = ChunkID(digestOf: bytes)
        guard actual == id else {
            defer { close(fd) }
            let why = "its bytes hash to \(actual)"
            return .corrupt(why, quarantine(id, rel: rel, file: st, why: why))
        }
        if countRead {
            state.withLock {
                counterValues.chunksRead += 1
                counterValues.bytesRead += UInt64(bytes.count)
            }
        }
        return .ok(bytes, fd)
    }

    /// Moves the corrupt file (the one described by `file`) out of `chunks/`. Returns the
    /// quarantine name, or nil when the name no longer points at that file (another reader
    /// moved it, or a put replaced it with a good copy, which must stay).
    private func quarantine(_ id: ChunkID, rel: String, file: Glibc.stat, why: String) -> String? {
        guard let now = try? chunksDir.stat(rel), now.st_ino == file.st_ino, now.st_dev == file.st_dev else { return nil }
        let qname = "\(id.hex).\(Self.timestamp())"
        if renameat(chunksDir.fd, rel, quarantineDir.fd, qname) != 0 {
            let e = errno
            if e == ENOENT { return nil }
            // Cannot keep it for inspection; it still must never be served.
            logger.error(
                "cannot move corrupt chunk to quarantine; deleting it",
                metadata: ["chunk": "\(id)", "error": "\(String(cString: strerror(e)))"])
            unlinkat(chunksDir.fd, rel, 0)
        }
        try? quarantineDir.sync()
        state.withLock { counterValues.corruptQuarantined += 1 }
        logger.error(
            "corrupt chunk quarantined",
            metadata: [
                "chunk": "\(id)", "problem": "\(why)", "size": "\(file.st_size)", "quarantine": "\(quarantineDir.path)/\(qname)",
            ])
        return qname
    }

    /// Asks the source for `id`, verifies and stores what it returns. Nil when there is no
    /// source or it did not come up with good bytes (counted and logged).
    private func refetch(_ id: ChunkID, because why: String) -> [UInt8]? {
        guard let source else { return nil }
        let bytes: [UInt8]?
        do {
            bytes = try source.fetchChunk(id)
        } catch {
            return refetchFailed(id, why, "the source failed: \(error)")
        }
        guard let bytes else { return refetchFailed(id, why, "the source does not have it") }
        let actual = ChunkID(digestOf: bytes)
        guard actual == id else { return refetchFailed(id, why, "the source sent bytes hashing to \(actual)") }
        do {
            _ = try bytes.withUnsafeBytes { try putVerified(id: id, bytes: $0) }
        } catch let e as StoreError where e.code == .noSpace {
            // Served anyway; counted (and logged once per episode) by the put.
        } catch {
            // The bytes verified, so the read is served; the store just could not keep them.
            logger.error("refetched chunk could not be stored", metadata: ["chunk": "\(id)", "error": "\(error)"])
        }
        state.withLock {
            counterValues.refetched += 1
            counterValues.chunksRead += 1
            counterValues.bytesRead += UInt64(bytes.count)
        }
        logger.notice("chunk refetched", metadata: ["chunk": "\(id)", "reason": "\(why)"])
        return bytes
    }

    private func refetchFailed(_ id: ChunkID, _ why: String, _ detail: String) -> [UInt8]? {
        state.withLock { counterValues.refetchFailed += 1 }
        logger.warning("refetch failed", metadata: ["chunk": "\(id)", "reason": "\(why)", "detail": "\(detail)"])
        return nil
    }

    // MARK: - Whole-store walks

    /// Every chunk id stored, in no particular order.
    public func allChunkIDs() throws -> [ChunkID] {
        var out: [ChunkID] = []
        try forEachShard { dir, names in
            for name in names { if let id = Self.chunkID(fileName: name) { out.append(id) } }
        }
        return out
    }

    /// Reads and verifies every stored chunk (a scrub); corrupt ones are quarantined as a
    /// read would, and a file larger than `largestChunk` without being read.
    public func verifyAll() throws -> VerifyReport {
        var report = VerifyReport(checked: 0, corrupt: [])
        for id in try allChunkIDs() {
            report.checked += 1
            switch try readLocal(id, countRead: false) {
            case .ok(_, let fd): close(fd)
            case .missing: report.checked -= 1
            case .corrupt: report.corrupt.append(id)
            }
        }
        return report
    }

    /// Garbage collection's walk: every stored chunk not in `keep` whose mtime is older than
    /// `grace`, in walk order; the others counted as kept (in `keep`) or young. Takes no lock:
    /// puts go on meanwhile, which is why `sweepLocked` looks at each candidate again.
    func sweepCandidates(keeping keep: Set<ChunkID>, grace: Duration) throws -> (candidates: [ChunkID], counted: SweepResult) {
        var counted = SweepResult()
        var candidates: [ChunkID] = []
        let now = Self.now()
        try forEachShard { dir, names in
            for name in names {
                guard let id = Self.chunkID(fileName: name) else { continue }
                if keep.contains(id) { counted.kept += 1; continue }
                guard let st = try dir.stat(name) else { continue }  // quarantined or evicted meanwhile
                if Self.age(of: st, at: now) < Self.seconds(grace) { counted.young += 1; continue }
                candidates.append(id)
            }
        }
        return (candidates, counted)
    }

    /// Removes each of `candidates` not in `keep` whose mtime is still older than `grace`, and
    /// counts it in the store's counters. The caller holds `lock` exclusively, so no put runs
    /// meanwhile: a put that refreshed a candidate since the walk (dedup) or rewrote it shows
    /// in its mtime here, and none can refresh or name it between this check and the unlink.
    func sweepLocked(candidates: some Collection<ChunkID>, keeping keep: Set<ChunkID>, grace: Duration) throws -> SweepResult {
        var result = SweepResult()
        let now = Self.now()
        var touched: [String: Directory] = [:]
        for id in candidates {
            if keep.contains(id) { result.kept += 1; continue }
            let (shard, name) = Self.location(id)
            guard let st = try chunksDir.stat(shard + "/" + name) else { continue }
            if Self.age(of: st, at: now) < Self.seconds(grace) { result.young += 1; continue }
            guard unlinkat(chunksDir.fd, shard + "/" + name, 0) == 0 else {
                if errno == ENOENT { continue }
                throw StoreError.io("unlink", "\(chunksDir.path)/\(shard)/\(name)")
            }
            if touched[shard] == nil { touched[shard] = try Directory(shard, in: chunksDir) }
            result.removed += 1
            result.bytesFreed += UInt64(st.st_size)
        }
        for dir in touched.values { try dir.sync() }
        state.withLock {
            counterValues.chunksCollected += UInt64(result.removed)
            counterValues.bytesCollected += result.bytesFreed
        }
        return result
    }

    private static func now() -> timespec {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return now
    }

    private static func seconds(_ d: Duration) -> Double {
        Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }

    private static func age(of st: Glibc.stat, at now: timespec) -> Double {
        Double(now.tv_sec - st.st_mtim.tv_sec) + Double(now.tv_nsec - st.st_mtim.tv_nsec) / 1e9
    }

    /// Calls `body` with each shard directory (`chunks/ab/cd`) and its entries.
    private func forEachShard(_ body: (Directory, [String]) throws -> Void) throws {
        try Self.forEachShard(of: chunksDir, body)
    }

    private static func forEachShard(of chunksDir: Directory, _ body: (Directory, [String]) throws -> Void) throws {
        for a in try chunksDir.names().sorted() where Self.isShardName(a) {
            let outer = try Directory(a, in: chunksDir)
            for b in try outer.names().sorted() where Self.isShardName(b) {
                let inner = try Directory(b, in: outer)
                try body(inner, try inner.names())
            }
        }
    }

    private static func removeTempFiles(in chunksDir: Directory) throws -> Int {
        var removed = 0
        try forEachShard(of: chunksDir) { dir, names in
            var here = 0
            for name in names where name.hasPrefix(".tmp-") {
                if unlinkat(dir.fd, name, 0) == 0 { here += 1 }
            }
            if here > 0 { try dir.sync() }
            removed += here
        }
        return removed
    }

    // MARK: - Layout

    /// `("ab/cd", "<64 hex>")` for the chunk whose id starts `abcd`.
    static func location(_ id: ChunkID) -> (String, String) {
        let hex = id.hex
        let a = hex.prefix(2), b = hex.dropFirst(2).prefix(2)
        return ("\(a)/\(b)", hex)
    }

    /// The chunk a file in a shard directory holds; nil for temp files and strangers.
    private static func chunkID(fileName: String) -> ChunkID? {
        guard fileName.utf8.count == 64, let id = ChunkID(hex: fileName), id.hex == fileName else { return nil }
        return id
    }

    private static func isShardName(_ s: String) -> Bool {
        s.utf8.count == 2 && s.utf8.allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) }
    }

    /// The shard directory for `id`, created durably the first time this process needs it:
    /// a chunk's rename is only as durable as the directory entries leading to it.
    private func shardDirectory(_ id: ChunkID, _ shard: String) throws -> Directory {
        let raw = id.bytes
        let key = UInt16(raw[0]) << 8 | UInt16(raw[1])
        if state.withLock({ durableShards.contains(key) }) {
            return try Directory(shard, in: chunksDir)
        }
        let outer = try Directory(String(shard.prefix(2)), in: chunksDir, create: true)
        let inner = try Directory(String(shard.suffix(2)), in: outer, create: true)
        if options.durable {
            try outer.sync()
            try chunksDir.sync()
        }
        _ = state.withLock { durableShards.insert(key) }
        return inner
    }

    /// UTC, to the nanosecond, sortable: `20261125T205618.123456789Z`.
    static func timestamp() -> String {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var t = ts.tv_sec
        var tmv = tm()
        gmtime_r(&t, &tmv)
        func pad(_ v: Int32, _ n: Int) -> String {
            let s = String(v)
            return String(repeating: "0", count: max(0, n - s.count)) + s
        }
        let ns = String(ts.tv_nsec)
        return pad(tmv.tm_year + 1900, 4) + pad(tmv.tm_mon + 1, 2) + pad(tmv.tm_mday, 2) + "T"
            + pad(tmv.tm_hour, 2) + pad(tmv.tm_min, 2) + pad(tmv.tm_sec, 2) + "."
            + String(repeating: "0", count: 9 - ns.count) + ns + "Z"
    }
}
