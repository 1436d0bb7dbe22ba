import Foundation
import Testing

@testable import STOQTrust

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Files that must change together (a node's chain and key) change together or not at all.
@Suite struct PEMFilesReplaceTests {
    func read(_ path: String) -> String? { try? String(contentsOfFile: path, encoding: .utf8) }

    /// The certificate manager wrote key.pem, then cert.pem, each renamed into place on its
    /// own: a full disk between the two left a new key beside the old certificate. Now both
    /// are written first, and when the second rename fails the first file is put back.
    @Test func aFailedSecondRenamePutsTheFirstFileBack() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let cert = dir.path + "/cert.pem", key = dir.path + "/key.pem"
        try "old cert\n".write(toFile: cert, atomically: false, encoding: .utf8)
        try "old key\n".write(toFile: key, atomically: false, encoding: .utf8)
        var renames = 0
        do {
            try PEMFiles.replaceFiles(
                [("new cert\n", cert, 0o644), ("new key\n", key, 0o600)],
                rename: { from, to in
                    renames += 1
                    if renames == 2 {
                        errno = ENOSPC
                        return -1
                    }
                    return rename(from, to)
                })
            Issue.record("a failed rename was not reported")
        } catch let e as TrustError {
            #expect(e.code == .io)
            #expect(e.message.hasPrefix("\(key): cannot replace: \(String(cString: strerror(ENOSPC)))"))
            #expect(e.message.contains("put back"))
        }
        #expect(renames == 2)
        #expect(read(cert) == "old cert\n" && read(key) == "old key\n")
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted() == ["cert.pem", "key.pem"])

        // The same with no files yet (a node's first start): nothing half-installed is left.
        let fresh = TempDir()
        defer { fresh.cleanup() }
        renames = 0
        #expect(throws: TrustError.self) {
            try PEMFiles.replaceFiles(
                [("c", fresh.path + "/cert.pem", 0o644), ("k", fresh.path + "/key.pem", 0o600)],
                rename: { from, to in
                    renames += 1
                    if renames == 2 {
                        errno = ENOSPC
                        return -1
                    }
                    return rename(from, to)
                })
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: fresh.path).isEmpty)
    }

    @Test func replacesEveryFileWithItsModeAndLeavesNothingBehind() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let cert = dir.path + "/cert.pem", key = dir.path + "/key.pem"
        try "old cert\n".write(toFile: cert, atomically: false, encoding: .utf8)
        try PEMFiles.replaceFiles([("new cert\n", cert, 0o644), ("new key\n", key, 0o600)])
        #expect(read(cert) == "new cert\n" && read(key) == "new key\n")
        let mode = try FileManager.default.attributesOfItem(atPath: key)[.posixPermissions] as? NSNumber
        #expect(mode?.intValue == 0o600)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted() == ["cert.pem", "key.pem"])
    }
}
