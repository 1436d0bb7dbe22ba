import CSTOQXDP
import Glibc
import STOQCore
import STOQDatapath

/// Options for one AF_XDP queue.
public struct XDPOptions: Sendable {
    /// Whether to ask for a zero-copy bind.
    public enum ZeroCopy: String, Sendable {
        /// Zero-copy where the driver supports it, else copy mode.
        case auto
        /// Zero-copy or fail.
        case on
        /// Copy mode always.
        case off
    }
    /// The interface whose queue this socket binds.
    public var interface: String
    /// The NIC receive queue.
    public var queueID = 0
    /// The slot in the XDP program's xsk_map (the queue id when steering by queue).
    public var mapIndex = 0
    /// UMEM frame size (2048 or 4096).
    public var frameSize = 2048
    /// UMEM frames; `ringSize` of them feed the fill ring, the rest transmit.
    public var frameCount = 16384
    /// RX/TX/fill ring entries.
    public var ringSize = 8192
    public var zeroCopy = ZeroCopy.auto
    /// SO_BUSY_POLL microseconds (0: off).
    public var busyPollMicroseconds = 0
    /// Peers whose next-hop MAC the socket keeps without evicting one: the worker's
    /// `network.max_connections`. Its neighbour table takes twice as many slots, rounded up to a
    /// power of two, 40 bytes each (1.25 MiB for 10000), 1024 to 2^20 slots; past it, a reply
    /// to an evicted peer costs a lookup in the kernel (its route and next hop), or is dropped
    /// (`tx_no_neighbour`) when that fails or over the lookup budget, until the peer sends. The
    /// default is the engine's (STOQ_XSK_DEFAULT_NEIGHBOUR_PEERS, also what 0 means there).
    public var neighbourPeers = Int(STOQ_XSK_DEFAULT_NEIGHBOUR_PEERS)
    /// The slots the socket's neighbour table takes for `neighbourPeers`, 40 bytes each.
    public var neighbourTableSlots: Int { Int(stoq_xsk_neighbour_slots(UInt32(clamping: neighbourPeers))) }
    /// Where scripts/xdp-attach pinned the program's maps.
    public var pinDirectory: String { "/sys/fs/bpf/stoq/\(interface)" }

    public init(interface: String) { self.interface = interface }
}

/// The AF_XDP datapath: one socket + UMEM per NIC queue (see CSTOQXDP). Datagrams are
/// read from and written into UMEM frames in place; the engine does its own
/// Ethernet/IPv6/UDP framing. Nothing outside this module knows AF_XDP exists.
public final class XDPDatapathQueue: DatapathQueue {
    let raw: OpaquePointer
    private let rx: UnsafeMutablePointer<stoq_xsk_rx>
    private let rxCapacity: Int
    private var reserved: UnsafeMutableRawBufferPointer?
    private var closed = false
    /// This socket's stoq_shed entry sheds something.
    private var shedding = false
    private var nextAttachCheck: Timestamp = 0
    /// How often receive looks whether the XDP program is still attached.
    private let attachCheckInterval: UInt64 = 500_000_000

    public let backendName = "af_xdp"
    public let localEndpoint: IPv6Endpoint
    public let options: XDPOptions
    /// "native", "skb", "hw" or "multi": how the interface runs the XDP program.
    public let xdpMode: String
    /// Whether the socket got a zero-copy bind.
    public let isZeroCopy: Bool
    /// Whether the kernel or NIC fills in transmitted UDP checksums (TX metadata) rather
    /// than the engine.
    public let checksumOffload: Bool
    /// Why the socket runs on interrupts although `busyPollMicroseconds` asked for busy
    /// polling (the option the kernel refused: without CAP_NET_ADMIN it refuses all), or nil.
    public let busyPollRefusal: String?

    /// Binds a socket to `options.interface` queue `options.queueID` and registers it in
    /// the pinned xsk_map; `bind` gives the node's address (may be `::`) and UDP port.
    public init(bind: IPv6Endpoint, options: XDPOptions) throws(DatapathError) {
        if bind.address.isIPv4Mapped {
            throw DatapathError(.open, operation: "bind", message: "\(bind) is IPv4-mapped; STOQ is IPv6 only")
        }
        guard bind.port != 0 else {
            throw DatapathError(.open, operation: "bind", message: "AF_XDP needs a fixed UDP port, not 0")
        }
        var cfg = stoq_xsk_config()
        withUnsafeMutableBytes(of: &cfg.ifname) { dst in
            let n = min(options.interface.utf8.count, dst.count - 1)
            dst.copyBytes(from: options.interface.utf8.prefix(n))
        }
        withUnsafeMutableBytes(of: &cfg.pin_dir) { dst in
            let n = min(options.pinDirectory.utf8.count, dst.count - 1)
            dst.copyBytes(from: options.pinDirectory.utf8.prefix(n))
        }
        cfg.queue_id = UInt32(options.queueID)
        cfg.xsk_map_index = UInt32(options.mapIndex)
        cfg.local = bind.sockaddr
        cfg.frame_size = UInt32(options.frameSize)
        cfg.frame_count = UInt32(options.frameCount)
        cfg.ring_size = UInt32(options.ringSize)
        cfg.busy_poll_usec = UInt32(options.busyPollMicroseconds)
        cfg.neighbour_peers = UInt32(clamping: options.neighbourPeers)
        switch options.zeroCopy {
        case .auto: cfg.zero_copy = Int32(STOQ_XSK_ZC_AUTO.rawValue)
        case .on: cfg.zero_copy = Int32(STOQ_XSK_ZC_ON.rawValue)
        case .off: cfg.zero_copy = Int32(STOQ_XSK_ZC_OFF.rawValue)
        }
        var err = [CChar](repeating: 0, count: 512)
        guard let p = stoq_xsk_open(&cfg, &err, err.count) else {
            let msg = String(cBuffer: err)
            throw DatapathError(.open, engineMessage: msg)
        }
        raw = p
        self.options = options
        rxCapacity = 256
        rx = .allocate(capacity: rxCapacity)
        var sa = sockaddr_in6()
        stoq_xsk_local(p, &sa)
        localEndpoint = IPv6Endpoint(sa)
        xdpMode = String(cString: stoq_xsk_xdp_mode(p))
        isZeroCopy = stoq_xsk_zero_copy(p) != 0
        checksumOffload = stoq_xsk_tx_checksum_offload(p) != 0
        let refused = String(cString: stoq_xsk_busy_poll_refused(p))
        busyPollRefusal = refused.isEmpty ? nil : refused
        _ = try? shedInitials(InitialShedPlan())  // what a node before this one left
    }

    deinit { close() }

    /// The most AF_XDP sockets one interface's XDP program can feed (its xsk_map,
    /// STOQ_MAX_SOCKETS): a socket at a higher index cannot be registered.
    public static var maxSockets: Int { Int(STOQ_MAX_SOCKETS) }

    /// The layout version of the XDP program's maps this build reads and writes
    /// (STOQ_MAP_ABI_VERSION): a socket refuses maps pinned with another.
    public static var mapLayoutVersion: Int { Int(STOQ_MAP_ABI_VERSION) }

    /// The queues of `interface` an AF_XDP socket can bind to, in this thread's network
    /// namespace: the active channels (`ethtool -L`), not the queues the device was allocated
    /// (an ioctl and netlink, so it is right under `nsenter --net` too, where /sys shows
    /// another namespace).
    public static func receiveQueues(of interface: String) throws(DatapathError) -> Int {
        let n = stoq_xsk_interface_rx_queues(interface)
        if n == -ENODEV { throw DatapathError(.open, operation: "if_nametoindex", message: "no interface \(interface)") }
        if n < 0 { throw DatapathError(.open, operation: "RTM_GETLINK", errno: -n, message: "queues of \(interface)") }
        return Int(n)
    }

    public var features: DatapathFeatures { isZeroCopy ? [.ecn, .zeroCopy] : [.ecn] }
    public var maxSegmentsPerSlot: Int { Int(stoq_xsk_slot_frames(raw)) }
    public var transmitStride: Int { Int(stoq_xsk_stride(raw)) }
    public var slotCapacity: Int { Int(stoq_xsk_slot_size(raw)) }

    public var counters: DatapathCounters {
        let c = stoq_xsk_get_counters(raw)!.pointee
        var d = DatapathCounters()
        d.rxDatagrams = c.rx_datagrams
        d.rxBuffers = c.rx_datagrams
        d.txSends = c.tx_kicks
        d.rxBytes = c.rx_bytes
        d.txDatagrams = c.tx_datagrams
        d.txBytes = c.tx_bytes
        d.rxDropped = c.rx_dropped + c.rx_checksum_errors + c.k_rx_dropped + c.k_rx_ring_full
        d.txErrors = c.tx_errors + c.tx_no_neighbour
        return d
    }

    /// Every AF_XDP counter, the kernel's XDP_STATISTICS included.
    public var engineCounters: stoq_xsk_counters { stoq_xsk_get_counters(raw)!.pointee }

    /// Where each UMEM frame is; `total` always equals the sum of the others.
    public var frames: stoq_xsk_frames { stoq_xsk_get_frames(raw) }

    public var diagnostics: [(String, String)] {
        let f = frames, c = engineCounters
        return [
            ("xdp_mode", xdpMode), ("zero_copy", "\(isZeroCopy)"), ("frames_total", "\(f.total)"),
            ("frames_per_slot", "\(maxSegmentsPerSlot)"),
            ("frames_kernel_rx", "\(f.kernel_rx)"), ("frames_held", "\(f.held)"), ("frames_tx_free", "\(f.tx_free)"),
            ("frames_tx_reserved", "\(f.tx_reserved)"), ("frames_tx_in_flight", "\(f.tx_in_flight)"),
            ("rx_checksum_errors", "\(c.rx_checksum_errors)"), ("tx_no_neighbour", "\(c.tx_no_neighbour)"),
            ("neighbour_solicits", "\(c.neighbour_solicits)"),
            ("kernel_rx_dropped", "\(c.k_rx_dropped)"), ("kernel_rx_ring_full", "\(c.k_rx_ring_full)"),
            ("kernel_fill_ring_empty", "\(c.k_fill_ring_empty)"),
        ]
    }

    public func receive(timeoutNanoseconds: UInt64, _ body: (borrowing ReceivedDatagrams) -> Void) throws -> Int {
        let now = monotonicNow()
        if now >= nextAttachCheck {
            nextAttachCheck = now + attachCheckInterval
            if stoq_xsk_program_attached(raw) == 0 {
                throw DatapathError(
                    .detached, operation: "bpf_xdp_query",
                    message: "the XDP program the node opened on \(options.interface) was detached or replaced")
            }
        }
        let wait = min(timeoutNanoseconds, attachCheckInterval)
        let n = stoq_xsk_receive(raw, wait, rx, Int32(rxCapacity))
        if n < 0 { throw DatapathError(.receive, operation: "ppoll", errno: -n) }
        for i in 0..<Int(n) {
            let r = rx[i]
            let d = ReceivedDatagrams(
                bytes: UnsafeRawBufferPointer(start: r.data, count: Int(r.len)),
                segmentSize: Int(r.len), peer: IPv6Endpoint(r.peer),
                local: IPv6Endpoint(address: IPv6Address(r.local), port: localEndpoint.port),
                ecn: ECN(lowBitsOf: r.ecn))
            body(d)
        }
        stoq_xsk_rx_done(raw)
        return Int(n)
    }

    public func reserveTransmit() -> UnsafeMutableRawBufferPointer? {
        if let reserved { return reserved }
        guard let p = stoq_xsk_tx_reserve(raw) else { return nil }
        let b = UnsafeMutableRawBufferPointer(start: p, count: slotCapacity)
        reserved = b
        return b
    }

    public func commitTransmit(length: Int, segmentSize: Int, to peer: IPv6Endpoint, ecn: ECN) {
        reserved = nil
        var sa = peer.sockaddr
        stoq_xsk_tx_commit(raw, length, segmentSize, &sa, nil, ecn.rawValue)
    }

    public func commitTransmit(length: Int, segmentSize: Int, to peer: IPv6Endpoint, from source: IPv6Endpoint, ecn: ECN) {
        reserved = nil
        var sa = peer.sockaddr
        var from = source.sockaddr.sin6_addr
        stoq_xsk_tx_commit(raw, length, segmentSize, &sa, &from, ecn.rawValue)
    }

    public func flush() throws {
        let rc = stoq_xsk_flush(raw)
        if rc < 0 { throw DatapathError(.transmit, operation: "sendto", errno: -rc) }
    }

    public func setWakeup(fileDescriptor: Int32) { stoq_xsk_set_wake_fd(raw, fileDescriptor) }

    /// Writes this socket's entry of the XDP program's stoq_shed map: the program then drops
    /// that share of the flood before it reaches the UMEM.
    public func shedInitials(_ plan: InitialShedPlan) throws(DatapathError) -> Bool {
        let rules = plan.rules.prefix(Int(STOQ_SHED_PREFIXES)).map {
            stoq_shed_rule(prefix: $0.prefix, shift: $0.clampedShift, pad: 0)
        }
        var err = [CChar](repeating: 0, count: 512)
        guard
            stoq_xdp_shed_initials(
                options.pinDirectory, UInt32(options.mapIndex), rules, UInt32(rules.count), plan.clampedShift, &err,
                err.count) == 0
        else {
            let msg = String(cBuffer: err)
            throw DatapathError(.unsupported, operation: String(msg.prefix { $0 != "(" }), message: msg)
        }
        shedding = !plan.isEmpty
        return true
    }

    public func close() {
        guard !closed else { return }
        closed = true
        if shedding { _ = try? shedInitials(InitialShedPlan()) }  // the map outlives the node
        stoq_xsk_close(raw)
        rx.deallocate()
    }
}
