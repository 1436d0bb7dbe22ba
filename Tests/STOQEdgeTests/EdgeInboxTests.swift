import Foundation
import Synchronization
import Testing

@testable import STOQEdge

/// The worker's inbox of finished origin fetches: lock-free, many posters, one drainer.
@Suite struct EdgeInboxTests {
    @Test func everyCompletionArrivesOnceInEachPostersOrderAndPostsWake() {
        let inbox = EdgeCache.Inbox()
        let wakes = Atomic<Int>(0)
        inbox.onPost = { wakes.add(1, ordering: .relaxed) }
        let perPoster = 20_000
        let done = Atomic<Int>(0)
        for poster in 0..<2 {
            Thread {
                for i in 0..<perPoster {
                    let failure = i % 7 == 0 ? EdgeCache.Failure(status: 502, reason: "poster \(poster)") : nil
                    inbox.post(EdgeCache.Completion(ticket: UInt64(poster) << 32 | UInt64(i), failure: failure))
                }
                done.add(1, ordering: .releasing)
            }.start()
        }
        var got: [EdgeCache.Completion] = []
        while true {
            let finished = done.load(ordering: .acquiring) == 2
            inbox.drain(into: &got)
            if finished { inbox.drain(into: &got); break }
        }
        #expect(got.count == (2 * perPoster))
        var last = [-1, -1]
        for c in got {
            let poster = Int(c.ticket >> 32), i = Int(c.ticket & 0xffff_ffff)
            #expect(i > last[poster], "poster \(poster)'s completions out of order")
            last[poster] = i
            #expect(c.failure?.reason == (i % 7 == 0 ? "poster \(poster)" : nil))
        }
        #expect(wakes.load(ordering: .relaxed) == (2 * perPoster))
        var none: [EdgeCache.Completion] = []
        inbox.drain(into: &none)
        #expect(none.isEmpty)
    }
}
