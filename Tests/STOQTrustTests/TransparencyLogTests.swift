import Crypto
import Foundation
import Testing
@testable import STOQTrust

@Suite struct TransparencyLogTests {
    let key = P256.Signing.PrivateKey()

    func fileSize(_ path: String) throws -> Int {
        (try FileManager.default.attributesOfItem(atPath: path)[.size] as! NSNumber).intValue
    }

    func appendRaw(_ bytes: [UInt8], to path: String) throws {
        let h = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        try h.seekToEnd()
        try h.write(contentsOf: bytes)
        try h.close()
    }

    @Test func persistsAndReloads() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let path = dir.path + "/log"
        var root: MerkleHash = []
        do {
            let log = try TransparencyLog(path: path, signingKey: key)
            #expect(log.size == 0 && log.recovery == nil)
            for i in 0..<10 { #expect(try log.append(Array("cert \(i)".utf8)) == i) }
            try log.append([UInt8]())  // empty entries are entries too
            root = try log.rootHash()
        }
        let log = try TransparencyLog(path: path, signingKey: key)
        #expect(log.recovery == nil)
        #expect(log.size == 11)
        #expect(try log.rootHash() == root)
        #expect(try log.entry(at: 3) == Array("cert 3".utf8))
        #expect(try log.rootHash() == MerkleTree(entries: (0..<10).map { Array("cert \($0)".utf8) } + [[]]).rootHash())
        let proof = try log.inclusionProof(index: 3)
        #expect(
            MerkleTree.verifyInclusion(
                leafHash: MerkleTree.leafHash(Array("cert 3".utf8)), leafIndex: 3, treeSize: 11,
                proof: proof, rootHash: root))
        let c = try log.consistencyProof(from: 6)
        #expect(MerkleTree.verifyConsistency(oldSize: 6, newSize: 11, oldRoot: try log.rootHash(size: 6), newRoot: root, proof: c))
    }

    @Test func truncatesATornLastRecordAndSaysSo() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let path = dir.path + "/log"
        var goodSize = 0
        do {
            let log = try TransparencyLog(path: path, signingKey: key)
            for i in 0..<3 { try log.append(Array("entry \(i)".utf8)) }
            goodSize = try fileSize(path)
        }
        // Every way a crash can cut the next record short.
        let full: [UInt8] = [0, 0, 0, 5] + Array("hello".utf8) + MerkleTree.leafHash(Array("hello".utf8))
        for cut in [1, 3, 4, 7, full.count - 1] {
            try appendRaw(Array(full.prefix(cut)), to: path)
            let log = try TransparencyLog(path: path, signingKey: key)
            #expect(log.size == 3, "cut at \(cut)")
            #expect(log.recovery?.code == .tornRecordTruncated)
            #expect(log.recovery?.message.contains("offset \(goodSize)") == true)
            #expect(try fileSize(path) == goodSize)
        }
        // A zero-filled tail (size updated, data never written) is torn too.
        try appendRaw([UInt8](repeating: 0, count: 100), to: path)
        do {
            let log = try TransparencyLog(path: path, signingKey: key)
            #expect(log.recovery?.code == .tornRecordTruncated)
            #expect(log.size == 3)
            // The log goes on, and reopens clean.
            try log.append(Array("hello".utf8))
        }
        let log = try TransparencyLog(path: path, signingKey: key)
        #expect(log.recovery == nil && log.size == 4)
        #expect(try log.entry(at: 3) == Array("hello".utf8))
    }

    @Test func refusesDamageBeforeTheEnd() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let path = dir.path + "/log"
        do {
            let log = try TransparencyLog(path: path, signingKey: key)
            for i in 0..<3 { try log.append(Array("entry \(i)".utf8)) }
        }
        // Flip a byte inside the first entry's data (magic 8 + length 4).
        var bytes = Array(FileManager.default.contents(atPath: path)!)
        bytes[8 + 4] ^= 0xff
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        do {
            _ = try TransparencyLog(path: path, signingKey: key)
            Issue.record("a damaged record in the middle was accepted")
        } catch let e as TransparencyLogError {
            #expect(e.code == .corruptRecord)
            #expect(e.message.hasPrefix("\(path): record 0 at offset 8 is complete"))
        }
        #expect(Array(FileManager.default.contents(atPath: path)!) == bytes)  // nothing was truncated
    }

    /// A complete last record whose hash fails was taken for a torn one: cut on open, and its
    /// index handed to the next append, so the log forked under every tree head that had
    /// counted it. A crash cannot leave such a record, so the log now refuses to open, naming
    /// the file, the record and its offset, and leaves the file as it was.
    @Test func refusesADamagedCompleteLastRecord() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let path = dir.path + "/log"
        var lastOffset = 0
        do {
            let log = try TransparencyLog(path: path, signingKey: key)
            for i in 0..<2 { try log.append(Array("entry \(i)".utf8)) }
            lastOffset = try fileSize(path)
            try log.append(Array("entry 2".utf8))
        }
        let intact = Array(FileManager.default.contents(atPath: path)!)
        // A flipped bit in the entry, and one in the stored hash.
        for at in [lastOffset + 4 + 2, intact.count - 1] {
            var bytes = intact
            bytes[at] ^= 0x01
            #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
            do {
                _ = try TransparencyLog(path: path, signingKey: key)
                Issue.record("a damaged last record at byte \(at) was accepted")
            } catch let e as TransparencyLogError {
                #expect(e.code == .corruptRecord)
                #expect(e.message.hasPrefix("\(path): record 2 at offset \(lastOffset) is complete (7 bytes) but fails its hash"))
                #expect(e.message.contains("Restore the file from a backup"))
            }
            #expect(Array(FileManager.default.contents(atPath: path)!) == bytes)
        }
        // A length no record can have is damage too, not a torn tail.
        var bytes = intact
        bytes[lastOffset] = 0xff
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        #expect(throws: TransparencyLogError.self) { _ = try TransparencyLog(path: path, signingKey: key) }
        #expect(Array(FileManager.default.contents(atPath: path)!) == bytes)
        // A record whose end (hash) never reached the disk is still a crash's, and cut.
        bytes = intact
        for i in (intact.count - 32)..<intact.count { bytes[i] = 0 }
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        let log = try TransparencyLog(path: path, signingKey: key)
        #expect(log.size == 2 && log.recovery?.code == .tornRecordTruncated)
    }

    @Test func refusesAForeignFile() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let path = dir.path + "/log"
        #expect(FileManager.default.createFile(atPath: path, contents: Data("not a log at all".utf8)))
        #expect(throws: TransparencyLogError(.badHeader, "\(path): not a STOQ transparency log (bad magic)")) {
            try TransparencyLog(path: path, signingKey: key)
        }
    }

    @Test func twoOpenersAppendToOneSequence() throws {
        // A node serving its CA's log and `stoq trust issue` on the same CA: each append first
        // reads what the other appended, so both see one log and neither overwrites the other.
        let dir = TempDir()
        defer { dir.cleanup() }
        let path = dir.path + "/log"
        let a = try TransparencyLog(path: path, signingKey: key)
        let b = try TransparencyLog(path: path, signingKey: key)
        #expect(try a.append(Array("one".utf8)) == 0)
        #expect(try b.append(Array("two".utf8)) == 1)
        #expect(try a.append(Array("three".utf8)) == 2)
        #expect(b.size == 2)
        try b.refresh()
        let rootA = try a.rootHash()
        #expect(b.size == 3)
        #expect(try b.rootHash() == rootA)
        #expect(try b.entry(at: 2) == Array("three".utf8))
        let reopened = try TransparencyLog(path: path, signingKey: key)
        #expect(reopened.size == 3 && reopened.recovery == nil)
        #expect(try reopened.rootHash() == rootA)
    }

    @Test func signedTreeHeadVerifiesAndTamperingFails() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let log = try TransparencyLog(path: dir.path + "/log", signingKey: key)
        for i in 0..<5 { try log.append([UInt8(i)]) }
        let now = Date(timeIntervalSince1970: 1_800_000_000.123)
        let sth = try log.signedTreeHead(now: now)
        #expect(sth.treeSize == 5)
        #expect(sth.timestamp == 1_800_000_000_123)
        #expect(sth.rootHash == (try log.rootHash()))
        #expect(sth.verify(with: log.publicKey))
        // RFC 6962 §3.5 layout: version, type, timestamp, size, root.
        #expect(sth.signedBytes.count == 2 + 8 + 8 + 32)
        #expect(Array(sth.signedBytes.prefix(2)) == [0, 1])

        var t = sth; t.treeSize = 6
        #expect(!t.verify(with: log.publicKey))
        t = sth; t.timestamp += 1
        #expect(!t.verify(with: log.publicKey))
        t = sth; t.rootHash[0] ^= 1
        #expect(!t.verify(with: log.publicKey))
        t = sth; t.signature[t.signature.count - 1] ^= 1
        #expect(!t.verify(with: log.publicKey))
        #expect(!sth.verify(with: P256.Signing.PrivateKey().publicKey))
        // Survives a JSON round trip (how it will travel).
        let decoded = try JSONDecoder().decode(SignedTreeHead.self, from: JSONEncoder().encode(sth))
        #expect(decoded == sth && decoded.verify(with: log.publicKey))
    }
}
