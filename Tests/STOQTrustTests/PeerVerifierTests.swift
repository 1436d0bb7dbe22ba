import _CryptoExtras
import Crypto
import Foundation
import SwiftASN1
import Testing
import X509
@testable import STOQTrust

@Suite struct PeerVerifierTests {
    /// The refusal code for `chain`, or nil when it verifies.
    func refusal(_ verifier: PeerVerifier, _ chain: [Certificate], dns: String? = nil, ip: String? = nil,
                 now: Date = Date()) async -> PeerVerificationError? {
        do {
            _ = try await verifier.verify(chain: chain, dnsName: dns, ipv6Address: ip, now: now)
            return nil
        } catch let e as PeerVerificationError {
            return e
        } catch {
            Issue.record("unexpected error \(error)")
            return nil
        }
    }

    @Test func acceptsAnIssuedCertificate() async throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let cert = try f.authority.issue(publicKey: f.newKey(), dnsNames: ["node1.stoq.test"], ipv6Addresses: ["2001:db8::1"])
        let v = PeerVerifier(roots: [f.authority.root])
        let chain = [cert, f.authority.intermediate]
        let validated = try await v.verify(chain: chain, dnsName: "node1.stoq.test")
        #expect(validated == [cert, f.authority.intermediate, f.authority.root])
        #expect(await refusal(v, chain) == nil)
        #expect(await refusal(v, chain, dns: "NODE1.stoq.test.") == nil)
        #expect(await refusal(v, chain, ip: "2001:db8::1") == nil)
        #expect(await refusal(v, chain, ip: "2001:0db8:0:0::1") == nil)
        // serverAuth and clientAuth are both issued, so either role verifies.
        #expect(await refusal(PeerVerifier(roots: [f.authority.root], role: .client), chain) == nil)
    }

    @Test func acceptsEveryAllowedKeyType() async throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let v = PeerVerifier(roots: [f.authority.root])
        let keys: [Certificate.PublicKey] = [
            Certificate.PublicKey(P256.Signing.PrivateKey().publicKey),
            Certificate.PublicKey(P384.Signing.PrivateKey().publicKey),
            Certificate.PublicKey(Curve25519.Signing.PrivateKey().publicKey),
            Certificate.PublicKey(try _RSA.Signing.PrivateKey(keySize: .bits2048).publicKey),
        ]
        for k in keys {
            let cert = try f.authority.issue(publicKey: k, dnsNames: ["n.test"])
            #expect(await refusal(v, [cert, f.authority.intermediate]) == nil, "\(k)")
        }
    }

    @Test func refusesExpired() async throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let cert = try f.authority.issue(publicKey: f.newKey(), dnsNames: ["n.test"], lifetime: 3600,
                                         now: Date() - 7200)
        let e = await refusal(PeerVerifier(roots: [f.authority.root]), [cert, f.authority.intermediate])
        #expect(e?.code == .expired)
        #expect(e?.message.hasPrefix("leaf CN=n.test expired at ") == true)
    }

    @Test func refusesNotYetValid() async throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let cert = try f.authority.issue(publicKey: f.newKey(), dnsNames: ["n.test"], now: Date() + 3600)
        let e = await refusal(PeerVerifier(roots: [f.authority.root]), [cert, f.authority.intermediate])
        #expect(e?.code == .notYetValid)
        #expect(e?.message.hasPrefix("leaf CN=n.test is not valid before ") == true)
        // The same certificate is fine once its time has come.
        #expect(await refusal(PeerVerifier(roots: [f.authority.root]), [cert, f.authority.intermediate],
                              now: Date() + 7200) == nil)
    }

    @Test func refusesWrongEKU() async throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let v = PeerVerifier(roots: [f.authority.root])
        let codeSigning = CertFactory.leaf("n.test", publicKey: f.newKey(), issuer: f.issuer, eku: [.codeSigning])
        var e = await refusal(v, [codeSigning, f.authority.intermediate])
        #expect(e?.code == .wrongEKU)
        #expect(e?.message == "leaf CN=n.test allows [codeSigning]; serverAuth is required")
        let none = CertFactory.leaf("n.test", publicKey: f.newKey(), issuer: f.issuer, eku: nil)
        e = await refusal(v, [none, f.authority.intermediate])
        #expect(e?.code == .wrongEKU)
        // A server-only certificate cannot act as a client.
        let serverOnly = CertFactory.leaf("n.test", publicKey: f.newKey(), issuer: f.issuer, eku: [.serverAuth])
        #expect(await refusal(v, [serverOnly, f.authority.intermediate]) == nil)
        e = await refusal(PeerVerifier(roots: [f.authority.root], role: .client), [serverOnly, f.authority.intermediate])
        #expect(e?.code == .wrongEKU)
    }

    @Test func refusesSANMismatch() async throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let cert = try f.authority.issue(publicKey: f.newKey(), dnsNames: ["node1.stoq.test"], ipv6Addresses: ["2001:db8::1"])
        let v = PeerVerifier(roots: [f.authority.root])
        let chain = [cert, f.authority.intermediate]
        var e = await refusal(v, chain, dns: "node2.stoq.test")
        #expect(e?.code == .sanMismatch)
        #expect(e?.message == "leaf CN=node1.stoq.test names [DNS:node1.stoq.test, IP:2001:db8::1], not DNS:node2.stoq.test")
        e = await refusal(v, chain, ip: "2001:db8::2")
        #expect(e?.code == .sanMismatch)
        // An address is not matched against DNS names, nor a name against addresses.
        e = await refusal(v, chain, dns: "2001-db8--1.stoq.test")
        #expect(e?.code == .sanMismatch)
        // IPv4 cannot match anything: refused as input, naming the rule.
        e = await refusal(v, chain, ip: "192.0.2.1")
        #expect(e == PeerVerificationError(.invalidInput, "192.0.2.1 is an IPv4 address; STOQ is IPv6 only"))
    }

    @Test func refusesUnknownRoot() async throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let other = try AuthorityFixture()
        defer { other.dir.cleanup() }
        let cert = try f.authority.issue(publicKey: f.newKey(), dnsNames: ["n.test"])
        let e = await refusal(PeerVerifier(roots: [other.authority.root]), [cert, f.authority.intermediate])
        // Both authorities are named alike ("STOQ Root CA"), so the message says the signature failed.
        #expect(e?.code == .unknownRoot)
        // Without the intermediate there is no path at all.
        let stranger = CertFactory.root("Stranger CA")
        let lone = CertFactory.leaf("n.test", publicKey: f.newKey(), issuer: stranger)
        let e2 = await refusal(PeerVerifier(roots: [f.authority.root]), [lone])
        #expect(e2 == PeerVerificationError(.unknownRoot,
                                            "no chain to a trusted root: issuer CN=Stranger CA of CN=n.test is not in the trust bundle"))
    }

    @Test func refusesRevoked() async throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let cert = try f.authority.issue(publicKey: f.newKey(), dnsNames: ["n.test"])
        let chain = [cert, f.authority.intermediate]
        var e = await refusal(PeerVerifier(roots: [f.authority.root], revokedSerials: [cert.serialNumber]), chain)
        #expect(e?.code == .revoked)
        let hexSerial = cert.serialNumber.bytes.map { String(format: "%02x", $0) }.joined()
        #expect(e?.message == "leaf CN=n.test serial \(hexSerial) is revoked")
        // Revoking the intermediate takes every certificate under it with it.
        e = await refusal(PeerVerifier(roots: [f.authority.root], revokedSerials: [f.authority.intermediate.serialNumber]), chain)
        #expect(e?.code == .revoked)
        // Other serials do not matter.
        #expect(await refusal(PeerVerifier(roots: [f.authority.root], revokedSerials: [CertFactory.serial()]), chain) == nil)
    }

    @Test func refusesChainTooLong() async throws {
        let root = CertFactory.root("Root")
        let i1 = CertFactory.intermediate("Inter 1", issuer: root)
        let i2 = CertFactory.intermediate("Inter 2", issuer: i1)
        let leaf = CertFactory.leaf("n.test", publicKey: Certificate.PublicKey(P256.Signing.PrivateKey().publicKey), issuer: i2)
        let e = await refusal(PeerVerifier(roots: [root.cert]), [leaf, i2.cert, i1.cert])
        #expect(e == PeerVerificationError(.chainTooLong, "chain of 4 certificates (leaf to root) exceeds the maximum of 3"))
        // The length was the only problem.
        #expect(await refusal(PeerVerifier(roots: [root.cert], maxChainLength: 4), [leaf, i2.cert, i1.cert]) == nil)
    }

    @Test func refusesWeakKeys() async throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let v = PeerVerifier(roots: [f.authority.root])
        let rsa1024 = Certificate.PublicKey(try _RSA.Signing.PrivateKey(unsafeKeySize: .init(bitCount: 1024)).publicKey)
        let weak = CertFactory.leaf("n.test", publicKey: rsa1024, issuer: f.issuer)
        var e = await refusal(v, [weak, f.authority.intermediate])
        #expect(e == PeerVerificationError(
            .keyTooWeak, "leaf CN=n.test has a RSA-1024 key; accepted: ECDSA P-256, ECDSA P-384, Ed25519, RSA ≥ 2048"))
        let p521 = CertFactory.leaf("n.test", publicKey: Certificate.PublicKey(P521.Signing.PrivateKey().publicKey), issuer: f.issuer)
        e = await refusal(v, [p521, f.authority.intermediate])
        #expect(e?.code == .keyTooWeak)
    }

    @Test func reportsOtherRFC5280ViolationsAsInvalidChain() async throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        // A node certificate (CA:false) used to sign another certificate.
        let nodeKey = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let node = CertFactory.leaf("node.test", publicKey: nodeKey.publicKey, issuer: f.issuer)
        let below = CertFactory.leaf("n.test", publicKey: f.newKey(), issuer: (node, nodeKey))
        let e = await refusal(PeerVerifier(roots: [f.authority.root], maxChainLength: 4), [below, node, f.authority.intermediate])
        #expect(e?.code == .invalidChain)
    }

    @Test func everyCodeHasADistinctName() {
        let names = PeerVerificationError.Code.allCases.map(\.rawValue)
        #expect(Set(names).count == names.count)
        for required in ["expired", "notYetValid", "wrongEKU", "sanMismatch", "unknownRoot", "revoked", "chainTooLong", "keyTooWeak"] {
            #expect(names.contains(required))
        }
    }
    @Test func transparencyRequiresAValidSCTFromATrustedLog() async throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let log = try TransparencyLog.openForAuthority(caDirectory: f.dir.path + "/ct")
        let logged = try f.authority.issue(publicKey: f.newKey(), dnsNames: ["n.test"], log: log)
        let bare = try f.authority.issue(publicKey: f.newKey(), dnsNames: ["n.test"])
        let strict = PeerVerifier(roots: [f.authority.root], transparencyLogs: [log.publicKey])
        #expect(await refusal(strict, [logged, f.authority.intermediate]) == nil)
        #expect(await refusal(strict, [bare, f.authority.intermediate])?.code == .sctMissing)
        // Not required: a certificate without SCT is fine.
        #expect(await refusal(PeerVerifier(roots: [f.authority.root]), [bare, f.authority.intermediate]) == nil)
        // A log the verifier does not trust.
        let other = PeerVerifier(roots: [f.authority.root], transparencyLogs: [P256.Signing.PrivateKey().publicKey])
        #expect(await refusal(other, [logged, f.authority.intermediate])?.code == .sctUnknownLog)
        // The logged certificate's SCT list on a different certificate (same CA, same serial
        // space): the signature does not cover it.
        var exts = Array(bare.extensions)
        exts.append(try #require(Array(logged.extensions).last))
        let forged = try Certificate(
            version: .v3, serialNumber: bare.serialNumber, publicKey: bare.publicKey,
            notValidBefore: bare.notValidBefore, notValidAfter: bare.notValidAfter, issuer: bare.issuer,
            subject: bare.subject, signatureAlgorithm: .ecdsaWithSHA256, extensions: try Certificate.Extensions(exts),
            issuerPrivateKey: f.intermediateKey)
        let e = await refusal(strict, [forged, f.authority.intermediate])
        #expect(e?.code == .sctInvalid && e!.message.contains("SCT signature invalid (forged)"), "\(String(describing: e))")
    }
}
