import Foundation
import Logging
import STOQChunking
import STOQCore
import STOQEdge
import STOQStore
import Synchronization

/// Manifests of this node's own plain files (`chunking.cut_plain_files`): a node asked for the
/// manifest of an object it keeps as a plain file (by an edge, a mesh node or a `--chunked`
/// client) cuts the file with the node's chunking parameters and answers with the cut, so that
/// the asker fetches it chunk by chunk — streamed as chunks arrive, in a mesh over several
/// routes and relayed chunk by chunk — instead of whole before its first byte goes on
/// (docs/content.md "Edge cache", docs/mesh.md "Plain files").
///
/// Nothing is copied: a chunk of a cut is read from the file when it is asked for, and served
/// only if it still hashes to its id. A file that changed since its cut (another inode, size
/// or mtime, or bytes that no longer hash to the id) is cut again at the next manifest
/// request; its old chunks are 404s.
///
/// - Cuts run on one thread of their own, never a worker's, at most `maxQueued` files waiting;
///   the worker that asked is answered through its inbox (`Done`).
/// - The SHA-256 of the whole file is taken from `user.stoq.object` when the attribute is
///   current (one hashing pass instead of two), and recorded there when a cut computed it.
/// - At most `maxChunks` chunks are listed by the cuts kept, all together: a larger file is
///   not cut (it travels whole), and the oldest cuts go first.
/// Thread-safe.
public final class PlainCuts: @unchecked Sendable {
    /// What the cutter did since the node started (`stoq_content_plain_cuts_total`,
    /// `stoq_content_plain_chunks_total`).
    public struct Counters: Sendable, Equatable {
        /// Files cut into a manifest.
        public var cut: UInt64 = 0
        /// Requests for a cut refused (too large, too many waiting, stopping) and cuts given up
        /// (changed while read, unreadable).
        public var failed: UInt64 = 0
        /// Chunks served from a cut's file, and chunks asked for whose file had changed since.
        public var chunksServed: UInt64 = 0
        public var chunksStale: UInt64 = 0
        public init(cut: UInt64 = 0, failed: UInt64 = 0, chunksServed: UInt64 = 0, chunksStale: UInt64 = 0) {
            (self.cut, self.failed, self.chunksServed, self.chunksStale) = (cut, failed, chunksServed, chunksStale)
        }
    }

    /// How a cut ended, for the worker that asked (`ticket` is the worker's).
    public struct Done: Sendable {
        public var ticket: UInt64
        /// The manifest, or nil when there is none (`why` says why).
        public var manifest: [UInt8]?
        public var why: String
    }

    /// What `manifest(of:ticket:inbox:)` found.
    public enum Answer: Equatable {
        /// The current cut's manifest.
        case manifest([UInt8])
        /// A cut was started (or joined); the worker hears of it through its inbox.
        case cutting
        /// The node has no plain file of that name.
        case noFile
        /// It has one but will not cut it (why).
        case refused(String)
    }

    /// What `chunk(_:)` found.
    public enum Chunk: Equatable {
        /// The chunk's bytes, read from a file that still holds them.
        case bytes([UInt8])
        /// No cut lists it, or every file that did has changed since.
        case none
        /// A file that lists it could not be read (why): it may still hold it.
        case unreadable(String)
    }

    /// Chunks listed by the cuts kept, all together (about 200 bytes each).
    public let maxChunks: Int
    /// Files that may wait to be cut at once.
    public static let maxQueued = 64

    private struct Cut {
        var version: PlainDigests.Version
        var manifest: [UInt8]
        var ids: [ChunkID]
    }
    private struct Piece {
        var name: String
        var offset: UInt64
        var length: Int
    }
    private struct Waiter {
        var ticket: UInt64
        var version: PlainDigests.Version
        var inbox: CompletionInbox<Done>
    }
    private enum ReadFailure: Error, Equatable { case changed, io(Int32) }

    private let rootFD: Int32
    private let parameters: ChunkingParameters
    private let maxObjectSize: UInt64
    private let logger: Logger
    /// Where a digest a cut computed is recorded (`user.stoq.object`); nil: nowhere.
    private let digests: PlainDigests?
    private let pool: WorkPool
    private let stopping = Atomic<Bool>(false)
    private let lock = NSLock()
    private var cuts: [String: Cut] = [:]
    /// Names of `cuts`, oldest first, and the chunks they list together.
    private var order: [String] = []
    private var listed = 0
    /// Where each chunk is: usually one place, more when files share chunks.
    private var pieces: [ChunkID: [Piece]] = [:]
    /// Cuts under way or queued, and who waits for each.
    private var waiting: [String: [Waiter]] = [:]
    private var counterValues = Counters()

    /// A cutter of the plain files under `root`, with the node's chunking parameters; the
    /// digests its cuts compute are recorded through `digests` (the node's `ObjectGate`'s).
    public init(
        root: String, parameters: ChunkingParameters, maxObjectSize: UInt64, maxChunks: Int = 1 << 20,
        digests: PlainDigests? = nil, logger: Logger
    ) throws {
        rootFD = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard rootFD >= 0 else { throw NodeError(.storage, "cannot open storage directory \(root): \(String(cString: strerror(errno)))") }
        self.parameters = parameters
        self.maxObjectSize = maxObjectSize
        self.maxChunks = maxChunks
        self.digests = digests
        self.logger = logger
        pool = WorkPool(name: "stoq-cut", threads: 1)
    }

    deinit {
        // Never waits: the last reference may be dropped by a cut on the cutter's own thread.
        pool.finish()
        close(rootFD)
    }

    /// Ends the cut under way (between two chunks) and the queued ones, answering their waiters
    /// with a failure, refuses every cut asked for after it, and waits for the cutter's thread
    /// (a node's orderly stop, once its workers have ended).
    public func stop() {
        lock.withLock { stopping.store(true, ordering: .relaxed) }
        pool.stop()
    }

    /// A snapshot of the counters.
    public var counters: Counters { lock.withLock { counterValues } }

    /// The manifest of the plain file `name` if its current version is cut; else starts the
    /// cut (the worker hears through `inbox`, with `ticket`). Worker thread; one `fstatat`.
    public func manifest(of name: String, ticket: UInt64, inbox: CompletionInbox<Done>) -> Answer {
        var st = stat()
        guard fstatat(rootFD, name, &st, AT_SYMLINK_NOFOLLOW) == 0, (st.st_mode & S_IFMT) == S_IFREG else { return .noFile }
        let version = PlainDigests.Version(st)
        let size = UInt64(st.st_size)
        return lock.withLock {
            if let c = cuts[name], c.version == version { return .manifest(c.manifest) }
            var why = tooLarge(size) ?? ""
            if stopping.load(ordering: .relaxed) {
                why = "the node is stopping"
            } else if why.isEmpty && waiting[name] == nil && waiting.count >= Self.maxQueued {
                why = "\(Self.maxQueued) plain files are already waiting to be cut"
            }
            guard why.isEmpty else {
                counterValues.failed += 1
                return .refused(why)
            }
            waiting[name, default: []].append(Waiter(ticket: ticket, version: version, inbox: inbox))
            // Under the lock, so that a `stop` cannot come between the check and the job.
            if waiting[name]!.count == 1 { submit(name) }
            return .cutting
        }
    }

    /// Why a file of `size` bytes is not cut, or nil.
    private func tooLarge(_ size: UInt64) -> String? {
        // The largest cut the bound allows: every chunk but the last at least minSize.
        if size > maxObjectSize { return "the plain file has \(size) bytes, more than storage.max_object_size (\(maxObjectSize))" }
        if size > UInt64(maxChunks) * UInt64(parameters.minSize) {
            return "the plain file has \(size) bytes, more than this node cuts (\(maxChunks) chunks)"
        }
        return nil
    }

    /// Holds the cutter's thread until the semaphore returned is signalled: tests queue requests
    /// behind a busy cutter with it.
    func hold() -> DispatchSemaphore {
        let go = DispatchSemaphore(value: 0)
        pool.submit { go.wait() }
        return go
    }

    private func submit(_ name: String) {
        pool.submit { [weak self] in
            guard let self else { return }
            finish(name, cut(name))
        }
    }

    /// The bytes of chunk `id` from the file of a cut that listed it, if that file still holds
    /// them (a cut whose file changed is forgotten). Worker thread.
    public func chunk(_ id: ChunkID) -> Chunk {
        let places: [(Piece, PlainDigests.Version)] = lock.withLock {
            (pieces[id] ?? []).compactMap { p in cuts[p.name].map { (p, $0.version) } }
        }
        var unreadable: String?
        for (piece, version) in places.reversed() {
            switch read(piece, version) {
            case .success(let bytes) where ChunkID(digestOf: bytes) == id:
                lock.withLock { counterValues.chunksServed += 1 }
                return .bytes(bytes)
            case .failure(.io(let e)):
                // Says nothing of the file: it may still hold the chunk.
                unreadable = "cannot read \(piece.name): \(String(cString: strerror(e)))"
            case .success, .failure(.changed):  // bytes that no longer hash to the id: changed
                lock.withLock {
                    counterValues.chunksStale += 1
                    if cuts[piece.name]?.version == version { forget(piece.name) }
                }
            }
        }
        return unreadable.map { .unreadable($0) } ?? .none
    }

    private func read(_ p: Piece, _ version: PlainDigests.Version) -> Result<[UInt8], ReadFailure> {
        let fd = openat(rootFD, p.name, StoredFile.readFlags)
        guard fd >= 0 else { return .failure(errno == ENOENT ? .changed : .io(errno)) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { return .failure(.io(errno)) }
        guard PlainDigests.Version(st) == version else { return .failure(.changed) }
        var out = [UInt8](repeating: 0, count: p.length)
        var done = 0
        while done < p.length {
            let n = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, p.length - done, off_t(p.offset) + off_t(done)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return .failure(n == 0 ? .changed : .io(errno)) }
            done += n
        }
        return .success(out)
    }

    /// Cuts `name` (on the cutter's thread): the manifest and its chunks' places, or why not.
    private func cut(_ name: String) -> Result<(Cut, [Piece]), NodeError> {
        let fd = openat(rootFD, name, StoredFile.readFlags)
        guard fd >= 0 else { return .failure(NodeError(.storage, "cannot open it: \(String(cString: strerror(errno)))")) }
        defer { close(fd) }
        var before = stat()
        guard fstat(fd, &before) == 0, (before.st_mode & S_IFMT) == S_IFREG else {
            return .failure(NodeError(.storage, "it is no longer a regular file"))
        }
        // It may have grown since it was asked for: the bounds again, and no byte past its size.
        let size = UInt64(before.st_size)
        if let why = tooLarge(size) { return .failure(NodeError(.storage, why)) }
        // The recorded SHA-256 of the whole file, when it is still the content's.
        var digest: ContentDigest?
        if let meta = ObjectGate.readMeta(fd), meta.stamp.map({ $0 == ObjectGate.stamp(before) }) == true {
            digest = ContentDigest(hex: meta.sha256)
        }
        let chunker = StreamingChunker(source: FileDescriptorSource(fd: fd), parameters: parameters, digestObject: digest == nil)
        var entries: [Manifest.Entry] = []
        var pieces: [Piece] = []
        var ids: [ChunkID] = []
        do {
            while let c = try chunker.next() {
                if stopping.load(ordering: .relaxed) { return .failure(NodeError(.storage, "the node is stopping")) }
                if c.offset + UInt64(c.length) > size { return .failure(NodeError(.storage, "it changed while it was cut")) }
                entries.append(Manifest.Entry(id: c.id, length: UInt32(c.length)))
                pieces.append(Piece(name: name, offset: c.offset, length: c.length))
                ids.append(ChunkID(bytes: c.id.bytes)!)
            }
        } catch { return .failure(NodeError(.storage, "cannot read it: \(error)")) }
        var after = stat()
        guard fstat(fd, &after) == 0, PlainDigests.Version(after) == PlainDigests.Version(before),
            chunker.bytesConsumed == size, let whole = digest ?? chunker.objectDigest
        else { return .failure(NodeError(.storage, "it changed while it was cut")) }
        // A digest computed here is recorded, as a GET's would be: the file's ETag becomes its
        // SHA-256, and its next cut (after a restart, or once this one is dropped) hashes each
        // byte once.
        if digest == nil, let digests { digests.record(name, fd: fd, sha256: whole.bytes, before: before) }
        do {
            let manifest = try Manifest(totalLength: size, digest: whole, parameters: parameters, chunks: entries).encode()
            return .success((Cut(version: PlainDigests.Version(before), manifest: manifest, ids: ids), pieces))
        } catch { return .failure(NodeError(.storage, "its manifest: \(error)")) }
    }

    /// Keeps a cut (dropping the oldest past `maxChunks`) and answers whoever waited: with it,
    /// unless the file changed again since and the waiter saw the version now on disk: those
    /// wait for its cut, so that each waiter gets at most one cut more however often the file
    /// changes. The cutter's thread.
    private func finish(_ name: String, _ result: Result<(Cut, [Piece]), NodeError>) {
        var st = stat()
        let now = fstatat(rootFD, name, &st, AT_SYMLINK_NOFOLLOW) == 0 ? PlainDigests.Version(st) : nil
        let answered: [Waiter] = lock.withLock {
            let all = waiting.removeValue(forKey: name) ?? []
            guard case .success(let (cut, placed)) = result else {
                counterValues.failed += 1
                return all
            }
            counterValues.cut += 1
            forget(name)
            cuts[name] = cut
            order.append(name)
            listed += cut.ids.count
            for (id, p) in zip(cut.ids, placed) { pieces[id, default: []].append(p) }
            while listed > maxChunks, let oldest = order.first, oldest != name { forget(oldest) }
            // Changed again since: the waiters that saw the version now on disk wait for its
            // cut (each at most once more); everyone else has this one. None once stopping.
            guard let now, now != cut.version, !stopping.load(ordering: .relaxed) else { return all }
            let (later, rest) = (all.filter { $0.version == now }, all.filter { $0.version != now })
            if !later.isEmpty {
                waiting[name] = later
                submit(name)
            }
            return rest
        }
        let done: Done
        switch result {
        case .success(let (cut, _)): done = Done(ticket: 0, manifest: cut.manifest, why: "")
        case .failure(let e):
            logger.warning("cannot cut the plain file \(name): \(e.message)")
            done = Done(ticket: 0, manifest: nil, why: "its plain file could not be cut: \(e.message)")
        }
        for w in answered {
            var d = done
            d.ticket = w.ticket
            w.inbox.post(d)
        }
    }

    /// Drops the cut of `name` and its chunks' places (under the lock).
    private func forget(_ name: String) {
        guard let c = cuts.removeValue(forKey: name) else { return }
        order.removeAll { $0 == name }
        listed -= c.ids.count
        for id in c.ids {
            guard var ps = pieces[id] else { continue }
            ps.removeAll { $0.name == name }
            pieces[id] = ps.isEmpty ? nil : ps
        }
    }
}
