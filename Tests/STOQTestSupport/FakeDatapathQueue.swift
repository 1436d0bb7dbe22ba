import Foundation
import STOQCore
import STOQDatapath

/// A datapath queue in memory, so that `Worker.turn()` runs with no socket: the test puts
/// datagrams in `inbox`, the worker receives them, and what it transmits lands in `sent`.
/// Every call the worker makes is recorded (the timeouts it waits with, when it flushes and
/// whether that was inside a receive batch), so tests can assert how the loop behaves, not
/// only what comes out of it.
public final class FakeDatapathQueue: DatapathQueue {
    /// One datagram that went out (a committed slot is cut into these by `segmentSize`).
    public struct Sent: Equatable {
        /// The datagram's bytes.
        public var bytes: [UInt8]
        /// Where it went.
        public var peer: IPv6Endpoint
        /// The ECN codepoint it was sent with.
        public var ecn: ECN
        /// Which `flush` call handed it over (1 for the first).
        public var flush: Int
    }

    /// One receive buffer waiting to be handed to the worker.
    public struct Pending {
        /// The bytes: one datagram, or several of `segmentSize` back to back (GRO).
        public var bytes: [UInt8]
        /// The size of each datagram in `bytes` (`bytes.count` when not coalesced).
        public var segmentSize: Int
        /// The sender.
        public var peer: IPv6Endpoint
        /// The ECN bits it arrived with.
        public var ecn: ECN
    }

    public let backendName = "fake"
    public var features: DatapathFeatures
    public let localEndpoint: IPv6Endpoint
    public let maxSegmentsPerSlot: Int
    public let slotCapacity: Int
    public let transmitStride: Int
    public private(set) var counters = DatapathCounters()

    /// Buffers the next `receive` calls hand over, oldest first.
    public var inbox: [Pending] = []
    /// Most buffers one `receive` hands over (the rest wait for the next call).
    public var batchLimit = 1024
    /// When the inbox is empty, `receive` sleeps for the timeout it was given (as a real
    /// queue would block); otherwise it returns at once.
    public var sleepsWhenIdle = false
    /// Thrown by the next `receive` (then cleared), e.g. `.detached` to test a fallback.
    public var failNextReceive: DatapathError?

    /// Every datagram sent, in order.
    public private(set) var sent: [Sent] = []
    /// The timeout of every `receive` call, in order.
    public private(set) var receiveTimeouts: [UInt64] = []
    /// For every `flush` call: whether it came while a receive batch was being handed over
    /// (the worker's work budget) and how many datagrams it sent.
    public private(set) var flushes: [(duringReceive: Bool, datagrams: Int)] = []
    /// The eventfd the worker asked to be woken by.
    public private(set) var wakeupFileDescriptor: Int32 = -1
    /// Whether `close` was called.
    public private(set) var isClosed = false

    private let slotCount: Int
    private var freeSlots: [Int]
    private var committed: [(slot: Int, length: Int, segmentSize: Int, peer: IPv6Endpoint, ecn: ECN)] = []
    private let storage: UnsafeMutableRawBufferPointer
    private var inReceive = false

    /// A queue bound to `local` with `slots` transmit slots of `slotCapacity` bytes, each
    /// carrying up to `maxSegmentsPerSlot` datagrams packed (`transmitStride` 0, GSO) or
    /// one per `transmitStride` bytes (AF_XDP's layout).
    public init(
        local: IPv6Endpoint, features: DatapathFeatures = [.segmentationOffload, .ecn], slots: Int = 8,
        slotCapacity: Int = 65536, maxSegmentsPerSlot: Int = 44, transmitStride: Int = 0
    ) {
        self.localEndpoint = local
        self.features = features
        self.slotCount = slots
        self.slotCapacity = slotCapacity
        self.maxSegmentsPerSlot = maxSegmentsPerSlot
        self.transmitStride = transmitStride
        freeSlots = Array((0..<slots).reversed())
        storage = .allocate(byteCount: slots * slotCapacity, alignment: 64)
    }

    deinit { storage.deallocate() }

    /// Queues one received datagram (or a coalesced run of them).
    public func deliver(_ bytes: [UInt8], from peer: IPv6Endpoint, segmentSize: Int? = nil, ecn: ECN = .notECT) {
        inbox.append(Pending(bytes: bytes, segmentSize: segmentSize ?? bytes.count, peer: peer, ecn: ecn))
    }

    /// Forgets what was sent and recorded so far (the inbox stays).
    public func clearRecords() {
        sent = []
        receiveTimeouts = []
        flushes = []
    }

    public func receive(timeoutNanoseconds: UInt64, _ body: (borrowing ReceivedDatagrams) -> Void) throws -> Int {
        precondition(!isClosed, "receive after close")
        receiveTimeouts.append(timeoutNanoseconds)
        if let e = failNextReceive {
            failNextReceive = nil
            throw e
        }
        if inbox.isEmpty {
            if sleepsWhenIdle && timeoutNanoseconds > 0 { usleep(useconds_t(min(timeoutNanoseconds / 1000, 1_000_000))) }
            return 0
        }
        let batch = inbox.prefix(batchLimit)
        inbox.removeFirst(batch.count)
        inReceive = true
        defer { inReceive = false }
        for p in batch {
            counters.rxBuffers += 1
            counters.rxBytes += UInt64(p.bytes.count)
            counters.rxDatagrams += UInt64(p.segmentSize > 0 ? (p.bytes.count + p.segmentSize - 1) / p.segmentSize : 1)
            p.bytes.withUnsafeBytes {
                body(ReceivedDatagrams(bytes: $0, segmentSize: p.segmentSize, peer: p.peer, local: localEndpoint, ecn: p.ecn))
            }
        }
        return batch.count
    }

    public func reserveTransmit() -> UnsafeMutableRawBufferPointer? {
        guard let slot = freeSlots.last else { return nil }
        return UnsafeMutableRawBufferPointer(rebasing: storage[slot * slotCapacity..<(slot + 1) * slotCapacity])
    }

    public func commitTransmit(length: Int, segmentSize: Int, to peer: IPv6Endpoint, ecn: ECN) {
        let slot = freeSlots.removeLast()
        precondition(length <= slotCapacity, "a commit longer than its slot")
        committed.append((slot, length, segmentSize, peer, ecn))
    }

    public func flush() throws {
        precondition(!isClosed, "flush after close")
        var n = 0
        let number = flushes.count + 1
        for c in committed {
            let base = c.slot * slotCapacity
            if transmitStride > 0 {
                // `length` is the extent: datagram i at i × stride, all of `segmentSize` but the last.
                var off = 0
                while off < c.length {
                    let len = min(c.segmentSize, c.length - off)
                    sent.append(Sent(bytes: Array(storage[base + off..<base + off + len]), peer: c.peer, ecn: c.ecn, flush: number))
                    off += transmitStride
                    n += 1
                }
            } else {
                var off = 0
                while off < c.length {
                    let len = min(c.segmentSize, c.length - off)
                    sent.append(Sent(bytes: Array(storage[base + off..<base + off + len]), peer: c.peer, ecn: c.ecn, flush: number))
                    off += len
                    n += 1
                }
            }
            counters.txSends += 1
            counters.txBytes += UInt64(c.length)
            freeSlots.append(c.slot)
        }
        counters.txDatagrams += UInt64(n)
        committed = []
        flushes.append((inReceive, n))
    }

    public func setWakeup(fileDescriptor: Int32) { wakeupFileDescriptor = fileDescriptor }

    public func close() { isClosed = true }
}
