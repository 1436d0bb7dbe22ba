import STOQCore
import STOQTestSupport
import Testing

@testable import STOQQUIC

private final class Timer: TimerHeapElement {
    var scheduled: Timestamp = .max
    var timerIndex = -1
}

/// The timer heap against the obvious model (a deadline per timer, the earliest due first),
/// through many random moves, removals and pops.
struct TimerHeapTests {
    @Test func agreesWithAModelThroughRandomOperations() {
        var rng = SeededRandom(seed: 7)
        var heap = TimerHeap<Timer>()
        let timers = (0..<64).map { _ in Timer() }
        var model: [ObjectIdentifier: Timestamp] = [:]
        for step in 0..<20_000 {
            let t = timers[Int.random(in: 0..<timers.count, using: &rng)]
            switch Int.random(in: 0..<10, using: &rng) {
            case 0..<6:  // set a deadline, earlier or later than before
                let d = Timestamp.random(in: 0..<1000, using: &rng)
                heap.schedule(t, at: d)
                model[ObjectIdentifier(t)] = d
            case 6..<8:
                heap.remove(t)
                model[ObjectIdentifier(t)] = nil
            case 8:  // no deadline at all
                heap.schedule(t, at: .max)
                model[ObjectIdentifier(t)] = nil
            default:  // pop the first
                if let first = heap.first {
                    #expect(first.scheduled == model.values.min(), "step \(step)")
                    heap.remove(first)
                    model[ObjectIdentifier(first)] = nil
                } else {
                    #expect(model.isEmpty)
                }
            }
            #expect(heap.count == model.count, "step \(step)")
            #expect(heap.first?.scheduled == model.values.min(), "step \(step)")
        }
        for t in timers {
            #expect((t.timerIndex >= 0) == (model[ObjectIdentifier(t)] != nil))
            #expect(t.scheduled == model[ObjectIdentifier(t)] ?? .max)
        }
        heap.removeAll()
        #expect(heap.isEmpty && timers.allSatisfy { $0.timerIndex == -1 && $0.scheduled == .max })
    }
}
