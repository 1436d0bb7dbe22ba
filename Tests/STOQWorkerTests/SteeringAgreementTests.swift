import CSTOQXDPProbe
import Foundation
import STOQCore
import STOQDatapath
import STOQDatapathURing
import STOQQUIC
import STOQTestSupport
import Testing
import STOQWorker

/// The CID → worker rule (bpf/stoq_kern_user.h) is applied in four places: `make_cid`
/// writes the worker byte, and the XDP program, the reuseport program and the worker
/// hand-off read it. One set of datagrams — real ones from an ngtcp2 handshake with a
/// server on worker `w`, plus crafted ones — goes through all four, and they must agree.
@Suite(.serialized) struct SteeringAgreementTests {
    static let workers = 4
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path

    /// What the client sends a server on worker `worker` during and just after a handshake.
    func clientDatagrams(serverWorker worker: UInt8) throws -> [[UInt8]] {
        let identity = try TestIdentity()
        defer { identity.remove() }
        let pair = try EndpointPair(identity: identity, serverWorkerID: worker)
        var seen: [[UInt8]] = []
        pair.onServerReceive = { seen.append(Array($0)) }
        let conn = try pair.connect()
        #expect(pair.run { conn.isEstablished })
        // The client acknowledges HANDSHAKE_DONE and NEW_CONNECTION_ID in 1-RTT packets.
        #expect(pair.run(for: 1_000_000_000) { seen.contains { $0[0] & 0x80 == 0 } })
        return seen
    }

    /// Which socket of a real SO_REUSEPORT group (one io_uring queue per worker, the
    /// node's cBPF attached) the kernel delivers each datagram to.
    func reuseportWorkers(_ datagrams: [[UInt8]]) throws -> [Int] {
        var group: [URingDatapathQueue] = []
        for i in 0..<Self.workers {
            var o = URingOptions()
            o.workerIndex = i
            o.workerCount = Self.workers
            o.disableGRO = true
            let port = group.first?.localEndpoint.port ?? 0
            group.append(try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: port), options: o))
        }
        let sender = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: 0))
        defer { for q in group + [sender] { q.close() } }
        var result: [Int] = []
        for d in datagrams {
            let slot = try #require(sender.reserveTransmit())
            slot.copyBytes(from: d)
            sender.commitTransmit(length: d.count, segmentSize: d.count, to: group[0].localEndpoint, ecn: .notECT)
            try sender.flush()
            var got: [Int] = []
            // Bounded wait for the one datagram; not a timing assertion.
            for _ in 0..<200 where got.isEmpty {
                for (i, q) in group.enumerated() {
                    _ = try q.receive(timeoutNanoseconds: i == 0 ? 5_000_000 : 0) { r in
                        r.forEachDatagram { if Array($0) == d { got.append(i) } }
                    }
                }
            }
            #expect(got.count == 1, "datagram of \(d.count) bytes received \(got.count) times")
            result.append(got.first ?? -1)
        }
        return result
    }

    /// The worker the XDP program steers each datagram to (BPF_PROG_TEST_RUN on the real object).
    func xdpWorkers(_ datagrams: [[UInt8]]) throws -> [Int] {
        let build = Process()
        build.executableURL = URL(fileURLWithPath: Self.repository + "/scripts/build-bpf")
        build.standardOutput = FileHandle.nullDevice
        try build.run()
        build.waitUntilExit()
        #expect(build.terminationStatus == 0, "scripts/build-bpf failed")
        var err = [CChar](repeating: 0, count: 256)
        let probe = stoq_xdp_probe_open(Self.repository + "/.build-bpf/stoq_xdp.bpf.o", UInt32(Self.workers), 4433, &err, err.count)
        guard let probe else {
            Issue.record("cannot load the XDP program: \(String(decoding: err.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))")
            return []
        }
        defer { stoq_xdp_probe_close(probe) }
        return datagrams.map { d in d.withUnsafeBytes { Int(stoq_xdp_probe_worker(probe, $0.baseAddress!.assumingMemoryBound(to: UInt8.self), d.count)) } }
    }

    func handoffWorkers(_ datagrams: [[UInt8]]) -> [Int?] {
        datagrams.map { d in d.withUnsafeBytes { WorkerMesh.owner(of: $0, workers: Self.workers) } }
    }

    @Test func makeCIDXDPReuseportAndHandoffAgree() throws {
        var datagrams: [[UInt8]] = []
        var expected: [Int?] = []  // the hand-off's answer: the owner, or nil (an Initial stays put)
        var kernel: [Int?] = []  // the kernel programs' worker: every datagram but the first has one
        for worker: UInt8 in [1, 3] {
            let seen = try clientDatagrams(serverWorker: worker)
            let isInitial = { (d: [UInt8]) in d[0] & 0xb0 == 0x80 }  // v1 long header, type 0
            // After its first Initial (a DCID of its own choosing), the client addresses the
            // server by a CID the server issued. Its second flight is one datagram: an Initial
            // ACK, its Finished (Handshake) and 1-RTT packets, coalesced.
            let long = seen.dropFirst().filter { $0[0] & 0x80 != 0 }
            let short = seen.filter { $0[0] & 0x80 == 0 }
            #expect(isInitial(seen[0]) && !long.isEmpty && !short.isEmpty)
            // make_cid: the DCID the client echoes (a CID the server issued) starts with its worker id.
            #expect(long.allSatisfy { $0[6] == worker }, "long-header DCID byte 0 != worker \(worker)")
            #expect(short.allSatisfy { $0[1] == worker }, "short-header DCID byte 0 != worker \(worker)")
            for (i, d) in seen.enumerated() {
                datagrams.append(d)
                expected.append(isInitial(d) ? nil : Int(worker))
                kernel.append(i == 0 ? nil : Int(worker))
            }
        }
        // Crafted: worker bytes past the worker count wrap (modulo), on both header forms.
        for byte: UInt8 in [0, 5, 7, 255] {
            datagrams.append([0x40, byte] + [UInt8](repeating: 0xab, count: 38))
            expected.append(Int(byte) % Self.workers)
            kernel.append(Int(byte) % Self.workers)
            datagrams.append([0xe0, 0, 0, 0, 1, 8, byte] + [UInt8](repeating: 0xcd, count: 60))
            expected.append(Int(byte) % Self.workers)
            kernel.append(Int(byte) % Self.workers)
        }

        let handoff = handoffWorkers(datagrams)
        let xdp = try xdpWorkers(datagrams)
        let reuseport = try reuseportWorkers(datagrams)
        try #require(xdp.count == datagrams.count && reuseport.count == datagrams.count)
        for i in datagrams.indices {
            let what = "datagram \(i) (\(datagrams[i].count) bytes, first byte \(String(datagrams[i][0], radix: 16)))"
            // The kernel programs steer every datagram, Initials too (by the client's DCID).
            #expect(xdp[i] == reuseport[i], "\(what): XDP \(xdp[i]) vs reuseport \(reuseport[i])")
            #expect(handoff[i] == expected[i], "\(what): hand-off \(String(describing: handoff[i]))")
            if let owner = kernel[i] {
                #expect(xdp[i] == owner, "\(what): XDP \(xdp[i]), owner \(owner)")
                #expect(reuseport[i] == owner, "\(what): reuseport \(reuseport[i]), owner \(owner)")
            }
        }
    }
}
