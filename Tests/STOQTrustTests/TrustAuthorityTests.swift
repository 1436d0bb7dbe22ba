import Crypto
import Foundation
import STOQCore
import SwiftASN1
import Testing
import X509
@testable import STOQTrust

@Suite struct TrustAuthorityTests {
    func mode(_ path: String) throws -> Int {
        (try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as! NSNumber).intValue
    }

    @Test func createWritesRootAndIntermediateWithPrivateKeys() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let ca = try TrustAuthority.create(in: dir.path + "/ca")
        #expect(try mode(dir.path + "/ca") == 0o700)
        #expect(try mode(dir.path + "/ca/root-key.pem") == 0o600)
        #expect(try mode(dir.path + "/ca/intermediate-key.pem") == 0o600)
        #expect(try mode(dir.path + "/ca/root.pem") == 0o644)

        let root = try PEMFiles.readCertificates(dir.path + "/ca/root.pem")[0]
        let inter = try PEMFiles.readCertificates(dir.path + "/ca/intermediate.pem")[0]
        #expect(root == ca.root && inter == ca.intermediate)
        #expect(root.subject == root.issuer)
        #expect(root.publicKey.isValidSignature(root.signature, for: root))
        #expect(try root.extensions.basicConstraints == .isCertificateAuthority(maxPathLength: 1))
        #expect(inter.issuer == root.subject)
        #expect(root.publicKey.isValidSignature(inter.signature, for: inter))
        #expect(try inter.extensions.basicConstraints == .isCertificateAuthority(maxPathLength: 0))
        // Each key matches its certificate and they are different keys.
        let rootKey = try Certificate.PrivateKey(pemEncoded: String(contentsOfFile: dir.path + "/ca/root-key.pem", encoding: .utf8))
        #expect(rootKey.publicKey == root.publicKey)
        #expect(rootKey.publicKey != inter.publicKey)
        #expect(P256.Signing.PublicKey(root.publicKey) != nil && P256.Signing.PublicKey(inter.publicKey) != nil)
    }

    @Test func createRefusesToOverwrite() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        _ = try TrustAuthority.create(in: dir.path)
        let before = try String(contentsOfFile: dir.path + "/root-key.pem", encoding: .utf8)
        #expect(throws: TrustError.self) { try TrustAuthority.create(in: dir.path) }
        do { _ = try TrustAuthority.create(in: dir.path) } catch let e as TrustError { #expect(e.code == .alreadyExists) }
        #expect(try String(contentsOfFile: dir.path + "/root-key.pem", encoding: .utf8) == before)
    }

    @Test func loadsAndIssuesWithTheRootKeyOffline() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let created = try TrustAuthority.create(in: dir.path)
        try FileManager.default.moveItem(atPath: dir.path + "/root-key.pem", toPath: dir.path + "/offline.pem")
        let ca = try TrustAuthority.load(from: dir.path)
        #expect(ca.root == created.root && ca.intermediate == created.intermediate)
        let cert = try ca.issue(publicKey: Certificate.PublicKey(P256.Signing.PrivateKey().publicKey), dnsNames: ["a.stoq.test"])
        #expect(ca.intermediate.publicKey.isValidSignature(cert.signature, for: cert))
    }

    @Test func issuedCertificateHasTheNodeProfile() throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let now = Date()
        let cert = try f.authority.issue(
            publicKey: f.newKey(), dnsNames: ["Node1.STOQ.test", "node1.stoq.test"],
            ipv6Addresses: ["2001:db8::1", "2001:0db8:0::1", "::1"], now: now)
        #expect(cert.issuer == f.authority.intermediate.subject)
        #expect(f.authority.intermediate.publicKey.isValidSignature(cert.signature, for: cert))
        #expect(cert.signatureAlgorithm == .ecdsaWithSHA256)
        // 24 h by default, backdated 60 s.
        #expect(abs(cert.notValidAfter.timeIntervalSince(now) - 86400) < 1)
        #expect(abs(now.timeIntervalSince(cert.notValidBefore) - 60) < 1)
        #expect(cert.serialNumber.bytes.count == 16)
        #expect(try cert.extensions.basicConstraints == .notCertificateAuthority)
        #expect(try cert.extensions.keyUsage == KeyUsage(digitalSignature: true))
        let eku = try #require(try cert.extensions.extendedKeyUsage)
        #expect(Array(eku) == [.serverAuth, .clientAuth])
        let summary = CertificateSummary(cert)
        #expect(summary.dnsNames == ["node1.stoq.test"])  // lower-cased, de-duplicated
        #expect(summary.ipAddresses == ["2001:db8::1", "::1"])
        #expect(summary.keyType == "ECDSA P-256")
        #expect(summary.isCA == false)
        // Only DNS names and IP addresses appear.
        for n in try #require(try cert.extensions.subjectAlternativeNames) {
            switch n {
            case .dnsName, .ipAddress: continue
            default: Issue.record("unexpected SAN \(n)")
            }
        }
    }

    @Test func lifetimeComesFromTheParameter() throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let now = Date()
        let cert = try f.authority.issue(publicKey: f.newKey(), dnsNames: ["a.test"], lifetime: 3600, now: now)
        #expect(abs(cert.notValidAfter.timeIntervalSince(now) - 3600) < 1)
        for (bad, text) in [(0.0, "0"), (-5, "-5")] {
            #expect(throws: TrustError(.invalidLifetime, "lifetime \(text)s: expected more than 0 seconds")) {
                try f.authority.issue(publicKey: f.newKey(), dnsNames: ["a.test"], lifetime: bad)
            }
        }
        // Beyond the intermediate: cut to end with it (`intermediateIsReissued…` below).
        let long = try f.authority.issue(publicKey: f.newKey(), dnsNames: ["a.test"], lifetime: 20 * 365 * 86400)
        #expect(long.notValidAfter == f.authority.intermediate.notValidAfter)
    }

    /// Three years after `trust init` the intermediate ended, `issue` refused every lifetime
    /// that outlived it, and nothing re-issued it: a node's 24 h certificate lapsed a day
    /// later. Now the intermediate is re-issued from the root 30 days before its end (same
    /// key, so certificates from before and after verify under either), and in its last day
    /// a certificate is cut to end with it rather than refused. Time is the `now` passed in.
    @Test func intermediateIsReissuedBeforeItRunsOutAndCertificatesNeverOutliveIt() async throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let t0 = Date(timeIntervalSince1970: 1_800_000_000), day = 86400.0
        let ca = try TrustAuthority.create(in: dir.path, now: t0, rootLifetime: 400 * day, intermediateLifetime: 60 * day)
        let old = ca.intermediate
        let now = t0 + 31 * day
        let before = try ca.issue(publicKey: Certificate.PublicKey(P256.Signing.PrivateKey().publicKey), dnsNames: ["a.test"], now: now - 3600)

        // 31 days left: not due.
        #expect(try ca.renewIntermediateIfDue(now: t0 + 29 * day)?.intermediate == nil)
        // In its last day, a 24 h certificate ends with it instead of being refused.
        let lastDay = t0 + 60 * day - 3600
        let clamped = try ca.issue(publicKey: Certificate.PublicKey(P256.Signing.PrivateKey().publicKey), dnsNames: ["a.test"], now: lastDay)
        #expect(clamped.notValidAfter == old.notValidAfter)
        // Once it has ended, nothing valid can be issued: refused, naming the file and the way out.
        do {
            _ = try ca.issue(publicKey: Certificate.PublicKey(P256.Signing.PrivateKey().publicKey), dnsNames: ["a.test"], now: t0 + 61 * day)
            Issue.record("a certificate was issued under an expired intermediate")
        } catch let e as TrustError {
            #expect(e.code == .invalidLifetime)
            #expect(e.message.contains("\(dir.path)/intermediate.pem expired") && e.message.contains("root-key.pem"))
        }

        // 29 days left: re-issued, same subject and key, a fresh 60 days, and on disk.
        let renewed = try #require(try ca.renewIntermediateIfDue(now: now))
        let fresh = renewed.intermediate
        #expect(fresh.publicKey == old.publicKey && fresh.subject == old.subject && fresh.serialNumber != old.serialNumber)
        #expect(abs(fresh.notValidAfter.timeIntervalSince(now + 60 * day)) < 1)
        #expect(try TrustAuthority.load(from: dir.path).intermediate == fresh)
        #expect(try renewed.renewIntermediateIfDue(now: now)?.intermediate == nil)

        // Peers trust the root: a certificate from the new intermediate verifies, and so does
        // one from before the change with either intermediate beside it.
        let verifier = PeerVerifier(roots: [ca.root])
        let after = try renewed.issue(publicKey: Certificate.PublicKey(P256.Signing.PrivateKey().publicKey), dnsNames: ["a.test"], now: now)
        #expect(after.notValidAfter == now + TrustAuthority.defaultLifetime)
        _ = try await verifier.verify(chain: [after, fresh], dnsName: "a.test", now: now + 60)
        _ = try await verifier.verify(chain: [before, fresh], dnsName: "a.test", now: now + 60)
        _ = try await verifier.verify(chain: [after, old], dnsName: "a.test", now: now + 60)
    }

    /// With the root key moved offline the intermediate cannot be re-issued: the error names
    /// the key file, the intermediate's end and what to do, and issuing goes on (clamped).
    @Test func intermediateRenewalWithoutTheRootKeySaysWhatToDo() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let t0 = Date(timeIntervalSince1970: 1_800_000_000), day = 86400.0
        let ca = try TrustAuthority.create(in: dir.path, now: t0, rootLifetime: 400 * day, intermediateLifetime: 60 * day)
        try FileManager.default.removeItem(atPath: dir.path + "/root-key.pem")
        do {
            _ = try ca.renewIntermediateIfDue(now: t0 + 50 * day)
            Issue.record("re-issued without the root key")
        } catch let e as TrustError {
            #expect(e.code == .missingFile)
            #expect(e.message.contains("\(dir.path)/root-key.pem") && e.message.contains("\(ca.intermediate.notValidAfter)"))
        }
        #expect(try TrustAuthority.load(from: dir.path).intermediate == ca.intermediate)
    }

    /// A root cannot be renewed in place; half a year ahead the authority says so, with the
    /// date and the steps. Near the root's end the intermediate is re-issued only to the root's
    /// end, and not again once it already ends there.
    @Test func rootNearItsEndIsWarnedAboutWellAhead() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let t0 = Date(timeIntervalSince1970: 1_800_000_000), day = 86400.0
        let ca = try TrustAuthority.create(in: dir.path, now: t0, rootLifetime: 400 * day, intermediateLifetime: 300 * day)
        #expect(ca.rootExpiryWarning(now: t0 + 200 * day) == nil)
        let warning = try #require(ca.rootExpiryWarning(now: t0 + 230 * day))
        #expect(warning.contains("\(dir.path)/root.pem expires at \(ca.root.notValidAfter) (in 170 days)"))
        #expect(warning.contains("stoq trust init"))
        #expect(ca.rootExpiryWarning(now: t0 + 401 * day)?.contains("expired at") == true)
        let renewed = try #require(try ca.renewIntermediateIfDue(now: t0 + 280 * day))
        #expect(renewed.intermediate.notValidAfter == ca.root.notValidAfter)
        #expect(try renewed.renewIntermediateIfDue(now: t0 + 380 * day)?.intermediate == nil)
    }

    @Test func serialsAreRandom() throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        var serials = Set<Certificate.SerialNumber>()
        for _ in 0..<50 {
            serials.insert(try f.authority.issue(publicKey: f.newKey(), dnsNames: ["a.test"]).serialNumber)
        }
        #expect(serials.count == 50)
    }

    func code(_ body: () throws -> Certificate) -> TrustError.Code? {
        do { _ = try body(); return nil } catch let e as TrustError { return e.code } catch { return nil }
    }

    @Test func refusesIPv4AndBadNames() throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let k = f.newKey()
        #expect(code { try f.authority.issue(publicKey: k, dnsNames: [], ipv6Addresses: ["192.0.2.1"]) } == .ipv4Refused)
        #expect(code { try f.authority.issue(publicKey: k, dnsNames: [], ipv6Addresses: ["::ffff:192.0.2.1"]) } == .ipv4Refused)
        #expect(code { try f.authority.issue(publicKey: k, dnsNames: ["192.0.2.1"]) } == .ipv4Refused)
        #expect(code { try f.authority.issue(publicKey: k, dnsNames: [], ipv6Addresses: ["2001:db8::zz"]) } == .invalidAddress)
        #expect(code { try f.authority.issue(publicKey: k, dnsNames: ["*.stoq.test"]) } == .invalidDNSName)
        #expect(code { try f.authority.issue(publicKey: k, dnsNames: ["-a.test"]) } == .invalidDNSName)
        #expect(code { try f.authority.issue(publicKey: k, dnsNames: ["a..test"]) } == .invalidDNSName)
        #expect(code { try f.authority.issue(publicKey: k, dnsNames: ["2001:db8::1"]) } == .invalidDNSName)
        #expect(code { try f.authority.issue(publicKey: k, dnsNames: []) } == .noSubjectAlternativeNames)
        do {
            _ = try f.authority.issue(publicKey: k, dnsNames: [], ipv6Addresses: ["10.0.0.1"])
        } catch let e as TrustError {
            #expect(e.message == "10.0.0.1 is an IPv4 address; STOQ is IPv6 only")
        }
    }

    @Test func issuesFromACSRAndRefusesABadOne() throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let csr = try CertificateSigningRequest(
            version: .v1, subject: CertFactory.name("ignored"), privateKey: key,
            attributes: CertificateSigningRequest.Attributes(), signatureAlgorithm: .ecdsaWithSHA256)
        let cert = try f.authority.issue(csr: csr, dnsNames: ["n.test"])
        #expect(cert.publicKey == key.publicKey)
        #expect(cert.subject == CertFactory.name("n.test"))  // names come from the authority, not the CSR

        // Same request body, signature made by another key: no proof of possession.
        let other = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let otherCSR = try CertificateSigningRequest(
            version: .v1, subject: CertFactory.name("ignored"), privateKey: other,
            attributes: CertificateSigningRequest.Attributes(), signatureAlgorithm: .ecdsaWithSHA256)
        let forged = try CertificateSigningRequest(
            version: .v1, subject: CertFactory.name("ignored"), publicKey: key.publicKey,
            attributes: CertificateSigningRequest.Attributes(), signatureAlgorithm: .ecdsaWithSHA256,
            signature: otherCSR.signature)
        #expect(code { try f.authority.issue(csr: forged, dnsNames: ["n.test"]) } == .invalidCSR)
    }

    @Test func issueWithNewKeyReturnsChainAndMatchingKey() throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let issued = try f.authority.issueWithNewKey(dnsNames: ["n.test"], ipv6Addresses: ["2001:db8::7"])
        let chainPath = f.dir.path + "/chain.pem"
        try issued.chainPEM.write(toFile: chainPath, atomically: true, encoding: .utf8)
        let chain = try PEMFiles.readCertificates(chainPath)
        #expect(chain == [issued.certificate, f.authority.intermediate])
        let key = try Certificate.PrivateKey(pemEncoded: issued.keyPEM)
        #expect(key.publicKey == issued.certificate.publicKey)
    }

    /// A client's certificate with access roles (`stoq trust issue --role`): URI SANs, no DNS
    /// name or address, clientAuth only, and the name and URIs the node's access check reads.
    @Test func roleCertificateIsAClientsWithItsURIs() throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let uris = ["urn:stoq:role:writer", "urn:stoq:role:reader"]
        let issued = try f.authority.issueWithNewKey(dnsNames: [], uris: uris, commonName: "alice")
        let s = CertificateSummary(issued.certificate)
        #expect(s.extendedKeyUsage == ["clientAuth"])
        #expect(s.dnsNames.isEmpty && s.ipAddresses.isEmpty)
        let id = CertificateSummary.clientIdentity(issued.certificate)
        #expect(id.subject == "alice")
        #expect(id.uris == uris)
        // A node certificate keeps both usages, and names itself.
        let node = try f.authority.issueWithNewKey(dnsNames: ["n.test"], uris: ["urn:stoq:role:reader"])
        #expect(CertificateSummary(node.certificate).extendedKeyUsage == ["serverAuth", "clientAuth"])
        #expect(CertificateSummary.clientIdentity(node.certificate).subject == "n.test")
        #expect(throws: TrustError.self) { try f.authority.issueWithNewKey(dnsNames: []) }
    }
}

@Suite struct PEMFilesTests {
    @Test func readsRevocationLists() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let path = dir.path + "/revoked.txt"
        try "# revoked 2026-11\n23bb96d2636c6a6d\n\n7F:A6:24:9E  # with colons\n".write(toFile: path, atomically: true, encoding: .utf8)
        let serials = try PEMFiles.readSerials(path)
        #expect(
            serials == [
                Certificate.SerialNumber(bytes: [0x23, 0xbb, 0x96, 0xd2, 0x63, 0x6c, 0x6a, 0x6d]),
                Certificate.SerialNumber(bytes: [0x7f, 0xa6, 0x24, 0x9e]),
            ])
        try "abc\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(throws: TrustError(.invalidPEM, "\(path):1: abc is not a hex serial number")) { try PEMFiles.readSerials(path) }
        // The one parser refuses a bad line anywhere (the node used to skip it), naming the line.
        try "23bb96d2636c6a6d\nnot-a-serial # oops\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(throws: TrustError(.invalidPEM, "\(path):2: not-a-serial  is not a hex serial number")) {
            try PEMFiles.readSerials(path, missingIsEmpty: true)
        }
        // Fullwidth digits pass Character.isHexDigit but no radix-16 conversion: refused, not trapped on.
        try "２３bb\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(throws: TrustError(.invalidPEM, "\(path):1: ２３bb is not a hex serial number")) { try PEMFiles.readSerials(path) }
        // Nothing revoked yet: no file is an empty list where the caller says so.
        #expect(try PEMFiles.readSerials(dir.path + "/absent.txt", missingIsEmpty: true).isEmpty)
        #expect(throws: TrustError.self) { try PEMFiles.readSerials(dir.path + "/absent.txt") }
    }

    @Test func refusesNonPEMAndMissingFiles() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        #expect(throws: TrustError(.missingFile, "\(dir.path)/none.pem: no such file")) {
            try PEMFiles.readCertificates(dir.path + "/none.pem")
        }
        try "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".write(toFile: dir.path + "/k.pem", atomically: true, encoding: .utf8)
        #expect(throws: TrustError(.invalidPEM, "\(dir.path)/k.pem: no CERTIFICATE block")) {
            try PEMFiles.readCertificates(dir.path + "/k.pem")
        }
    }
}
