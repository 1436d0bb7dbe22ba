import Foundation
import STOQCore
import STOQDatapath
import STOQQUIC

/// HTTP/3 servers in this process that a client reaches with no socket: a `DatapathQueue`
/// (`queue()`, what a `ClientDatapath` opens) hands the client's datagrams to the server
/// endpoint they are addressed to and the servers' replies back, driving the servers on the
/// client's own thread in real time. A `ConnectionPool` (an edge fetcher's, a mesh loop's)
/// then talks to upstreams that answer as a test scripts them (`TestUpstream`), endless and
/// trickling bodies included, with its own clocks and timeouts untouched.
public final class LoopbackUpstreams: @unchecked Sendable {
    struct Server {
        var address: IPv6Endpoint
        var endpoint: QUICEndpoint
        var app: TestUpstream
    }
    private let servers: [Server]
    private let replyDelay: UInt64

    /// Servers at `[::1]:port`, one per `(port, app)`, presenting `identity`'s certificate.
    /// `replyDelay` (ns) holds back each datagram a server sends for that long: a round trip
    /// of a real link (what the client sends arrives at once), so that delayed ACKs are
    /// really delayed.
    public init(identity: TestIdentity, _ upstreams: [(port: UInt16, app: TestUpstream)], replyDelay: UInt64 = 0) throws {
        self.replyDelay = replyDelay
        let credentials = try TLSCredentials(certificateFile: identity.identity.certificatePath, keyFile: identity.identity.keyPath)
        servers = upstreams.map { u in
            let ep = QUICEndpoint(isServer: true, credentials: credentials, settings: QUICSettings(), workerID: 0, secret: StaticSecret.random())
            ep.application = u.app
            return Server(address: IPv6Endpoint(address: .loopback, port: u.port), endpoint: ep, app: u.app)
        }
    }

    /// A queue for one client (bound to `[::1]` and a port of its own). Every queue drives
    /// the same servers: use them from one client thread at a time.
    public func queue() -> DatapathQueue { Queue(servers, replyDelay: replyDelay) }

    final class Queue: DatapathQueue {
        let backendName = "loopback"
        let features: DatapathFeatures = []
        let localEndpoint = IPv6Endpoint(address: .loopback, port: UInt16.random(in: 40000...60000))
        let maxSegmentsPerSlot = 16
        let slotCapacity = 65536
        private(set) var counters = DatapathCounters()
        private let servers: [Server]
        private let replyDelay: UInt64
        private let slot = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 64)
        private let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 64)
        /// To the servers (flushed), and from them (received).
        private var outbox: [(bytes: [UInt8], from: IPv6Endpoint, to: IPv6Endpoint)] = []
        private var inbox: [(bytes: [UInt8], from: IPv6Endpoint, to: IPv6Endpoint, due: UInt64)] = []
        private var wakeup: Int32 = -1

        init(_ servers: [Server], replyDelay: UInt64) { (self.servers, self.replyDelay) = (servers, replyDelay) }
        deinit {
            slot.deallocate()
            scratch.deallocate()
        }

        func receive(timeoutNanoseconds: UInt64, _ body: (borrowing ReceivedDatagrams) -> Void) throws -> Int {
            let deadline = monotonicNow() + timeoutNanoseconds
            while true {
                driveServers()
                let arrived = monotonicNow()
                if let first = inbox.first, first.due <= arrived {
                    let batch = inbox.prefix { $0.due <= arrived }
                    inbox.removeFirst(batch.count)
                    for d in batch {
                        counters.rxDatagrams += 1
                        counters.rxBuffers += 1
                        counters.rxBytes += UInt64(d.bytes.count)
                        d.bytes.withUnsafeBytes {
                            body(ReceivedDatagrams(bytes: $0, segmentSize: $0.count, peer: d.from, local: d.to, ecn: .notECT))
                        }
                    }
                    return batch.count
                }
                var woken: UInt64 = 0
                if wakeup >= 0, read(wakeup, &woken, 8) == 8 { return 0 }
                let now = monotonicNow()
                if now >= deadline { return 0 }
                usleep(useconds_t(min((deadline - now) / 1000, 200)))
            }
        }

        func reserveTransmit() -> UnsafeMutableRawBufferPointer? { slot }

        func commitTransmit(length: Int, segmentSize: Int, to peer: IPv6Endpoint, ecn: ECN) {
            commitTransmit(length: length, segmentSize: segmentSize, to: peer, from: localEndpoint, ecn: ecn)
        }

        func commitTransmit(length: Int, segmentSize: Int, to peer: IPv6Endpoint, from source: IPv6Endpoint, ecn: ECN) {
            let from = source.address.isUnspecified ? IPv6Endpoint(address: localEndpoint.address, port: source.port) : source
            var off = 0
            while off < length {
                let n = min(segmentSize, length - off)
                outbox.append((Array(slot[off..<off + n]), from, peer))
                off += n
            }
            counters.txSends += 1
            counters.txBytes += UInt64(length)
        }

        func flush() throws {
            let sent = outbox
            outbox.removeAll()
            let now = monotonicNow()
            for d in sent {
                counters.txDatagrams += 1
                guard let s = servers.first(where: { $0.address == d.to }) else { continue }
                d.bytes.withUnsafeBytes { s.endpoint.handle(datagram: $0, from: d.from, to: d.to, ecn: .notECT, now: now) }
            }
            if !sent.isEmpty { driveServers() }
        }

        /// Each server's timers and scripted sends, then what it owes the client.
        private func driveServers() {
            for s in servers {
                let now = monotonicNow()
                s.app.tick(now: now)
                s.endpoint.handleTimeouts(now: now)
                while let t = s.endpoint.pollTransmit(into: scratch, maxSegments: 16, now: now) {
                    var off = 0
                    while off < t.length {
                        let n = min(t.segmentSize, t.length - off)
                        inbox.append((Array(scratch[off..<off + n]), s.address, t.destination, now + replyDelay))
                        off += n
                    }
                }
            }
        }

        func setWakeup(fileDescriptor: Int32) { wakeup = fileDescriptor }

        func close() {}
    }
}

/// An upstream that answers each path as the test says (`answers`; anything else 404):
/// a body sent whole, one that never ends, or one that trickles a byte at a time. It counts
/// what it sent and how each stream ended. Its endpoint runs on the client's thread; the
/// test reads what it counted from its own (`sent`, `closed`).
public final class TestUpstream: QUICApplication, @unchecked Sendable {
    /// How a path is answered.
    public enum Answer: Sendable {
        /// `status` with `body`, whole.
        case whole(status: Int, body: [UInt8])
        /// `status`, then `filler` over and over, 16 KiB a piece, for as long as the client
        /// takes it (it ends when the client resets the stream).
        case endless(status: Int, filler: String)
        /// `status` with a body of `total` bytes of `filler`, sent as fast as the client takes it.
        case huge(status: Int, filler: String, total: Int)
        /// `status`, then one byte of `filler` every `every` nanoseconds, for ever.
        case trickle(status: Int, filler: String, every: UInt64)
    }

    private let lock = NSLock()
    private var answers: [String: Answer]
    private var streaming: [HTTPStream: (path: String, piece: [UInt8], left: Int, connection: QUICConnection)] = [:]
    private var trickling: [HTTPStream: (path: String, filler: [UInt8], at: Int, every: UInt64, due: UInt64, connection: QUICConnection)] = [:]
    private var sentBytes: [String: Int] = [:]
    private var closedCodes: [String: [UInt64]] = [:]
    private var requested: [String] = []
    private var goAways: Set<String> = []

    public init(_ answers: [String: Answer] = [:]) { self.answers = answers }

    /// Answers `path` with `answer` from now on.
    public func answer(_ path: String, _ answer: Answer) { lock.withLock { answers[path] = answer } }
    /// After answering a request for `path`, its connection starts a graceful shutdown (GOAWAY).
    public func goAway(after path: String) { lock.withLock { _ = goAways.insert(path) } }

    /// Answers the next requests for `path` with `first`, one each, before its `answer`.
    public func answer(_ path: String, first: [Answer]) { lock.withLock { firstAnswers[path, default: []] += first } }
    private var firstAnswers: [String: [Answer]] = [:]

    /// Body bytes handed to the stack for `path` so far, over every request for it.
    public func sent(_ path: String) -> Int { lock.withLock { sentBytes[path] ?? 0 } }

    /// The HTTP/3 codes the streams of requests for `path` closed with, in order.
    public func closed(_ path: String) -> [UInt64] { lock.withLock { closedCodes[path] ?? [] } }

    /// Every path asked for, in order.
    public var paths: [String] { lock.withLock { requested } }

    public func request(_ request: HTTPRequest, stream: HTTPStream, connection: QUICConnection) {
        let path = request.path
        defer { if lock.withLock({ goAways.contains(path) }) { connection.goAway() } }
        let answer = lock.withLock { () -> Answer? in
            requested.append(path)
            if let next = firstAnswers[path]?.first {
                firstAnswers[path]?.removeFirst()
                return next
            }
            return answers[path]
        }
        switch answer {
        case nil:
            connection.respond(stream, status: 404, body: nil)
            remember(stream, path)
        case .whole(let status, let body):
            remember(stream, path)
            lock.withLock { sentBytes[path, default: 0] += body.count }
            connection.respond(stream, status: status, headers: [("content-length", "\(body.count)")], body: body.isEmpty ? nil : BodyRegion(copying: body))
        case .endless(let status, let filler), .huge(let status, let filler, _):
            var total = Int.max
            if case .huge(_, _, let t) = answer { total = t }
            let text = Array(filler.utf8)
            let piece = (0..<(16 << 10)).map { text[$0 % text.count] }
            remember(stream, path)
            lock.withLock { streaming[stream] = (path, piece, total, connection) }
            connection.respondStreamed(stream, status: status, headers: total == .max ? [] : [("content-length", "\(total)")])
            feed(stream)
        case .trickle(let status, let filler, let every):
            remember(stream, path)
            lock.withLock { trickling[stream] = (path, Array(filler.utf8), 0, every, monotonicNow() + every, connection) }
            connection.respondStreamed(stream, status: status)
        }
    }

    private var streamPaths: [HTTPStream: String] = [:]
    private func remember(_ stream: HTTPStream, _ path: String) { lock.withLock { streamPaths[stream] = path } }

    /// Appends pieces to streamed body `stream` until the stack holds as many as it takes.
    private func feed(_ stream: HTTPStream) {
        while true {
            guard let s = lock.withLock({ streaming[stream] }), s.left > 0 else { return }
            let n = min(s.piece.count, s.left)
            let last = n == s.left
            guard s.connection.appendBody(stream, BodyRegion(copying: s.piece.prefix(n)), last: last) else { return }
            lock.withLock {
                sentBytes[s.path, default: 0] += n
                if last { streaming[stream] = nil } else { streaming[stream]?.left -= n }
            }
            if last { return }
        }
    }

    public func bodyWanted(stream: HTTPStream, connection: QUICConnection) { feed(stream) }

    /// Sends the trickles' bytes that are due (the loopback queue calls it as it turns).
    func tick(now: UInt64) {
        let due = lock.withLock { trickling.filter { $0.value.due <= now } }
        for (stream, t) in due {
            let byte = t.filler[t.at % t.filler.count]
            guard t.connection.appendBody(stream, BodyRegion(copying: [byte]), last: false) else { continue }
            lock.withLock {
                sentBytes[t.path, default: 0] += 1
                trickling[stream]?.at += 1
                trickling[stream]?.due = now + t.every
            }
        }
    }

    public func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) {
        lock.withLock {
            streaming[stream] = nil
            trickling[stream] = nil
            if let path = streamPaths.removeValue(forKey: stream) { closedCodes[path, default: []].append(errorCode) }
        }
    }
}
