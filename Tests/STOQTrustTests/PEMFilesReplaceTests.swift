import Crypto
import Foundation
import Testing
import X509

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

    /// Every step a replacement of a chain and key can stop at, as a crash would.
    static let steps: [PEMFiles.ReplaceStep] = [
        .wroteTemporary(0), .wroteTemporary(1), .keptOld(0), .keptOld(1), .staged, .renamed(0), .renamed(1), .synced,
        .removedOld(0), .removedOld(1),
    ]

    /// A chain and its key, as PEM (a self-signed certificate: the pairing is what matters).
    static func pair() throws -> (cert: String, key: String) {
        let made = try EmbeddedIdentity.makeSelfSigned(names: ["n.test"], addresses: [])
        return (made.certificate, made.key)
    }

    /// Which of `pairs` is in `dir` now (its index), once its key is checked to fit its
    /// certificate; nil when there is no pair at all.
    func loadedPair(_ dir: String, _ pairs: [(cert: String, key: String)]) throws -> Int? {
        let certPath = dir + "/cert.pem", keyPath = dir + "/key.pem"
        let cert = read(certPath), key = read(keyPath)
        if cert == nil && key == nil { return nil }
        let leaf = try PEMFiles.readCertificates(certPath)[0]
        let privateKey = try PEMFiles.p256PrivateKey(pem: try #require(key))
        #expect(leaf.publicKey == Certificate.PublicKey(privateKey.publicKey), "the key does not fit the certificate")
        let index = pairs.firstIndex { $0.cert == cert && $0.key == key }
        #expect(index != nil, "a certificate and key of different pairs")
        return index
    }

    /// `install` renamed the chain, then the key, each in place: a crash between the two left a
    /// new certificate beside the old key, and a crash after them `.old-*` copies that nothing
    /// removed. Stopped after each step, the next open (`recoverReplacement`) ends with one whole
    /// pair: the old one until both renames happened, the new one from then on; nothing else.
    @Test(arguments: steps) func aReplacementStoppedAtAnyStepOpensAsOneWholePair(_ step: PEMFiles.ReplaceStep) throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let cert = dir.path + "/cert.pem", key = dir.path + "/key.pem"
        let pairs = [try Self.pair(), try Self.pair()]
        try PEMFiles.replaceFiles([(pairs[0].cert, cert, 0o644), (pairs[0].key, key, 0o600)])
        #expect(throws: PEMFiles.ReplaceStopped(step: step)) {
            try PEMFiles.replaceFiles([(pairs[1].cert, cert, 0o644), (pairs[1].key, key, 0o600)], stop: { $0 == step })
        }
        let left = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0 != "cert.pem" && $0 != "key.pem" }

        let recovered = try PEMFiles.recoverReplacement(of: [cert, key])
        let completed = Self.steps.firstIndex(of: step)! >= Self.steps.firstIndex(of: .renamed(1))!
        #expect(try loadedPair(dir.path, pairs) == (completed ? 1 : 0))
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted() == ["cert.pem", "key.pem"])
        if left.isEmpty {
            #expect(recovered.isEmpty)
        } else {
            #expect(recovered.count == 1)
            #expect(recovered.first?.completed == completed)
            #expect(recovered.first.map { Set($0.leftovers) } == Set(left.map { dir.path + "/" + $0 }))
            #expect(recovered.first?.description.contains(completed ? "the new set stays" : "the old set is back") == true)
        }
        // Recovered once, there is nothing more to do.
        #expect(try PEMFiles.recoverReplacement(of: [cert, key]).isEmpty)
        let mode = try FileManager.default.attributesOfItem(atPath: key)[.posixPermissions] as? NSNumber
        #expect(mode?.intValue == 0o600)
    }

    /// A node's first certificate: no old pair to go back to, so until both renames happened
    /// the next open finds none at all (and issues one), never a certificate without its key.
    @Test(arguments: steps) func aFirstInstallStoppedAtAnyStepOpensAsThePairOrNone(_ step: PEMFiles.ReplaceStep) throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let cert = dir.path + "/cert.pem", key = dir.path + "/key.pem"
        let pairs = [try Self.pair()]
        #expect(throws: PEMFiles.ReplaceStopped(step: step)) {
            try PEMFiles.replaceFiles([(pairs[0].cert, cert, 0o644), (pairs[0].key, key, 0o600)], stop: { $0 == step })
        }
        _ = try PEMFiles.recoverReplacement(of: [cert, key])
        let completed = Self.steps.firstIndex(of: step)! >= Self.steps.firstIndex(of: .renamed(1))!
        #expect(try loadedPair(dir.path, pairs) == (completed ? 0 : nil))
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted() == (completed ? ["cert.pem", "key.pem"] : []))
    }

    /// The recovery itself may be cut short (it puts the certificate back, then the key): run
    /// again, it still ends with the old pair, not with the old certificate and the new key.
    @Test func aRecoveryCutShortIsFinishedByTheNext() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let cert = dir.path + "/cert.pem", key = dir.path + "/key.pem"
        let pairs = [try Self.pair(), try Self.pair()]
        try PEMFiles.replaceFiles([(pairs[0].cert, cert, 0o644), (pairs[0].key, key, 0o600)])
        #expect(throws: PEMFiles.ReplaceStopped.self) {
            try PEMFiles.replaceFiles([(pairs[1].cert, cert, 0o644), (pairs[1].key, key, 0o600)], stop: { $0 == .renamed(0) })
        }
        // The new certificate beside the old key, as the crash left them.
        #expect(read(cert) == pairs[1].cert && read(key) == pairs[0].key)
        // The recovery's first step, then a crash: the old certificate is back, its copy gone.
        let old = try #require(FileManager.default.contentsOfDirectory(atPath: dir.path).first { $0.hasPrefix("cert.pem.old-") })
        #expect(rename(dir.path + "/" + old, cert) == 0)
        let recovered = try PEMFiles.recoverReplacement(of: [cert, key])
        #expect(recovered.map(\.completed) == [false])
        #expect(try loadedPair(dir.path, pairs) == 0)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted() == ["cert.pem", "key.pem"])
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
