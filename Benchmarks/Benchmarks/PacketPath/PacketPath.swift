import Benchmark
import Foundation
import STOQ

// Allocation counts on the steady-state packet path. Set-up (identities, endpoints,
// the handshake, the request) happens before startMeasurement(); what is measured is
// only datagrams moving: the mallocs it reports are per-datagram costs.

/// Moves datagrams between a client and a server endpoint through two fixed buffers,
/// with a manual clock: the QUIC + TLS + HTTP/3 path with no I/O at all.
final class Pump {
    let client: QUICEndpoint, server: QUICEndpoint
    let cAddr = IPv6Endpoint(address: IPv6Address("fd00::2")!, port: 5000)
    let sAddr = IPv6Endpoint(address: IPv6Address("fd00::1")!, port: 4433)
    let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 16)
    var now: Timestamp = 1_000_000_000
    var datagrams = 0

    init() throws {
        let dir = NSTemporaryDirectory() + "stoq-bench-\(UUID().uuidString)"
        let id = try EmbeddedIdentity.loadOrCreate(in: dir, names: ["bench"], addresses: [IPv6Address("fd00::1")!])
        server = QUICEndpoint(
            isServer: true, credentials: try TLSCredentials(certificateFile: id.certificatePath, keyFile: id.keyPath),
            settings: QUICSettings(), workerID: 0, secret: .random())
        var cs = QUICSettings()
        cs.maxWindow = 256 << 20
        cs.maxStreamWindow = 256 << 20
        client = QUICEndpoint(
            isServer: false, credentials: try TLSCredentials(trusting: id.certificatePath),
            settings: cs, workerID: 0, secret: .random())
    }

    /// One round: everything each side owes goes to the other; then the clock moves to the next timer.
    func round() {
        var moved = false
        while let t = client.pollTransmit(into: buf, maxSegments: 32, now: now) {
            deliver(t, to: server, from: cAddr, local: sAddr); moved = true
        }
        while let t = server.pollTransmit(into: buf, maxSegments: 32, now: now) {
            deliver(t, to: client, from: sAddr, local: cAddr); moved = true
        }
        if !moved {
            let next = [client.nextTimeout(), server.nextTimeout()].compactMap { $0 }.min() ?? now + 1_000_000
            now = max(now + 1000, next)
            client.handleTimeouts(now: now)
            server.handleTimeouts(now: now)
        } else {
            now += 20_000  // 20 µs per flight keeps pacing honest
        }
    }

    private func deliver(_ t: Transmit, to ep: QUICEndpoint, from: IPv6Endpoint, local: IPv6Endpoint) {
        var off = 0
        while off < t.length {
            let n = min(t.segmentSize, t.length - off)
            ep.handle(datagram: UnsafeRawBufferPointer(rebasing: buf[off..<off + n]), from: from, to: local, ecn: t.ecn, now: now)
            datagrams += 1
            off += n
        }
    }
}

final class Sink: QUICApplication {
    var done = false
    func response(status: Int, contentLength: Int64?, stream: HTTPStream, connection: QUICConnection) {
        stream.setBodySink(fd: -1)
    }
    func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) { done = true }
}

final class Source: QUICApplication {
    let body: BodyRegion
    init(size: Int) { body = BodyRegion(copying: [UInt8](repeating: 0x5a, count: size)) }
    func request(_ request: HTTPRequest, stream: HTTPStream, connection: QUICConnection) {
        connection.respond(stream, status: 200, headers: [("content-length", "\(body.count)")], body: body)
    }
}

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(metrics: [.wallClock, .mallocCountTotal, .throughput], maxIterations: 5)

    // 256 MiB body; the first 128 MiB warm up (windows and cwnd grow, ngtcp2 fills its object
    // pools); the second 128 MiB are measured.
    Benchmark(
        "QUIC+HTTP/3 download, 128 MiB measured, in memory",
        configuration: .init(
            metrics: [.wallClock, .mallocCountTotal, .custom("datagrams", polarity: .prefersSmaller, useScalingFactor: false)],
            maxIterations: 3)
    ) { benchmark in
        let pump = try Pump()
        let sink = Sink()
        pump.server.application = Source(size: 256 << 20)
        pump.client.application = sink
        let conn = try pump.client.connect(to: pump.sAddr, from: pump.cAddr, serverName: "fd00::1", now: pump.now)
        while !conn.isEstablished { pump.round() }
        _ = try conn.request(method: "GET", authority: "bench", path: "/objects/x")
        while conn.stats.body_bytes_received < 128 << 20 { pump.round() }
        pump.datagrams = 0
        benchmark.startMeasurement()
        while !sink.done { pump.round() }
        benchmark.stopMeasurement()
        benchmark.measurement(.custom("datagrams"), pump.datagrams)
    }

    Benchmark(
        "io_uring datagrams over [::1], 1200 B",
        configuration: .init(
            metrics: [.wallClock, .mallocCountTotal, .throughput], scalingFactor: .kilo, maxIterations: 5)
    ) { benchmark in
        let a = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: 0))
        let b = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: 0))
        let dest = b.localEndpoint
        var received = 0
        func sendBatch(_ n: Int) throws {
            for _ in 0..<n {
                guard let slot = a.reserveTransmit() else { try a.flush(); continue }
                slot[0] = 0x40
                a.commitTransmit(length: 1200, segmentSize: 1200, to: dest, ecn: .notECT)
            }
            try a.flush()
        }
        try sendBatch(64)
        _ = try b.receive(timeoutNanoseconds: 10_000_000) { d in d.forEachDatagram { _ in received += 1 } }
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            try sendBatch(32)
            _ = try b.receive(timeoutNanoseconds: 0) { d in d.forEachDatagram { _ in received += 1 } }
            _ = try a.receive(timeoutNanoseconds: 0) { _ in }
        }
        benchmark.stopMeasurement()
        blackHole(received)
    }
}
