import Foundation
import STOQStore

/// A fresh node-like layout under a temp directory: `storage` (plain objects, `storage.path`)
/// and a content store under `dir/content`. The caller removes `dir`.
func makeTempNodeStore(_ prefix: String) throws -> (dir: String, storage: String, index: ObjectIndex) {
    var template = Array((NSTemporaryDirectory() + "/\(prefix)-XXXXXX").utf8CString)
    guard let made = mkdtemp(&template) else { throw StoreError(.io, "mkdtemp failed") }
    let dir = String(cString: made)
    let storage = dir + "/objects"
    try FileManager.default.createDirectory(atPath: storage, withIntermediateDirectories: true)
    return (dir, storage, try ObjectIndex(chunks: ChunkStore(root: dir + "/content")))
}
