import Foundation
import Logging
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Objects over a `ChunkStore`: name → manifest + ordered chunk ids, one record file per
/// object under `<root>/objects/`, each replaced atomically (temp file, fsync, rename,
/// directory fsync). Also the store's garbage collector, since only the objects know which
/// chunks are still wanted.
///
/// Garbage collection against concurrent writes — the rule (`collect` says why it holds):
/// - `collect` marks and walks the chunk tree without the store's lock, while it records the
///   chunk ids of every record `putObject` writes meanwhile; then, in short turns under the
///   store's exclusive lock, it removes the old unreferenced chunks the walk found, keeping
///   what was recorded, what is pinned, and whatever a put has refreshed since.
/// - An upload puts its chunks before its object. Chunks referenced by no object are
///   collected only when their mtime is older than `Options.collectGracePeriod` (default 1 h);
///   a put of a chunk the store already has refreshes its mtime. An ingest (the node cutting
///   an upload into chunks as it arrives) also pins the chunks it has put (`pinChunks`), so
///   that an upload slower than the grace period keeps them all until its object is written or
///   it is abandoned. A client's own chunked upload (chunk PUTs, then its manifest) pins
///   nothing: one that takes longer than the grace period between its chunks and its object
///   gets `.missingChunks` listing what to resend.
/// - Puts wait only for those short turns, not for the mark or the walk, which take as long
///   as the store is large.
/// - One process has a store open at a time (`lock` file), so the rule is in-process only.
///
/// Thread-safe.
public final class ObjectIndex: @unchecked Sendable {
    /// What opening the index found and repaired.
    public struct Recovery: Sendable, Equatable {
        /// Temp files of interrupted record writes, removed.
        public var tempFilesRemoved: Int
        /// Objects whose records refer to chunks the store lacks: name → missing ids. Kept
        /// (a `ChunkSource` or a re-upload can complete them), reported and logged.
        public var incompleteObjects: [String: [ChunkID]]
        /// Records that could not be read: name → why.
        public var unreadableObjects: [String: String]
    }

    /// What one garbage collection did.
    public struct CollectResult: Sendable, Equatable {
        /// Object records marked from.
        public var objectsScanned: Int
        /// Chunks kept because an object references them, or an ingest in progress pinned them.
        public var chunksReferenced: Int
        /// Unreferenced chunks kept because they are younger than the grace period.
        public var chunksInGracePeriod: Int
        /// Chunks removed.
        public var chunksRemoved: Int
        /// Bytes those chunks held.
        public var bytesFreed: UInt64

        /// A result with these counts.
        public init(objectsScanned: Int, chunksReferenced: Int, chunksInGracePeriod: Int, chunksRemoved: Int, bytesFreed: UInt64) {
            self.objectsScanned = objectsScanned
            self.chunksReferenced = chunksReferenced
            self.chunksInGracePeriod = chunksInGracePeriod
            self.chunksRemoved = chunksRemoved
            self.bytesFreed = bytesFreed
        }
    }

    /// The chunks this index's objects refer to.
    public let chunks: ChunkStore
    /// What opening the index found.
    public private(set) var recovery = Recovery(tempFilesRemoved: 0, incompleteObjects: [:], unreadableObjects: [:])

    private let dir: Directory
    private let logger: Logger
    /// Guards `pins`, `recorded` and `phaseHook`. Taken inside the store's lock, never around it.
    private let pinLock = NSLock()
    private var pins: [ObjectIdentifier: ChunkPin] = [:]
    /// While a collection runs: the chunk ids of the records written since it began (see
    /// `collect`); nil otherwise.
    private var recorded: Set<ChunkID>?
    /// One collection at a time: `recorded` belongs to it.
    private let collecting = NSLock()
    /// Called by `collect` between its phases, outside the store's lock; tests set it to act
    /// at a chosen point of a collection.
    var phaseHook: (@Sendable (CollectPhase) -> Void)? {
        get { pinLock.withLock { hook } }
        set { pinLock.withLock { hook = newValue } }
    }
    private var hook: (@Sendable (CollectPhase) -> Void)?

    /// Where a collection is when it calls `phaseHook`.
    enum CollectPhase: Sendable {
        /// Recording, records read; the chunk tree not yet walked.
        case marked
        /// The chunk tree walked; nothing removed yet.
        case walked
    }

    /// Candidates `collect` re-checks and removes per turn under the exclusive lock: bounds how
    /// long a put can wait for it (a few thousand stats and unlinks, a few directory fsyncs).
    static let sweepTurn = 1024

    /// The chunks an upload in progress has put and its object will name, kept by garbage
    /// collection whatever their age until the upload ends (`ObjectIndex.unpin`). A chunk is
    /// added just after its put, which wrote it or refreshed its mtime: it is within the grace
    /// period in between. Thread-safe.
    public final class ChunkPin: @unchecked Sendable {
        private let lock = NSLock()
        private var ids = Set<ChunkID>()

        /// Keeps `id` from collection while the pin lasts.
        public func add(_ id: ChunkID) { _ = lock.withLock { ids.insert(id) } }

        var pinned: Set<ChunkID> { lock.withLock { ids } }
    }

    /// Opens the objects of `chunks` (creating `objects/` if needed), removes temp files of
    /// interrupted writes and reports objects whose chunks are missing.
    public init(chunks: ChunkStore, logger: Logger = Logger(label: "stoq.store.objects")) throws {
        self.chunks = chunks
        self.logger = logger
        dir = try Directory("objects", in: chunks.rootDir, create: true)
        try chunks.rootDir.sync()
        var removed = 0
        for name in try dir.names() where name.hasPrefix(".tmp-") {
            if unlinkat(dir.fd, name, 0) == 0 { removed += 1 }
        }
        if removed > 0 { try dir.sync() }
        recovery.tempFilesRemoved = removed
        for name in try listObjects() {
            do {
                let record = try object(name)
                let missing = try chunks.missing(record.chunkIDs)
                if !missing.isEmpty { recovery.incompleteObjects[name] = missing }
            } catch let e as StoreError {
                recovery.unreadableObjects[name] = e.message
            }
        }
        if removed > 0 || !recovery.incompleteObjects.isEmpty || !recovery.unreadableObjects.isEmpty {
            logger.warning(
                "object index recovery",
                metadata: [
                    "tempFilesRemoved": "\(removed)",
                    "incompleteObjects": "\(recovery.incompleteObjects.keys.sorted())",
                    "unreadableObjects": "\(recovery.unreadableObjects.keys.sorted())",
                ])
        }
    }

    /// Throws `.invalidObjectName` unless `name` is 1–255 characters of `[A-Za-z0-9._-]`
    /// not starting with a dot: one path segment that can never name a file outside
    /// `objects/` nor collide with a temp file.
    public static func validateName(_ name: String) throws(StoreError) {
        func bad(_ why: String) -> StoreError {
            StoreError(.invalidObjectName, "object name \"\(name.prefix(300))\" is not allowed: \(why)")
        }
        if name.isEmpty { throw bad("it is empty") }
        if name.utf8.count > 255 { throw bad("it is \(name.utf8.count) bytes long, the limit is 255") }
        if name.hasPrefix(".") { throw bad("it starts with a dot") }
        for c in name.unicodeScalars {
            let ok = ("a"..."z").contains(c) || ("A"..."Z").contains(c) || ("0"..."9").contains(c) || c == "." || c == "_" || c == "-"
            if !ok { throw bad("it contains \"\(c)\"; only A-Z a-z 0-9 . _ - are allowed") }
        }
    }

    /// Chunk ids a `.missingChunks` error names; the rest are counted. A message that named
    /// them all would grow with the manifest (16 Mi ids: over 1 GB of hex) only to be cut short.
    public static let missingChunksNamed = 32

    /// `.missingChunks` for object `name`: the first `missingChunksNamed` of `missing`, and how
    /// many more there are. (Public: a manifest PUT verified before its record is written says
    /// what it lacks the same way.)
    public static func missingChunks(_ name: String, _ missing: [ChunkID]) -> StoreError {
        var message = "object \(name) refers to \(missing.count) chunk(s) the store does not have: "
        message += missing.prefix(missingChunksNamed).map(\.hex).joined(separator: ", ")
        if missing.count > missingChunksNamed { message += " and \(missing.count - missingChunksNamed) more" }
        return StoreError(.missingChunks, message)
    }

    /// Stores (or atomically replaces) object `name` with `manifest` and `chunkIDs`, written
    /// by `owner` ("" = unknown). Every chunk must already be in the store, else
    /// `.missingChunks` names the ones that are not (the first `missingChunksNamed`). A full disk throws `.noSpace` and leaves
    /// the object as it was (absent, or the old version).
    public func putObject(_ name: String, manifest: [UInt8], chunkIDs: [ChunkID], owner: String = "") throws {
        try Self.validateName(name)
        let record = ObjectRecord(name: name, manifest: manifest, chunkIDs: chunkIDs, owner: owner).encoded()
        try chunks.lock.shared {
            let missing = try chunks.missing(chunkIDs)
            guard missing.isEmpty else { throw Self.missingChunks(name, missing) }
            let temp = ".tmp-\(name.prefix(200))-\(String(UInt64.random(in: 0...UInt64.max), radix: 16))"
            do {
                try record.withUnsafeBytes {
                    try dir.replace(name, tempName: temp, with: $0, what: "the record of object \(name)", write: chunks.options.write)
                }
            } catch let e as StoreError where e.code == .noSpace {
                // Nothing replaced: the previous version of the object, if any, is what is served.
                chunks.diskFull.refused(e.message)
                throw e
            }
            // After the rename, not before: a collection that begins after this check lists
            // the record, so only one already running needs telling (`collect`).
            pinLock.withLock { recorded?.formUnion(chunkIDs) }
            chunks.diskFull.stored()
        }
    }

    /// The record of object `name`; `.objectNotFound` if there is none, `.corruptRecord` when
    /// something other than a regular file has its name, when the file is larger than any record
    /// may be (`ObjectRecord.maxEncodedSize`, refused unread), or when its fields are past the
    /// limits a record has (more chunk ids than a manifest may list, a longer manifest or owner).
    /// Only that record is refused: the others read as before.
    public func object(_ name: String) throws -> ObjectRecord {
        try Self.validateName(name)
        let fd = openat(dir.fd, name, StoredFile.readFlags)
        guard fd >= 0 else {
            if errno == ENOENT { throw StoreError(.objectNotFound, "no object named \(name)") }
            throw StoreError.io("open", dir.path + "/" + name)
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw StoreError.io("fstat", dir.path + "/" + name) }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            throw StoreError(
                .corruptRecord, "object record \(dir.path)/\(name) is damaged: it is \(StoreError.fileKind(st.st_mode)), not a regular file")
        }
        guard st.st_size <= ObjectRecord.maxEncodedSize else {
            throw StoreError(
                .corruptRecord,
                "object record \(dir.path)/\(name) is damaged: it is \(st.st_size) bytes, larger than any record may be (\(ObjectRecord.maxEncodedSize) bytes)")
        }
        let bytes = try Directory.readWhole(fd, size: Int(st.st_size), path: dir.path + "/" + name)
        return try ObjectRecord(decoding: bytes, name: name, path: dir.path + "/" + name)
    }

    /// Removes object `name` (durably); its chunks stay until garbage collection finds no
    /// other object referring to them. `.objectNotFound` if there is none.
    public func deleteObject(_ name: String) throws {
        try Self.validateName(name)
        guard unlinkat(dir.fd, name, 0) == 0 else {
            if errno == ENOENT { throw StoreError(.objectNotFound, "no object named \(name)") }
            throw StoreError.io("unlink", dir.path + "/" + name)
        }
        try dir.sync()
    }

    /// The names of all objects, sorted.
    public func listObjects() throws -> [String] {
        try dir.names().filter { !$0.hasPrefix(".") }.sorted()
    }

    /// Objects whose records refer to chunks the store does not have: name → missing ids.
    public func incompleteObjects() throws -> [String: [ChunkID]] {
        var out: [String: [ChunkID]] = [:]
        for name in try listObjects() {
            guard let record = try? object(name) else { continue }  // deleted meanwhile, or in `recovery`
            let missing = try chunks.missing(record.chunkIDs)
            if !missing.isEmpty { out[name] = missing }
        }
        return out
    }

    /// A new pin for an upload in progress (`ChunkPin`); `unpin` it when the upload ends, however.
    public func pinChunks() -> ChunkPin {
        let pin = ChunkPin()
        pinLock.withLock { pins[ObjectIdentifier(pin)] = pin }
        return pin
    }

    /// Ends `pin`: its chunks are left to their object, or to collection after the grace period.
    public func unpin(_ pin: ChunkPin) {
        _ = pinLock.withLock { pins.removeValue(forKey: ObjectIdentifier(pin)) }
    }

    /// Garbage collection: marks every chunk some object refers to or an upload in progress
    /// pinned, then removes the other chunks older than the grace period (`gracePeriod`, else
    /// the store's option). Refuses (`.corruptRecord`) if any record cannot be read, since its
    /// chunks would be lost. One at a time (a second call waits).
    ///
    /// Phases:
    /// 1. Recording begins: from now on `putObject` adds the ids of each record it has written
    ///    to `recorded`.
    /// 2. Mark, without the store's lock: the ids pinned now and those of every record read.
    /// 3. Walk, without the store's lock: the chunks neither marked nor younger than the grace
    ///    period are the candidates.
    /// 4. Sweep, in turns of `sweepTurn` candidates under the exclusive lock: add what was
    ///    recorded so far and what is pinned now to the keep set, then remove each candidate
    ///    not kept whose mtime is still older than the grace period. Recording ends with the
    ///    last turn.
    /// Puts and records are written throughout, waiting only for a turn.
    ///
    /// Why no chunk an object refers to is removed — take a chunk C unlinked in a turn of
    /// phase 4, and an object O whose record names C at that moment:
    /// - O's record was renamed into place before recording began: phase 2 read it (or a later
    ///   version, which replaced it: then that version is the one that counts, and it is
    ///   either older than recording, and read, or newer, below). A delete only drops a
    ///   record, so its chunks may go. C was marked, never a candidate.
    /// - O's record was written after recording began and before the turn: `putObject` adds
    ///   the ids under the shared lock, after the rename, and recording was on (the turn had
    ///   not ended). The turn holds the exclusive lock, so that write finished before it and
    ///   the turn's keep set has C.
    /// - O's record was written after the turn: `putObject` checks, under the shared lock,
    ///   that its chunks are there; C is not, so it refuses with `.missingChunks`, as it would
    ///   have had the collection come before its chunk puts.
    /// The same for an upload in progress, whose object is not written yet: its chunks were
    /// put (written, or refreshed if already stored) just before they were pinned. One pinned
    /// at the turn is kept; one pinned before and unpinned by then has had its object written
    /// (above) or was abandoned. A chunk put since the walk (a dedup put refreshes the mtime,
    /// a non-dedup put rewrites the file) is young at the turn's re-check, which no put can
    /// overtake while the exclusive lock is held. `missing` (have/want) refreshes nothing: an
    /// upload that finds chunks present and then waits longer than the grace period before
    /// its manifest may get `.missingChunks`, as before.
    public func collect(gracePeriod: Duration? = nil) throws -> CollectResult {
        try collecting.withLock {
            let grace = gracePeriod ?? chunks.options.collectGracePeriod
            var keep = pinLock.withLock {
                recorded = []
                return pins.values.reduce(into: Set<ChunkID>()) { $0.formUnion($1.pinned) }
            }
            defer { pinLock.withLock { recorded = nil } }
            let names = try listObjects()
            for name in names {
                let record: ObjectRecord
                do {
                    record = try object(name)
                } catch let e as StoreError where e.code == .objectNotFound {
                    continue  // deleted since the listing (deletes take no lock): its chunks are garbage
                } catch let e as StoreError where e.code == .corruptRecord {
                    throw StoreError(.corruptRecord, "garbage collection refused: \(e.message)")
                }
                keep.formUnion(record.chunkIDs)
            }
            phaseHook?(.marked)
            let (candidates, walked) = try chunks.sweepCandidates(keeping: keep, grace: grace)
            phaseHook?(.walked)
            var sweep = walked
            var start = candidates.startIndex
            while start < candidates.endIndex {
                let turn = candidates[start..<min(start + Self.sweepTurn, candidates.endIndex)]
                let swept = try chunks.lock.exclusive {
                    // The recorded ids move into `keep`: each turn takes only what came since.
                    pinLock.withLock {
                        keep.formUnion(recorded ?? [])
                        recorded = []
                        for pin in pins.values { keep.formUnion(pin.pinned) }
                    }
                    return try chunks.sweepLocked(candidates: turn, keeping: keep, grace: grace)
                }
                sweep.kept += swept.kept
                sweep.young += swept.young
                sweep.removed += swept.removed
                sweep.bytesFreed += swept.bytesFreed
                start = turn.endIndex
            }
            let result = CollectResult(
                objectsScanned: names.count, chunksReferenced: sweep.kept,
                chunksInGracePeriod: sweep.young, chunksRemoved: sweep.removed, bytesFreed: sweep.bytesFreed)
            logger.info(
                "garbage collection",
                metadata: [
                    "objects": "\(result.objectsScanned)", "kept": "\(result.chunksReferenced)",
                    "young": "\(result.chunksInGracePeriod)", "removed": "\(result.chunksRemoved)", "bytesFreed": "\(result.bytesFreed)",
                ])
            return result
        }
    }
}
