import STOQTransfer
import Testing
import X509

@testable import STOQMesh
@testable import STOQTrust

/// A neighbour is named by the key of the certificate its connection shows, and only a node's
/// certificate names one (`NodeCertificate`): a server certificate that grants an access role
/// is a user's, and its probe answers make no neighbour.
@Suite struct NeighbourIdentityTests {
    @Test func onlyANodesCertificateNamesANeighbour() throws {
        let ca = MeshFixture.shared.ca
        let identify = try #require(MeshLoop.identifying(ClientTrust()).identifyServer)
        let node = MeshFixture.shared.nodes[0]
        #expect(identify([PeerVerifier.der(node.chain[0])]) == node.id.hex)
        let user = try ca.issueWithNewKey(dnsNames: ["user.mesh"], uris: ["urn:stoq:role:reader"])
        #expect(NodeCertificate.refusal(user.certificate)?.contains("urn:stoq:role:reader") == true)
        #expect(identify([PeerVerifier.der(user.certificate)]) == "")
        #expect(identify([]) == "")
    }
}
