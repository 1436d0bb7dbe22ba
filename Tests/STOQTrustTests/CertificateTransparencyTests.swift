import Crypto
import Foundation
import SwiftASN1
import Testing
import X509
@testable import STOQTrust

/// The precertificate flow and embedded SCTs (RFC 6962 §3.1–3.4).
@Suite struct CertificateTransparencyTests {
    /// A CA with its log, in a temporary directory.
    struct Fixture {
        let dir = TempDir()
        let ca: TrustAuthority
        let log: TransparencyLog
        init() throws {
            ca = try TrustAuthority.create(in: dir.path + "/ca")
            log = try TransparencyLog.openForAuthority(caDirectory: dir.path + "/ca") { _ in }
        }
        func issue(_ name: String = "node1.example", now: Date = Date()) throws -> Certificate {
            let key = P256.Signing.PrivateKey()
            return try ca.issue(publicKey: Certificate.PublicKey(key.publicKey), dnsNames: [name], now: now, log: log)
        }
    }

    static func der(_ c: Certificate) throws -> [UInt8] {
        var s = DER.Serializer()
        try s.serialize(c)
        return s.serializedBytes
    }

    @Test func sctRoundTripsThroughItsTLSEncoding() throws {
        let key = P256.Signing.PrivateKey()
        let entry = PrecertificateEntry(issuerKeyHash: Array(repeating: 7, count: 32), tbsCertificate: [0x30, 0x00])
        let sct = try SignedCertificateTimestamp.sign(entry: entry, timestamp: 1_700_000_000_123, key: key)
        let bytes = sct.encoded
        #expect(bytes[0] == 0 && bytes.count == 1 + 32 + 8 + 2 + 2 + 2 + sct.signature.count)
        #expect(try SignedCertificateTimestamp(encoded: bytes) == sct)
        let list = SignedCertificateTimestamp.encodeList([sct, sct])
        #expect(Int(list[0]) << 8 | Int(list[1]) == list.count - 2)
        #expect(try SignedCertificateTimestamp.decodeList(list) == [sct, sct])
        #expect(sct.verify(entry: entry, key: key.publicKey))
        #expect(
            !sct.verify(
                entry: PrecertificateEntry(issuerKeyHash: entry.issuerKeyHash, tbsCertificate: [0x30, 0x01, 0x00]),
                key: key.publicKey))
        #expect(!sct.verify(entry: entry, key: P256.Signing.PrivateKey().publicKey))
        // Truncation, trailing bytes and unknown versions are refused.
        #expect(throws: TransparencyError.self) { try SignedCertificateTimestamp(encoded: bytes.dropLast()) }
        #expect(throws: TransparencyError.self) { try SignedCertificateTimestamp(encoded: bytes + [0]) }
        #expect(throws: TransparencyError.self) { try SignedCertificateTimestamp(encoded: [1] + bytes.dropFirst()) }
        #expect(throws: TransparencyError.self) { try SignedCertificateTimestamp.decodeList([0, 0]) }
    }

    @Test func signedStructIsTheRFC6962Layout() throws {
        let entry = PrecertificateEntry(issuerKeyHash: Array(repeating: 0xaa, count: 32), tbsCertificate: [1, 2, 3])
        let b = CertificateTransparency.signedBytes(timestamp: 0x0102030405060708, entry: entry, extensions: [])
        // version, signature_type, timestamp, entry_type precert(1), issuer_key_hash, u24 len, tbs, u16 ext len
        #expect(b == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1] + Array(repeating: 0xaa, count: 32) + [0, 0, 3, 1, 2, 3, 0, 0])
        let leaf = CertificateTransparency.merkleTreeLeaf(timestamp: 0x0102030405060708, entry: entry)
        #expect(leaf == b)  // MerkleTreeLeaf v1/timestamped_entry has the same bytes for a precert entry
        let parsed = try #require(CertificateTransparency.parseMerkleTreeLeaf(leaf))
        #expect(parsed.timestamp == 0x0102030405060708 && parsed.entry == entry)
        #expect(CertificateTransparency.parseMerkleTreeLeaf([0x30, 0x03, 1, 2, 3]) == nil)
    }

    @Test func issuanceLogsThePrecertificateAndEmbedsItsSCTLast() throws {
        let f = try Fixture()
        defer { f.dir.cleanup() }
        let cert = try f.issue()
        #expect(f.log.size == 1)
        // The SCT list is the last extension, non-critical; the poison is gone.
        let last = try #require(Array(cert.extensions).last)
        #expect(last.oid == CertificateTransparency.sctListOID && !last.critical)
        #expect(!cert.extensions.contains { $0.oid == CertificateTransparency.poisonOID })
        let scts = try CertificateTransparency.embeddedSCTs(cert)
        #expect(scts.count == 1 && scts[0].logID == f.log.logID)
        // The logged entry is the final TBS without the SCT list, with the issuer's key hash.
        let logged = try #require(CertificateTransparency.parseMerkleTreeLeaf(try f.log.entry(at: 0)))
        let recomputed = try #require(try CertificateTransparency.entry(forFinalCertificate: cert, issuer: f.ca.intermediate))
        #expect(logged.entry == recomputed && logged.timestamp == scts[0].timestamp)
        // SHA-256 over the intermediate's whole SubjectPublicKeyInfo, as found in its own DER.
        let spki = try #require(P256.Signing.PublicKey(f.ca.intermediate.publicKey)).derRepresentation
        #expect(recomputed.issuerKeyHash == Array(SHA256.hash(data: spki)))
        #expect(scts[0].verify(entry: recomputed, key: f.log.publicKey))
        // Its Merkle leaf hash is the one an auditor recomputes.
        let leafHash = MerkleTree.leafHash(CertificateTransparency.merkleTreeLeaf(timestamp: scts[0].timestamp, entry: recomputed))
        #expect(f.log.tree.leafHashes[0] == leafHash)
        #expect(
            CertificateTransparency.verify(cert, issuer: f.ca.intermediate, trustedLogs: [f.log.publicKey])
                == .valid(logID: f.log.logID, timestamp: scts[0].timestamp))
        // The final certificate still verifies under the intermediate.
        #expect(f.ca.intermediate.publicKey.isValidSignature(cert.signature, for: cert))
    }

    @Test func theLogRefusesAnythingButAPoisonedPrecertificateOfItsIssuer() throws {
        let f = try Fixture()
        defer { f.dir.cleanup() }
        let plain = try f.ca.issue(publicKey: Certificate.PublicKey(P256.Signing.PrivateKey().publicKey), dnsNames: ["a.example"])
        #expect(throws: TransparencyError.self) { try f.log.addPrecertificate(plain, issuer: f.ca.intermediate) }
        #expect(throws: TransparencyError.self) { try f.log.addPrecertificate(plain, issuer: f.ca.root) }
        #expect(f.log.size == 0)
    }

    @Test func verdictsForMissingForgedAndUnknownLogSCTs() throws {
        let f = try Fixture()
        defer { f.dir.cleanup() }
        let good = try f.issue()
        let logs = [f.log.publicKey]
        // No SCT at all.
        let bare = try f.ca.issue(publicKey: Certificate.PublicKey(P256.Signing.PrivateKey().publicKey), dnsNames: ["b.example"])
        #expect(CertificateTransparency.verify(bare, issuer: f.ca.intermediate, trustedLogs: logs) == .missing)
        #expect(CertificateTransparency.Verdict.missing.refusal == "SCT missing")
        // The good certificate's SCT list transplanted onto another certificate from the same CA.
        let other = try f.issue("other.example")
        var exts = Array(other.extensions.dropLast())
        exts.append(try #require(Array(good.extensions).last))
        let transplanted = try Certificate(
            version: .v3, serialNumber: other.serialNumber, publicKey: other.publicKey,
            notValidBefore: other.notValidBefore, notValidAfter: other.notValidAfter, issuer: other.issuer,
            subject: other.subject, signatureAlgorithm: .ecdsaWithSHA256, extensions: try Certificate.Extensions(exts),
            issuerPrivateKey: Certificate.PrivateKey(
                try P256.Signing.PrivateKey(
                    pemRepresentation: String(contentsOfFile: f.dir.path + "/ca/intermediate-key.pem", encoding: .utf8))))
        guard case .forged = CertificateTransparency.verify(transplanted, issuer: f.ca.intermediate, trustedLogs: logs) else {
            Issue.record("a transplanted SCT was accepted")
            return
        }
        #expect(CertificateTransparency.Verdict.forged("x").refusal!.hasPrefix("SCT signature invalid (forged)"))
        // Checked against another issuer's key hash, the entry differs too.
        guard case .forged = CertificateTransparency.verify(good, issuer: f.ca.root, trustedLogs: logs) else {
            Issue.record("an SCT verified with the wrong issuer key hash")
            return
        }
        // A log nobody trusts.
        let stranger = P256.Signing.PrivateKey().publicKey
        #expect(
            CertificateTransparency.verify(good, issuer: f.ca.intermediate, trustedLogs: [stranger])
                == .unknownLog([f.log.logID]))
        #expect(CertificateTransparency.Verdict.unknownLog([f.log.logID]).refusal!.hasPrefix("SCT from an unknown log"))
        // DER entry point, as the TLS callback uses it.
        #expect(
            CertificateTransparency.verify(
                leafDER: try Self.der(good), issuerDER: try Self.der(f.ca.intermediate),
                trustedLogs: logs
            ).refusal == nil)
    }

    @Test func removingTheSCTListRestoresThePrecertTBSByteForByte() throws {
        let f = try Fixture()
        defer { f.dir.cleanup() }
        let cert = try f.issue()
        let (tbs, removed) = try DERWalk.removingExtension(CertificateTransparency.sctListOID, fromTBS: Array(cert.tbsCertificateBytes))
        #expect(removed != nil && removed!.critical == false)
        // Removing an absent extension changes nothing.
        let (same, none) = try DERWalk.removingExtension(CertificateTransparency.poisonOID, fromTBS: tbs)
        #expect(none == nil && same == tbs)
        #expect(try CertificateTransparency.serialNumber(ofTBS: tbs) == cert.serialNumber)
        // The TBS without the SCT is shorter by exactly the extension's encoding.
        #expect(cert.tbsCertificateBytes.count > tbs.count)
    }

    @Test func oldLogsOfDERCertificatesStayReadable() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let key = P256.Signing.PrivateKey()
        do {
            let old = try TransparencyLog(path: dir.path + "/t.log", signingKey: key)
            try old.append([0x30, 0x03, 0x02, 0x01, 0x05])  // a pre-SCT entry: DER
        }
        let ca = try TrustAuthority.create(in: dir.path + "/ca")
        let log = try TransparencyLog(path: dir.path + "/t.log", signingKey: key)
        let cert = try ca.issue(publicKey: Certificate.PublicKey(P256.Signing.PrivateKey().publicKey), dnsNames: ["c.example"], log: log)
        #expect(log.size == 2)
        #expect(try log.entry(at: 0) == [0x30, 0x03, 0x02, 0x01, 0x05])
        #expect(CertificateTransparency.parseMerkleTreeLeaf(try log.entry(at: 1)) != nil)
        #expect(CertificateTransparency.verify(cert, issuer: ca.intermediate, trustedLogs: [key.publicKey]).refusal == nil)
    }
}
