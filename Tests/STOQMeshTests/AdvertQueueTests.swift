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

    /// A flood from one sender (anyone anonymous together, or one node once the queue is half
    /// full) fills its quarter of the queue and no more: the other senders' adverts still go
    /// in, up to the whole bound; what the mesh thread takes, oldest first, makes room.
    @Test func noSenderCrowdsOutTheOthers() {
        let share = MeshService.senderAdvertBound, bound = MeshService.advertQueueBound
        // Anonymous ones get their quarter and no more, even into an empty queue.
        let empty = service()
        for _ in 0..<share { #expect(empty.receiveAdvert([0], from: nil)) }
        #expect(!empty.receiveAdvert([0], from: nil))

        let mesh = service()
        // Alone, a node goes past its share up to half the queue (a neighbour handing over a
        // large mesh's adverts), then no further; past half, the next node gets its share only.
        for i in 0..<bound / 2 { #expect(mesh.receiveAdvert([1, UInt8(i & 0xff)], from: "node-a")) }
        #expect(!mesh.receiveAdvert([1], from: "node-a"))
        for _ in 0..<share { #expect(mesh.receiveAdvert([2], from: "node-b")) }
        #expect(!mesh.receiveAdvert([2], from: "node-b"))  // a quarter of the queue is still free
        for _ in 0..<share { #expect(mesh.receiveAdvert([0], from: nil)) }
        #expect(!mesh.receiveAdvert([3], from: "node-c"))  // the queue is full

        let first = mesh.takeAdverts(limit: 2)
        #expect(first == [[1, 0], [1, 1]])
        #expect(!mesh.receiveAdvert([1], from: "node-a") && !mesh.receiveAdvert([0], from: nil))  // shares still full
        #expect(mesh.receiveAdvert([3], from: "node-c") && mesh.receiveAdvert([3], from: "node-c"))
        #expect(!mesh.receiveAdvert([3], from: "node-c"))  // full again
        // The whole queue drains, in the order it came.
        var taken = first
        while true {
            let batch = mesh.takeAdverts(limit: 256)
            if batch.isEmpty { break }
            taken += batch
        }
        #expect(taken.count == bound + 2)
        let senders = taken.map { $0[0] }
        #expect(senders == Array(repeating: 1, count: bound / 2) + Array(repeating: 2, count: share) + Array(repeating: 0, count: share) + [3, 3])
        for _ in 0..<share { #expect(mesh.receiveAdvert([0], from: nil)) }
    }
}
