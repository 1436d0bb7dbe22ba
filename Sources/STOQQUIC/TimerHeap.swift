import STOQCore

/// What a `TimerHeap` holds: an object that keeps its own deadline and its place in the heap.
protocol TimerHeapElement: AnyObject {
    /// Its deadline (`.max`: none); only the heap sets it.
    var scheduled: Timestamp { get set }
    /// Its place in the heap (-1: not in it); only the heap sets it.
    var timerIndex: Int { get set }
}

/// An endpoint's timers: a binary min-heap of its connections by deadline, each connection in
/// it at most once, with its place kept in the connection (`timerIndex`), so that moving a
/// deadline either way or dropping it is O(log n) and leaves nothing behind.
///
/// Why not swift-collections' `Heap` with lazy deletion: every deadline moved earlier left a
/// stale entry, and a strong reference, until the old deadline passed. With an idle timeout
/// of 30 s that was one entry per ACK-timer cycle per connection, and a closed connection's
/// memory (ngtcp2, nghttp3 and TLS state, ~100 KB) stayed until its last old deadline.
struct TimerHeap<Element: TimerHeapElement> {
    private var items: [Element] = []

    init() {}

    var isEmpty: Bool { items.isEmpty }
    /// Connections with a deadline.
    var count: Int { items.count }
    /// The connection due first.
    var first: Element? { items.first }

    /// Sets `conn`'s deadline (`.max`: none, it leaves the heap).
    mutating func schedule(_ conn: Element, at deadline: Timestamp) {
        if deadline == .max { return remove(conn) }
        let old = conn.scheduled
        conn.scheduled = deadline
        if conn.timerIndex < 0 {
            conn.timerIndex = items.count
            items.append(conn)
            siftUp(conn.timerIndex)
        } else if deadline < old {
            siftUp(conn.timerIndex)
        } else if deadline > old {
            siftDown(conn.timerIndex)
        }
    }

    /// Takes `conn` out (no deadline), if it is in.
    mutating func remove(_ conn: Element) {
        let i = conn.timerIndex
        conn.scheduled = .max
        guard i >= 0 else { return }
        conn.timerIndex = -1
        let last = items.removeLast()
        guard i < items.count else { return }
        items[i] = last
        last.timerIndex = i
        siftDown(i)
        siftUp(last.timerIndex)
    }

    mutating func removeAll() {
        for conn in items { (conn.timerIndex, conn.scheduled) = (-1, .max) }
        items.removeAll()
    }

    private mutating func siftUp(_ start: Int) {
        let conn = items[start]
        var i = start
        while i > 0 {
            let parent = (i - 1) / 2
            guard conn.scheduled < items[parent].scheduled else { break }
            items[i] = items[parent]
            items[i].timerIndex = i
            i = parent
        }
        items[i] = conn
        conn.timerIndex = i
    }

    private mutating func siftDown(_ start: Int) {
        let conn = items[start]
        var i = start
        while true {
            let left = 2 * i + 1
            guard left < items.count else { break }
            let right = left + 1
            let child = right < items.count && items[right].scheduled < items[left].scheduled ? right : left
            guard items[child].scheduled < conn.scheduled else { break }
            items[i] = items[child]
            items[i].timerIndex = i
            i = child
        }
        items[i] = conn
        conn.timerIndex = i
    }
}
