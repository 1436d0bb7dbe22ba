import Crypto
import Foundation
import Logging
import STOQChunking
import STOQCore
import STOQEdge
import STOQStore

/// Manifests of this node's own plain files, for the mesh: a node asked (as the holder) for
/// the manifest of an object it keeps as a plain file cuts the file with the node's chunking
/// parameters and answers with the cut, so that other nodes fetch it chunk by chunk — over
/// several routes, relayed chunk by chunk, streamed as chunks arrive — instead of whole
/// through every hop (docs/mesh.md "Plain files").
///
/// Nothing is copied: a chunk of a cut is read from the file when it is asked for, and served
/// only if it still hashes to its id. A file that changed since its cut (another inode, size
/// or mtime) is cut again at the next manifest request; its old chunks are 404s.
///
/// - Cuts run on one thread of their own, never a worker's; the worker that asked is answered
///   through its inbox (`Done`).
/// - The SHA-256 of the whole file is taken from `user.stoq.object` when the attribute is
///   current (one hashing pass instead of two).
/// - At most `maxChunks` chunks are remembered, all cuts together; the oldest cuts go first.
/// Thread-safe.
public final class PlainCuts: @unchecked Sendable {
    /// What the cutter did since the node started (`stoq_mesh_plain_cuts_total`).
    public struct Counters: Sendable, Equatable {
        /// Files cut into a manifest.
        public var cut: UInt64 = 0
        /// Cuts given up: the file changed while it was read, or could not be read.
        public var failed: UInt64 = 0
        /// Chunks served from a cut's file.
        public var chunksServed: UInt64 = 0
        /// Chunks asked for whose file no longer holds them (changed since its cut).
        public var chunksStale: UInt64 = 0
        /// All zero.
        public init() {}
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
    }

    /// Chunks remembered, all cuts together (about 100 bytes each).
    public static let maxChunks = 1 << 20

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

    private let rootFD: Int32
    private let parameters: ChunkingParameters
    private let maxObjectSize: UInt64
    private let logger: Logger
    private let pool: WorkPool
    private let lock = NSLock()
    private var cuts: [String: Cut] = [:]
    /// Names of `cuts`, oldest first.
    private var order: [String] = []
    private var pieces: [ChunkID: Piece] = [:]
    /// Cuts under way and who waits for each.
    private var waiting: [String: [(ticket: UInt64, inbox: CompletionInbox<Done>)]] = [:]
    private var counterValues = Counters()

    /// A cutter of the plain files under `root`, with the node's chunking parameters.
    public init(root: String, parameters: ChunkingParameters, maxObjectSize: UInt64, logger: Logger) throws {
        rootFD = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard rootFD >= 0 else { throw NodeError(.storage, "cannot open storage directory \(root): \(String(cString: strerror(errno)))") }
        self.parameters = parameters
        self.maxObjectSize = maxObjectSize
        self.logger = logger
        pool = WorkPool(name: "stoq-cut", threads: 1)
    }

    deinit {
        pool.stop()
        close(rootFD)
    }

    /// A snapshot of the counters.
    public var counters: Counters { lock.withLock { counterValues } }

    /// The manifest of the plain file `name` if its current version is cut; else starts the
    /// cut (the worker hears through `inbox`, with `ticket`). Worker thread; one `fstatat`.
    public func manifest(of name: String, ticket: UInt64, inbox: CompletionInbox<Done>) -> Answer {
        var st = stat()
        guard fstatat(rootFD, name, &st, AT_SYMLINK_NOFOLLOW) == 0, (st.st_mode & S_IFMT) == S_IFREG else { return .noFile }
        let version = PlainDigests.Version(st)
        let (answer, start): (Answer, Bool) = lock.withLock {
            if let c = cuts[name], c.version == version { return (.manifest(c.manifest), false) }
            waiting[name, default: []].append((ticket, inbox))
            return (.cutting, waiting[name]!.count == 1)
        }
        if start { pool.submit { [self] in finish(name, cut(name)) } }
        return answer
    }

    /// The bytes of chunk `id` from the file of the cut that named it, if that file still holds
    /// them; nil otherwise (a cut whose file changed is forgotten). Worker thread.
    public func chunk(_ id: ChunkID) -> [UInt8]? {
        guard let (piece, version) = lock.withLock({ pieces[id].flatMap { p in cuts[p.name].map { (p, $0.version) } } }) else { return nil }
        let bytes = read(piece, version)
        let good = bytes.map { ChunkID(digestOf: $0) == id } ?? false
        lock.withLock {
            if good {
                counterValues.chunksServed += 1
            } else {
                counterValues.chunksStale += 1
                if cuts[piece.name]?.version == version { forget(piece.name) }
            }
        }
        return good ? bytes : nil
    }

    private func read(_ p: Piece, _ version: PlainDigests.Version) -> [UInt8]? {
        let fd = openat(rootFD, p.name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, PlainDigests.Version(st) == version else { return nil }
        var out = [UInt8](repeating: 0, count: p.length)
        var done = 0
        while done < p.length {
            let n = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, p.length - done, off_t(p.offset) + off_t(done)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return nil }
            done += n
        }
        return out
    }

    /// Cuts `name` (on the cutter's thread): the manifest and its chunks' places, or why not.
    private func cut(_ name: String) -> Result<(Cut, [Piece]), NodeError> {
        let fd = openat(rootFD, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { return .failure(NodeError(.storage, "cannot open \(name): \(String(cString: strerror(errno)))")) }
        defer { close(fd) }
        var before = stat()
        guard fstat(fd, &before) == 0, (before.st_mode & S_IFMT) == S_IFREG else {
            return .failure(NodeError(.storage, "\(name) is no longer a regular file"))
        }
        let size = UInt64(before.st_size)
        guard size <= maxObjectSize else {
            return .failure(NodeError(.storage, "\(name) has \(size) bytes, more than storage.max_object_size (\(maxObjectSize))"))
        }
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
                entries.append(Manifest.Entry(id: c.id, length: UInt32(c.length)))
                pieces.append(Piece(name: name, offset: c.offset, length: c.length))
                ids.append(ChunkID(bytes: c.id.bytes)!)
            }
        } catch { return .failure(NodeError(.storage, "cannot read \(name) to cut it: \(error)")) }
        var after = stat()
        guard fstat(fd, &after) == 0, PlainDigests.Version(after) == PlainDigests.Version(before), chunker.bytesConsumed == size,
            let whole = digest ?? chunker.objectDigest
        else { return .failure(NodeError(.storage, "\(name) changed while it was cut")) }
        do {
            let manifest = try Manifest(totalLength: size, digest: whole, parameters: parameters, chunks: entries).encode()
            return .success((Cut(version: PlainDigests.Version(before), manifest: manifest, ids: ids), pieces))
        } catch { return .failure(NodeError(.storage, "the manifest of \(name): \(error)")) }
    }

    /// Keeps a cut (dropping the oldest past `maxChunks`) and answers whoever waited for it.
    private func finish(_ name: String, _ result: Result<(Cut, [Piece]), NodeError>) {
        let waiters: [(ticket: UInt64, inbox: CompletionInbox<Done>)] = lock.withLock {
            switch result {
            case .success(let (cut, placed)):
                counterValues.cut += 1
                if cuts[name] != nil { forget(name) }
                cuts[name] = cut
                order.append(name)
                for (id, p) in zip(cut.ids, placed) { pieces[id] = p }
                while pieces.count > Self.maxChunks, let oldest = order.first, oldest != name { forget(oldest) }
            case .failure:
                counterValues.failed += 1
            }
            return waiting.removeValue(forKey: name) ?? []
        }
        let done: Done
        switch result {
        case .success(let (cut, _)): done = Done(ticket: 0, manifest: cut.manifest, why: "")
        case .failure(let e):
            logger.warning("mesh: cannot cut the plain file \(name) for the mesh: \(e.message)")
            done = Done(ticket: 0, manifest: nil, why: e.message)
        }
        for w in waiters {
            var d = done
            d.ticket = w.ticket
            w.inbox.post(d)
        }
    }

    /// Drops the cut of `name` and its chunks' places (under the lock).
    private func forget(_ name: String) {
        guard let c = cuts.removeValue(forKey: name) else { return }
        order.removeAll { $0 == name }
        for id in c.ids where pieces[id]?.name == name { pieces[id] = nil }
    }
}
