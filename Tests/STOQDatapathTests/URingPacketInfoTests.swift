import CSTOQURing
import STOQCore
import STOQDatapath
import STOQDatapathURing
import Testing

/// IPV6_PKTINFO on the io_uring datapath: a socket bound to `[::]` learns where each datagram
/// was sent to, and names that address as the source of its replies (issue 15).
@Suite struct URingPacketInfoTests {
    private func address(_ text: String) throws -> IPv6Address { try #require(IPv6Address(text)) }

    /// Encodes a send's control data and reads it back as a receive would.
    private func roundTrip(segment: UInt16, ecn: UInt8, source: IPv6Address?, ifindex: UInt32) -> (Int, stoq_uring_rx) {
        let space = stoq_uring_tx_cmsg_space()
        let control = UnsafeMutableRawPointer.allocate(byteCount: space, alignment: 8)
        defer { control.deallocate() }
        var len = 0
        if var src = source?.in6 {
            len = stoq_uring_encode_tx_cmsgs(control, space, segment, ecn, &src, ifindex)
        } else {
            len = stoq_uring_encode_tx_cmsgs(control, space, segment, ecn, nil, ifindex)
        }
        var rx = stoq_uring_rx()
        stoq_uring_decode_rx_cmsgs(control, len, &rx)
        return (len, rx)
    }

    @Test func everyCmsgFitsTheSlotsBuffer() throws {
        let (len, rx) = roundTrip(segment: 1200, ecn: ECN.ect0.rawValue, source: try address("fd00:5706::1"), ifindex: 0)
        #expect(len == stoq_uring_tx_cmsg_space())
        #expect(IPv6Address(rx.local) == (try address("fd00:5706::1")))
        #expect(rx.local_scope_id == 0)
        #expect(rx.ecn == ECN.ect0.rawValue)
        // UDP_SEGMENT is a send's cmsg; only UDP_GRO sets a receive's segment size.
        #expect(rx.segment_size == 0)
    }

    @Test func aLinkLocalSourceKeepsItsInterface() throws {
        let (len, rx) = roundTrip(segment: 0, ecn: 0, source: try address("fe80::1"), ifindex: 7)
        #expect(len > 0)
        #expect(IPv6Address(rx.local) == (try address("fe80::1")))
        #expect(rx.local_scope_id == 7)
    }

    @Test func aGlobalSourceCarriesNoScope() throws {
        let (_, rx) = roundTrip(segment: 0, ecn: 0, source: try address("2001:db8::1"), ifindex: 7)
        #expect(rx.local_scope_id == 0)
    }

    @Test func nothingToSayIsNoControlData() {
        #expect(roundTrip(segment: 0, ecn: 0, source: nil, ifindex: 0).0 == 0)
    }

    @Test func tooSmallABufferIsRefusedNotOverrun() throws {
        var src = try address("fd00::1").in6
        var small: UInt64 = 0
        #expect(stoq_uring_encode_tx_cmsgs(&small, MemoryLayout<UInt64>.size, 1200, 2, &src, 0) == 0)
    }

    @Test func anUnspecifiedSocketLearnsTheDestination() throws {
        let any = try URingDatapathQueue(bind: IPv6Endpoint(address: .any, port: 0))
        let sender = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: 0))
        let slot = try #require(sender.reserveTransmit())
        slot.copyBytes(from: [1, 2, 3])
        sender.commitTransmit(length: 3, segmentSize: 3, to: IPv6Endpoint(address: .loopback, port: any.localEndpoint.port), ecn: .notECT)
        try sender.flush()
        var local: IPv6Endpoint?
        for _ in 0..<40 where local == nil {
            _ = try any.receive(timeoutNanoseconds: 50_000_000) { local = $0.local }
        }
        #expect(local == IPv6Endpoint(address: .loopback, port: any.localEndpoint.port))
    }

    /// The kernel refuses IPV6_PKTINFO naming an address the host does not have (EINVAL): a
    /// `[::]` socket told to leave from one counts a transmit error, which shows the source
    /// really goes out with the datagram. A socket bound to one address ignores `from`.
    @Test func theSourceGoesOutOnlyFromAnUnspecifiedSocket() throws {
        let receiver = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: 0))
        let foreign = IPv6Endpoint(address: try address("fd00:dead::1"), port: 0)
        func sendFrom(_ q: URingDatapathQueue, _ source: IPv6Endpoint) throws {
            let slot = try #require(q.reserveTransmit())
            slot.copyBytes(from: [9, 9])
            q.commitTransmit(length: 2, segmentSize: 2, to: receiver.localEndpoint, from: source, ecn: .notECT)
            try q.flush()
            for _ in 0..<10 { _ = try q.receive(timeoutNanoseconds: 10_000_000) { _ in } }  // reaps the send
        }
        let any = try URingDatapathQueue(bind: IPv6Endpoint(address: .any, port: 0))
        try sendFrom(any, foreign)
        #expect(any.counters.txErrors == 1)
        #expect(any.counters.txDatagrams == 0)
        try sendFrom(any, IPv6Endpoint(address: .loopback, port: 0))
        #expect(any.counters.txDatagrams == 1)
        // A GSO run refused for its source is not GSO's fault: the offload stays on.
        if any.features.contains(.segmentationOffload) {
            let slot = try #require(any.reserveTransmit())
            slot.copyBytes(from: [UInt8](repeating: 7, count: 2400))
            any.commitTransmit(length: 2400, segmentSize: 1200, to: receiver.localEndpoint, from: foreign, ecn: .notECT)
            try any.flush()
            for _ in 0..<10 { _ = try any.receive(timeoutNanoseconds: 10_000_000) { _ in } }
            #expect(any.counters.txErrors == 3)
            #expect(any.counters.offloadFallbacks == 0)
            #expect(any.features.contains(.segmentationOffload))
        }

        let bound = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: 0))
        try sendFrom(bound, foreign)
        #expect(bound.counters.txErrors == 0)
        #expect(bound.counters.txDatagrams == 1)

        var peers: [IPv6Endpoint] = []
        for _ in 0..<40 where peers.count < 2 {
            _ = try receiver.receive(timeoutNanoseconds: 50_000_000) { peers.append($0.peer) }
        }
        #expect(Set(peers) == [IPv6Endpoint(address: .loopback, port: any.localEndpoint.port), bound.localEndpoint])
    }
}
