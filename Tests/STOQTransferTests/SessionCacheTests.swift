import Foundation
import Testing

@testable import STOQTransfer

/// The session cache's file format (version 2, `SessionCache`'s doc comment is its spec):
/// what `store` writes `load` reads back, and every other file is refused with a reason that
/// `warn` hears, never used.
@Suite final class SessionCacheTests {
    let directory: String
    let url: STOQURL
    let heard = Heard()

    final class Heard: @unchecked Sendable {
        private let lock = NSLock()
        private var lines: [String] = []
        func add(_ s: String) { lock.withLock { lines.append(s) } }
        var all: [String] { lock.withLock { lines } }
    }

    init() throws {
        directory =
            FileManager.default.temporaryDirectory
            .appendingPathComponent("stoq-sessions-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        url = try STOQURL("https://[::1]:4433/objects/x")
    }

    deinit { try? FileManager.default.removeItem(atPath: directory) }

    var cache: SessionCache {
        let heard = heard
        return SessionCache(directory: directory) { heard.add($0) }
    }

    @Test func theLayoutIsTheDocumentedOne() throws {
        let entry = SessionCache.Entry(session: [1, 2, 3], earlyParameters: [9, 8], offeredCipherSuites: "TLS_X")
        #expect(
            SessionCache.encode(entry)
                == Array("STOQSESS".utf8) + [2] + [0, 0, 0, 3, 1, 2, 3] + [0, 0, 0, 2, 9, 8] + [0, 0, 0, 5]
                + Array("TLS_X".utf8))
        #expect(try SessionCache.decode(SessionCache.encode(entry)) == entry)
        // No 0-RTT parameters kept: length 0, read back as none.
        let bare = SessionCache.Entry(session: [7], earlyParameters: nil, offeredCipherSuites: "S")
        #expect(SessionCache.encode(bare).suffix(9) == [0, 0, 0, 0, 0, 0, 0, 1, 0x53])
        #expect(try SessionCache.decode(SessionCache.encode(bare)) == bare)
    }

    @Test func whatIsStoredLoadsBackPrivately() throws {
        let entry = SessionCache.Entry(
            session: Array(repeating: 0xab, count: 900), earlyParameters: [1, 2, 3, 4], offeredCipherSuites: "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384")
        #expect(cache.load(for: url) == nil)
        cache.store(entry, for: url)
        #expect(cache.load(for: url) == entry)
        let attrs = try FileManager.default.attributesOfItem(atPath: directory + "/__1_4433.session")
        #expect((attrs[.posixPermissions] as? NSNumber)?.intValue == 0o600)
        #expect(heard.all.isEmpty)
    }

    @Test func sessionsAreKeptPerTrust() throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let a = directory + "/a.pem", b = directory + "/b.pem", log = directory + "/log.pem"
        #expect(FileManager.default.createFile(atPath: a, contents: Data("A".utf8)))
        #expect(FileManager.default.createFile(atPath: b, contents: Data("B".utf8)))
        #expect(FileManager.default.createFile(atPath: log, contents: Data("L".utf8)))
        let scopes = [
            ClientTrust(caFile: a), ClientTrust(caFile: b), ClientTrust(), ClientTrust(caFile: a, transparencyLogs: [log]),
        ].map(\.sessionScope)
        #expect(Set(scopes).count == 4 && scopes.allSatisfy { $0.count == 16 })
        #expect(ClientTrust(caFile: a, cipherSuites: ["AES-256-GCM"]).sessionScope == scopes[0])
        let entry = SessionCache.Entry(session: [1], earlyParameters: nil, offeredCipherSuites: "S")
        SessionCache(directory: directory, trust: ClientTrust(caFile: a)).store(entry, for: url)
        #expect(SessionCache(directory: directory, trust: ClientTrust(caFile: a)).load(for: url) == entry)
        #expect(SessionCache(directory: directory, trust: ClientTrust(caFile: b)).load(for: url) == nil)
        #expect(FileManager.default.fileExists(atPath: directory + "/__1_4433-\(scopes[0]).session"))
    }

    static let magic: [UInt8] = Array("STOQSESS".utf8)
    /// Files that are not version 2's layout, and what `load` says of each.
    static let badFiles: [([UInt8], String)] = [
        ([UInt8](repeating: 0x30, count: 200), "not a stoq session file (an older stoq's, or damaged)"),
        // Version 1's layout (no suite), as stoq wrote it before.
        (magic + [1, 0, 0, 0, 1, 5, 0, 0, 0, 0], "format version 1, this stoq reads version 2"),
        (magic + [2, 0, 0, 0, 9, 5], "truncated"),
        (magic + [2, 0, 0, 0, 1, 5, 0, 0], "truncated"),
        (magic + [2, 0, 0, 0, 1, 5, 0, 0, 0, 0], "truncated"),
        (magic + [2, 0, 0, 0, 1, 5, 0, 0, 0, 0, 0, 0, 0, 1, 0x53, 7], "1 bytes after the end"),
        (magic + [2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x53], "no session in it"),
        (magic + [2, 0, 0, 0, 1, 5, 0, 0, 0, 0, 0, 0, 0, 0], "no cipher suite names in it"),
        (magic + [2, 0, 0, 0, 1, 5, 0, 0, 0, 0, 0, 0, 0, 2, 0x53, 0x0a], "no cipher suite names in it"),
    ]

    @Test(arguments: badFiles)
    func aBadFileIsRefusedWithItsReason(bytes: [UInt8], why: String) throws {
        #expect(throws: SessionCache.FormatError(description: why)) { try SessionCache.decode(bytes) }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let file = directory + "/__1_4433.session"
        #expect(FileManager.default.createFile(atPath: file, contents: Data(bytes)))
        #expect(cache.load(for: url) == nil)
        #expect(heard.all == ["session cache \(file): \(why); resuming nothing (a full handshake)"])
    }
}
