import STOQCore
import Testing

@testable import STOQMesh

/// The mesh thread's pure rules.
@Suite struct MeshLoopTests {
    /// A neighbour whose probe answer names a sequence below the one held for it (its clock
    /// went back over a restart) is sent its own advert, so that it signs past it; not one that
    /// is level or ahead, not before it signed once, and the same advert at most once a second.
    @Test func aNeighbourBehindItsHeldAdvertIsSentIt() {
        let s = Nanos.second
        #expect(MeshLoop.returnsOwnAdvert(held: 100, answered: 99, lastReturned: nil, now: 0))
        #expect(!MeshLoop.returnsOwnAdvert(held: 100, answered: 100, lastReturned: nil, now: 0))
        #expect(!MeshLoop.returnsOwnAdvert(held: 100, answered: 101, lastReturned: nil, now: 0))
        #expect(!MeshLoop.returnsOwnAdvert(held: nil, answered: 99, lastReturned: nil, now: 0))
        #expect(!MeshLoop.returnsOwnAdvert(held: 100, answered: 0, lastReturned: nil, now: 0))
        #expect(!MeshLoop.returnsOwnAdvert(held: 100, answered: 99, lastReturned: (100, 5 * s), now: 5 * s + s / 2))
        #expect(MeshLoop.returnsOwnAdvert(held: 100, answered: 99, lastReturned: (100, 5 * s), now: 6 * s))
        // A newer held advert goes at once.
        #expect(MeshLoop.returnsOwnAdvert(held: 120, answered: 99, lastReturned: (100, 5 * s), now: 5 * s + 1))
    }
}
