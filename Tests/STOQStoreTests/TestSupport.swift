import Foundation
import STOQStore
import Testing

/// A fresh directory under the system temp directory for each test, removed when the test's
/// suite instance goes away (swift-testing makes one instance per test).
class StoreTestCase {
    let root: String

    init() throws {
        var template = Array((NSTemporaryDirectory() + "/stoq-store-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else { throw StoreError(.io, "mkdtemp failed") }
        root = String(cString: made)
    }

    deinit {
        try? FileManager.default.removeItem(atPath: root)
    }

    func path(of id: ChunkID) -> String {
        let hex = id.hex
        return "\(root)/chunks/\(hex.prefix(2))/\(hex.dropFirst(2).prefix(2))/\(hex)"
    }

    /// Every file under `root` whose name starts with `.tmp-`.
    func tempFiles() -> [String] {
        let e = FileManager.default.enumerator(atPath: root)
        var out: [String] = []
        while let p = e?.nextObject() as? String {
            if (p as NSString).lastPathComponent.hasPrefix(".tmp-") { out.append(p) }
        }
        return out
    }

    func quarantined() -> [String] {
        (try? FileManager.default.contentsOfDirectory(atPath: root + "/quarantine").sorted()) ?? []
    }

    /// Flips one bit of byte `at` in the file at `path`, in place.
    func flipByte(_ path: String, at: Int = 0) throws {
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        bytes[at] ^= 0x01
        let fd = open(path, O_WRONLY)
        #expect(fd >= 0)
        defer { close(fd) }
        #expect(pwrite(fd, bytes, bytes.count, 0) == bytes.count)
    }

    /// Sets the mtime of `path` to `secondsAgo` in the past.
    func age(_ path: String, secondsAgo: Int) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var times = [timespec(tv_sec: now.tv_sec - secondsAgo, tv_nsec: 0), timespec(tv_sec: now.tv_sec - secondsAgo, tv_nsec: 0)]
        #expect(utimensat(AT_FDCWD, path, &times, 0) == 0)
    }

    func mtime(_ path: String) -> Int {
        var st = stat()
        #expect(stat(path, &st) == 0)
        return st.st_mtim.tv_sec
    }

    func inode(_ path: String) -> UInt {
        var st = stat()
        #expect(stat(path, &st) == 0)
        return UInt(st.st_ino)
    }

    func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

    /// Asserts `body` throws a `StoreError` with `code`, and returns its message.
    @discardableResult
    func assertStoreError<T>(
        _ code: StoreError.Code, sourceLocation: SourceLocation = #_sourceLocation,
        _ body: () throws -> T
    ) -> String {
        do {
            _ = try body()
            Issue.record("expected StoreError \(code), nothing thrown", sourceLocation: sourceLocation)
        } catch let e as StoreError {
            #expect(e.code == code, "message: \(e.message)", sourceLocation: sourceLocation)
            return e.message
        } catch {
            Issue.record("expected StoreError \(code), got \(error)", sourceLocation: sourceLocation)
        }
        return ""
    }
}
