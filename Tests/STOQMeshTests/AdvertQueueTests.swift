import Foundation
import Logging
import STOQCore
import STOQTransfer
import Testing

@testable import STOQMesh

/// The queue between the workers that receive adverts and the mesh thread that verifies them.
@Suite struct AdvertQueueTests {
    private func service() -> MeshService {
        let node = MeshFixture.shared.nodes[0]
        let settings = MeshService.Settings(
            chain: node.chain, key: node.key, trust: ClientTrust(), verifyChain: { _ in }, listenPort: 4433, localAddresses: [])
        struct NotOpened: Error {}
        return MeshService(
            settings: settings, discovery: StaticDiscovery(peers: []), datapath: ClientDatapath { throw NotOpened() },
            logger: Logger(label: "test.mesh"))
    }

    /// An anonymous flood fills its quarter of the queue and no more: adverts from nodes (a
    /// connection that showed a node's certificate) still go in, up to the whole bound; what
    /// the mesh thread takes, oldest first, makes room in the share it came from.
    @Test func anonymousAdvertsTakeAQuarterOfTheQueueAtMost() {
        let mesh = service()
        let anonymous = MeshService.anonymousAdvertBound
        for i in 0..<anonymous { #expect(mesh.receiveAdvert([0, UInt8(i & 0xff)], fromNode: false)) }
        #expect(!mesh.receiveAdvert([0], fromNode: false))
        for _ in anonymous..<MeshService.advertQueueBound { #expect(mesh.receiveAdvert([1], fromNode: true)) }
        #expect(!mesh.receiveAdvert([1], fromNode: true))

        let first = mesh.takeAdverts(limit: 2)
        #expect(first == [[0, 0], [0, 1]])
        #expect(mesh.receiveAdvert([0], fromNode: false) && mesh.receiveAdvert([1], fromNode: true))
        #expect(!mesh.receiveAdvert([0], fromNode: false) && !mesh.receiveAdvert([1], fromNode: true))
        // The whole queue drains: anonymous first (they came first), then the nodes'.
        var taken = first
        while true {
            let batch = mesh.takeAdverts(limit: 256)
            if batch.isEmpty { break }
            taken += batch
        }
        #expect(taken.count == MeshService.advertQueueBound + 2)
        #expect(
            taken.prefix(anonymous).allSatisfy { $0[0] == 0 }
                && taken.dropFirst(anonymous).prefix(MeshService.advertQueueBound - anonymous).allSatisfy { $0 == [1] })
        #expect(taken.suffix(2) == [[0], [1]])
        for _ in 0..<anonymous { #expect(mesh.receiveAdvert([0], fromNode: false)) }
    }
}
