import Foundation
import STOQConfig
import STOQCore
import STOQQUIC
import Synchronization

/// The qlog settings in force (`log.qlog_dir`, `log.qlog_sample`), published by the node at
/// start and at each reload, taken by every worker between batches: a worker never waits on
/// the control plane, and one atomic load a turn is all it costs when nothing changed.
final class QLogControl: @unchecked Sendable {
    private let lock = NSLock()
    /// Bumped with each publish, under the lock; read without it every turn. It starts at 1
    /// so that a worker (which starts having seen 0) takes the settings of the start.
    private let version = Atomic<Int>(1)
    private var current: NodeConfig.Log

    init(_ log: NodeConfig.Log) { current = log }

    /// Makes the directory (the node's user owns it) so that every worker can open it; the
    /// error names the key and the path. Called before `publish`, so a bad directory is
    /// refused before any worker sees it.
    static func prepare(_ log: NodeConfig.Log) throws(NodeError) {
        guard !log.qlogDir.isEmpty, log.qlogSample > 0 else { return }
        if let failed = makeDirectories(log.qlogDir) {
            throw NodeError(.config, "log.qlog_dir = \"\(log.qlogDir)\": cannot create the directory: mkdir \(failed)")
        }
        guard access(log.qlogDir, W_OK | X_OK) == 0 else {
            throw NodeError(.config, "log.qlog_dir = \"\(log.qlogDir)\": not writable by this process: \(String(cString: strerror(errno)))")
        }
    }

    /// Makes `path` and the directories above it that are missing (mode 0750); nil once it is a
    /// directory, else the one that could not be made and why (`<dir>: <strerror>`).
    /// FileManager's error says only "The file doesn't exist", naming neither.
    private static func makeDirectories(_ path: String) -> String? {
        var prefix = path.hasPrefix("/") ? "/" : ""
        for part in path.split(separator: "/") {
            prefix += (prefix.isEmpty || prefix == "/" ? "" : "/") + part
            if mkdir(prefix, 0o750) == 0 { continue }
            let err = errno
            var st = stat()
            if err == EEXIST, stat(prefix, &st) == 0, st.st_mode & S_IFMT == S_IFDIR { continue }
            return "\(prefix): \(String(cString: strerror(err == EEXIST ? ENOTDIR : err)))"
        }
        return nil
    }

    func publish(_ log: NodeConfig.Log) {
        lock.withLock {
            current = log
            version.add(1, ordering: .releasing)
        }
    }

    /// The settings if they changed since `seen` (which is updated).
    func take(after seen: inout Int) -> NodeConfig.Log? {
        guard version.load(ordering: .acquiring) != seen else { return nil }
        return lock.withLock {
            seen = version.load(ordering: .relaxed)
            return current
        }
    }

    /// Applies `log`'s qlog settings to a worker's endpoint (on the worker's thread).
    static func apply(_ log: NodeConfig.Log, to endpoint: QUICEndpoint) throws(QUICError) {
        try endpoint.setQLog(directory: log.qlogDir, sample: log.qlogSample)
    }
}
