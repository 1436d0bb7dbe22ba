import Foundation

/// A fresh directory `<prefix>-XXXXXX` under the system temporary directory, removed with
/// everything in it by `remove()` or, at the latest, when the last reference to it goes. A test
/// that holds one in a local calls `remove()` from a `defer` (which runs when the test fails
/// too), declared before whatever writes there (a daemon, a server), so that is stopped first.
public final class TemporaryDirectory: Sendable {
    public let path: String
    public var url: URL { URL(fileURLWithPath: path, isDirectory: true) }

    public init(_ prefix: String) throws {
        var template = Array((NSTemporaryDirectory() + "\(prefix)-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else {
            throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO)
        }
        path = String(cString: made)
    }

    deinit { remove() }

    public func remove() { try? FileManager.default.removeItem(atPath: path) }
}
