import Foundation
import Logging
import STOQCore
import STOQRouting
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

    /// A relay picks its route within what `max_hops` leaves the request. max_hops = 3; links
    /// A–B and the cheap B–X–Y–H, and a dear B–H. A's best route to H within 3 links is A-B-H,
    /// so B gets the request with 1 hop taken: B's own best route within 3 links, B-X-Y-H,
    /// would take it to Y with 3 hops, which refuses it (508). B must send it to H directly.
    @Test func aRelayTakesTheBestRouteWithinTheHopsLeft() throws {
        let node = MeshFixture.shared.nodes[0]
        let settings = MeshService.Settings(
            chain: node.chain, key: node.key, trust: ClientTrust(), verifyChain: { _ in }, listenPort: 4433, localAddresses: [])
        struct NotOpened: Error {}
        let service = MeshService(
            settings: settings, discovery: StaticDiscovery(peers: []), datapath: ClientDatapath { throw NotOpened() },
            logger: Logger(label: "test.mesh"))
        let b = service.identity
        func other(_ n: UInt8) -> NodeIdentity { NodeIdentity([UInt8](repeating: n, count: 32)) }
        let (a, x, y, h) = (other(1), other(2), other(3), other(4))
        func table(_ links: [(NodeIdentity, NodeIdentity, Double)]) throws -> RouteTable {
            let engine = RoutingEngine(algorithm: .latency, maxHops: 3, backups: .all)
            var out: [NodeID: [AdvertisedLink]] = [:]
            for (p, q, ms) in links {
                out[p.routingID, default: []].append(AdvertisedLink(peer: q.routingID, metrics: LinkMetrics(rttMs: ms)))
                out[q.routingID, default: []].append(AdvertisedLink(peer: p.routingID, metrics: LinkMetrics(rttMs: ms)))
            }
            for (origin, l) in out { try engine.apply(LinkStateAdvert(origin: origin, sequence: 1, links: l), now: 0) }
            return engine.routes(from: b.routingID)
        }
        let cheap: [(NodeIdentity, NodeIdentity, Double)] = [(a, b, 1), (b, x, 1), (x, y, 1), (y, h, 1)]
        let routes = try table(cheap + [(b, h, 50)])
        #expect(routes.nextHop(to: h.routingID) == x.routingID)  // the scenario holds
        let url = { (n: Int) in try! STOQURL("https://[fd00::\(n)]:4433/") }
        let identities = Dictionary(uniqueKeysWithValues: [a, b, x, y, h].map { ($0.routingID, $0) })
        let neighbours = [a.routingID: url(1), x.routingID: url(2), h.routingID: url(4)]
        service.publish(
            view: MeshView(me: b, routes: routes, identities: identities, neighbourURLs: neighbours, down: [], maxHops: 3, paths: [:]))
        let upstream = MeshUpstream(service: service)
        let chunk = UpstreamResource.chunk(hex: String(repeating: "ab", count: 32))
        let via = MeshWire.via("", adding: a)
        // 1 hop taken, 2 left: straight to H (the best route of 2 links or fewer), and nothing
        // else (the backup, B-X-Y-H, is longer than 2).
        let relayed = upstream.attempts(for: chunk, hint: RelayHint(holder: h.hex, hops: 1, via: via))
        #expect(relayed.map(\.url.endpoint) == [url(4).endpoint])
        #expect(relayed.first?.path == MeshWire.relayPath(holder: h, hops: 2, chunk))
        // With all 3 links left, the cheap way first, the direct link as its backup.
        #expect(service.view.nextHops(to: h, within: 3).map(\.endpoint) == [url(2).endpoint, url(4).endpoint])
        // A view that disagrees with the asker's (B sees no B-H link, so nothing of 2 links):
        // the full route, as before, where a relay with room may still take it.
        service.publish(
            view: MeshView(
                me: b, routes: try table(cheap), identities: identities, neighbourURLs: neighbours, down: [], maxHops: 3, paths: [:]))
        #expect(upstream.attempts(for: chunk, hint: RelayHint(holder: h.hex, hops: 1, via: via)).map(\.url.endpoint) == [url(2).endpoint])
    }

    /// Only chunk fetches make a neighbour's delivery rate: a manifest's time may hold a search
    /// or a holder cutting a plain file. A chunk's bytes count from its dispatch to its end.
    @Test func onlyChunksMakeTheDeliveryRate() throws {
        let node = MeshFixture.shared.nodes[0]
        let settings = MeshService.Settings(
            chain: node.chain, key: node.key, trust: ClientTrust(), verifyChain: { _ in }, listenPort: 4433, localAddresses: [])
        struct NotOpened: Error {}
        let service = MeshService(
            settings: settings, discovery: StaticDiscovery(peers: []), datapath: ClientDatapath { throw NotOpened() },
            logger: Logger(label: "test.mesh"))
        let upstream = MeshUpstream(service: service)
        let url = try STOQURL("https://[fd00::7]:4433/")
        let body = [UInt8](repeating: 7, count: 100_000)
        func fetch(_ resource: UpstreamResource) {
            let a = UpstreamAttempt(url: url, path: MeshWire.relayPath(holder: node.id, hops: 1, resource), label: "n")
            upstream.dispatched(resource, via: a)
            body.withUnsafeBytes { upstream.fetched(resource, via: a, body: $0, seconds: 0.5) }
        }
        fetch(.manifest(name: "big.iso"))
        #expect(service.takeDeliveries(now: monotonicNow()).isEmpty)
        fetch(.chunk(hex: String(repeating: "ab", count: 32)))
        let d = try #require(service.takeDeliveries(now: monotonicNow())[url.endpoint])
        // Its own time (a few µs here), not the 0.5 s it was said to take.
        #expect(d.bytes == 100_000 && d.nanos > 0 && d.nanos < 100_000_000)
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
