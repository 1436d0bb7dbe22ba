import Foundation
import Logging
import STOQAdmin
import STOQCore
import ServiceLifecycle
import Synchronization
import UnixSignals

/// The node as a swift-service-lifecycle `Service`: `run` starts it, serves until the
/// group shuts down gracefully (SIGTERM/SIGINT), then drains every connection and returns
/// once the workers have stopped. Put it in a `ServiceGroup` with
/// `successTerminationBehavior: .gracefullyShutdownGroup`, so that its return ends the rest.
public struct NodeService: Service {
    let node: Node
    let started: @Sendable (Node) -> Void

    /// Runs `node`; `started` is called once it listens (to print its addresses).
    public init(node: Node, started: @escaping @Sendable (Node) -> Void = { _ in }) {
        self.node = node
        self.started = started
    }

    public func run() async throws {
        try node.start()
        started(node)
        // Cancellation (the group failing) drains the same way as a graceful shutdown.
        try? await gracefulShutdown()
        node.logger.notice("draining connections and stopping")
        node.stop()
        await node.stopped()
    }
}

/// Reloads the configuration on SIGHUP and when a file a reload reads changes: the config file,
/// and the others the node reads again at each reload (its CA's revoked serials,
/// `Node.revocationListPath`). Each is polled every `interval` (its inode, size and modification
/// time: a file may be replaced by a rename, rewritten within one tick of the clock, or live on
/// a volume without inotify). One reload at a time, in arrival order, none before `ready` says
/// the node has started (a SIGHUP or an edit while it starts is applied once it has); stops at
/// graceful shutdown. A reload that fails (`reload` returns false: an invalid file, a file it
/// names that does not load) is tried again every `retryInterval` until one applies: a refused
/// reload was left as it was until the next edit or SIGHUP, though what it lacked (a bundle
/// being written, a directory being mounted) may have come meanwhile.
public struct ReloadService: Service {
    let hangups: UnixSignalsSequence
    let path: String?
    /// The files watched: the config file first, when there is one, then the others.
    let files: [String]
    let interval: Duration
    let retryInterval: Duration
    let ready: @Sendable () -> Bool
    let reload: @Sendable (String) async -> Bool
    /// The files' stamps when the service was made (before the node started), so that a change
    /// made while the node starts is seen too.
    let seen: [FileStamp?]

    /// `hangups` is made before the node starts (`UnixSignalsSequence(trapping: .sighup)`),
    /// so that a SIGHUP sent as soon as the node listens is not lost. Without `path` only
    /// SIGHUP and a change to one of `others` trigger (and `reload` says there is no file to
    /// read). `reload` gets the reason: "SIGHUP", "config file changed", "<other> changed" or
    /// "retry", and returns whether the reload applied.
    public init(
        hangups: UnixSignalsSequence, watching path: String?, andFiles others: [String] = [], every interval: Duration = .seconds(2),
        retryEvery retryInterval: Duration = .seconds(30), ready: @escaping @Sendable () -> Bool = { true },
        reload: @escaping @Sendable (String) async -> Bool
    ) {
        self.hangups = hangups
        self.path = path
        self.files = (path.map { [$0] } ?? []) + others
        self.interval = interval
        self.retryInterval = retryInterval
        self.ready = ready
        self.reload = reload
        self.seen = files.map(Self.stamp)
    }

    public func run() async throws {
        let (reasons, trigger) = AsyncStream<String>.makeStream()
        // The files' stamps as last read, by a reload of either kind: the watcher reports a
        // change only past them, so a SIGHUP after an edit is one reload, not two.
        let readAt = Replaceable(seen)
        // Whether the last reload failed: then it is tried again.
        let failing = Replaceable(false)
        await withDiscardingTaskGroup { group in
            group.addTask { [hangups] in
                for await _ in hangups.cancelOnGracefulShutdown() { trigger.yield("SIGHUP") }
                trigger.finish()
            }
            group.addTask { [retryInterval] in
                while !Task.isShuttingDownGracefully {
                    do { try await cancelWhenGracefulShutdown { try await Task.sleep(for: retryInterval) } } catch { break }
                    if failing.current { trigger.yield("retry") }
                }
                trigger.finish()
            }
            if !files.isEmpty {
                group.addTask { [interval] in
                    while !Task.isShuttingDownGracefully {
                        do { try await cancelWhenGracefulShutdown { try await Task.sleep(for: interval) } } catch { break }
                        let now = stamps(), before = readAt.current
                        if let i = now.indices.first(where: { now[$0] != before[$0] }) {
                            trigger.yield(i == 0 && path != nil ? "config file changed" : "\(files[i]) changed")
                        }
                    }
                    trigger.finish()
                }
            }
            for await why in reasons {
                // Read once the node runs: what the files say then is what it applies.
                while !ready() {
                    do { try await cancelWhenGracefulShutdown { try await Task.sleep(for: .milliseconds(50)) } } catch { return }
                }
                let now = stamps()
                // Already read at this version (the watcher saw the edit a SIGHUP also announced).
                if why != "SIGHUP" && why != "retry" && readAt.current == now { continue }
                // A retry that an edit or a SIGHUP answered meanwhile.
                if why == "retry" && !failing.current { continue }
                readAt.replace(now)
                failing.replace(!(await reload(why)))
            }
        }
    }

    private func stamps() -> [FileStamp?] { files.map(Self.stamp) }

    /// What the watcher compares of a file: its device and inode (replaced by a rename), its
    /// size and its modification time (nanoseconds).
    struct FileStamp: Equatable, Sendable {
        var device: UInt64
        var inode: UInt64
        var size: Int64
        var modified: Int
    }

    /// The file's stamp, nil when it cannot be read (absent).
    static func stamp(_ path: String) -> FileStamp? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return FileStamp(
            device: UInt64(st.st_dev), inode: UInt64(st.st_ino), size: Int64(st.st_size),
            modified: st.st_mtim.tv_sec * 1_000_000_000 + st.st_mtim.tv_nsec)
    }
}

extension Node {
    /// Suspends until every worker has stopped (after `stop()`), without holding a
    /// cooperative thread: the blocking wait runs on a thread of its own.
    public func stopped() async {
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            let t = Thread { [self] in
                wait()
                done.resume()
            }
            t.name = "stoq-node-drain"
            t.start()
        }
    }
}

/// What the node's configuration reloads did, for the admin API (`stoq_config_*`): whoever
/// reloads the node records each outcome here (stoq-node's `ReloadService` closure). Any thread.
public final class ReloadRecord: Sendable {
    private let state: Mutex<NodeMetrics.Reloads>

    /// `loadedAt`: when the configuration the node starts with was loaded.
    init(loadedAt: Date) { state = Mutex(NodeMetrics.Reloads(lastSuccess: loadedAt)) }

    /// A reload applied, or found nothing to change: the file is what the node runs.
    public func succeeded(at now: Date = Date()) {
        state.withLock {
            $0.lastSucceeded = true
            $0.lastSuccess = now
        }
    }

    /// A reload was refused: the running configuration stays.
    public func failed() {
        state.withLock {
            $0.failures += 1
            $0.lastSucceeded = false
        }
    }

    /// The numbers now.
    var current: NodeMetrics.Reloads { state.withLock { $0 } }
}
