#if AFXDP
import Foundation
import STOQCore
import STOQDatapath
import STOQDatapathXDP
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// What only the AF_XDP queue does, on the testbed the conformance cases use (Testbed): which
/// datagrams the XDP program gives it.
@Suite(.serialized) struct XDPDatapathQueueTests {
    /// The port at another address of the interface stays the kernel's: the queue, bound to
    /// Testbed.addressA, never sees a datagram to that port at fd00:5704::3 (it used to).
    @Test func aDatagramToTheNodePortAtAnotherAddressNeverReachesIt() throws {
        if let reason = Testbed.unavailable { try Test.cancel(Comment(rawValue: reason)) }
        try Testbed.up()
        defer { Testbed.down() }
        let other = "fd00:5704::3"
        try Self.sh("ip -n stoq-a addr add \(other)/64 dev veth-a nodad")
        let queue = try Harness.onThread(namespace: Testbed.namespaceA) { try Testbed.openQueue() }
        defer { queue.close() }
        let peer = try Harness.onThread(namespace: Testbed.namespaceB) {
            try PeerSocket(bind: IPv6Endpoint(address: IPv6Address(Testbed.addressB)!, port: 0))
        }
        for i in 0..<10 {
            peer.send([0x40, UInt8(i)], to: IPv6Endpoint(address: IPv6Address(other)!, port: Testbed.port))
        }
        peer.send([0x40, 0xff], to: queue.localEndpoint)
        let got = try Harness.onThread(namespace: Testbed.namespaceA) { () throws -> [[UInt8]] in
            var got: [[UInt8]] = []
            for _ in 0..<40 {
                // From the peer only: a test elsewhere on the machine may be talking to the testbed.
                _ = try queue.receive(timeoutNanoseconds: 50_000_000) { d in
                    if d.peer == peer.local { d.forEachDatagram { got.append(Array($0)) } }
                }
            }
            return got
        }
        #expect(got == [[0x40, 0xff]])
    }

    static func sh(_ command: String) throws {
        let r = Testbed.sh(command)
        if r.status != 0 { throw DatapathError(.open, operation: command, message: r.output) }
    }
}
#endif
