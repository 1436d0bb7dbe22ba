import Foundation
import Logging
import STOQCore
import ServiceLifecycle
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

/// Reloads the configuration on SIGHUP and when the file changes (its modification time,
/// polled every `interval`, because the file may be replaced by a rename or live on a
/// volume without inotify). One reload at a time, in arrival order, none before `ready` says
/// the node has started (a SIGHUP or an edit while it starts is applied once it has); stops at
/// graceful shutdown.
public struct ReloadService: Service {
    let hangups: UnixSignalsSequence
    let path: String?
    let interval: Duration
    let ready: @Sendable () -> Bool
    let reload: @Sendable (String) async -> Void
    /// The file's modification time when the service was made (before the node started),
    /// so that a change made while the node starts is seen too.
    let seen: Int

    /// `hangups` is made before the node starts (`UnixSignalsSequence(trapping: .sighup)`),
    /// so that a SIGHUP sent as soon as the node listens is not lost. Without `path` only
    /// SIGHUP triggers (and `reload` says there is nothing to read).
    public init(
        hangups: UnixSignalsSequence, watching path: String?, every interval: Duration = .seconds(2),
        ready: @escaping @Sendable () -> Bool = { true }, reload: @escaping @Sendable (String) async -> Void
    ) {
        self.hangups = hangups
        self.path = path
        self.interval = interval
        self.ready = ready
        self.reload = reload
        self.seen = path.map(Self.modificationTime) ?? 0
    }

    public func run() async throws {
        let (reasons, trigger) = AsyncStream<String>.makeStream()
        // The file's modification time as last read, by a reload of either kind: the watcher
        // reports a change only past it, so a SIGHUP after an edit is one reload, not two.
        let readAt = Replaceable(seen)
        await withDiscardingTaskGroup { group in
            group.addTask { [hangups] in
                for await _ in hangups.cancelOnGracefulShutdown() { trigger.yield("SIGHUP") }
                trigger.finish()
            }
            if let path {
                group.addTask { [interval] in
                    while !Task.isShuttingDownGracefully {
                        do { try await cancelWhenGracefulShutdown { try await Task.sleep(for: interval) } } catch { break }
                        let now = Self.modificationTime(path)
                        if readAt.current != now { trigger.yield("config file changed") }
                    }
                    trigger.finish()
                }
            }
            for await why in reasons {
                // Read once the node runs: what the file says then is what it applies.
                while !ready() {
                    do { try await cancelWhenGracefulShutdown { try await Task.sleep(for: .milliseconds(50)) } } catch { return }
                }
                if let path {
                    let now = Self.modificationTime(path)
                    // Already read at this version (the watcher saw the edit a SIGHUP also announced).
                    if why != "SIGHUP" && readAt.current == now { continue }
                    readAt.replace(now)
                }
                await reload(why)
            }
        }
    }

    /// The file's modification time (nanoseconds), 0 when it cannot be read.
    static func modificationTime(_ path: String) -> Int {
        var st = stat()
        guard stat(path, &st) == 0 else { return 0 }
        return st.st_mtim.tv_sec * 1_000_000_000 + st.st_mtim.tv_nsec
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
