import CSTOQSystem
#if canImport(Glibc)
import Glibc
#endif
import STOQCore
import STOQDatapath
import STOQQUIC

/// How a node's workers hand each other datagrams. A connection lives on the worker whose
/// id is in byte 0 of the CIDs the node issued; the NIC (RSS), the XDP program or the
/// kernel may still deliver a datagram to another worker — after a client migrates, or
/// when a queue has no worker of its own — and that worker passes it on through the
/// owner's queue here instead of answering with a stateless reset.
///
/// One bounded lock-free queue per worker (many producers, one consumer), allocated at
/// start; a full queue drops the datagram (counted) and QUIC recovers it.
public final class WorkerMesh: @unchecked Sendable {
    private let inboxes: [OpaquePointer]

    /// Number of workers.
    public var count: Int { inboxes.count }

    /// One inbox of `capacity` datagrams (a power of two) of at most `maxDatagram` bytes per worker.
    public init(workers: Int, capacity: Int = 1024, maxDatagram: Int = 4096) throws(DatapathError) {
        precondition((1...ConnectionID.maxWorkers).contains(workers), "1 to \(ConnectionID.maxWorkers) workers")
        var made: [OpaquePointer] = []
        for _ in 0..<workers {
            guard let h = stoq_handoff_create(UInt32(capacity), UInt32(maxDatagram)) else {
                for h in made { stoq_handoff_destroy(h) }
                throw DatapathError(.open, operation: "eventfd", errno: errno, message: "worker hand-off queue")
            }
            made.append(h)
        }
        inboxes = made
    }

    deinit { for h in inboxes { stoq_handoff_destroy(h) } }

    /// The eventfd worker `index`'s datapath should wake on.
    public func wakeFileDescriptor(of index: Int) -> Int32 { stoq_handoff_wake_fd(inboxes[index]) }

    /// The worker that owns the connection `datagram` belongs to, or nil when it may be
    /// handled anywhere (see `owner(of:workers:)`).
    @inline(__always)
    public func owner(of datagram: UnsafeRawBufferPointer) -> Int? {
        WorkerMesh.owner(of: datagram, workers: inboxes.count)
    }

    /// The worker, of `workers`, that owns the connection `datagram` belongs to, by the
    /// worker byte of its destination CID (layout in `bpf/stoq_kern_user.h`, shared with
    /// `make_cid`, the XDP program and the reuseport program), or nil when it may be
    /// handled anywhere: Initial and 0-RTT packets (their CID is the client's choice until
    /// the server answers, and the worker that receives the first one creates the
    /// connection), Version Negotiation, or too short to tell.
    @inline(__always)
    public static func owner(of datagram: UnsafeRawBufferPointer, workers: Int) -> Int? {
        let shortAt = Int(STOQ_QUIC_SHORT_WORKER_OFFSET), longAt = Int(STOQ_QUIC_LONG_WORKER_OFFSET)
        guard datagram.count > shortAt else { return nil }
        let first = datagram[0]
        if first & UInt8(STOQ_QUIC_LONG_HEADER_BIT) == 0 { return Int(datagram[shortAt]) % workers }
        guard datagram.count > longAt, datagram[Int(STOQ_QUIC_LONG_DCID_LEN_OFFSET)] > 0 else { return nil }
        let version = UInt32(datagram[1]) << 24 | UInt32(datagram[2]) << 16 | UInt32(datagram[3]) << 8 | UInt32(datagram[4])
        let type = (first >> 4) & 0x3
        switch version {
        case 0: return nil  // Version Negotiation
        case 0x6b33_43cf: if type == 1 || type == 2 { return nil }  // QUIC v2: Initial = 1, 0-RTT = 2
        default: if type == 0 || type == 1 { return nil }  // v1 and drafts: Initial = 0, 0-RTT = 1
        }
        return Int(datagram[longAt]) % workers
    }

    /// Copies `datagram` into worker `index`'s inbox. False when it was full or the datagram
    /// too large (the caller counts the drop).
    @inline(__always)
    func push(_ datagram: UnsafeRawBufferPointer, into index: Int, peer: IPv6Endpoint, local: IPv6Endpoint, ecn: ECN) -> Bool {
        var p = peer.sockaddr, l = local.sockaddr
        return stoq_handoff_push(
            inboxes[index], datagram.baseAddress!.assumingMemoryBound(to: UInt8.self),
            UInt32(datagram.count), &p, &l, ecn.rawValue) == 1
    }

    /// Wakes worker `index` if it sleeps in its datapath (any thread: also how work finished
    /// off the workers, such as an origin fetch, gets their attention).
    public func wake(_ index: Int) { stoq_handoff_wake(inboxes[index]) }

    /// Worker `index` only: hands every datagram waiting in its inbox to `body`. Returns how many.
    @inline(__always)
    func drain(_ index: Int, _ body: (UnsafeRawBufferPointer, IPv6Endpoint, IPv6Endpoint, ECN) -> Void) -> Int {
        let h = inboxes[index]
        var n = 0
        while let item = stoq_handoff_peek(h) {
            let it = item.pointee
            body(
                UnsafeRawBufferPointer(start: it.data, count: Int(it.len)), IPv6Endpoint(it.peer),
                IPv6Endpoint(it.local), ECN(lowBitsOf: it.ecn))
            stoq_handoff_pop(h)
            n += 1
        }
        return n
    }
}

/// What a worker handed off and took in.
public struct HandoffCounters: Sendable {
    /// Datagrams this worker passed to the worker owning their connection.
    public var sent: UInt64 = 0
    /// Datagrams it could not pass on (the owner's inbox was full).
    public var dropped: UInt64 = 0
    /// Datagrams other workers passed to this one.
    public var received: UInt64 = 0
    public init() {}
}
