import Foundation
import STOQAccess
import STOQMesh
import STOQTransfer
import Testing
import X509

@testable import STOQNode
@testable import STOQTrust

/// Who may sign a mesh advert: a node's certificate under the mesh's roots. A user's client
/// certificate (issued under the same roots, with an access role) and a certificate this
/// node's CA revoked are refused, each saying why.
@Suite struct AdvertSignerTests {
    /// The identity a node's certificate gives its connections carries the node's key id: its
    /// mesh id, which the advert queue counts a node's adverts by. Two nodes may share a name
    /// (nodes on one host do), never a key.
    @Test func aNodesCertificateIdentityCarriesItsMeshID() throws {
        let dir = NSTemporaryDirectory() + "stoq-identity-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ca = try TrustAuthority.create(in: dir + "/trust")
        let a = try ca.issueWithNewKey(dnsNames: ["same.test"]), b = try ca.issueWithNewKey(dnsNames: ["same.test"])
        let ida = try #require(CertificateIdentity(encoded: Node.certificateIdentity([PeerVerifier.der(a.certificate)])))
        let idb = try #require(CertificateIdentity(encoded: Node.certificateIdentity([PeerVerifier.der(b.certificate)])))
        #expect(ida.subject == "same.test" && ida.roles.isEmpty)
        #expect(ida.key == NodeIdentity(publicKey: a.certificate.publicKey).hex)
        #expect(idb.subject == ida.subject && idb.key == NodeIdentity(publicKey: b.certificate.publicKey).hex && idb.key != ida.key)
    }

    /// A certificate that grants no role is not a node's for that alone: one with clientAuth
    /// and no serverAuth is a client's. Neither it nor a user's certificate signs adverts or
    /// gives its connections a node's key (which would count them as a node's).
    @Test func aClientOnlyCertificateWithoutRolesIsNotANodes() throws {
        let dir = NSTemporaryDirectory() + "stoq-client-only-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ca = try TrustAuthority.create(in: dir + "/trust")
        let gadget = try ca.issueWithNewKey(dnsNames: [], uris: ["urn:example:gadget"], commonName: "gadget")
        let alice = try ca.issueWithNewKey(dnsNames: [], uris: ["urn:stoq:role:writer"], commonName: "alice")
        let node = try ca.issueWithNewKey(dnsNames: ["n1.test"])
        #expect(CertificateSummary(gadget.certificate).extendedKeyUsage == [ExtendedKeyUsage.Usage.clientAuth.description])
        #expect(NodeCertificate.refusal(node.certificate) == nil)
        #expect(NodeCertificate.refusal(gadget.certificate)?.contains("no serverAuth") == true)
        #expect(NodeCertificate.refusal(alice.certificate)?.contains("urn:stoq:role:writer") == true)
        let verify = try Node.advertVerifier(ClientTrust(caFile: dir + "/trust/root.pem"), revocations: RevocationList(dataDir: dir))
        do {
            try verify([gadget.certificate, ca.intermediate])
            Issue.record("a client-only certificate signed an advert")
        } catch {
            #expect("\(error)".contains("a client's, not a node's"), "\(error)")
        }
        for (issued, subject) in [(gadget, "gadget"), (alice, "alice")] {
            let id = try #require(CertificateIdentity(encoded: Node.certificateIdentity([PeerVerifier.der(issued.certificate)])))
            #expect(id.subject == subject && id.key.isEmpty)
        }
    }

    @Test func onlyANodesUnrevokedCertificateSignsAdverts() throws {
        let dir = NSTemporaryDirectory() + "stoq-advert-signer-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ca = try TrustAuthority.create(in: dir + "/trust")
        let revocations = RevocationList(dataDir: dir)
        let verify = try Node.advertVerifier(ClientTrust(caFile: dir + "/trust/root.pem"), revocations: revocations)
        func chain(_ issued: (certificate: Certificate, chainPEM: String, keyPEM: String)) -> [Certificate] {
            [issued.certificate, ca.intermediate]
        }
        let node = try ca.issueWithNewKey(dnsNames: ["n1.test"])
        try verify(chain(node))
        let user = try ca.issueWithNewKey(dnsNames: [], uris: ["urn:stoq:role:writer"], commonName: "alice")
        #expect(throws: AdvertSignerError.self) { try verify(chain(user)) }
        do { try verify(chain(user)) } catch { #expect("\(error)".contains("urn:stoq:role:writer")) }
        let roleNode = try ca.issueWithNewKey(dnsNames: ["n2.test"], uris: ["urn:stoq:role:reader"])
        #expect(throws: AdvertSignerError.self) { try verify(chain(roleNode)) }
        let revoked = try ca.issueWithNewKey(dnsNames: ["n3.test"])
        try verify(chain(revoked))
        try PEMFiles.appendSerial(CertificateSummary(revoked.certificate).serial, to: dir + "/trust/revoked.txt", header: "# test")
        // The check applies the serials held when the advert arrives: once a reload has read
        // the file again (SIGHUP, or the file changing), not only at the next start.
        #expect(try revocations.reload())
        try verify(chain(node))
        do {
            try verify(chain(revoked))
            Issue.record("a revoked node's certificate signed an advert")
        } catch {
            #expect("\(error)".contains("revoked"), "\(error)")
        }
    }
}
