import Foundation
import Logging
import STOQConfig
import STOQCore
import STOQDatapath
import STOQDatapathURing
#if AFXDP
import STOQDatapathXDP
#endif
import STOQQUIC
import STOQTransfer
import STOQWorker
import Synchronization

/// Opens the worker queues the configuration asks for: AF_XDP on `network.interface`
/// when `network.datapath` is "af_xdp" (or "auto" and the XDP program is attached
/// there), io_uring UDP sockets otherwise. This is the only place in the node that names
/// a backend. Built without the `AFXDP` package trait, "af_xdp" is refused as not
/// compiled in and "auto" means io_uring.
struct DatapathSelection {
    let config: NodeConfig
    let logger: Logger

    /// The edge cache's connection to its origin: one client connection, on io_uring (it
    /// works on any interface and needs no queue of the NIC's, which the workers own).
    static let originFetch = ClientDatapath {
        try URingDatapathQueue(bind: IPv6Endpoint(address: .any, port: 0))
    }

    /// The opened queues, in worker order.
    func open() throws(NodeError) -> [DatapathQueue] {
        let net = config.network
        switch net.datapath {
        case .ioURing:
            return try openURing(workers: workerCount())
        case .afXDP:
            do { return try openXDP() } catch {
                throw NodeError(.datapath, "network.datapath = \"af_xdp\" on \(net.interface): \(error)")
            }
        case .auto:
            if net.interface.isEmpty {
                logger.info("datapath auto: io_uring (network.interface is not set, so AF_XDP is not tried)")
                return try openURing(workers: workerCount())
            }
            do { return try openXDP() } catch {
                logger.warning("datapath auto: AF_XDP on \(net.interface) unavailable (\(error)); using io_uring")
                return try openURing(workers: workerCount())
            }
        }
    }

    private func workerCount() -> Int {
        config.network.workers == 0 ? min(max(1, Worker.availableCPUs), ConnectionID.maxWorkers) : config.network.workers
    }

    /// One socket per worker in one SO_REUSEPORT group, opened in worker order (the
    /// group's order is the CID steering order).
    func openURing(workers: Int, port: UInt16? = nil) throws(NodeError) -> [DatapathQueue] {
        var queues: [URingDatapathQueue] = []
        for i in 0..<workers {
            var opts = URingOptions()
            opts.workerIndex = i
            opts.workerCount = workers
            var bind = config.network.listenAddress
            if let port { bind.port = port }
            if i > 0 { bind.port = queues[0].localEndpoint.port }
            do { queues.append(try URingDatapathQueue(bind: bind, options: opts)) } catch {
                for q in queues { q.close() }
                throw NodeError(.datapath, "cannot listen on \(bind): \(error)")
            }
        }
        logger.info("datapath io_uring: \(workers) worker(s) on \(queues[0].localEndpoint), features \(queues[0].features)")
        warnIfSocketBuffersCapped(queues[0])
        return queues
    }

    /// Set when the capped socket buffers have been reported: once a process, not at every
    /// fallback to io_uring.
    private static let reportedCappedBuffers = Atomic<Bool>(false)

    /// The node asks for deep socket buffers, which the kernel grants past net.core.rmem_max /
    /// wmem_max only to CAP_NET_ADMIN, which no deployment gives it: say so once, with the sysctl.
    private func warnIfSocketBuffersCapped(_ queue: URingDatapathQueue) {
        let b = queue.socketBuffers
        var short: [String] = []
        if b.receive < b.requested { short.append("receive \(b.receive) bytes (raise net.core.rmem_max)") }
        if b.send < b.requested { short.append("send \(b.send) bytes (raise net.core.wmem_max)") }
        guard !short.isEmpty, !Self.reportedCappedBuffers.exchange(true, ordering: .relaxed) else { return }
        logger.warning(
            "io_uring socket buffers: asked for \(b.requested) bytes, got \(short.joined(separator: ", ")): a burst that outruns a busy worker is dropped by the kernel; sysctl -w net.core.rmem_max=\(b.requested) net.core.wmem_max=\(b.requested) (docs/deployment.md, Preparing a host)"
        )
    }

    /// One AF_XDP socket per receive queue, each registered at its queue's index, read by
    /// `network.workers` workers (0: one per queue; never more than the queues): worker w
    /// reads queues w, w + workers, …
    private func openXDP() throws(DatapathError) -> [DatapathQueue] {
        #if AFXDP
        let net = config.network
        let active = try XDPDatapathQueue.receiveQueues(of: net.interface)
        let count = net.queues == 0 ? active : net.queues
        guard count <= active else {
            throw DatapathError(
                .open, operation: "ETHTOOL_GCHANNELS",
                message: "network.queues = \(count) but \(net.interface) has \(active) active queue(s)")
        }
        let slots = XDPDatapathQueue.maxSockets
        guard count <= slots else {
            throw DatapathError(
                .open, operation: "xsk_map",
                message:
                    "\(net.interface) has \(active) active queues but the XDP program's xsk_map holds \(slots) sockets (STOQ_MAX_SOCKETS): set network.queues to at most \(slots) and confine the port to those queues (ethtool -N \(net.interface) flow-type udp6 dst-port \(net.listenAddress.port) action Q), or ethtool -L \(net.interface) combined \(slots)"
            )
        }
        // A worker's connections spread over the queues it reads: each socket's neighbour table
        // is sized for its share, not for all of them (64 queues × 10,000 each was 80 MiB).
        let readers = min(net.workers == 0 ? min(count, ConnectionID.maxWorkers) : net.workers, count)
        let peersPerQueue = (net.quic.maxConnections * readers + count - 1) / count
        var queues: [XDPDatapathQueue] = []
        for q in 0..<count {
            var opts = XDPOptions(interface: net.interface)
            opts.queueID = q
            opts.mapIndex = q
            opts.frameSize = net.xdp.frameSize
            opts.frameCount = net.xdp.frames
            opts.ringSize = net.xdp.ringSize
            opts.busyPollMicroseconds = net.xdp.busyPollMicroseconds
            opts.neighbourPeers = peersPerQueue
            opts.zeroCopy =
                switch net.zeroCopy {
                case .auto: .auto;
                case .on: .on;
                case .off: .off
                }
            do { queues.append(try XDPDatapathQueue(bind: net.listenAddress, options: opts)) } catch {
                for x in queues { x.close() }
                throw error
            }
        }
        let first = queues[0]
        if net.xdpMode != .auto && first.xdpMode != net.xdpMode.rawValue {
            for x in queues { x.close() }
            throw DatapathError(
                .open, operation: "bpf_xdp_query",
                message: "the XDP program runs in \(first.xdpMode) mode but network.xdp_mode = \"\(net.xdpMode)\"")
        }
        var workers = net.workers == 0 ? min(count, ConnectionID.maxWorkers) : net.workers
        if workers > count {
            logger.notice(
                "AF_XDP: \(count) queue(s) on \(net.interface), so \(count) worker(s), not network.workers = \(net.workers): a worker transmits on a queue of its own"
            )
            workers = count
        }
        let copy = first.isZeroCopy ? "zero-copy" : (net.zeroCopy == .off ? "copy mode (zero_copy = off)" : "copy mode (the driver has no zero-copy)")
        let checksum = first.checksumOffload ? "tx checksum: offloaded" : "tx checksum: software"
        logger.notice("datapath af_xdp: \(net.interface), \(count) queue(s), XDP \(first.xdpMode), \(copy), \(checksum), \(first.localEndpoint)")
        if count < active {
            // RSS spreads the node's port over every active queue; the program passes what
            // arrives on a queue without a socket to the kernel, where nothing listens. Said
            // once the sockets are open (a node that falls back to io_uring serves every
            // queue), as a notice: with an ntuple rule it is what the operator meant.
            func queues(_ r: Range<Int>) -> String { r.count == 1 ? "queue \(r.lowerBound)" : "queues \(r.lowerBound)…\(r.upperBound - 1)" }
            logger.notice(
                "AF_XDP: network.queues = \(count) but \(net.interface) has \(active) active queues: datagrams hashed to \(queues(count..<active)) go to the kernel and get port unreachable, unless an ntuple rule confines port \(net.listenAddress.port) to \(queues(0..<count)) (ethtool -N \(net.interface) flow-type udp6 dst-port \(net.listenAddress.port) action Q, or an RSS context)"
            )
        }
        if let refused = first.busyPollRefusal {
            logger.warning(
                "AF_XDP: network.xdp.busy_poll_usec = \(net.xdp.busyPollMicroseconds) is not in effect, the sockets wait on interrupts: \(refused)"
            )
        }
        if workers == count { return queues }
        let groups = (0..<workers).map { w in XDPQueueGroup(Swift.stride(from: w, to: count, by: workers).map { queues[$0] }) }
        for (w, g) in groups.enumerated() {
            logger.notice("AF_XDP: worker \(w) reads queue(s) \(g.queueIDs.map(String.init).joined(separator: ", "))")
        }
        return groups
        #else
        throw DatapathError(
            .open, operation: "af_xdp",
            message: "af_xdp is not compiled in (stoq-node was built without the AFXDP package trait)")
        #endif
    }
}

/// Hands every worker its io_uring replacement when AF_XDP goes away under a running
/// node. The first worker to ask opens all of them, in worker order, so that the
/// reuseport group's CID steering matches the workers' ids. Rare path: a lock is fine.
final class FallbackQueues: @unchecked Sendable {
    private let lock = NSLock()
    private let selection: DatapathSelection
    private let workers: Int
    private let port: UInt16
    private var opened: [DatapathQueue]?
    private var failed = false

    init(selection: DatapathSelection, workers: Int, port: UInt16) {
        self.selection = selection
        self.workers = workers
        self.port = port
    }

    /// Worker `index`'s replacement queue, or nil when io_uring cannot open either.
    func queue(for index: Int) -> DatapathQueue? {
        lock.withLock {
            if opened == nil && !failed {
                do { opened = try selection.openURing(workers: workers, port: port) } catch {
                    selection.logger.error("fallback to io_uring failed: \(error)")
                    failed = true
                }
            }
            return opened?[index]
        }
    }
}
