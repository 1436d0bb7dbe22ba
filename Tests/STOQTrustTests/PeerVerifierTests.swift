import _CryptoExtras
import Crypto
import Foundation
import SwiftASN1
import Testing
import X509
@testable import STOQTrust

@Suite struct PeerVerifierTests {
    /// The refusal code for `chain`, or nil when it verifies.
    func refusal(
        _ verifier: PeerVerifier, _ chain: [Certificate], dns: String? = nil, ip: String? = nil,
        now: Date = Date()
    ) async -> PeerVerificationError? {
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
        let cert = try f.authority.issue(
            publicKey: f.newKey(), dnsNames: ["n.test"], lifetime: 3600,
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
        #expect(
            await refusal(
                PeerVerifier(roots: [f.authority.root]), [cert, f.authority.intermediate],
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
        #expect(
            e2
                == PeerVerificationError(
                    .unknownRoot,
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

    /// Twelve intermediates with one name and one key, each signed by that key: every one
    /// verifies every other. Depth first tried every ordering of them (minutes of ECDSA on a
    /// worker, from any client under client_auth); breadth first reaches each once.
    @Test func mutuallySignedIntermediatesCostSquaresNotFactorials() async throws {
        let loop = CertFactory.root("Loop")
        let copies = (0..<12).map { _ in
            try! Certificate(
                version: .v3, serialNumber: CertFactory.serial(), publicKey: loop.key.publicKey,
                notValidBefore: Date() - 3600, notValidAfter: Date() + 86400,
                issuer: loop.cert.subject, subject: loop.cert.subject, signatureAlgorithm: .ecdsaWithSHA256,
                extensions: try! Certificate.Extensions { Critical(BasicConstraints.isCertificateAuthority(maxPathLength: nil)) },
                issuerPrivateKey: loop.key)
        }
        let leaf = CertFactory.leaf("n.test", publicKey: Certificate.PublicKey(P256.Signing.PrivateKey().publicKey), issuer: loop)
        let clock = ContinuousClock(), start = clock.now
        let e = await refusal(PeerVerifier(roots: [CertFactory.root("Root").cert], role: .client), [leaf] + copies)
        #expect(e?.code == .unknownRoot)
        print("12 mutually signed intermediates refused in \(clock.now - start)")
    }

    @Test func refusesChainTooLong() async throws {
        let root = CertFactory.root("Root")
        let i1 = CertFactory.intermediate("Inter 1", issuer: root)
        let i2 = CertFactory.intermediate("Inter 2", issuer: i1)
        let i3 = CertFactory.intermediate("Inter 3", issuer: i2)
        let leaf = CertFactory.leaf("n.test", publicKey: Certificate.PublicKey(P256.Signing.PrivateKey().publicKey), issuer: i3)
        // Counted over the verified path (leaf to root: 5), though the peer sent four.
        let e = await refusal(PeerVerifier(roots: [root.cert]), [leaf, i3.cert, i2.cert, i1.cert])
        #expect(e == PeerVerificationError(.chainTooLong, "chain of 5 certificates (leaf to root) exceeds the maximum of 4"))
        // The length was the only problem.
        #expect(await refusal(PeerVerifier(roots: [root.cert], maxChainLength: 5), [leaf, i3.cert, i2.cert, i1.cert]) == nil)
        // The same limit for a client's chain.
        #expect(await refusal(PeerVerifier(roots: [root.cert], role: .client), [leaf, i3.cert, i2.cert, i1.cert])?.code == .chainTooLong)
    }

    @Test func refusesWeakKeys() async throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let v = PeerVerifier(roots: [f.authority.root])
        let rsa1024 = Certificate.PublicKey(try _RSA.Signing.PrivateKey(unsafeKeySize: .init(bitCount: 1024)).publicKey)
        let weak = CertFactory.leaf("n.test", publicKey: rsa1024, issuer: f.issuer)
        var e = await refusal(v, [weak, f.authority.intermediate])
        #expect(
            e
                == PeerVerificationError(
                    .keyTooWeak, "leaf CN=n.test has a RSA-1024 key; accepted: ECDSA P-256, ECDSA P-384, ECDSA P-521, Ed25519, RSA ≥ 2048"))
        // The DER entry (the handshake's, and stoq trust verify's) gives the same verdict for a
        // certificate swift-certificates will not even parse.
        #expect(throws: e!) { try v.verify(derChain: [PeerVerifier.der(weak), PeerVerifier.der(f.authority.intermediate)]) }
        // P-521 is accepted, in both roles (GnuTLS and swift-crypto implement it).
        let p521 = CertFactory.leaf("n.test", publicKey: Certificate.PublicKey(P521.Signing.PrivateKey().publicKey), issuer: f.issuer)
        e = await refusal(v, [p521, f.authority.intermediate])
        #expect(e == nil)
        #expect(await refusal(PeerVerifier(roots: [f.authority.root], role: .client), [p521, f.authority.intermediate]) == nil)
    }

    @Test func reportsOtherRFC5280ViolationsAsInvalidChain() async throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        // A node certificate (CA:false) used to sign another certificate.
        let nodeKey = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let node = CertFactory.leaf("node.test", publicKey: nodeKey.publicKey, issuer: f.issuer)
        let below = CertFactory.leaf("n.test", publicKey: f.newKey(), issuer: (node, nodeKey))
        let e = await refusal(PeerVerifier(roots: [f.authority.root], maxChainLength: 4), [below, node, f.authority.intermediate])
        // Its keyUsage (digitalSignature only) is the first rule it breaks.
        #expect(
            e
                == PeerVerificationError(
                    .wrongKeyUsage, "intermediate CN=node.test issues CN=n.test but its keyUsage \((try node.extensions.keyUsage)!) lacks keyCertSign"))
        // With keyCertSign but CA:FALSE, basic constraints refuse it.
        let signer = try Certificate(
            version: .v3, serialNumber: CertFactory.serial(), publicKey: nodeKey.publicKey,
            notValidBefore: Date() - 60, notValidAfter: Date() + 3600, issuer: f.authority.intermediate.subject,
            subject: CertFactory.name("signer.test"), signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(keyCertSign: true))
            },
            issuerPrivateKey: f.intermediateKey)
        let below2 = CertFactory.leaf("n.test", publicKey: f.newKey(), issuer: (signer, nodeKey))
        let e2 = await refusal(PeerVerifier(roots: [f.authority.root]), [below2, signer, f.authority.intermediate])
        #expect(e2?.code == .invalidChain)
    }

    @Test func refusesACALeafUnlessItIsThePinnedAnchor() async throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let caLeaf = try Certificate(
            version: .v3, serialNumber: CertFactory.serial(), publicKey: key.publicKey,
            notValidBefore: Date() - 60, notValidAfter: Date() + 3600, issuer: f.authority.intermediate.subject,
            subject: CertFactory.name("n.test"), signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                Critical(KeyUsage(digitalSignature: true, keyCertSign: true))
                try ExtendedKeyUsage([.serverAuth, .clientAuth])
                SubjectAlternativeNames([.dnsName("n.test")])
            },
            issuerPrivateKey: f.intermediateKey)
        let e = await refusal(PeerVerifier(roots: [f.authority.root]), [caLeaf, f.authority.intermediate])
        #expect(
            e
                == PeerVerificationError(
                    .invalidChain, "leaf CN=n.test is a CA certificate (basicConstraints CA:TRUE); a peer must present an end-entity certificate"))
        // A self-signed identity the bundle pins (TestIdentity, TOFU) is its own anchor.
        let pinned = try Certificate(pemEncoded: try EmbeddedIdentity.makeSelfSigned(names: ["stoq.test"], addresses: []).certificate)
        #expect(await refusal(PeerVerifier(roots: [pinned]), [pinned], dns: "stoq.test") == nil)
    }

    @Test func namesAreMatchedInSANsOnly() async throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let cnOnly = CertFactory.leaf("node1.stoq.test", publicKey: f.newKey(), issuer: f.issuer, dns: [])
        let e = await refusal(PeerVerifier(roots: [f.authority.root]), [cnOnly, f.authority.intermediate], dns: "node1.stoq.test")
        #expect(
            e
                == PeerVerificationError(
                    .sanMismatch, "leaf CN=node1.stoq.test has no subject alternative name, not DNS:node1.stoq.test (the subject CN is not a name, RFC 9525)"))
        // Only an address in the SANs: a DNS name is not looked for in the CN either.
        let ipOnly = try f.authority.issue(publicKey: f.newKey(), dnsNames: [], ipv6Addresses: ["2001:db8::1"])
        let e2 = await refusal(PeerVerifier(roots: [f.authority.root]), [ipOnly, f.authority.intermediate], dns: "node1.stoq.test")
        #expect(e2?.code == .sanMismatch)
    }

    @Test func refusesSHA1AndNamesTheBrokenSignature() async throws {
        let f = try AuthorityFixture()
        defer { f.dir.cleanup() }
        let rsa = Certificate.PrivateKey(try _RSA.Signing.PrivateKey(keySize: .bits2048))
        let inter = try Certificate(
            version: .v3, serialNumber: CertFactory.serial(), publicKey: rsa.publicKey,
            notValidBefore: Date() - 60, notValidAfter: Date() + 3600, issuer: f.authority.intermediate.subject,
            subject: CertFactory.name("RSA Inter"), signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                Critical(KeyUsage(keyCertSign: true))
            },
            issuerPrivateKey: f.intermediateKey)
        let sha1 = try Certificate(
            version: .v3, serialNumber: CertFactory.serial(), publicKey: f.newKey(),
            notValidBefore: Date() - 60, notValidAfter: Date() + 3600, issuer: inter.subject,
            subject: CertFactory.name("n.test"), signatureAlgorithm: .sha1WithRSAEncryption,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                try ExtendedKeyUsage([.serverAuth])
                SubjectAlternativeNames([.dnsName("n.test")])
            },
            issuerPrivateKey: rsa)
        let v = PeerVerifier(roots: [f.authority.root])
        #expect(
            await refusal(v, [sha1, inter, f.authority.intermediate])
                == PeerVerificationError(
                    .weakSignature, "leaf CN=n.test is signed with SHA-1 (sha1WithRSAEncryption); accepted: SHA-256 or stronger"))
        // A leaf naming the real intermediate but signed by another key: the leaf is blamed.
        let stranger = CertFactory.root("STOQ Intermediate CA")
        let forged = CertFactory.leaf("n.test", publicKey: f.newKey(), issuer: (f.authority.intermediate, stranger.key))
        let e = await refusal(v, [forged, f.authority.intermediate])
        #expect(
            e
                == PeerVerificationError(
                    .unknownRoot, "signature of leaf CN=n.test does not verify with the key of its issuer \(f.authority.intermediate.subject)"))
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
        let log = try TransparencyLog.openForAuthority(caDirectory: f.dir.path + "/ct") { _ in }
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
