import Foundation

/// A fresh directory under the system temporary directory, removed by `cleanup`.
struct TempDir {
    let path: String
    init() {
        path = NSTemporaryDirectory() + "stoq-trust-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func cleanup() { try? FileManager.default.removeItem(atPath: path) }
}
