import Foundation
import Synchronization
import STOQCore
import Testing
@testable import STOQWorker

@Suite struct WorkerMeshTests {
    let peer = IPv6Endpoint(address: IPv6Address("2001:db8::1")!, port: 4433)
    let local = IPv6Endpoint(address: IPv6Address("2001:db8::2")!, port: 443)

    func owner(_ mesh: WorkerMesh, _ bytes: [UInt8]) -> Int? {
        bytes.withUnsafeBytes { mesh.owner(of: $0) }
    }

    @Test func ownerIsTheWorkerByteOfTheServersConnectionIDs() throws {
        let mesh = try WorkerMesh(workers: 4, capacity: 8)
        // Short header: DCID starts at byte 1.
        #expect(owner(mesh, [0x40, 3, 0xaa, 0xbb]) == 3)
        #expect(owner(mesh, [0x40, 6, 0xaa]) == 2)  // modulo the worker count, as the XDP program does
        // v1 Handshake (type 2): DCID length at 5, DCID at 6.
        #expect(owner(mesh, [0xe0, 0, 0, 0, 1, 8, 1, 9, 9]) == 1)
        // v1 Initial and 0-RTT stay where they land: their DCID is the client's choice.
        #expect(owner(mesh, [0xc0, 0, 0, 0, 1, 8, 1, 9, 9]) == nil)
        #expect(owner(mesh, [0xd0, 0, 0, 0, 1, 8, 1, 9, 9]) == nil)
        // QUIC v2 numbers them differently: Initial = 1, 0-RTT = 2, Handshake = 3.
        #expect(owner(mesh, [0xd0, 0x6b, 0x33, 0x43, 0xcf, 8, 1, 9]) == nil)
        #expect(owner(mesh, [0xf0, 0x6b, 0x33, 0x43, 0xcf, 8, 1, 9]) == 1)
        // Version Negotiation, an empty DCID, a datagram too short to tell.
        #expect(owner(mesh, [0x80, 0, 0, 0, 0, 8, 1, 9]) == nil)
        #expect(owner(mesh, [0xe0, 0, 0, 0, 1, 0, 1, 9]) == nil)
        #expect(owner(mesh, [0x40]) == nil)
    }

    @Test func datagramsArriveIntactInOrderAndAFullInboxDrops() throws {
        let mesh = try WorkerMesh(workers: 2, capacity: 4, maxDatagram: 64)
        var refused = 0
        for i in 0..<6 {
            let ok = [UInt8](repeating: UInt8(i), count: 10 + i).withUnsafeBytes {
                mesh.push($0, into: 1, peer: peer, local: local, ecn: .ect0)
            }
            #expect(ok == (i < 4))
            if !ok { refused += 1 }
        }
        let tooBig = [UInt8](repeating: 0, count: 65).withUnsafeBytes { mesh.push($0, into: 1, peer: peer, local: local, ecn: .ce) }
        #expect(!tooBig)
        if !tooBig { refused += 1 }
        #expect(refused == 3)
        var seen: [[UInt8]] = []
        let n = mesh.drain(1) { bytes, p, l, ecn in
            #expect(p == peer && l == local && ecn == .ect0)
            seen.append(Array(bytes))
        }
        #expect(n == 4)
        #expect(seen == (0..<4).map { [UInt8](repeating: UInt8($0), count: 10 + $0) })
        #expect(mesh.drain(0) { _, _, _, _ in } == 0)
    }

    @Test func manyProducersOneConsumerLoseNothingTheyWereToldWasQueued() async throws {
        let mesh = try WorkerMesh(workers: 3, capacity: 256, maxDatagram: 16)
        let perProducer = 50_000
        let done = Atomic<Int>(0)
        let accepted = Atomic<Int>(0)
        for producer in 0..<2 {
            Thread {
                var sent = 0
                for i in 0..<perProducer {
                    var word = (UInt64(producer) << 32) | UInt64(i)
                    let ok = withUnsafeBytes(of: &word) { mesh.push($0, into: 2, peer: peer, local: local, ecn: .notECT) }
                    if ok { sent += 1 }
                    mesh.wake(2)
                }
                accepted.add(sent, ordering: .relaxed)
                done.add(1, ordering: .releasing)
            }.start()
        }
        var got = 0
        var last = [Int](repeating: -1, count: 2)
        var ordered = true
        while true {
            let finished = done.load(ordering: .acquiring) == 2
            got += mesh.drain(2) { bytes, _, _, _ in
                let word = bytes.loadUnaligned(as: UInt64.self)
                let p = Int(word >> 32), i = Int(word & 0xffff_ffff)
                if i <= last[p] { ordered = false }
                last[p] = i
            }
            if finished && mesh.drain(2, { _, _, _, _ in }) == 0 { break }
        }
        #expect(ordered, "each producer's datagrams come out in the order it pushed them")
        #expect(got == accepted.load(ordering: .relaxed))
        // The wake-up counter is readable: the owner's datapath would have woken.
        var v: UInt64 = 0
        #expect(read(mesh.wakeFileDescriptor(of: 2), &v, 8) == 8 && v > 0)
    }
}
