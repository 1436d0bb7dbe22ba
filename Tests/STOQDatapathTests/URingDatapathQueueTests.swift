import Foundation
import STOQCore
import STOQDatapath
import STOQDatapathURing
import Testing

@Suite struct URingDatapathQueueTests {
    func pair() throws -> (URingDatapathQueue, URingDatapathQueue) {
        let a = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: 0))
        let b = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: 0))
        return (a, b)
    }

    func send(_ q: URingDatapathQueue, _ bytes: [UInt8], segment: Int, to: IPv6Endpoint, ecn: ECN = .notECT) throws {
        let slot = try #require(q.reserveTransmit())
        slot.copyBytes(from: bytes)
        q.commitTransmit(length: bytes.count, segmentSize: segment, to: to, ecn: ecn)
        try q.flush()
    }

    func receiveAll(_ q: URingDatapathQueue, count: Int) throws -> [([UInt8], ECN, IPv6Endpoint)] {
        var got: [([UInt8], ECN, IPv6Endpoint)] = []
        var tries = 0
        while got.count < count && tries < 40 {
            tries += 1
            _ = try q.receive(timeoutNanoseconds: 50_000_000) { d in
                let ecn = d.ecn, peer = d.peer
                d.forEachDatagram { got.append((Array($0), ecn, peer)) }
            }
        }
        return got
    }

    @Test func datagramsArriveByteIdentical() throws {
        let (a, b) = try pair()
        var rng = SystemRandomNumberGenerator()
        var sent: [[UInt8]] = []
        for i in 0..<200 {
            let n = 1 + (i * 37) % 1452
            let d = (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }
            sent.append(d)
            try send(a, d, segment: d.count, to: b.localEndpoint)
        }
        let got = try receiveAll(b, count: sent.count)
        #expect(got.count == sent.count)
        #expect(Set(got.map(\.0)) == Set(sent))
        #expect(got.allSatisfy { $0.2 == a.localEndpoint })
        #expect(b.counters.rxDatagrams == UInt64(sent.count))
        _ = try a.receive(timeoutNanoseconds: 0) { _ in }  // reaps send completions
        #expect(a.counters.txDatagrams == UInt64(sent.count))
    }

    @Test func gsoRunArrivesAsSeparateDatagrams() throws {
        let (a, b) = try pair()
        #expect(a.features.contains(.segmentationOffload))
        var run: [UInt8] = []
        var expected: [[UInt8]] = []
        for i in 0..<10 { let d = [UInt8](repeating: UInt8(i), count: 1200); expected.append(d); run += d }
        let tail = [UInt8](repeating: 0xEE, count: 700)
        expected.append(tail)
        run += tail
        try send(a, run, segment: 1200, to: b.localEndpoint)
        let got = try receiveAll(b, count: 11)
        #expect(got.map(\.0) == expected)
    }

    /// A full GRO batch: 45 datagrams of 1452 bytes and a 100-byte tail, 65,440 bytes in one
    /// GSO send, which loopback hands to the receiving socket as one coalesced batch. A 64 KiB
    /// receive buffer had 65,404 bytes of room after the multishot header, the address and the
    /// control data: the batch came back truncated and was dropped whole.
    @Test func fullGROBatchArrivesWhole() throws {
        let (a, b) = try pair()
        #expect(a.features.contains(.segmentationOffload) && b.features.contains(.receiveCoalescing))
        var run: [UInt8] = []
        var expected: [[UInt8]] = []
        for i in 0..<45 { let d = [UInt8](repeating: UInt8(i), count: 1452); expected.append(d); run += d }
        let tail = [UInt8](repeating: 0xEE, count: 100)
        expected.append(tail)
        run += tail
        #expect(run.count == 65_440)
        try send(a, run, segment: 1452, to: b.localEndpoint)
        let got = try receiveAll(b, count: expected.count)
        #expect(got.map(\.0) == expected)
        #expect(b.counters.rxDropped == 0)
    }

    /// A transmit slot holds at most one UDP datagram's payload: with 2048-byte datagrams a
    /// 65,536-byte slot held 32 (65,536 bytes), a send the kernel refuses (EMSGSIZE), and the
    /// whole run was lost as a transmit error. Now the slot offers 65,527 bytes, 31 datagrams,
    /// and the run arrives whole.
    @Test func aFullSlotIsOneSendTheKernelTakes() throws {
        #expect(URingDatapathQueue.largestSend == IPv6Address.largestUDPPayload)
        let (a, b) = try pair()
        #expect(a.slotCapacity == IPv6Address.largestUDPPayload)
        let count = min(a.maxSegmentsPerSlot, a.slotCapacity / 2048)
        #expect(count == 31)
        let expected = (0..<count).map { [UInt8](repeating: UInt8($0), count: 2048) }
        try send(a, expected.flatMap { $0 }, segment: 2048, to: b.localEndpoint)
        let got = try receiveAll(b, count: count)
        #expect(got.map(\.0) == expected)
        #expect(a.counters.txErrors == 0)
    }

    /// A receive buffer too small for a full GRO batch is refused at open, not dropped later.
    @Test func refusesAReceiveBufferTooSmallForABatch() {
        var o = URingOptions()
        o.receiveBufferSize = 65536
        #expect(URingDatapathQueue.fullBatchBufferSize > 65536)
        #expect(throws: DatapathError.self) { _ = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: 0), options: o) }
    }

    /// A queue that cannot bind (the port is taken) closes its own socket and nothing else:
    /// it used to tear down a ring it had not made yet, whose descriptor, all zeros, is fd 0.
    @Test func failedOpenLeavesFileDescriptorZeroOpen() throws {
        if fcntl(0, F_GETFD) < 0 {  // no stdin: make fd 0 the sentinel
            let fd = open("/dev/null", O_RDONLY)
            try #require(fd == 0)
        }
        var before = stat()
        try #require(fstat(0, &before) == 0)
        let taken = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: 0))
        var failed = false
        do { _ = try URingDatapathQueue(bind: taken.localEndpoint) } catch { failed = true }
        #expect(failed)
        var after = stat()
        #expect(fstat(0, &after) == 0)
        #expect(after.st_dev == before.st_dev && after.st_ino == before.st_ino)
    }

    /// A port clash names the call and the address whole: the address's colons cut the call's
    /// name short ("datapath open failed in bind([: bind([::1]:4433): Address already in use").
    @Test func aTakenPortIsNamedWhole() throws {
        let taken = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: 0))
        let port = taken.localEndpoint.port
        let error = try #require(throws: DatapathError.self) { _ = try URingDatapathQueue(bind: taken.localEndpoint) }
        #expect(error.operation == "bind([::1]:\(port))")
        #expect("\(error)" == "datapath open failed in bind([::1]:\(port)): Address already in use")
    }

    @Test func ecnPassesThrough() throws {
        let (a, b) = try pair()
        try send(a, [1, 2, 3], segment: 3, to: b.localEndpoint, ecn: .ect0)
        let got = try receiveAll(b, count: 1)
        #expect(got.first?.1 == .ect0)
    }

    @Test func refusesIPv4Mapped() {
        #expect(throws: DatapathError.self) {
            _ = try URingDatapathQueue(bind: IPv6Endpoint(address: IPv6Address(bytes: (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1)), port: 0))
        }
    }
}

@Suite struct ReuseportSteeringTests {
    /// Two workers share a port; the kernel picks the socket from the CID's first byte
    /// (the worker id STOQ puts there), for short and long headers alike.
    @Test func steersOnTheConnectionIDsFirstByte() throws {
        var o0 = URingOptions(), o1 = URingOptions()
        o0.workerIndex = 0; o0.workerCount = 2
        o1.workerIndex = 1; o1.workerCount = 2
        let w0 = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: 0), options: o0)
        let w1 = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: w0.localEndpoint.port), options: o1)
        let sender = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: 0))
        func packet(long: Bool, worker: UInt8, tag: UInt8) -> [UInt8] {
            if long { return [0xC0, 0, 0, 0, 1, 8, worker, 1, 2, 3, 4, 5, 6, 7, 0, tag] + [UInt8](repeating: 0, count: 40) }
            return [0x40, worker, 9, 9, 9, 9, 9, 9, 9, 9, tag] + [UInt8](repeating: 0, count: 40)
        }
        var expected: [UInt8: Set<UInt8>] = [0: [], 1: []]
        var tag: UInt8 = 0
        for long in [false, true] {
            for worker: UInt8 in [0, 1, 2, 3] {
                for _ in 0..<5 {
                    let p = packet(long: long, worker: worker, tag: tag)
                    expected[worker % 2]!.insert(tag)
                    let slot = try #require(sender.reserveTransmit())
                    slot.copyBytes(from: p)
                    sender.commitTransmit(length: p.count, segmentSize: p.count, to: w0.localEndpoint, ecn: .notECT)
                    try sender.flush()
                    tag += 1
                }
            }
        }
        var got: [UInt8: Set<UInt8>] = [0: [], 1: []]
        for _ in 0..<40 where got[0]!.count + got[1]!.count < Int(tag) {
            _ = try w0.receive(timeoutNanoseconds: 20_000_000) { d in
                d.forEachDatagram { got[0]!.insert($0[$0[0] & 0x80 != 0 ? 15 : 10]) }
            }
            _ = try w1.receive(timeoutNanoseconds: 1_000_000) { d in
                d.forEachDatagram { got[1]!.insert($0[$0[0] & 0x80 != 0 ? 15 : 10]) }
            }
        }
        #expect(got == expected)
    }
}
