import Foundation
import STOQAccess
import Testing

@Suite struct AccessFilesTests {
    /// A key or token file that cannot be read is named with the system's reason: a missing
    /// file and a directory are different repairs.
    @Test func anUnreadableFileIsNamedWithItsReason() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("stoq-access-files-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect { try AccessFiles.readPublicKey(dir + "/missing.pem") } throws: {
            "\($0)" == "bad_key: \(dir)/missing.pem: cannot be read: No such file or directory"
        }
        #expect { try AccessFiles.readPrivateKey(dir) } throws: { "\($0)" == "bad_key: \(dir): cannot be read: Is a directory" }
        #expect { try AccessFiles.readToken(dir + "/operator.token") } throws: {
            "\($0)" == "io: \(dir)/operator.token: cannot be read: No such file or directory"
        }
    }
}
