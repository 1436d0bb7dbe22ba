import Foundation
import STOQCore
import STOQDatapath
import STOQDatapathURing
#if AFXDP
import STOQDatapathXDP
#endif
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The datapath contract, checked the same way against every backend: a batch out and in
/// byte-identical with the right addresses, a multi-datagram slot cut into datagrams, ECN
/// both ways, the wakeup descriptor, and close releasing what the queue held.
///
/// io_uring runs on loopback. AF_XDP runs on the project's testbed (scripts/testbed: two
/// network namespaces over a veth pair, the XDP program attached by scripts/xdp-attach to
/// veth-a); the queue lives in stoq-a and the peer, a plain UDP socket, in stoq-b. Each case
/// runs its I/O on a thread of its own (namespaces are per thread) and asserts afterwards.
/// When AF_XDP cannot run (not root, a tool missing, the attach refused) the case is
/// cancelled with the exact reason.
@Suite(.serialized) struct DatapathConformanceTests {
    enum Backend: String, CaseIterable, CustomTestStringConvertible, Sendable {
        case ioUring = "io_uring"
        case afXDP = "af_xdp"
        var testDescription: String { rawValue }
    }

    // MARK: Cases

    @Test(arguments: Backend.allCases)
    func batchOutAndInByteIdentical(_ backend: Backend) throws {
        let sizes = (0..<24).map { 1 + ($0 * 157) % 1400 }
        let out = sizes.enumerated().map { i, n in (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ i) } }
        let back = sizes.reversed().enumerated().map { i, n in (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ i) } }
        let r = try Harness.run(backend) { h -> (peerGot: [Datagram], queueGot: [Datagram], tx: UInt64, rx: UInt64, queue: IPv6Endpoint, peer: IPv6Endpoint) in
            for d in out { try h.send(d, segmentSize: d.count) }
            let peerGot = h.peer.receive(count: out.count)
            for d in back { h.peer.send(d, to: h.queue.localEndpoint) }
            let queueGot = try h.receive(count: back.count)
            _ = try h.queue.receive(timeoutNanoseconds: 0) { _ in }  // reaps send completions
            return (peerGot, queueGot, h.queue.counters.txDatagrams, h.queue.counters.rxDatagrams, h.queue.localEndpoint, h.peer.local)
        }
        #expect(r.peerGot.map(\.bytes) == out)
        #expect(r.peerGot.allSatisfy { $0.from == r.queue })
        #expect(r.queueGot.map(\.bytes) == back)
        #expect(r.queueGot.allSatisfy { $0.from == r.peer })
        #expect(r.tx == UInt64(out.count))
        #expect(r.rx == UInt64(back.count))
    }

    @Test(arguments: Backend.allCases)
    func oneSlotOfSeveralDatagramsArrivesAsSeparateDatagrams(_ backend: Backend) throws {
        let r = try Harness.run(backend) { h -> (segments: Int, stride: Int, expected: [[UInt8]], got: [Datagram], tx: UInt64) in
            let segments = min(4, h.queue.maxSegmentsPerSlot)
            // Three full 1000-byte datagrams and a shorter last one, laid out as the queue
            // asks: packed (GSO) or one per stride (AF_XDP frames).
            var expected: [[UInt8]] = []
            for i in 0..<segments {
                expected.append([UInt8](repeating: UInt8(0x10 + i), count: i == segments - 1 && segments > 1 ? 300 : 1000))
            }
            let stride = h.queue.transmitStride
            guard let slot = h.queue.reserveTransmit() else { throw DatapathError(.transmit, operation: "reserve") }
            var end = 0
            for (i, d) in expected.enumerated() {
                let at = stride > 0 ? i * stride : end
                UnsafeMutableRawBufferPointer(rebasing: slot[at..<at + d.count]).copyBytes(from: d)
                end = at + d.count
            }
            h.queue.commitTransmit(length: end, segmentSize: 1000, to: h.peer.local, ecn: .notECT)
            try h.queue.flush()
            let got = h.peer.receive(count: expected.count)
            _ = try h.queue.receive(timeoutNanoseconds: 0) { _ in }
            return (segments, stride, expected, got, h.queue.counters.txDatagrams)
        }
        print("\(backend): \(r.segments) datagrams per slot, stride \(r.stride)")
        #expect(r.segments >= 2, "a slot must carry several datagrams (GSO or frames in a row)")
        #expect(r.got.map(\.bytes) == r.expected)
        #expect(r.tx == UInt64(r.expected.count))
    }

    @Test(arguments: Backend.allCases)
    func ecnTravelsBothWays(_ backend: Backend) throws {
        let codepoints: [ECN] = [.notECT, .ect1, .ect0, .ce]
        let r = try Harness.run(backend) { h -> (features: DatapathFeatures, peerSaw: [UInt8], queueSaw: [ECN]) in
            for (i, e) in codepoints.enumerated() {
                try h.send([UInt8(i), 1, 2, 3], segmentSize: 4, ecn: e)
            }
            let peerSaw = h.peer.receive(count: codepoints.count).map { $0.trafficClass & 0x3 }
            for (i, e) in codepoints.enumerated() { h.peer.send([UInt8(i), 9, 9], to: h.queue.localEndpoint, trafficClass: e.rawValue) }
            let queueSaw = try h.receive(count: codepoints.count).map(\.ecn)
            return (h.queue.features, peerSaw, queueSaw)
        }
        #expect(r.features.contains(.ecn))
        #expect(r.peerSaw == codepoints.map(\.rawValue))
        #expect(r.queueSaw == codepoints)
    }

    @Test(arguments: Backend.allCases)
    func aWrittenWakeupDescriptorEndsTheWaitAndIsDrained(_ backend: Backend) throws {
        let r = try Harness.run(backend) { h -> (buffers: Int, drained: Bool) in
            let fd = LibC.eventfd(0, efdNonblock | efdCloexec)
            guard fd >= 0 else { throw DatapathError(.open, operation: "eventfd", errno: errno) }
            defer { Glibc.close(fd) }
            h.queue.setWakeup(fileDescriptor: fd)
            var one: UInt64 = 1
            guard write(fd, &one, 8) == 8 else { throw DatapathError(.open, operation: "write eventfd", errno: errno) }
            // A wait far longer than the harness allows the case: only the wakeup can end it.
            let n = try h.queue.receive(timeoutNanoseconds: 600_000_000_000) { _ in }
            var v: UInt64 = 0
            let drained = read(fd, &v, 8) < 0 && errno == EAGAIN
            h.queue.setWakeup(fileDescriptor: -1)
            return (n, drained)
        }
        #expect(r.buffers == 0)
        #expect(r.drained, "the queue must drain the eventfd it was woken by")
    }

    @Test(arguments: Backend.allCases)
    func closeReleasesTheBindForTheNextQueue(_ backend: Backend) throws {
        let r = try Harness.run(backend) { h -> (got: [Datagram], tx: UInt64) in
            h.queue.close()
            let again = try h.reopen()
            defer { again.close() }
            h.peer.send([7, 7, 7], to: again.localEndpoint)
            var got: [Datagram] = []
            for _ in 0..<100 where got.isEmpty {
                _ = try again.receive(timeoutNanoseconds: 50_000_000) { d in
                    let from = d.peer, ecn = d.ecn
                    d.forEachDatagram { got.append(Datagram(bytes: Array($0), from: from, ecn: ecn)) }
                }
            }
            guard let slot = again.reserveTransmit() else { throw DatapathError(.transmit, operation: "reserve") }
            slot.copyBytes(from: [8, 8])
            again.commitTransmit(length: 2, segmentSize: 2, to: h.peer.local, ecn: .notECT)
            try again.flush()
            got += h.peer.receive(count: 1)
            _ = try again.receive(timeoutNanoseconds: 0) { _ in }
            return (got, again.counters.txDatagrams)
        }
        #expect(r.got.map(\.bytes) == [[7, 7, 7], [8, 8]])
        #expect(r.tx == 1)
    }
}

// MARK: Harness

/// One datagram as observed by either side.
struct Datagram: Equatable {
    var bytes: [UInt8]
    var from: IPv6Endpoint
    var ecn: ECN = .notECT
    var trafficClass: UInt8 = 0
}

/// Calls into libc functions the Swift Glibc module does not export (`setns`, `eventfd`).
enum LibC {
    static let CLONE_NEWNET: Int32 = 0x4000_0000
    static func setns(_ fd: Int32, _ type: Int32) -> Int32 {
        typealias F = @convention(c) (Int32, Int32) -> Int32
        return unsafeBitCast(dlsym(UnsafeMutableRawPointer(bitPattern: 0), "setns"), to: F.self)(fd, type)
    }
    static func eventfd(_ initial: UInt32, _ flags: Int32) -> Int32 {
        typealias F = @convention(c) (UInt32, Int32) -> Int32
        return unsafeBitCast(dlsym(UnsafeMutableRawPointer(bitPattern: 0), "eventfd"), to: F.self)(initial, flags)
    }
}

let efdNonblock: Int32 = 0o4000
let efdCloexec: Int32 = 0o2000000

/// A plain UDP socket: the other end of every case.
final class PeerSocket {
    let fd: Int32
    let local: IPv6Endpoint

    init(bind: IPv6Endpoint) throws {
        let fd = socket(AF_INET6, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw DatapathError(.open, operation: "socket", errno: errno) }
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_IPV6), 66 /* IPV6_RECVTCLASS */, &one, 4)
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var sa = bind.sockaddr
        let rc = withUnsafePointer(to: &sa) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
        }
        guard rc == 0 else { let e = errno; Glibc.close(fd); throw DatapathError(.open, operation: "bind \(bind)", errno: e) }
        var out = sockaddr_in6()
        var len = socklen_t(MemoryLayout<sockaddr_in6>.size)
        _ = withUnsafeMutablePointer(to: &out) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        self.fd = fd
        local = IPv6Endpoint(out)
    }

    deinit { Glibc.close(fd) }

    func send(_ bytes: [UInt8], to: IPv6Endpoint, trafficClass: UInt8 = 0) {
        var tc = Int32(trafficClass)
        setsockopt(fd, Int32(IPPROTO_IPV6), 67 /* IPV6_TCLASS */, &tc, 4)
        var sa = to.sockaddr
        _ = bytes.withUnsafeBytes { b in
            withUnsafePointer(to: &sa) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(fd, b.baseAddress, b.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in6>.size))
                }
            }
        }
    }

    /// Up to `count` datagrams, each with its sender and traffic class; stops at the first
    /// 5-second silence.
    func receive(count: Int) -> [Datagram] {
        var out: [Datagram] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        var control = [UInt8](repeating: 0, count: 64)
        while out.count < count {
            var from = sockaddr_in6()
            var controlLength = 0
            let n: Int = buf.withUnsafeMutableBytes { b in
                control.withUnsafeMutableBytes { c in
                    withUnsafeMutablePointer(to: &from) { f in
                        var iov = iovec(iov_base: b.baseAddress, iov_len: b.count)
                        return withUnsafeMutablePointer(to: &iov) { iovp in
                            var m = msghdr(
                                msg_name: UnsafeMutableRawPointer(f), msg_namelen: socklen_t(MemoryLayout<sockaddr_in6>.size),
                                msg_iov: iovp, msg_iovlen: 1, msg_control: c.baseAddress, msg_controllen: c.count, msg_flags: 0)
                            let r = recvmsg(fd, &m, 0)
                            controlLength = max(0, min(c.count, Int(m.msg_controllen)))
                            return r
                        }
                    }
                }
            }
            if n < 0 { break }
            // One cmsghdr (len: size_t, level: Int32, type: Int32) and its int, 8-aligned.
            var tclass: UInt8 = 0
            var off = 0
            while off + 16 <= controlLength {
                let len = control[off..<off + 8].withUnsafeBytes { $0.loadUnaligned(as: Int.self) }
                let level = control[off + 8..<off + 12].withUnsafeBytes { $0.loadUnaligned(as: Int32.self) }
                let type = control[off + 12..<off + 16].withUnsafeBytes { $0.loadUnaligned(as: Int32.self) }
                if level == Int32(IPPROTO_IPV6) && type == 67, off + 20 <= controlLength {
                    tclass = UInt8(truncatingIfNeeded: control[off + 16..<off + 20].withUnsafeBytes { $0.loadUnaligned(as: Int32.self) })
                }
                guard len > 0 else { break }
                off += (len + 7) & ~7
            }
            out.append(Datagram(bytes: Array(buf[0..<n]), from: IPv6Endpoint(from), trafficClass: tclass))
        }
        return out
    }
}

/// The queue under test, its peer, and the namespace the case runs in.
final class Harness: @unchecked Sendable {
    let backend: DatapathConformanceTests.Backend
    private(set) var queue: DatapathQueue
    let peer: PeerSocket

    private init(backend: DatapathConformanceTests.Backend, queue: DatapathQueue, peer: PeerSocket) {
        self.backend = backend
        self.queue = queue
        self.peer = peer
    }

    /// Sends one slot.
    func send(_ bytes: [UInt8], segmentSize: Int, ecn: ECN = .notECT) throws {
        guard let slot = queue.reserveTransmit() else { throw DatapathError(.transmit, operation: "reserve") }
        slot.copyBytes(from: bytes)
        queue.commitTransmit(length: bytes.count, segmentSize: segmentSize, to: peer.local, ecn: ecn)
        try queue.flush()
    }

    /// Up to `count` datagrams from the queue (50 ms waits, at most 5 s).
    func receive(count: Int) throws -> [Datagram] {
        var got: [Datagram] = []
        for _ in 0..<100 where got.count < count {
            _ = try queue.receive(timeoutNanoseconds: 50_000_000) { d in
                let from = d.peer, ecn = d.ecn
                d.forEachDatagram { got.append(Datagram(bytes: Array($0), from: from, ecn: ecn)) }
            }
        }
        return got
    }

    /// A new queue with the same bind as the first (which the caller closed).
    func reopen() throws -> DatapathQueue {
        switch backend {
        case .ioUring: return try URingDatapathQueue(bind: queue.localEndpoint)
        case .afXDP: return try Testbed.openQueue()
        }
    }

    /// Runs `body` against a fresh queue and peer of `backend`, on a thread of its own (in
    /// stoq-a for AF_XDP), and returns what it observed.
    static func run<T>(_ backend: DatapathConformanceTests.Backend, _ body: @escaping (Harness) throws -> T) throws -> T {
        switch backend {
        case .ioUring:
            return try onThread(namespace: nil) {
                let q = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: 0))
                let h = Harness(backend: backend, queue: q, peer: try PeerSocket(bind: IPv6Endpoint(address: .loopback, port: 0)))
                defer { h.queue.close() }
                return try body(h)
            }
        case .afXDP:
            if let reason = Testbed.unavailable { try Test.cancel(Comment(rawValue: reason)) }
            try Testbed.up()
            defer { Testbed.down() }
            let peer = try onThread(namespace: Testbed.namespaceB) {
                try PeerSocket(bind: IPv6Endpoint(address: IPv6Address(Testbed.addressB)!, port: 0))
            }
            return try onThread(namespace: Testbed.namespaceA) {
                let h = Harness(backend: backend, queue: try Testbed.openQueue(), peer: peer)
                defer { h.queue.close() }
                return try body(h)
            }
        }
    }

    /// Runs `body` on a new thread, first moved into the network namespace at `namespace`.
    static func onThread<T>(namespace: String?, _ body: @escaping () throws -> T) throws -> T {
        let box = ThreadBox(body)
        let thread = Thread {
            defer { box.done.signal() }
            if let namespace {
                let fd = open(namespace, O_RDONLY | O_CLOEXEC)
                guard fd >= 0, LibC.setns(fd, LibC.CLONE_NEWNET) == 0 else {
                    box.result = .failure(DatapathError(.open, operation: "setns \(namespace)", errno: errno))
                    return
                }
                Glibc.close(fd)
            }
            box.result = Result { try box.body() }
        }
        thread.start()
        // A hang guard, not a performance assert: a wait the wakeup should have ended.
        guard box.done.wait(timeout: .now() + 120) == .success else {
            throw DatapathError(.receive, operation: "conformance case", message: "did not finish within 120 s")
        }
        return try box.result!.get()
    }
}

/// A body to run on another thread and its result (handed over under the semaphore).
final class ThreadBox<T>: @unchecked Sendable {
    var result: Result<T, Error>?
    let done = DispatchSemaphore(value: 0)
    let body: () throws -> T
    init(_ body: @escaping () throws -> T) { self.body = body }
}

/// scripts/testbed and scripts/xdp-attach, driven from the tests.
enum Testbed {
    static let namespaceA = "/run/netns/stoq-a"
    static let namespaceB = "/run/netns/stoq-b"
    static let addressA = "fd00:5704::1"
    static let addressB = "fd00:5704::2"
    static let port: UInt16 = 4433
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path

    /// Why AF_XDP cannot run here, or nil.
    static var unavailable: String? {
        #if !AFXDP
        return "this build has no AF_XDP (the AFXDP package trait is off)"
        #endif
        if geteuid() != 0 { return "AF_XDP needs root (network namespaces, bpf()): run as root" }
        for tool in ["ip", "nsenter", "bpftool", "ethtool"] where sh("command -v \(tool)").status != 0 {
            return "\(tool) is not installed (scripts/install-deps installs it)"
        }
        return nil
    }

    static func sh(_ command: String) -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", command]
        p.currentDirectoryURL = URL(fileURLWithPath: root)
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        do { try p.run() } catch { return (127, "\(error)") }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    /// The two namespaces over a one-queue veth, the XDP program on veth-a in native mode
    /// for UDP port 4433, and static neighbour entries both ways (so no case depends on
    /// neighbour discovery racing its first datagram). Cancels the case, with the failing
    /// step's output, when any step fails.
    static func up() throws {
        let steps = [
            // From scratch: an earlier testbed (two queues, another program) would be kept by `up`.
            "scripts/testbed down",
            "scripts/testbed up --xdp --queues 1",
            "nsenter --net=\(namespaceA) scripts/xdp-attach veth-a --mode native --ports \(port) --no-dispatcher",
            "ip -n stoq-a neigh replace \(addressB) lladdr $(ip -n stoq-b -o link show veth-b | sed 's/.*link.ether \\([^ ]*\\).*/\\1/') dev veth-a nud permanent",
            "ip -n stoq-b neigh replace \(addressA) lladdr $(ip -n stoq-a -o link show veth-a | sed 's/.*link.ether \\([^ ]*\\).*/\\1/') dev veth-b nud permanent",
        ]
        for step in steps {
            let r = sh(step)
            if r.status != 0 {
                down()
                try Test.cancel(Comment(rawValue: "AF_XDP testbed step failed (exit \(r.status)): \(step)\n\(r.output)"))
            }
        }
    }

    static func down() {
        _ = sh("nsenter --net=\(namespaceA) scripts/xdp-attach --detach veth-a")
        _ = sh("scripts/testbed down")
    }

    /// An AF_XDP queue on veth-a queue 0 (call on a thread inside stoq-a), copy mode: veth
    /// has no zero-copy.
    static func openQueue() throws -> DatapathQueue {
        #if AFXDP
        var o = XDPOptions(interface: "veth-a")
        o.zeroCopy = .off
        return try XDPDatapathQueue(bind: IPv6Endpoint(address: IPv6Address(addressA)!, port: port), options: o)
        #else
        throw DatapathError(.unsupported, "this build has no AF_XDP (the AFXDP package trait is off)")
        #endif
    }
}
