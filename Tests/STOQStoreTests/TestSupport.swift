import Foundation
import STOQStore
import XCTest

/// A fresh directory under the system temp directory, removed by `tearDown`.
class StoreTestCase: XCTestCase {
    var root = ""

    override func setUpWithError() throws {
        var template = Array((NSTemporaryDirectory() + "/stoq-store-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else { throw StoreError(.io, "mkdtemp failed") }
        root = String(cString: made)
    }

    override func tearDown() {
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
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        XCTAssertEqual(pwrite(fd, bytes, bytes.count, 0), bytes.count)
    }

    /// Sets the mtime of `path` to `secondsAgo` in the past.
    func age(_ path: String, secondsAgo: Int) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var times = [timespec(tv_sec: now.tv_sec - secondsAgo, tv_nsec: 0), timespec(tv_sec: now.tv_sec - secondsAgo, tv_nsec: 0)]
        XCTAssertEqual(utimensat(AT_FDCWD, path, &times, 0), 0)
    }

    func mtime(_ path: String) -> Int {
        var st = stat()
        XCTAssertEqual(stat(path, &st), 0)
        return st.st_mtim.tv_sec
    }

    func inode(_ path: String) -> UInt {
        var st = stat()
        XCTAssertEqual(stat(path, &st), 0)
        return UInt(st.st_ino)
    }

    func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

    /// Asserts `body` throws a `StoreError` with `code`, and returns its message.
    @discardableResult
    func assertStoreError<T>(_ code: StoreError.Code, file: StaticString = #filePath, line: UInt = #line,
                             _ body: () throws -> T) -> String {
        do {
            _ = try body()
            XCTFail("expected StoreError \(code), nothing thrown", file: file, line: line)
        } catch let e as StoreError {
            XCTAssertEqual(e.code, code, "message: \(e.message)", file: file, line: line)
            return e.message
        } catch {
            XCTFail("expected StoreError \(code), got \(error)", file: file, line: line)
        }
        return ""
    }
}
