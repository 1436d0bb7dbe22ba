import Foundation
import Logging

/// A log handler for tests: keeps every message with its level, and can run an action once, at
/// the first message at or above a level — to act at the very moment the code under test logs
/// (a failure it is handling, say). `logger` logs through it.
public final class LogCapture: @unchecked Sendable, LogHandler {  // every field behind `lock`
    private let lock = NSLock()
    private var lines: [(level: Logger.Level, message: String, metadata: Logger.Metadata)] = []
    private var trigger: (level: Logger.Level, action: () -> Void)?
    public var logLevel: Logger.Level = .trace
    public var metadata: Logger.Metadata = [:]

    public init() {}

    public var logger: Logger { Logger(label: "test") { _ in self } }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(
        level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String, file: String, function: String,
        line: UInt
    ) {
        let action: (() -> Void)? = lock.withLock {
            lines.append((level, "\(message)", metadata ?? [:]))
            guard let t = trigger, level >= t.level else { return nil }
            trigger = nil
            return t.action
        }
        action?()
    }

    /// Runs `action` once, on the logging thread, at the first message at `level` or above.
    public func onFirst(_ level: Logger.Level, _ action: @escaping () -> Void) { lock.withLock { trigger = (level, action) } }

    /// The messages logged at `level` or above, in order.
    public func messages(atLeast level: Logger.Level = .trace) -> [String] {
        lock.withLock { lines.filter { $0.level >= level }.map(\.message) }
    }

    /// The metadata value `key` of each message `message` logged, in order.
    public func metadata(_ key: String, of message: String) -> [String] {
        lock.withLock { lines.filter { $0.message == message }.compactMap { $0.metadata[key].map { "\($0)" } } }
    }

    /// How many messages were logged at exactly `level`.
    public func count(_ level: Logger.Level) -> Int { lock.withLock { lines.filter { $0.level == level }.count } }
}
