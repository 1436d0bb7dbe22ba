import CSTOQSystem
import Crypto
import Foundation
import STOQCore
import STOQDatapath
import STOQQUIC
import STOQTestSupport
import Testing
@testable import STOQWorker

/// Serves one in-memory object at any path.
private final class ObjectServer: QUICApplication {
    let object: [UInt8]
    init(object: [UInt8]) { self.object = object }
    func request(_ request: HTTPRequest, stream: HTTPStream, connection: QUICConnection) {
        connection.respond(
            stream, status: 200, headers: [("content-length", "\(object.count)")],
            body: BodyRegion(copying: object))
    }
}

/// Records the response a client got.
private final class Downloader: QUICApplication {
    var status: Int?
    var sha: [UInt8]?
    var closedCode: UInt64?
    func response(_ head: HTTPResponseHead, stream: HTTPStream, connection: QUICConnection) {
        let status = head.status
        self.status = status
        stream.setBodySink(fd: -1, hash: true)
    }
    func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) {
        closedCode = errorCode
        sha = stream.bodySHA256()
    }
}

/// `Worker.turn()` against `FakeDatapathQueue`: what it receives reaches the endpoint, what
/// the endpoint owes goes out, timers bound the wait and fire, the work budget flushes
/// mid-batch, and datagrams for another worker's connections are handed to it.
@Suite(.serialized) struct WorkerTests {
    let identity: TestIdentity
    let serverAddress = IPv6Endpoint(address: IPv6Address("fd00::1")!, port: 4433)
    let clientAddress = IPv6Endpoint(address: IPv6Address("fd00::2")!, port: 50000)

    init() throws { identity = try TestIdentity() }

    func serverEndpoint(workerID: UInt8 = 0, secret: StaticSecret = .random()) throws -> QUICEndpoint {
        let creds = try TLSCredentials(certificateFile: identity.identity.certificatePath, keyFile: identity.identity.keyPath)
        return QUICEndpoint(isServer: true, credentials: creds, settings: QUICSettings(), workerID: workerID, secret: secret)
    }

    func clientEndpoint() throws -> QUICEndpoint {
        let creds = try identity.clientCredentials()
        return QUICEndpoint(isServer: false, credentials: creds, settings: QUICSettings(), workerID: 0, secret: .random())
    }

    /// Moves everything the client owes into the fake's inbox.
    func clientSends(_ client: QUICEndpoint, into fake: FakeDatapathQueue, buffer: UnsafeMutableRawBufferPointer) -> Int {
        var n = 0
        let now = monotonicNow()
        client.handleTimeouts(now: now)
        while let t = client.pollTransmit(into: buffer, maxSegments: 16, stride: 0, now: now) {
            var off = 0
            while off < t.length {
                let len = min(t.segmentSize, t.length - off)
                fake.deliver(Array(buffer[off..<off + len]), from: clientAddress, ecn: t.ecn)
                off += len
                n += 1
            }
        }
        return n
    }

    /// A Version Negotiation probe: a 1200-byte long header of an unknown version.
    func probe(_ i: UInt8) -> [UInt8] {
        var pkt = [UInt8](repeating: 0, count: 1200)
        pkt[0] = 0xC0
        pkt[1...4] = [0x1a, 0x2a, 0x3a, 0x4a]
        pkt[5] = 8
        for k in 0..<8 { pkt[6 + k] = UInt8(k) }
        pkt[14] = 4
        for k in 0..<4 { pkt[15 + k] = i &+ UInt8(k) }
        return pkt
    }

    @Test func receivedDatagramsReachTheEndpointAndItsPacketsGoOut() throws {
        let fake = FakeDatapathQueue(local: serverAddress)
        let server = try serverEndpoint()
        let object = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        server.application = ObjectServer(object: object)
        let worker = Worker(queue: fake, endpoint: server)
        // An idle turn sleeps up to 1 ms (as a real queue would block), so that waiting for
        // a timer (ACK delay, pacing) does not spin and starve the tests running alongside.
        worker.idleWait = 1_000_000
        fake.sleepsWhenIdle = true
        let client = try clientEndpoint()
        let app = Downloader()
        client.application = app
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 16)
        defer { buffer.deallocate() }
        let conn = try client.connect(to: serverAddress, from: clientAddress, serverName: "fd00::1", now: monotonicNow())
        var delivered = 0, consumed = 0, requested = false
        // Bounded by a generous deadline, not a turn count: ngtcp2 paces on the real clock, so
        // how many turns a transfer takes depends on how fast the machine is right now.
        let deadline = monotonicNow() + 120_000_000_000
        var turns = 0
        while app.closedCode == nil && monotonicNow() < deadline {
            turns += 1
            delivered += clientSends(client, into: fake, buffer: buffer)
            try worker.turn()
            for s in fake.sent[consumed...] {
                #expect(s.peer == clientAddress)
                s.bytes.withUnsafeBytes { client.handle(datagram: $0, from: serverAddress, to: clientAddress, ecn: s.ecn, now: monotonicNow()) }
            }
            consumed = fake.sent.count
            if conn.isEstablished && !requested {
                _ = try conn.request(method: "GET", authority: "x", path: "/objects/x")
                requested = true
            }
        }
        let state = "after \(turns) turns: server \(server.counters), fake \(fake.counters), client \(client.counters)"
        #expect(app.status == 200, Comment(rawValue: state))
        #expect(app.closedCode == H3Error.noError, Comment(rawValue: state))
        #expect(app.sha == Array(SHA256.hash(data: object)))
        // Every datagram the queue received reached the endpoint, once; every packet the
        // endpoint wrote went out through the queue, and runs of them in one send (GSO).
        #expect(fake.counters.rxDatagrams == UInt64(delivered))
        #expect(server.counters.datagramsIn == UInt64(delivered))
        #expect(fake.counters.txDatagrams == UInt64(fake.sent.count))
        #expect(server.counters.datagramsOut == fake.counters.txDatagrams)
        #expect(fake.counters.txSends < fake.counters.txDatagrams)
        #expect(server.counters.connectionsAccepted == 1)
    }

    @Test func theWaitIsBoundedByTheNextTimerAndTimersFireWithoutInput() throws {
        let fake = FakeDatapathQueue(local: serverAddress)
        let server = try serverEndpoint()
        server.application = ObjectServer(object: [])
        let worker = Worker(queue: fake, endpoint: server)
        worker.idleWait = 20_000_000_000  // far longer than any QUIC timer here

        // Nothing to do: the worker waits the whole idle period.
        try worker.turn()
        #expect(server.nextTimeout() == nil)
        #expect(fake.receiveTimeouts == [worker.idleWait])

        // A client's first flight: the server answers and now has a retransmission timer.
        let client = try clientEndpoint()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 16)
        defer { buffer.deallocate() }
        _ = try client.connect(to: serverAddress, from: clientAddress, serverName: "fd00::1", now: monotonicNow())
        let first = clientSends(client, into: fake, buffer: buffer)
        #expect(first >= 1)
        try worker.turn()
        let answered = fake.sent.count
        #expect(answered >= 1)
        #expect(server.nextTimeout() != nil)

        // The client goes silent. The next waits are the timer's, not the idle period, and
        // the timer fires: the server retransmits with nothing received.
        fake.sleepsWhenIdle = true
        for _ in 0..<200 where fake.sent.count == answered { try worker.turn() }
        #expect(fake.receiveTimeouts.dropFirst(2).allSatisfy { $0 < worker.idleWait })
        #expect(fake.sent.count > answered)
        #expect(fake.counters.rxDatagrams == UInt64(first))
        #expect(fake.sent.allSatisfy { $0.peer == clientAddress })
    }

    @Test func theWorkBudgetFlushesInsideALargeBatch() throws {
        let fake = FakeDatapathQueue(local: serverAddress)
        let server = try serverEndpoint()
        let worker = Worker(queue: fake, endpoint: server)
        worker.idleWait = 1_000_000
        worker.flushBudget = 4
        let prober = IPv6Endpoint(address: IPv6Address("fd00::77")!, port: 999)
        for i in 0..<10 { fake.deliver(probe(UInt8(i * 8)), from: prober) }
        try worker.turn()
        #expect(server.counters.versionNegotiations == 10)
        #expect(fake.sent.count == 10)
        // Before receiving: nothing owed. Inside the batch: a transmit pass after the 4th
        // and the 8th datagram. After it: the last two.
        #expect(fake.flushes.map(\.duringReceive) == [false, true, true, false])
        #expect(fake.flushes.map(\.datagrams) == [0, 4, 4, 2])
        // The replies go out in the order the probes came (each echoes its probe's SCID).
        let echoed: [[UInt8]] = fake.sent.map { Array($0.bytes[6..<10]) }
        let probed: [[UInt8]] = (0..<10).map { (i: Int) -> [UInt8] in (0..<4).map { (k: Int) -> UInt8 in UInt8(i * 8 + k) } }
        #expect(echoed == probed)

        // One coalesced buffer is one unit of the budget: all ten are handled before the one
        // transmit pass that follows it, which flushes when the queue's 8 slots run out.
        fake.clearRecords()
        var coalesced: [UInt8] = []
        for i in 0..<10 { coalesced += probe(UInt8(100 + i * 8)) }
        fake.deliver(coalesced, from: prober, segmentSize: 1200)
        try worker.turn()
        #expect(fake.sent.count == 10)
        #expect(fake.flushes.map(\.duringReceive) == [false, true, true, false])
        #expect(fake.flushes.map(\.datagrams) == [0, 8, 2, 0])
    }

    @Test func aTransmitPassFlushesOnceEnoughBytesWait() throws {
        let fake = FakeDatapathQueue(local: serverAddress, slots: 16)
        let server = try serverEndpoint()
        let worker = Worker(queue: fake, endpoint: server)
        worker.idleWait = 1_000_000
        let prober = IPv6Endpoint(address: IPv6Address("fd00::77")!, port: 999)
        func probes(_ first: Int) -> [UInt8] { (0..<10).flatMap { probe(UInt8(first + $0 * 8)) } }
        // By default ten replies (one slot each) are far below the threshold: one flush at the end.
        fake.deliver(probes(0), from: prober, segmentSize: 1200)
        try worker.turn()
        #expect(fake.flushes.map(\.datagrams) == [0, 10])
        let reply = try #require(fake.sent.first).bytes.count
        // Three replies' worth waiting: the pass hands them over, three at a time, in order.
        fake.clearRecords()
        worker.transmitFlushBytes = 3 * reply
        fake.deliver(probes(100), from: prober, segmentSize: 1200)
        try worker.turn()
        #expect(fake.flushes.map(\.datagrams) == [0, 3, 3, 3, 1])
        let echoed: [[UInt8]] = fake.sent.map { Array($0.bytes[6..<10]) }
        let probed: [[UInt8]] = (0..<10).map { (i: Int) -> [UInt8] in (0..<4).map { (k: Int) -> UInt8 in UInt8(100 + i * 8 + k) } }
        #expect(echoed == probed)
    }

    @Test func aDatagramForAnotherWorkersConnectionIsHandedToIt() throws {
        let mesh = try WorkerMesh(workers: 2, capacity: 16)
        let secret = StaticSecret.random()
        let fakes = [FakeDatapathQueue(local: serverAddress), FakeDatapathQueue(local: serverAddress)]
        let endpoints = [try serverEndpoint(workerID: 0, secret: secret), try serverEndpoint(workerID: 1, secret: secret)]
        let workers = [Worker(queue: fakes[0], endpoint: endpoints[0]), Worker(queue: fakes[1], endpoint: endpoints[1])]
        for (i, w) in workers.enumerated() {
            w.idleWait = 1_000_000
            w.join(mesh, as: i)
            #expect(fakes[i].wakeupFileDescriptor == mesh.wakeFileDescriptor(of: i))
        }
        // A short-header packet whose connection ID says worker 1, arriving at worker 0.
        var pkt = [UInt8](repeating: 0x5a, count: 100)
        pkt[0] = 0x40
        pkt[1] = 1
        let peer = IPv6Endpoint(address: IPv6Address("fd00::9")!, port: 7000)
        fakes[0].deliver(pkt, from: peer, ecn: .ect0)
        try workers[0].turn()
        #expect(workers[0].handoff.sent == 1)
        #expect(endpoints[0].counters.datagramsIn == 0)
        #expect(fakes[0].sent.isEmpty)
        // Worker 1 was woken (its eventfd is readable) and takes the datagram on its next turn.
        var pfd = pollfd(fd: mesh.wakeFileDescriptor(of: 1), events: Int16(POLLIN), revents: 0)
        #expect(poll(&pfd, 1, 0) == 1)
        try workers[1].turn()
        #expect(workers[1].handoff.received == 1)
        #expect(endpoints[1].counters.datagramsIn == 1)
        // Unknown to worker 1 too: it answers with a stateless reset, to the original sender.
        #expect(endpoints[1].counters.statelessResets == 1)
        #expect(fakes[1].sent.count == 1)
        #expect(fakes[1].sent.first?.peer == peer)
        #expect(fakes[0].sent.isEmpty)
    }

    @Test func aDetachedQueueIsReplacedByTheFallbackAndClosed() throws {
        let first = FakeDatapathQueue(local: serverAddress)
        let second = FakeDatapathQueue(local: serverAddress)
        let worker = Worker(queue: first, endpoint: try serverEndpoint())
        worker.idleWait = 1_000_000
        let stop = StopFlag()
        var asked: [DatapathError] = []
        worker.fallback = { e in
            asked.append(e)
            return second
        }
        first.failNextReceive = DatapathError(.detached, operation: "test")
        worker.onTurn = { if worker.queue === second { stop.stop() } }
        worker.run(stop: stop)
        #expect(asked.map(\.code) == [.detached])
        #expect(first.isClosed)
        #expect(worker.queue === second)
        #expect(!second.receiveTimeouts.isEmpty)
    }
}

/// A worker's heap policy: what a thread frees goes back to the kernel, top of its arena
/// included, even once glibc has raised its trim threshold (as it does, up to 64 MiB, after
/// every large mmap'd block it frees: malloc_trim then leaves a thread arena's top resident).
@Suite struct HeapPolicyTests {
    /// The pages of `[lo, hi)` resident now (mincore, page by page: parts may be unmapped).
    private static func residentPages(_ lo: UInt, _ hi: UInt) -> Int {
        let page = UInt(sysconf(Int32(_SC_PAGESIZE)))
        var count = 0, flag: UInt8 = 0
        var p = lo & ~(page - 1)
        while p < hi {
            if mincore(UnsafeMutableRawPointer(bitPattern: p), Int(page), &flag) == 0, flag & 1 == 1 { count += 1 }
            p += page
        }
        return count
    }

    /// In a thread of its own, if its arena is new or it is the last try (else it keeps that arena
    /// and waits, so the next thread cannot take it): 24 MiB of connection-sized blocks, written,
    /// freed in order (so they merge into the arena's top), the worker's release;
    /// `[ran, pages, resident]` to the pipe. The argument: the pipe's fd, plus 1 << 32 if last.
    private static let scatterAndRelease: @convention(c) (UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? = { arg in
        let fd = Int32(truncatingIfNeeded: Int(bitPattern: arg)), last = Int(bitPattern: arg) >> 32 == 1
        let report = { (values: [Int]) in
            _ = values.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        }
        // A new thread arena starts at a 64 MiB boundary; one other threads left may hold anything.
        // (Where glibc has made all the arenas it will, a reused one: the policy must hold there too,
        // though without it the test may then pass.)
        let probe = malloc(16)!
        guard UInt(bitPattern: probe) & (64 << 20 - 1) < 64 << 10 || last else {
            report([0, 0, 0])
            while true { pause() }
        }
        // Nothing else may be allocated until they are freed (it would sit on the top): plain
        // loops over a buffer taken first, no generic type (whose metadata the runtime allocates
        // on first use) in between.
        let count = 100_000
        let blocks = UnsafeMutablePointer<UnsafeMutableRawPointer?>.allocate(capacity: count)
        defer { blocks.deallocate() }
        var lo = UInt.max, hi = UInt.min, i = 0
        while i < count {
            let b = malloc(240)!
            memset(b, 7, 240)
            blocks[i] = b
            lo = Swift.min(lo, UInt(bitPattern: b))
            hi = Swift.max(hi, UInt(bitPattern: b) + 240)
            i += 1
        }
        i = 0
        while i < count {
            free(blocks[i])
            i += 1
        }
        stoq_release_free_memory()
        report([1, Int((hi - lo) / UInt(sysconf(Int32(_SC_PAGESIZE)))), residentPages(lo, hi)])
        return nil
    }

    @Test func whatAThreadFreesLeavesItsArenaOnceTheWorkerReleases() throws {
        // In a child process, where no other thread allocates in (or pins) the blocks' arena.
        var fds: [Int32] = [0, 0]
        try #require(pipe(&fds) == 0)
        let child = fork()
        if child == 0 {
            // Where glibc's moving threshold ends up once a 32 MiB block has been freed.
            stoq_set_heap_thresholds(64 << 20, Worker.heapMmapThreshold)
            Worker.adoptHeapPolicy()
            alarm(60)  // never hang the suite
            var report = [0, 0, 0], threads: [Int32] = [0, 0]
            guard pipe(&threads) == 0 else { _exit(2) }
            for attempt in 1...64 {
                var thread = pthread_t()
                let arg = UnsafeMutableRawPointer(bitPattern: Int(threads[1]) | (attempt == 64 ? 1 << 32 : 0))
                guard pthread_create(&thread, nil, Self.scatterAndRelease, arg) == 0,
                    read(threads[0], &report, 3 * MemoryLayout<Int>.size) == 3 * MemoryLayout<Int>.size
                else { _exit(2) }
                if report[0] == 1 {
                    _ = write(fds[1], &report, 3 * MemoryLayout<Int>.size)
                    _exit(0)
                }
            }
            _exit(3)
        }
        close(fds[1])
        defer { close(fds[0]) }
        var report = [0, 0, 0], status: Int32 = 0
        let got = read(fds[0], &report, 3 * MemoryLayout<Int>.size)
        waitpid(child, &status, 0)
        try #require(got == 3 * MemoryLayout<Int>.size, "child exit status \(status)")
        let (pages, resident) = (report[1], report[2])
        #expect(pages > 5_000)
        // Without the policy every page stays.
        #expect(resident * 10 < pages, "\(resident) of \(pages) pages resident")
    }
}
