import STOQCore
import STOQDatapath

/// How a client opens the one datapath queue its connection runs on. STOQTransfer drives
/// any `DatapathQueue` through the worker loop and names no backend: whoever assembles a
/// client picks one (the STOQ library's `ClientDatapath.ioUring`, a node's assembly for its
/// edge fetcher, a test's fake).
public struct ClientDatapath: Sendable {
    /// Opens a queue bound to an ephemeral port on `[::]`; the client closes it when done.
    public let open: @Sendable () throws -> DatapathQueue

    /// A client datapath whose queues `open` makes.
    public init(open: @escaping @Sendable () throws -> DatapathQueue) { self.open = open }
}
