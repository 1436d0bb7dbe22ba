import CSTOQURing
import STOQCore
import STOQDatapath

/// Options for one io_uring queue.
public struct URingOptions: Sendable {
    /// This queue's index in its reuseport group.
    public var workerIndex = 0
    /// How many queues share the address; >1 turns on SO_REUSEPORT with CID steering.
    public var workerCount = 1
    public var receiveBuffers = 256
    /// Bytes per receive buffer; 0: room for a full GRO batch (`URingDatapathQueue.fullBatchBufferSize`),
    /// which is also the least accepted: a smaller buffer would drop such a batch whole.
    public var receiveBufferSize = 0
    public var transmitSlots = 64
    public var transmitSlotSize = 65536
    public var disableGSO = false
    public var disableGRO = false
    public init() {}
}

/// The io_uring UDP datapath: one socket and one ring per worker (see CSTOQURing).
public final class URingDatapathQueue: DatapathQueue {
    private let raw: OpaquePointer
    private let rx: UnsafeMutablePointer<stoq_uring_rx>
    private let rxCapacity: Int
    private var reserved: UnsafeMutableRawBufferPointer?
    private var closed = false

    public let backendName = "io_uring"
    public let localEndpoint: IPv6Endpoint

    /// The receive buffer size that holds a full GRO batch (up to 65,527 bytes of payload)
    /// beside what the multishot receive puts in front of it.
    public static var fullBatchBufferSize: Int { Int(stoq_uring_rx_buffer_size()) }
    /// The most payload one GSO send (one transmit slot) carries: `IPv6Address.largestUDPPayload`.
    public static let largestSend = Int(STOQ_URING_UDP_PAYLOAD_MAX)

    /// The socket buffer sizes asked for and granted, in bytes. Without CAP_NET_ADMIN the
    /// kernel caps the grant at net.core.rmem_max / wmem_max and says nothing.
    public var socketBuffers: (requested: Int, receive: Int, send: Int) {
        var requested: UInt32 = 0, receive: UInt32 = 0, send: UInt32 = 0
        stoq_uring_socket_buffers(raw, &requested, &receive, &send)
        return (Int(requested), Int(receive), Int(send))
    }

    /// Opens a socket bound to `bind` and its ring.
    public init(bind: IPv6Endpoint, options: URingOptions = URingOptions()) throws(DatapathError) {
        if bind.address.isIPv4Mapped {
            throw DatapathError(.open, operation: "bind", message: "\(bind) is IPv4-mapped; STOQ is IPv6 only")
        }
        var cfg = stoq_uring_config()
        cfg.bind = bind.sockaddr
        cfg.worker_index = UInt32(options.workerIndex)
        cfg.worker_count = UInt32(options.workerCount)
        cfg.rx_buffers = UInt32(options.receiveBuffers)
        cfg.rx_buffer_size = UInt32(options.receiveBufferSize)
        cfg.tx_slots = UInt32(options.transmitSlots)
        cfg.tx_slot_size = UInt32(options.transmitSlotSize)
        cfg.disable_gso = options.disableGSO ? 1 : 0
        cfg.disable_gro = options.disableGRO ? 1 : 0
        var err = [CChar](repeating: 0, count: 256)
        guard let p = stoq_uring_open(&cfg, &err, err.count) else {
            let msg = String(cBuffer: err)
            throw DatapathError(.open, engineMessage: msg)
        }
        raw = p
        rxCapacity = options.receiveBuffers
        rx = .allocate(capacity: rxCapacity)
        var sa = sockaddr_in6()
        stoq_uring_local(p, &sa)
        localEndpoint = IPv6Endpoint(sa)
    }

    deinit { close() }

    /// The engine's bits, named one by one: `DatapathFeatures` is the only definition of
    /// the contract's values, and the C enum's values are the engine's own.
    public var features: DatapathFeatures {
        let bits = stoq_uring_features(raw)
        var f: DatapathFeatures = []
        if bits & UInt32(STOQ_URING_F_GSO.rawValue) != 0 { f.insert(.segmentationOffload) }
        if bits & UInt32(STOQ_URING_F_GRO.rawValue) != 0 { f.insert(.receiveCoalescing) }
        if bits & UInt32(STOQ_URING_F_ECN.rawValue) != 0 { f.insert(.ecn) }
        if bits & UInt32(STOQ_URING_F_MULTISHOT.rawValue) != 0 { f.insert(.multishotReceive) }
        return f
    }
    public var maxSegmentsPerSlot: Int { Int(stoq_uring_max_segments(raw)) }
    public var slotCapacity: Int { Int(stoq_uring_slot_size(raw)) }

    public var counters: DatapathCounters {
        let c = stoq_uring_get_counters(raw)!.pointee
        var d = DatapathCounters()
        d.rxDatagrams = c.rx_datagrams
        d.rxBuffers = c.rx_buffers
        d.txSends = c.tx_sends
        d.rxBytes = c.rx_bytes
        d.txDatagrams = c.tx_datagrams
        d.txBytes = c.tx_bytes
        d.rxDropped = c.rx_dropped
        d.txErrors = c.tx_errors
        d.offloadFallbacks = c.offload_fallbacks
        return d
    }

    public func receive(timeoutNanoseconds: UInt64, _ body: (borrowing ReceivedDatagrams) -> Void) throws -> Int {
        let n = stoq_uring_receive(raw, timeoutNanoseconds, rx, Int32(rxCapacity))
        if n < 0 { throw DatapathError(.receive, operation: "io_uring_submit_and_wait_timeout", errno: -n) }
        let local = localEndpoint
        for i in 0..<Int(n) {
            let r = rx[i]
            var to = local
            to.address = IPv6Address(r.local)
            to.scopeID = r.local_scope_id
            let d = ReceivedDatagrams(
                bytes: UnsafeRawBufferPointer(start: r.data, count: Int(r.len)),
                segmentSize: Int(r.segment_size), peer: IPv6Endpoint(r.peer), local: to,
                ecn: ECN(lowBitsOf: r.ecn))
            body(d)
        }
        stoq_uring_rx_done(raw)
        return Int(n)
    }

    public func reserveTransmit() -> UnsafeMutableRawBufferPointer? {
        if let reserved { return reserved }
        guard let p = stoq_uring_tx_reserve(raw) else { return nil }
        let b = UnsafeMutableRawBufferPointer(start: p, count: slotCapacity)
        reserved = b
        return b
    }

    public func commitTransmit(length: Int, segmentSize: Int, to peer: IPv6Endpoint, ecn: ECN) {
        reserved = nil
        var sa = peer.sockaddr
        stoq_uring_tx_commit(raw, length, segmentSize, &sa, nil, ecn.rawValue)
    }

    /// Leaves from `source` when the socket is bound to `[::]` (IPV6_PKTINFO, written into
    /// the slot's own control buffer: nothing is allocated).
    public func commitTransmit(length: Int, segmentSize: Int, to peer: IPv6Endpoint, from source: IPv6Endpoint, ecn: ECN) {
        reserved = nil
        var sa = peer.sockaddr
        var src = source.sockaddr
        stoq_uring_tx_commit(raw, length, segmentSize, &sa, &src, ecn.rawValue)
    }

    public func flush() throws {
        let rc = stoq_uring_flush(raw)
        if rc < 0 { throw DatapathError(.transmit, operation: "io_uring_submit", errno: -rc) }
    }

    public func setWakeup(fileDescriptor: Int32) { stoq_uring_set_wake_fd(raw, fileDescriptor) }

    public func shedInitials(_ plan: InitialShedPlan) throws(DatapathError) -> Bool {
        let rules = plan.rules.prefix(Int(STOQ_SHED_PREFIXES)).map {
            stoq_shed_rule(prefix: $0.prefix, shift: $0.clampedShift, pad: 0)
        }
        var err = [CChar](repeating: 0, count: 256)
        guard stoq_uring_shed_initials(raw, rules, UInt32(rules.count), plan.clampedShift, &err, err.count) == 0 else {
            let msg = String(cBuffer: err)
            throw DatapathError(.unsupported, engineMessage: msg)
        }
        return true
    }

    public var kernelDrops: UInt32? { UInt32(truncatingIfNeeded: stoq_uring_socket_drops(raw)) }

    public func close() {
        guard !closed else { return }
        closed = true
        stoq_uring_close(raw)
        rx.deallocate()
    }
}
