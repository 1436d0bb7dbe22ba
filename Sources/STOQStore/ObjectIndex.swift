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
/// Garbage collection against concurrent writes — the rule:
/// - `putObject` checks its chunks and writes its record under the store's shared lock;
///   `collect` marks and sweeps under the exclusive lock. So a record is either seen by the
///   mark or written after the sweep, never in between.
/// - An upload puts its chunks before its object. Chunks referenced by no object are
///   collected only when their mtime is older than `Options.collectGracePeriod` (default 1 h);
///   a put of a chunk the store already has refreshes its mtime. An ingest (the node cutting
///   an upload into chunks as it arrives) also pins the chunks it has put (`pinChunks`), so
///   that an upload slower than the grace period keeps them all until its object is written or
///   it is abandoned. A client's own chunked upload (chunk PUTs, then its manifest) pins
///   nothing: one that takes longer than the grace period between its chunks and its object
///   gets `.missingChunks` listing what to resend.
/// - Puts wait while a collection runs (it walks the whole chunk tree); collections are
///   meant to be occasional.
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
    private let pinLock = NSLock()
    private var pins: [ObjectIdentifier: ChunkPin] = [:]

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
            chunks.diskFull.stored()
        }
    }

    /// The record of object `name`; `.objectNotFound` if there is none, `.corruptRecord` when
    /// something other than a regular file has its name.
    public func object(_ name: String) throws -> ObjectRecord {
        try Self.validateName(name)
        // O_NONBLOCK: opening a FIFO left under objects/ would block (a worker serving a GET,
        // the collector) until something opened it for writing. A regular file's reads ignore it.
        let fd = openat(dir.fd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
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
    /// chunks would be lost.
    public func collect(gracePeriod: Duration? = nil) throws -> CollectResult {
        try chunks.lock.exclusive {
            var keep = Set<ChunkID>()
            for pin in pinLock.withLock({ Array(pins.values) }) { keep.formUnion(pin.pinned) }
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
            let sweep = try chunks.sweepLocked(keeping: keep, grace: gracePeriod ?? chunks.options.collectGracePeriod)
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
