import CSTOQXDP
import Glibc
import STOQCore
import STOQDatapath

/// Several AF_XDP queues read by one worker, when an interface has more receive queues
/// than the node has workers. Receive drains every socket and sleeps on all of them at
/// once; transmit goes through the first, whose neighbour table every member's received
/// frames teach. Connections stay on the worker that took their first Initial; a
/// datagram that arrives on another worker's queue is handed over by the worker mesh.
public final class XDPQueueGroup: DatapathQueue {
    /// The sockets, the first of which transmits.
    public let members: [XDPDatapathQueue]
    private let transmitter: XDPDatapathQueue
    private var pollFDs: [pollfd]

    public var backendName: String { transmitter.backendName }
    public var features: DatapathFeatures { transmitter.features }
    public var localEndpoint: IPv6Endpoint { transmitter.localEndpoint }
    public var maxSegmentsPerSlot: Int { transmitter.maxSegmentsPerSlot }
    public var slotCapacity: Int { transmitter.slotCapacity }
    public var transmitStride: Int { transmitter.transmitStride }

    /// Groups `members` (at least one); the first transmits for all.
    public init(_ members: [XDPDatapathQueue]) {
        precondition(!members.isEmpty)
        self.members = members
        transmitter = members[0]
        for m in members.dropFirst() { stoq_xsk_teach(m.raw, transmitter.raw) }
        pollFDs = members.map { pollfd(fd: stoq_xsk_fd($0.raw), events: Int16(POLLIN), revents: 0) }
        pollFDs.append(pollfd(fd: -1, events: Int16(POLLIN), revents: 0))
    }

    /// The receive queues the members are bound to.
    public var queueIDs: [Int] { members.map(\.options.queueID) }

    public var counters: DatapathCounters {
        var sum = DatapathCounters()
        for m in members {
            let c = m.counters
            sum.rxDatagrams += c.rxDatagrams; sum.rxBuffers += c.rxBuffers; sum.txSends += c.txSends
            sum.rxBytes += c.rxBytes; sum.txDatagrams += c.txDatagrams; sum.txBytes += c.txBytes
            sum.rxDropped += c.rxDropped; sum.txErrors += c.txErrors; sum.offloadFallbacks += c.offloadFallbacks
        }
        return sum
    }

    /// The members' numbers summed (frames, errors); the mode and bind of the first.
    public var diagnostics: [(String, String)] {
        var out = transmitter.diagnostics
        for m in members.dropFirst() {
            let d = Dictionary(m.diagnostics, uniquingKeysWith: { a, _ in a })
            for i in out.indices {
                if let a = UInt64(out[i].1), let b = d[out[i].0].flatMap({ UInt64($0) }) { out[i].1 = "\(a + b)" }
            }
        }
        out.append(("queues", queueIDs.map(String.init).joined(separator: ",")))
        return out
    }

    public func receive(timeoutNanoseconds: UInt64, _ body: (borrowing ReceivedDatagrams) -> Void) throws -> Int {
        var n = 0
        for m in members { n += try m.receive(timeoutNanoseconds: 0, body) }
        guard n == 0, timeoutNanoseconds > 0 else { return n }
        // Nothing waiting anywhere: sleep on every socket (and the hand-off wake-up) at once.
        let ms = Int32(min((timeoutNanoseconds + 999_999) / 1_000_000, UInt64(Int32.max)))
        let count = pollFDs[pollFDs.count - 1].fd >= 0 ? pollFDs.count : pollFDs.count - 1
        let rc = pollFDs.withUnsafeMutableBufferPointer { poll($0.baseAddress, nfds_t(count), ms) }
        if rc < 0 && errno != EINTR { throw DatapathError(.receive, operation: "poll", errno: errno) }
        if rc > 0, count == pollFDs.count, pollFDs[count - 1].revents & Int16(POLLIN) != 0 {
            var v: UInt64 = 0
            _ = read(pollFDs[count - 1].fd, &v, 8)
        }
        for m in members { n += try m.receive(timeoutNanoseconds: 0, body) }
        return n
    }

    public func reserveTransmit() -> UnsafeMutableRawBufferPointer? { transmitter.reserveTransmit() }

    public func commitTransmit(length: Int, segmentSize: Int, to peer: IPv6Endpoint, ecn: ECN) {
        transmitter.commitTransmit(length: length, segmentSize: segmentSize, to: peer, ecn: ecn)
    }

    public func commitTransmit(length: Int, segmentSize: Int, to peer: IPv6Endpoint, from source: IPv6Endpoint, ecn: ECN) {
        transmitter.commitTransmit(length: length, segmentSize: segmentSize, to: peer, from: source, ecn: ecn)
    }

    public func flush() throws { try transmitter.flush() }

    public func setWakeup(fileDescriptor: Int32) { pollFDs[pollFDs.count - 1].fd = fileDescriptor }

    public func close() { for m in members { m.close() } }
}
