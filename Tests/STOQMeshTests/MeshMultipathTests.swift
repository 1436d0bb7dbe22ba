import STOQRouting
import STOQTransfer
import Synchronization
import Testing

@testable import STOQMesh

/// What the node's multipath scheduler is told of requests out: every send is matched by one
/// end, even when two fetches send the same path to the same next hop, and a request whose end
/// never comes stops counting against its route.
@Suite struct MeshMultipathTests {
    final class Clock: Sendable {
        let t = Mutex(0.0)
        func advance(_ s: Double) { t.withLock { $0 += s } }
    }

    static let holder = NodeIdentity([UInt8](repeating: 7, count: 32))
    static let chunk = 256 * 1024

    static func choice(_ hop: UInt64) -> (holder: NodeIdentity, path: MeshView.PathChoice, attempt: UpstreamAttempt) {
        let url = try! STOQURL("https://[fd00::\(hop)]:4433/")
        let attempt = UpstreamAttempt(url: url, path: "/_stoq/relay/x/1/chunks/c", holder: holder.hex, label: "via \(hop)")
        return (holder, MeshView.PathChoice(nextHop: NodeID(hop), features: MultipathRouteFeatures(rttMean: 0.01 * Double(hop), deliveryRate: 10e6)), attempt)
    }

    static func inFlight(_ m: MeshMultipath) -> [Int] { m.estimates().map(\.inFlightBytes) }

    @Test func twoSendsOfOnePathEndTwice() {
        let clock = Clock()
        let m = MeshMultipath(kind: .mlOptimized, clock: { clock.t.withLock { $0 } })
        let choices = [Self.choice(1), Self.choice(2)]
        let first = m.order(choices, bytes: Self.chunk)[0]
        let hop = choices.first { $0.attempt.label == first.label }!.path.nextHop
        m.dispatched(first, nextHop: hop, bytes: Self.chunk)
        m.dispatched(first, nextHop: hop, bytes: Self.chunk)
        #expect(Self.inFlight(m).reduce(0, +) == 2 * Self.chunk)
        clock.advance(0.05)
        m.ended(first, delivered: true)
        #expect(Self.inFlight(m).reduce(0, +) == Self.chunk)
        m.ended(first, delivered: true)
        // Before, the second send replaced the first: one end cleared it, the other found none,
        // and the scheduler still counted a chunk in flight on the route.
        #expect(Self.inFlight(m).reduce(0, +) == 0)
    }

    @Test func aRequestWhoseEndNeverComesIsTakenBack() {
        let clock = Clock()
        let m = MeshMultipath(kind: .mlOptimized, clock: { clock.t.withLock { $0 } })
        let choices = [Self.choice(1), Self.choice(2)]
        let first = m.order(choices, bytes: Self.chunk)[0]
        m.dispatched(first, nextHop: choices.first { $0.attempt.label == first.label }!.path.nextHop, bytes: Self.chunk)
        clock.advance(MeshMultipath.lostAfter - 1)
        _ = m.order(choices, bytes: Self.chunk)
        #expect(Self.inFlight(m).reduce(0, +) == Self.chunk)
        clock.advance(MeshMultipath.lostAfter / 10 + 1)
        _ = m.order(choices, bytes: Self.chunk)
        #expect(Self.inFlight(m).reduce(0, +) == 0)
        // Its late end, if it comes, finds nothing to take.
        m.ended(first, delivered: true)
        #expect(Self.inFlight(m).reduce(0, +) == 0)
    }
}
