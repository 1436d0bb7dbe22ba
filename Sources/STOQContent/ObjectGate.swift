import CSTOQSystem
import Foundation
import Logging
import STOQChunking
import STOQCore
import STOQQUIC
import STOQStore

/// The one place an object write or delete commits through, for plain objects
/// (`/objects/<name>`), chunked ones (`/manifests/<name>`) and uploads chunked on ingest:
///
/// - **Conditional requests** (RFC 9110 §13): `If-Match` and `If-None-Match` against the
///   object's strong ETag, which is the SHA-256 of its content (`"<64 hex>"`), the same
///   whether the object is a plain file or chunked.
/// - **Overwrite policy** (`access.overwrite`): who may replace or delete an object that
///   exists — its owner (the identity that wrote it) or an admin, any writer, or no one.
/// - **Quotas** (`limits.writer_quota`, `limits.storage_cap`): bytes per owner and bytes
///   the node stores.
///
/// Race-free: a commit looks up the current object, evaluates all three and performs the
/// write (a rename, or an object record's replacement) under one lock, so of two
/// `If-None-Match: *` PUTs of a name only one wins, and two uploads cannot both fit the last
/// megabyte of a quota. Commits are serialised node-wide; each is one rename or one record
/// write. The same checks run when a request's head arrives (refused before its body is
/// read), then again at the commit, which is what decides.
///
/// Accounting. An owner is charged the length of each object it owns (a chunked object's
/// `totalLength`), whether or not its chunks are shared: deduplication saves the node disk,
/// not the writer quota. Chunks themselves (`PUT /chunks/…`, and ingest's) are charged to
/// no one but count against `storage_cap` once each; so a manifest PUT is refused for the
/// owner's quota, a chunk PUT only for the cap. Stored bytes = plain files + chunk files;
/// deleting or replacing a chunked object frees its chunks only when garbage collection runs.
/// Usage is computed at start from the files and records, then kept up to date here.
///
/// Uploads in progress. A `PUT /objects/…` holds bytes from its start to its end (`Hold`),
/// counted against its writer's quota and the cap as if stored, so that uploads side by side
/// cannot together write more than the limits leave (their temp files are on the same disk):
/// an announced length is held whole when the head arrives (refused there when it does not
/// fit beside what is used and what the writer's other uploads hold); an upload of unannounced
/// length holds what it has received and a little more (`grow`), and is refused when it passes
/// what it holds with no room left to grow. The commit turns the hold into usage under the
/// lock; every other end releases it (`end`). Holds live in memory only: a restart starts
/// with none (the temp files of the uploads a crash cut short are removed at start).
/// Each byte counts once: the chunks an ingest stores for an upload before its commit
/// (`stored(_:by:)`) are inside that upload's hold, so the bytes stored leave them out until the
/// hold ends (then they are the object's, or garbage waiting for collection). Stored bytes +
/// held bytes is what the cap is checked against, and with them counted twice a followed upload
/// would need twice its size free at its end, and one of unannounced length could grow only
/// into half of the room left.
///
/// Plain files keep their owner and SHA-256 in an extended attribute (`user.stoq.object`,
/// `2 <sha256 hex> <size> <mtime ns> <owner>`, the numbers in hex), set on the temp file before
/// its rename so it is atomic with the content. The SHA-256 is the file's only while its size
/// and mtime are the ones recorded with it: a file rewritten in place (`cp new.bin
/// objects/a.bin` keeps the inode and its xattrs) keeps its owner but gets the ETag a file
/// without a digest has. A file without the attribute (stored before, or on a filesystem
/// without user xattrs) has no owner (any writer may replace it) and a strong ETag from its
/// inode, mtime and size. The first format (`1 <sha256 hex> <owner>`) is still read, trusted
/// as it always was.
///
/// Thread-safe: every worker and the ingest pool share one.
public final class ObjectGate: @unchecked Sendable {
    /// `access.overwrite`: who may replace or delete an object that exists.
    public enum Overwrite: String, Sendable, CaseIterable {
        /// Its owner or an admin (objects without an owner: any writer).
        case owner
        /// Any writer the node authorizes.
        case writers
        /// No one: objects are immutable once written (deletes refused too).
        case never
    }

    /// The policy and limits. Zero means no limit.
    public struct Settings: Sendable, Equatable {
        public var overwrite: Overwrite
        /// `limits.storage_cap`: bytes the node stores, at most.
        public var storageCap: UInt64
        /// `limits.writer_quota`: bytes each owner's objects may total.
        public var writerQuota: UInt64

        /// Settings with these values.
        public init(overwrite: Overwrite = .owner, storageCap: UInt64 = 0, writerQuota: UInt64 = 0) {
            (self.overwrite, self.storageCap, self.writerQuota) = (overwrite, storageCap, writerQuota)
        }
    }

    /// What the gate refused, and what is stored.
    public struct Counters: Sendable, Equatable {
        /// Writes refused for `limits.storage_cap` and for `limits.writer_quota` (507).
        public var storageCapRefused: UInt64 = 0
        public var writerQuotaRefused: UInt64 = 0
        /// Writes and deletes refused by `If-Match` / `If-None-Match` (412).
        public var preconditionFailed: UInt64 = 0
        /// Writes and deletes refused by `access.overwrite` (403, or 409 under "never").
        public var overwriteRefused: UInt64 = 0
        /// Bytes stored now: plain files and chunks, but the chunks of uploads in progress
        /// (their holds count them, in `inFlightBytes`).
        public var storedBytes: UInt64 = 0
        /// Owners with objects stored.
        public var owners = 0
        /// Bytes held by uploads in progress (`Hold`), and how many hold some: counted against
        /// the quota and the cap, not in `storedBytes`.
        public var inFlightBytes: UInt64 = 0
        public var inFlightUploads = 0
        /// Plain files hashed in the background (`PlainDigests`).
        public var digests = PlainDigests.Counters()

        /// All zero.
        public init() {}
    }

    /// The object a write would replace, as the checks see it.
    public struct Current: Sendable, Equatable {
        /// Its strong ETag, quoted.
        public var etag: String
        /// Who wrote it ("" = unknown).
        public var owner: String
        /// Bytes charged to its owner: its length.
        public var size: UInt64
        /// Bytes its replacement or deletion frees at once (a plain file's; a chunked
        /// object's chunks wait for garbage collection).
        public var physical: UInt64

        /// An object's state.
        public init(etag: String, owner: String, size: UInt64, physical: UInt64) {
            (self.etag, self.owner, self.size, self.physical) = (etag, owner, size, physical)
        }
    }

    /// Who writes, and the conditions the request puts on the write.
    public struct Writer: Sendable, Equatable {
        /// `clientIdentity(_:peer:)` of the request.
        public var identity: String
        /// The access policy's admin role (may replace or delete others' objects).
        public var admin: Bool
        public var ifMatch: String
        public var ifNoneMatch: String

        /// A writer.
        public init(identity: String, admin: Bool = false, ifMatch: String = "", ifNoneMatch: String = "") {
            (self.identity, self.admin, self.ifMatch, self.ifNoneMatch) = (identity, admin, ifMatch, ifNoneMatch)
        }
    }

    /// A refused write: the status and the sentence the client gets.
    public struct Refusal: Error, Sendable, Equatable {
        public var status: Int
        public var reason: String
    }

    /// An upload's hold on the quotas while its body arrives (`hold(_:by:size:)`): bytes
    /// counted against its writer's `limits.writer_quota` and the node's `limits.storage_cap`
    /// as if stored. Ended once, by the commit that turns it into usage or by `end`; ending
    /// it again does nothing.
    public struct Hold: Sendable, Hashable {
        /// Its number in this gate.
        public let id: UInt64
        /// Bytes held from the start: the announced length, or the first part of an upload of
        /// unannounced length (which `grow`s).
        public let bytes: UInt64
        /// The most bytes the upload may receive: the room the limits would leave it were no
        /// other upload in progress (the body sink's limit; the hold is the tighter bound).
        public let limit: UInt64
    }

    /// A hold's state. `freed`/`freedPhysical`: what the object it replaces (its writer's)
    /// gives back at the commit, as when the hold began.
    private struct Held {
        var identity: String
        var bytes: UInt64
        /// Bytes of chunks the upload's ingest has stored (`stored(_:by:)`), which the chunk
        /// store counts too; those within `bytes` are the hold's, not the bytes stored.
        var chunks: UInt64 = 0
        var freed: UInt64
        var freedPhysical: UInt64
        /// Why it could grow no more, as it was then (`grow`), and whether by the cap.
        var stopped: (refusal: Refusal, capped: Bool)?
    }

    /// An upload of unannounced length grows its hold by at most this much past what it has
    /// received, and by no more than half of the room left (but `growMinimum` or the rest):
    /// small enough that two uploads that fit together rarely find the room taken by the
    /// other's unused part, large enough that a gigabyte takes a thousand grows, not millions.
    public static let growStep: UInt64 = 1 << 20
    /// The least a hold grows by while there is that much room.
    public static let growMinimum: UInt64 = 64 << 10

    /// The policy and limits.
    public let settings: Settings
    /// Whether a request comes from an admin. The access policy supplies it (the assembly
    /// wires it); without one, no request is an admin's.
    public let isAdmin: @Sendable (HTTPRequest) -> Bool
    private let flatFD: Int32
    /// `fsync(2)` of the storage directory, unless a test makes it fail.
    private let syncDirectory: @Sendable (Int32) -> Int32
    private let index: ObjectIndex?
    private let lock = NSLock()
    private var usage: [String: UInt64] = [:]
    private var flatBytes: UInt64 = 0
    /// Chunk bytes being written (`reserve`).
    private var reserved: UInt64 = 0
    /// Uploads in progress (`Hold`), by id; their bytes by writer and in all.
    private var holds: [UInt64: Held] = [:]
    private var heldBy: [String: (bytes: UInt64, uploads: Int)] = [:]
    private var heldBytes: UInt64 = 0
    /// Of `heldBytes`, those stored as chunks already: Σ min(chunks, bytes) over the holds.
    private var heldInChunks: UInt64 = 0
    private var nextHold: UInt64 = 1
    private var chunkBytesAtStart: UInt64 = 0
    private var storeAtStart = StoreCounters()
    private var counterValues = Counters()
    private let logger: Logger
    /// Hashes the plain files served without a digest (`PlainDigests`).
    public let digests: PlainDigests

    /// The gate over plain files in `storagePath` and chunked objects in `index`; computes
    /// who stores what from them (walking every file, record and chunk once).
    /// `syncDirectory` is `fsync(2)` unless a test makes the storage directory's fsync fail.
    public init(
        settings: Settings, storagePath: String, index: ObjectIndex?,
        isAdmin: @escaping @Sendable (HTTPRequest) -> Bool = { _ in false }, logger: Logger = Logger(label: "stoq.gate"),
        syncDirectory: @escaping @Sendable (Int32) -> Int32 = { fsync($0) }
    ) throws {
        self.syncDirectory = syncDirectory
        try FileManager.default.createDirectory(atPath: storagePath, withIntermediateDirectories: true)
        flatFD = open(storagePath, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard flatFD >= 0 else {
            throw StoreError(.io, "cannot open storage directory \(storagePath): \(String(cString: strerror(errno)))")
        }
        (self.settings, self.index, self.isAdmin, self.logger) = (settings, index, isAdmin, logger)
        digests = PlainDigests(rootFD: flatFD, logger: logger)
        try scan()
    }

    deinit { close(flatFD) }

    /// A snapshot of the counters, with the bytes stored now.
    public var counters: Counters {
        lock.withLock {
            var c = counterValues
            c.storedBytes = storedLocked()
            c.owners = usage.count
            c.inFlightBytes = heldBytes
            c.inFlightUploads = holds.count
            c.digests = digests.counters
            return c
        }
    }

    /// Bytes `owner`'s objects total.
    public func usage(of owner: String) -> UInt64 { lock.withLock { usage[owner] ?? 0 } }

    /// The writer of `request` from `peer`.
    public func writer(_ request: HTTPRequest, peer: IPv6Endpoint) -> Writer {
        Writer(
            identity: clientIdentity(request, peer: peer), admin: isAdmin(request), ifMatch: request.ifMatch,
            ifNoneMatch: request.ifNoneMatch)
    }

    // MARK: - The object now

    /// The object `name` as a write sees it: the plain file when there is one (it shadows a
    /// chunked object of the name), else the chunked object's record; nil when neither.
    public func current(_ name: String) -> Current? {
        var st = stat()
        if fstatat(flatFD, name, &st, AT_SYMLINK_NOFOLLOW) == 0, (st.st_mode & S_IFMT) == S_IFREG {
            // A FIFO renamed over the file since the fstatat is not waited for (StoredFile).
            let fd = openat(flatFD, name, StoredFile.readFlags)
            let file = fd >= 0 ? Self.plainFile(fd, st) : (etag: Self.fileETag(st), owner: "", digested: false)
            if fd >= 0 { close(fd) }
            return Current(etag: file.etag, owner: file.owner, size: UInt64(st.st_size), physical: UInt64(st.st_size))
        }
        guard let index, let record = try? index.object(name), let manifest = try? Manifest(decoding: record.manifest) else { return nil }
        return Current(etag: manifest.etag, owner: record.owner, size: manifest.totalLength, physical: 0)
    }

    /// The ETag and owner of the plain file `fd`, whose status is `st`: its SHA-256 when
    /// `user.stoq.object` holds one that is still the content's (`digested`), else
    /// `fileETag`; no owner without the attribute.
    package static func plainFile(_ fd: Int32, _ st: stat) -> (etag: String, owner: String, digested: Bool) {
        guard let meta = readMeta(fd) else { return (fileETag(st), "", false) }
        let current = meta.stamp.map { $0 == stamp(st) } ?? true
        return (current ? ContentETag.of(sha256Hex: meta.sha256) : fileETag(st), meta.owner, current)
    }

    /// The ETag of a plain file with no SHA-256 that is still its own: a new file is a new
    /// inode, and a file rewritten in place a new mtime, so inode, mtime and size change
    /// whenever its content does.
    static func fileETag(_ st: stat) -> String {
        let s = stamp(st)
        return "\"f\(String(UInt64(st.st_ino), radix: 16))-\(String(s.mtime, radix: 16))-\(String(s.size, radix: 16))\""
    }

    /// What a recorded SHA-256 is checked against: the file's size and mtime (ns).
    static func stamp(_ st: stat) -> (size: UInt64, mtime: UInt64) {
        // Truncating: a file dated before 1970 has a negative tv_sec, and must not trap.
        (UInt64(st.st_size), UInt64(truncatingIfNeeded: st.st_mtim.tv_sec) &* 1_000_000_000 &+ UInt64(truncatingIfNeeded: st.st_mtim.tv_nsec))
    }

    static let metaName = "user.stoq.object"

    /// `user.stoq.object` of `fd`, if it has one: the SHA-256, the size and mtime it was
    /// recorded with (nil in the first format, which had none), and the owner.
    static func readMeta(_ fd: Int32) -> (sha256: String, stamp: (size: UInt64, mtime: UInt64)?, owner: String)? {
        var buf = [UInt8](repeating: 0, count: 120 + ObjectRecord.maxOwnerLength)
        let n = Int(stoq_fgetxattr(fd, metaName, &buf, UInt(buf.count)))
        guard n > 0 else { return nil }
        let text = String(decoding: buf[0..<n], as: UTF8.self)
        func field(_ s: Substring) -> UInt64? { UInt64(s, radix: 16) }
        func digest(_ s: Substring) -> Bool { s.utf8.count == 64 && s.utf8.allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) } }
        if text.hasPrefix("2 ") {
            let parts = text.split(separator: " ", maxSplits: 4, omittingEmptySubsequences: false)
            guard parts.count >= 4, digest(parts[1]), let size = field(parts[2]), let mtime = field(parts[3]) else { return nil }
            return (String(parts[1]), (size, mtime), parts.count == 5 ? String(parts[4]) : "")
        }
        let parts = text.split(separator: " ", maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count >= 2, parts[0] == "1", digest(parts[1]) else { return nil }
        return (String(parts[1]), nil, parts.count == 3 ? String(parts[2]) : "")
    }

    /// Keeps `owner` and the content's SHA-256 on the plain file `fd`, once its last byte is
    /// written (the size and mtime recorded are `known`, or those of now); false (errno set)
    /// when the filesystem keeps no user xattrs (the file then has no owner).
    static func writeMeta(_ fd: Int32, sha256: [UInt8], owner: String, stamp known: (size: UInt64, mtime: UInt64)? = nil) -> Bool {
        var st = stat()
        guard known != nil || fstat(fd, &st) == 0 else { return false }
        let s = known ?? stamp(st)
        let value =
            Array("2 \(Hex.encode(sha256)) \(String(s.size, radix: 16)) \(String(s.mtime, radix: 16)) ".utf8)
            + Array(owner.utf8.prefix(ObjectRecord.maxOwnerLength))
        return stoq_fsetxattr(fd, metaName, value, UInt(value.count)) == 0
    }

    // MARK: - Checks

    /// Why `If-Match` / `If-None-Match` fail against the object's current ETag (nil: there is
    /// no object), or nil when they hold. RFC 9110 §13.2.2's order: If-Match first (strong
    /// comparison), then If-None-Match (weak comparison; for a write, failing it is 412).
    package static func preconditionFailure(ifMatch: String, ifNoneMatch: String, current: String?) -> String? {
        func tags(_ field: String) -> [String] {
            field.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        }
        func weak(_ t: String) -> String { t.hasPrefix("W/") ? String(t.dropFirst(2)) : t }
        if !ifMatch.isEmpty {
            let list = tags(ifMatch)
            guard let current else { return "If-Match: \(ifMatch) but there is no such object" }
            let hit = list.contains("*") || list.contains { !$0.hasPrefix("W/") && $0 == current && !current.hasPrefix("W/") }
            if !hit { return "If-Match: \(ifMatch) but the object's ETag is \(current)" }
        }
        if !ifNoneMatch.isEmpty, let current {
            let list = tags(ifNoneMatch)
            if list.contains("*") { return "If-None-Match: * but the object exists (ETag \(current))" }
            if list.contains(where: { weak($0) == weak(current) }) { return "If-None-Match: \(ifNoneMatch) matches the object's ETag" }
        }
        return nil
    }

    /// What RFC 9110 §13.2.2 makes of a GET's or HEAD's `If-Match` and `If-None-Match` against
    /// the object's ETag `current`: nil to send the object, 412 and why for an `If-Match` it
    /// fails, 304 for an `If-None-Match` it matches (weak comparison, as for writes).
    package static func readPrecondition(ifMatch: String, ifNoneMatch: String, current: String) -> (status: Int, why: String)? {
        if let why = preconditionFailure(ifMatch: ifMatch, ifNoneMatch: "", current: current) { return (412, why) }
        if let why = preconditionFailure(ifMatch: "", ifNoneMatch: ifNoneMatch, current: current) { return (304, why) }
        return nil
    }

    /// What the writer may not do to `name` (whose state is `current`): nil when it may.
    /// `size` is the object's new length and `physical` the bytes it adds to the store, when
    /// known (nil: quotas are not checked yet); `delete` for a delete. Counts refusals.
    /// Under `lock`.
    /// `moreThan`: the upload was stopped after this many bytes, its size is unknown.
    /// Uploads in progress count as stored, but for the hold `excluding` (the write's own).
    private func refusalLocked(
        _ name: String, _ w: Writer, _ current: Current?, size: UInt64?, physical: UInt64?, delete: Bool, moreThan: UInt64? = nil,
        excluding own: UInt64? = nil
    ) -> Refusal? {
        if let why = Self.preconditionFailure(ifMatch: w.ifMatch, ifNoneMatch: w.ifNoneMatch, current: current?.etag) {
            counterValues.preconditionFailed += 1
            return Refusal(status: 412, reason: "precondition failed for \(name): \(why)")
        }
        if let current {
            switch settings.overwrite {
            case .never:
                counterValues.overwriteRefused += 1
                return Refusal(
                    status: 409,
                    reason: "object \(name) exists and access.overwrite = \"never\": objects cannot be \(delete ? "deleted" : "replaced")")
            case .owner where !current.owner.isEmpty && current.owner != w.identity && !w.admin:
                counterValues.overwriteRefused += 1
                return Refusal(
                    status: 403,
                    reason:
                        "object \(name) belongs to \(current.owner); access.overwrite = \"owner\" lets only its owner or an admin \(delete ? "delete" : "replace") it"
                )
            default: break
            }
        }
        let freed = current?.owner == w.identity ? current!.size : 0
        return limitRefusalLocked(
            w.identity, freed: freed, freedPhysical: current?.physical ?? 0, size: size, physical: physical, moreThan: moreThan,
            excluding: own
        ).map { r in
            if r.capped { counterValues.storageCapRefused += 1 } else { counterValues.writerQuotaRefused += 1 }
            return r.refusal
        }
    }

    /// Why a write by `identity` of `size` bytes charged to it and `physical` added to the store
    /// would pass the quota or the cap (nil: checks neither; a `physical` of 0 never passes the
    /// cap), beside what is used, stored and held by uploads in progress but `own`; `freed` and
    /// `freedPhysical`: what the object it replaces gives back. `capped`: the cap's refusal, not
    /// the quota's. Counts nothing. Under `lock`.
    private func limitRefusalLocked(
        _ identity: String, freed: UInt64, freedPhysical: UInt64, size: UInt64?, physical: UInt64?, moreThan: UInt64?,
        excluding own: UInt64?
    ) -> (refusal: Refusal, capped: Bool)? {
        let needs = { (n: UInt64) in moreThan.map { "more than \(Self.bytes($0))" } ?? Self.bytes(n) }
        let mine = own.flatMap { holds[$0] }
        func inFlight(_ bytes: UInt64, _ uploads: Int) -> String {
            uploads == 0 ? "" : ", \(Self.bytes(bytes)) in flight in \(uploads) other upload\(uploads == 1 ? "" : "s")"
        }
        if let size, settings.writerQuota > 0 {
            let (used, held, uploads, taken) = quotaTakenLocked(identity, freed: freed, excluding: mine)
            if taken > settings.writerQuota || size > settings.writerQuota - taken {
                let reason =
                    "quota for \(identity): \(Self.bytes(used)) used of \(Self.bytes(settings.writerQuota)) "
                    + "(limits.writer_quota)\(inFlight(held, uploads)), this upload needs \(needs(size))"
                    + (freed > 0 ? " and frees \(Self.bytes(freed))" : "")
                return (Refusal(status: 507, reason: reason), false)
            }
        }
        // A write adding nothing (a record over chunks already counted) is never the one refused.
        if let physical, physical > 0, settings.storageCap > 0 {
            let (stored, held, uploads, taken) = capTakenLocked(freedPhysical: freedPhysical, excluding: mine)
            if taken > settings.storageCap || physical > settings.storageCap - taken {
                let reason =
                    "storage cap of this node: \(Self.bytes(stored)) stored of \(Self.bytes(settings.storageCap)) "
                    + "(limits.storage_cap)\(inFlight(held, uploads)), this upload needs \(needs(physical))"
                return (Refusal(status: 507, reason: reason), true)
            }
        }
        return nil
    }

    /// The most bytes an upload by `identity` may hold now, given what the object it replaces
    /// frees (`freed` of the quota, `freedPhysical` of the cap) and what the other uploads hold
    /// (all but `own`); with `othersToo` false, as if no other upload were in progress (the
    /// body sink's limit). `.max` when no limit applies. Under `lock`.
    private func roomLocked(_ identity: String, freed: UInt64, freedPhysical: UInt64, excluding own: UInt64?, othersToo: Bool = true) -> UInt64 {
        let mine = own.flatMap { holds[$0] }
        var room = UInt64.max
        if settings.writerQuota > 0 {
            let taken = quotaTakenLocked(identity, freed: freed, excluding: mine, othersToo: othersToo).taken
            room = min(room, settings.writerQuota - min(settings.writerQuota, taken))
        }
        if settings.storageCap > 0 {
            let taken = capTakenLocked(freedPhysical: freedPhysical, excluding: mine, othersToo: othersToo).taken
            room = min(room, settings.storageCap - min(settings.storageCap, taken))
        }
        return room
    }

    /// What `identity`'s quota has taken: its objects' bytes `used` less `freed` (what the
    /// object an upload replaces gives back), plus what its uploads in progress but `mine` hold
    /// (`held`, by `uploads` of them; none with `othersToo` false). Under `lock`.
    private func quotaTakenLocked(
        _ identity: String, freed: UInt64, excluding mine: Held?, othersToo: Bool = true
    ) -> (used: UInt64, held: UInt64, uploads: Int, taken: UInt64) {
        let used = usage[identity] ?? 0
        var (held, uploads) = othersToo ? heldBy[identity] ?? (0, 0) : (0, 0)
        if othersToo, let mine, mine.identity == identity { (held, uploads) = (held - min(held, mine.bytes), uploads - 1) }
        return (used, held, uploads, used - min(used, freed) + held)
    }

    /// What the storage cap has taken: the bytes `stored` less `freedPhysical`, plus what every
    /// upload in progress but `mine` holds (none with `othersToo` false). Under `lock`.
    private func capTakenLocked(
        freedPhysical: UInt64, excluding mine: Held?, othersToo: Bool = true
    ) -> (stored: UInt64, held: UInt64, uploads: Int, taken: UInt64) {
        let stored = storedLocked()
        let held = othersToo ? heldBytes - min(heldBytes, mine?.bytes ?? 0) : 0
        let uploads = othersToo ? holds.count - (mine == nil ? 0 : 1) : 0
        return (stored, held, uploads, stored - min(stored, freedPhysical) + held)
    }

    /// What an upload of unannounced length that has received `received` bytes, with `room`
    /// bytes it may hold, holds next: what it received and `growStep` more, no more than half
    /// of what is left past it (but `growMinimum`), within `room`; `received` when there is no
    /// room past it.
    static func grant(received: UInt64, room: UInt64) -> UInt64 {
        guard room > received else { return received }
        let left = room - received
        return received + min(left, min(growStep, max(left / 2, growMinimum)))
    }

    /// The checks a request's head can be refused by before its body is read (`size`: its
    /// `Content-Length`, when sent). The commit checks again.
    public func check(_ name: String, by w: Writer, size: UInt64?, physical: UInt64?) -> Refusal? {
        let current = current(name)
        return lock.withLock { refusalLocked(name, w, current, size: size, physical: physical, delete: false) }
    }

    /// Reserves `size` bytes about to be written as chunks (a chunk PUT, or an ingest's
    /// upper bound), or refuses them by `storage_cap` (chunks are charged to no owner). The
    /// reservation counts as stored until `release`d once the chunks are written (and counted
    /// by the store), so concurrent writers cannot together pass the cap.
    public func reserve(_ size: UInt64) -> Refusal? {
        lock.withLock {
            if let r = refusalLocked("chunk", Writer(identity: ""), nil, size: nil, physical: size, delete: false) { return r }
            reserved += size
            return nil
        }
    }

    /// Whether a chunk of `size` bytes would fit `storage_cap` now (the checks a head gets;
    /// `reserve` decides).
    public func checkChunk(size: UInt64) -> Refusal? {
        lock.withLock { refusalLocked("chunk", Writer(identity: ""), nil, size: nil, physical: size, delete: false) }
    }

    /// Ends a reservation.
    public func release(_ size: UInt64) { lock.withLock { reserved -= min(reserved, size) } }

    // MARK: - Uploads in progress

    /// Begins an upload by `w` to `name` of `size` bytes (nil: not announced): refuses it
    /// when the conditions or the policy do, or when an announced length does not fit the
    /// quota and the cap beside what is stored and what the uploads in progress hold (507
    /// naming both); else holds the announced length, or for an unannounced one a first part
    /// (`grant`; 0 when nothing is left, so that its first byte is refused). Nil with nothing
    /// held when the node has no quota and no cap. The hold ends with the commit or `end`.
    public func hold(_ name: String, by w: Writer, size: UInt64?) -> Result<Hold?, Refusal> {
        let current = current(name)
        return lock.withLock {
            if let r = refusalLocked(name, w, current, size: size, physical: size, delete: false) { return .failure(r) }
            guard settings.writerQuota > 0 || settings.storageCap > 0 else { return .success(nil) }
            let freed = current?.owner == w.identity ? current!.size : 0
            let freedPhysical = current?.physical ?? 0
            let room = roomLocked(w.identity, freed: freed, freedPhysical: freedPhysical, excluding: nil)
            let bytes = size ?? Self.grant(received: 0, room: room)
            let id = nextHold
            nextHold += 1
            holds[id] = Held(identity: w.identity, bytes: bytes, freed: freed, freedPhysical: freedPhysical)
            heldBy[w.identity, default: (0, 0)].bytes += bytes
            heldBy[w.identity, default: (0, 0)].uploads += 1
            heldBytes += bytes
            let limit = roomLocked(w.identity, freed: freed, freedPhysical: freedPhysical, excluding: id, othersToo: false)
            return .success(Hold(id: id, bytes: bytes, limit: limit))
        }
    }

    /// An upload of unannounced length has received `received` bytes, all it holds: its hold
    /// grows to cover them and some more (`grant`) as far as the limits leave room. Returns
    /// the bytes held now, or, when there is no room for another byte, why (the upload must
    /// stop there; it holds what it received): the 507 as it is now, with what the other
    /// uploads hold now, which `overHeadroom` answers and counts if another byte comes. A hold
    /// already ended stays ended (0 bytes).
    public func grow(_ hold: Hold, received: UInt64) -> Result<UInt64, Refusal> {
        lock.withLock {
            guard let h = holds[hold.id] else { return .success(0) }
            let room = roomLocked(h.identity, freed: h.freed, freedPhysical: h.freedPhysical, excluding: hold.id)
            let bytes = max(h.bytes, Self.grant(received: received, room: room))
            setLocked(hold.id, bytes)
            if bytes > received { return .success(bytes) }
            let stopped =
                limitRefusalLocked(
                    h.identity, freed: h.freed, freedPhysical: h.freedPhysical, size: bytes + 1, physical: bytes + 1, moreThan: bytes,
                    excluding: hold.id)
                ?? (Refusal(status: 507, reason: "the upload needs more than the \(Self.bytes(bytes)) the limits left it"), false)
            holds[hold.id]!.stopped = stopped
            return .failure(stopped.refusal)
        }
    }

    /// The body of the upload holding `hold` ended with `size` bytes: holds exactly that (what
    /// it held past it is free at once), or refuses it, as the commit would, when conditions,
    /// policy or limits do (the hold stays until `end`). Checked again at the commit.
    public func settle(_ hold: Hold, _ name: String, by w: Writer, size: UInt64) -> Refusal? {
        let current = current(name)
        return lock.withLock {
            if let r = refusalLocked(name, w, current, size: size, physical: size, delete: false, excluding: hold.id) { return r }
            setLocked(hold.id, size)
            return nil
        }
    }

    /// Ends `hold` (the upload was refused, aborted or failed): its bytes count no more. Once;
    /// a hold the commit or an earlier `end` ended is left alone.
    public func end(_ hold: Hold?) {
        guard let hold else { return }
        lock.withLock { endLocked(hold.id) }
    }

    /// Bytes `hold` holds now (0 once it ended).
    public func held(_ hold: Hold) -> UInt64 { lock.withLock { holds[hold.id]?.bytes ?? 0 } }

    /// The ingest of the upload holding `hold` stored a new chunk of `bytes` bytes, before the
    /// commit: its hold covers them, so the bytes stored leave them out (each byte counts once
    /// against the cap) until the hold ends. Called after the chunk store counted the chunk:
    /// between the two it counts twice, never not at all. A hold already ended is left alone.
    public func stored(_ bytes: UInt64, by hold: Hold) {
        lock.withLock {
            guard let h = holds[hold.id] else { return }
            holds[hold.id]!.chunks = h.chunks + bytes
            heldInChunks = heldInChunks - min(heldInChunks, min(h.chunks, h.bytes)) + min(h.chunks + bytes, h.bytes)
        }
    }

    /// Sets hold `id`'s bytes (if it is still held). Under `lock`.
    private func setLocked(_ id: UInt64, _ bytes: UInt64) {
        guard let h = holds[id] else { return }
        holds[id]!.bytes = bytes
        heldBy[h.identity]!.bytes = heldBy[h.identity]!.bytes - min(heldBy[h.identity]!.bytes, h.bytes) + bytes
        heldBytes = heldBytes - min(heldBytes, h.bytes) + bytes
        heldInChunks = heldInChunks - min(heldInChunks, min(h.chunks, h.bytes)) + min(h.chunks, bytes)
    }

    /// Ends hold `id` (if it is still held): its chunks count as stored from here. Under `lock`.
    private func endLocked(_ id: UInt64) {
        guard let h = holds.removeValue(forKey: id) else { return }
        heldBytes -= min(heldBytes, h.bytes)
        heldInChunks -= min(heldInChunks, min(h.chunks, h.bytes))
        if let by = heldBy[h.identity] {
            heldBy[h.identity] = by.uploads <= 1 ? nil : (by.bytes - min(by.bytes, h.bytes), by.uploads - 1)
        }
    }

    /// Counts an upload the body sink stopped at `limit` and says why (507): past what it held
    /// when it could grow no more (`hold`'s `grow` said why then), or past its hold's `limit`.
    public func overHeadroom(_ name: String, by w: Writer, limit: UInt64, hold: Hold? = nil) -> Refusal {
        let current = current(name)
        return lock.withLock {
            if let stopped = hold.flatMap({ holds[$0.id]?.stopped }) {
                if stopped.capped { counterValues.storageCapRefused += 1 } else { counterValues.writerQuotaRefused += 1 }
                return stopped.refusal
            }
            return refusalLocked(
                name, Writer(identity: w.identity), current, size: limit + 1, physical: limit + 1, delete: false, moreThan: limit,
                excluding: hold?.id)
                ?? Refusal(status: 507, reason: "the upload of \(name) needs more than the \(Self.bytes(limit)) its quota left when it began")
        }
    }

    /// Commits a write of `name` by `w`: under the lock, looks up the object, checks the
    /// conditions, policy and quotas for an object of `size` bytes adding `physical` to the
    /// store, and calls `write` (the rename or record write) when they hold, then accounts
    /// for it. Returns the refusal (nothing written) or nil; rethrows `write`'s error.
    /// `chunked`: `write` records a chunked object, so a plain file of the name (which would
    /// shadow it, and whose bytes the accounting releases) is removed with it.
    /// `hold`: the upload's, which becomes the usage (checked without it); ended whatever the
    /// outcome.
    public func commit(
        _ name: String, by w: Writer, size: UInt64, physical: UInt64, chunked: Bool = false, hold: Hold? = nil,
        write: () throws -> Void
    ) throws -> Refusal? {
        try lock.withLock {
            defer { if let hold { endLocked(hold.id) } }
            let current = current(name)
            if let r = refusalLocked(name, w, current, size: size, physical: physical, delete: false, excluding: hold?.id) { return r }
            try write()
            // The record is written: account for it, then say whether the shadowing file is
            // durably gone. One still there (unlink failed) still takes its bytes on disk.
            let (gone, failure) = chunked && current?.physical ?? 0 > 0 ? removeFile(name) : (true, nil)
            if let current { release(current, fileGone: gone) }
            usage[w.identity, default: 0] += size
            flatBytes += physical
            if let failure { throw failure }
            return nil
        }
    }

    /// Deletes object `name` for `w`, durably: the plain file and the chunked object of the
    /// name (a chunked object's chunks stay until garbage collection). Under the lock, after
    /// the conditions and the policy. 404 when there is neither.
    public func delete(_ name: String, by w: Writer) throws -> Refusal? {
        try lock.withLock {
            guard let current = current(name) else { return Refusal(status: 404, reason: "no object \(name)") }
            if let r = refusalLocked(name, w, current, size: nil, physical: nil, delete: true) { return r }
            // A file still there (unlink failed) is not deleted; one whose removal may not
            // survive a crash is gone all the same, so the rest goes too before the 500.
            let (gone, failure) = removeFile(name)
            if !gone, let failure { throw failure }
            if let index {
                do { try index.deleteObject(name) } catch let e as StoreError where e.code == .objectNotFound {}
            }
            release(current)
            if let failure { throw failure }
            return nil
        }
    }

    /// Removes plain file `name` durably (unlink, then the directory's fsync): whether it is
    /// gone (or was never there), and why it is not, or not durably, errno included. Under `lock`.
    private func removeFile(_ name: String) -> (gone: Bool, failure: StoreError?) {
        if unlinkat(flatFD, name, 0) != 0 {
            let e = errno
            return e == ENOENT ? (true, nil) : (false, StoreError(.io, "unlink \(name): \(String(cString: strerror(e))) (errno \(e))"))
        }
        guard syncDirectory(flatFD) == 0 else {
            let e = errno
            return (true, StoreError(.io, "fsync of the storage directory: \(String(cString: strerror(e))) (errno \(e))"))
        }
        return (true, nil)
    }

    /// Forgets a replaced or deleted object's bytes: its owner's, and its plain file's on disk
    /// unless that file is still there. Under `lock`.
    private func release(_ c: Current, fileGone: Bool = true) {
        if let u = usage[c.owner] {
            usage[c.owner] = u > c.size ? u - c.size : nil
        }
        if fileGone { flatBytes -= min(flatBytes, c.physical) }
    }

    /// Bytes stored: plain files, reservations and chunks, but the chunks uploads in progress
    /// have stored, which their holds count (`heldInChunks`). Under `lock`.
    private func storedLocked() -> UInt64 {
        guard let index else { return flatBytes + reserved }
        let now = index.chunks.counters
        let written = now.bytesWritten - min(now.bytesWritten, storeAtStart.bytesWritten)
        let collected = now.bytesCollected - min(now.bytesCollected, storeAtStart.bytesCollected)
        let chunks = (chunkBytesAtStart + written) - min(chunkBytesAtStart + written, collected)
        return flatBytes + reserved + chunks - min(chunks, heldInChunks)
    }

    /// Who stores what, from the files and records.
    private func scan() throws {
        var shadowing = Set<String>()
        if let dir = fdopendir(dup(flatFD)) {
            defer { closedir(dir) }
            while let e = readdir(dir) {
                let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                guard !name.hasPrefix("."), let c = current(name) else { continue }
                usage[c.owner, default: 0] += c.size
                flatBytes += c.physical
                shadowing.insert(name)
            }
        }
        guard let index else { return }
        storeAtStart = index.chunks.counters
        for name in try index.listObjects() where !shadowing.contains(name) {
            guard let c = current(name) else { continue }
            usage[c.owner, default: 0] += c.size
        }
        for id in try index.chunks.allChunkIDs() {
            chunkBytesAtStart += UInt64(try index.chunks.size(id) ?? 0)
        }
        usage[""] = nil  // objects without an owner count towards the cap only
        logger.debug("object usage", metadata: ["owners": "\(usage.count)", "flat_bytes": "\(flatBytes)", "chunk_bytes": "\(chunkBytesAtStart)"])
    }

    /// `9.5 MB (9961472 bytes)`: the numbers a 507 carries.
    static func bytes(_ n: UInt64) -> String {
        let units: [(UInt64, String)] = [(1 << 40, "TB"), (1 << 30, "GB"), (1 << 20, "MB"), (1 << 10, "KB")]
        for (size, unit) in units where n >= size {
            let x = Double(n) / Double(size)
            let shown = x == x.rounded() ? String(Int(x)) : String(format: "%.1f", x)
            return "\(shown) \(unit) (\(n) bytes)"
        }
        return "\(n) bytes"
    }
}
