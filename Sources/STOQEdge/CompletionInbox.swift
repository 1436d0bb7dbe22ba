import Synchronization

/// Results finished on a background thread, for the one worker that asked: posted from
/// any thread, drained on the worker between batches, lock-free (a Treiber stack the
/// worker takes whole with one exchange and reverses). One small node per completed
/// request, never per packet.
///
/// Shared by the edge cache's fetcher (`EdgeCache.Inbox`) and plain-upload ingest
/// (`ObjectIngest.Inbox`). It lives here, beside its first user, rather than in STOQCore,
/// so that sharing it rebuilds only the modules above the edge cache.
public final class CompletionInbox<Item: Sendable>: @unchecked Sendable {
    private final class Node {
        let item: Item
        var next: UnsafeMutableRawPointer?
        init(_ item: Item) { self.item = item }
    }
    private let head = Atomic<UnsafeMutableRawPointer?>(nil)
    /// Called after each post (on the posting thread): wakes the worker that drains it.
    /// Set once, before the worker runs.
    public var onPost: (@Sendable () -> Void)?

    /// An empty inbox (one per worker).
    public init() {}

    deinit {
        var out: [Item] = []
        drain(into: &out)
    }

    /// Adds `item` (any thread), then calls `onPost`.
    public func post(_ item: Item) {
        let node = Unmanaged.passRetained(Node(item))
        let raw = node.toOpaque()
        var seen = head.load(ordering: .relaxed)
        while true {
            node.takeUnretainedValue().next = seen
            let (done, current) = head.compareExchange(expected: seen, desired: raw, ordering: .releasing)
            if done { break }
            seen = current
        }
        onPost?()
    }

    /// Moves every posted item into `out`, oldest first (one load when there are none).
    /// The draining worker's thread only.
    public func drain(into out: inout [Item]) {
        guard head.load(ordering: .relaxed) != nil, var p = head.exchange(nil, ordering: .acquiring) else { return }
        let start = out.count
        while true {
            let node = Unmanaged<Node>.fromOpaque(p).takeRetainedValue()
            out.append(node.item)
            guard let next = node.next else { break }
            p = next
        }
        out[start...].reverse()
    }
}
