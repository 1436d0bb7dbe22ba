import Foundation
import STOQTransfer
import STOQTrust
import Testing
import X509

@testable import STOQNode

/// Who may sign a mesh advert: a node's certificate under the mesh's roots. A user's client
/// certificate (issued under the same roots, with an access role) and a certificate this
/// node's CA revoked are refused, each saying why.
@Suite struct AdvertSignerTests {
    @Test func onlyANodesUnrevokedCertificateSignsAdverts() throws {
        let dir = NSTemporaryDirectory() + "stoq-advert-signer-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ca = try TrustAuthority.create(in: dir + "/trust")
        let verify = try Node.advertVerifier(ClientTrust(caFile: dir + "/trust/root.pem"), dataDir: dir)
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
        try PEMFiles.appendSerial(CertificateSummary(revoked.certificate).serial, to: dir + "/trust/revoked.txt", header: "# test")
        let after = try Node.advertVerifier(ClientTrust(caFile: dir + "/trust/root.pem"), dataDir: dir)
        try after(chain(node))
        do {
            try after(chain(revoked))
            Issue.record("a revoked node's certificate signed an advert")
        } catch {
            #expect("\(error)".contains("revoked"), "\(error)")
        }
    }
}
