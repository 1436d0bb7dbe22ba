import STOQTransfer
import Testing

@testable import STOQMesh

/// The order a search for a manifest asks the mesh in.
@Suite struct MeshUpstreamTests {
    static func attempt(_ hop: Int, to node: Int) -> UpstreamAttempt {
        let url = try! STOQURL("https://[fd00::\(hop)]:4433/")
        return UpstreamAttempt(url: url, path: "/_stoq/relay/\(node)", label: "node \(node) via \(hop)")
    }

    @Test func everyPrimaryRouteNearestFirstThenTheBackups() {
        // Three nodes, nearest first: node 1 over hops 1 (primary) and 2 (backup); node 2 over
        // hop 2 only; node 3 over hops 3 and 1.
        let routes = [[Self.attempt(1, to: 1), Self.attempt(2, to: 1)], [Self.attempt(2, to: 2)], [Self.attempt(3, to: 3), Self.attempt(1, to: 3)]]
        let order = MeshUpstream.search(after: [], routes: routes).map(\.label)
        #expect(order == ["node 1 via 1", "node 2 via 2", "node 3 via 3", "node 1 via 2", "node 3 via 1"])
        // What the holder hint put first is not asked again, and the total is bounded.
        let first = [Self.attempt(2, to: 1)]
        #expect(
            MeshUpstream.search(after: first, routes: routes).map(\.label) == ["node 1 via 2", "node 1 via 1", "node 2 via 2", "node 3 via 3", "node 3 via 1"])
        let many = (0..<20).map { [Self.attempt(100 + $0, to: $0), Self.attempt(200 + $0, to: $0)] }
        let bounded = MeshUpstream.search(after: [], routes: many)
        #expect(bounded.count == MeshUpstream.maxAttempts && bounded.allSatisfy { $0.label.contains("via 1") })
    }

    /// A chunk fetched by its id teaches who holds it; one fetched as a byte range of an object
    /// (an edge's own cut of a plain object) does not: the holder may have no such chunk.
    @Test func onlyAChunkFetchedByItsIdTeachesItsHolder() {
        let hex = String(repeating: "ab", count: 32)
        let url = try! STOQURL("https://[fd00::1]:4433/")
        func at(_ path: String) -> UpstreamAttempt { UpstreamAttempt(url: url, path: path, label: "node") }
        let relay = "/_stoq/relay/" + String(repeating: "cd", count: 32) + "/1"
        #expect(MeshUpstream.teachesHolder(.chunk(hex: hex), at(relay + "/chunks/" + hex)))
        #expect(MeshUpstream.teachesHolder(.chunk(hex: hex), at("/chunks/" + hex)))
        #expect(!MeshUpstream.teachesHolder(.chunk(hex: hex), at(relay + "/objects/big.iso")))
        #expect(MeshUpstream.teachesHolder(.manifest(name: "big.iso"), at(relay + "/objects/big.iso")))
    }
}
