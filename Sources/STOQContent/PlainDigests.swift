import CSTOQSystem
import Crypto
import Foundation
import Logging
import STOQCore
import STOQStore

/// SHA-256 digests for the plain files that have none: an operator's file copied into
/// `storage.path`, or one changed in place since its digest was recorded. Until it has one,
/// such a file's ETag is its inode, mtime and size, which no client or edge can check a body
/// against. A GET or HEAD of such a file asks for its digest (`request`); one background
/// thread, under SCHED_IDLE so that it only ever takes time no worker wants, reads the file
/// and records the digest in `user.stoq.object` (`ObjectGate.writeMeta`: format 2,
/// with the size and mtime it belongs to, keeping any owner), so the responses after it carry
/// the digest as their ETag. A cut of the file (`PlainCuts`) that computed the digest records
/// it the same way (`record`), so the file's ETag can change without a GET.
///
/// - A file that changes while it is read keeps no digest (`changed`); the next GET asks again.
/// - A file the node may not change is not read at all, and one whose attribute could not be
///   written is not read again while it stays the same (`unrecorded`). A storage that keeps
///   no user xattrs, or is read-only, turns the digester off for good. Logged once.
/// - At most `maxPending` files wait; a request beyond that is dropped (the next GET asks again).
/// - A node whose cores are always busy never gets to it: the ETag stays the file's own.
public final class PlainDigests: @unchecked Sendable {
    /// What the digester did since the node started.
    public struct Counters: Sendable, Equatable {
        /// Files hashed whose digest was recorded.
        public var recorded: UInt64 = 0
        /// Files that changed while they were hashed: nothing recorded.
        public var changed: UInt64 = 0
        /// Files hashed whose digest could not be recorded.
        public var unrecorded: UInt64 = 0
        /// All zero.
        public init() {}
    }

    /// Files that may wait to be hashed at once.
    public static let maxPending = 64
    /// Versions of files whose digest could not be recorded, remembered (then forgotten all at once).
    static let maxUnrecordable = 4096

    /// A version of a file: what a recorded digest is checked against, and its inode.
    struct Version: Hashable {
        var inode: UInt64
        var size: UInt64
        var mtime: UInt64
        init(_ st: stat) {
            let s = ObjectGate.stamp(st)
            (inode, size, mtime) = (UInt64(st.st_ino), s.size, s.mtime)
        }
    }

    private let rootFD: Int32
    private let logger: Logger
    private let lock = NSLock()
    private let wake = DispatchSemaphore(value: 0)
    private let done = DispatchSemaphore(value: 0)
    private var started = false
    private var stopping = false
    /// Files asked for, oldest first, and their names (for the bound and duplicates).
    private var queue: [(name: String, version: Version)] = []
    private var pending: Set<String> = []
    private var unrecordable: Set<Version> = []
    private var warned = false
    /// The storage cannot keep the attribute at all (ENOTSUP, EROFS).
    private var off = false
    private var counterValues = Counters()

    /// A digester for the plain files under the directory `rootFD` (which it duplicates).
    init(rootFD: Int32, logger: Logger) {
        self.rootFD = dup(rootFD)
        self.logger = logger
    }

    deinit {
        if lock.withLock({
            stopping = true; return started
        }) {
            wake.signal()
            done.wait()
        }
        close(rootFD)
    }

    /// A snapshot of the counters.
    public var counters: Counters { lock.withLock { counterValues } }

    /// Asks for the digest of the plain file `name`, whose status is `st` and which has no
    /// current one. Cheap; any thread.
    public func request(_ name: String, _ st: stat) {
        let version = Version(st)
        let start: Bool? = lock.withLock {
            guard !off, pending.count < Self.maxPending, !unrecordable.contains(version), pending.insert(name).inserted else { return nil }
            queue.append((name, version))
            defer { started = true }
            return !started
        }
        guard let start else { return }
        if start {
            // Unowned: deinit waits for the thread to end (`done`).
            let t = Thread { [unowned(unsafe) self] in run() }
            t.name = "stoq-digest"
            t.start()
        }
        wake.signal()
    }

    private func run() {
        _ = stoq_idle_current_thread()
        while true {
            wake.wait()
            guard let job = lock.withLock({ stopping ? nil : queue.first }) else { break }
            digest(job.name, job.version)
            lock.withLock {
                queue.removeFirst()
                pending.remove(job.name)
            }
        }
        done.signal()
    }

    private func digest(_ name: String, _ asked: Version) {
        let fd = openat(rootFD, name, StoredFile.readFlags)
        guard fd >= 0 else { return }  // gone since: nothing to record
        defer { close(fd) }
        var before = stat()
        guard fstat(fd, &before) == 0, (before.st_mode & S_IFMT) == S_IFREG, Version(before) == asked else { return }
        if let meta = ObjectGate.readMeta(fd), let s = meta.stamp, s == ObjectGate.stamp(before) { return }  // recorded meanwhile
        guard faccessat(rootFD, name, W_OK, AT_EACCESS) == 0 else { return unrecorded(name, asked, errno) }
        var hasher = SHA256()
        let piece = 1 << 20
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: piece, alignment: 64)
        defer { buffer.deallocate() }
        var offset: off_t = 0
        while true {
            let n = pread(fd, buffer.baseAddress, piece, offset)
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else {
                logger.warning("storage: cannot read \(name) to hash it: \(String(cString: strerror(errno)))")
                return
            }
            if n == 0 { break }
            hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
            offset += off_t(n)
        }
        var after = stat()
        guard fstat(fd, &after) == 0, Version(after) == asked, UInt64(offset) == asked.size else {
            lock.withLock { counterValues.changed += 1 }
            return
        }
        record(name, fd: fd, sha256: Array(hasher.finalize()), before: before)
    }

    /// Records `sha256`, the digest of the plain file `name` (open as `fd`) as it was read
    /// while its status was `before` (the caller checked it did not change while read), unless
    /// it has a current one or cannot be given one. Any thread (`PlainCuts` records what a cut
    /// computed): the check and the write are one step under the lock, so a file hashed by
    /// both is recorded once.
    func record(_ name: String, fd: Int32, sha256: [UInt8], before: stat) {
        let version = Version(before)
        let failed: Int32? = lock.withLock {
            guard !off, !unrecordable.contains(version) else { return nil }
            let meta = ObjectGate.readMeta(fd)
            if let s = meta?.stamp, s == ObjectGate.stamp(before) { return nil }  // recorded meanwhile
            guard faccessat(rootFD, name, W_OK, AT_EACCESS) == 0 else { return errno }
            guard ObjectGate.writeMeta(fd, sha256: sha256, owner: meta?.owner ?? "", stamp: ObjectGate.stamp(before)) else { return errno }
            counterValues.recorded += 1
            return nil
        }
        if let failed { unrecorded(name, version, failed) }
    }

    /// The digest of `name` cannot be recorded (`error`): not for this version, or (the storage
    /// keeps no user xattrs, or is read-only) not for any file.
    private func unrecorded(_ name: String, _ version: Version, _ error: Int32) {
        let storageWide = error == ENOTSUP || error == EOPNOTSUPP || error == EROFS
        let first: Bool = lock.withLock {
            counterValues.unrecorded += 1
            if storageWide { off = true }
            if unrecordable.count >= Self.maxUnrecordable { unrecordable.removeAll() }
            unrecordable.insert(version)
            defer { warned = true }
            return !warned
        }
        if first {
            let scope = storageWide ? "no file of this storage will get one" : "files the node may not change keep theirs"
            logger.warning(
                "storage: cannot record the SHA-256 of \(name) in its \(ObjectGate.metaName) attribute (\(String(cString: strerror(error)))); \(scope): an inode/mtime ETag, which clients cannot check bodies against (logged once)"
            )
        }
    }
}
