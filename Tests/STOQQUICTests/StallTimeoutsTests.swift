import CNgtcp2
import Foundation
import STOQCore
import STOQQUIC
import STOQTestSupport
import Testing

/// Stalled streams (slowloris): a request body that stops is answered 408 and its application
/// hears it aborted; a response the client stops granting flow control to is reset and its body
/// released; either way the connection goes on. In memory, on the manual clock.
@Suite(.serialized) struct StallTimeoutsTests {
    let identity: TestIdentity
    init() throws { identity = try TestIdentity() }

    /// PUT bodies go to a temp file (until the request ends or is aborted); GET serves `object`
    /// from a region whose release is counted.
    final class Server: QUICApplication, @unchecked Sendable {
        let object: [UInt8]
        var aborted = 0, ended = 0, closed = 0, released = 0
        var sinks: [HTTPStream: (Int32, String)] = [:]
        init(object: [UInt8]) { self.object = object }
        func request(_ request: HTTPRequest, stream: HTTPStream, connection: QUICConnection) {
            if request.method == "PUT" {
                let path = NSTemporaryDirectory() + "stoq-stall-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
                let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
                sinks[stream] = (fd, path)
                stream.setBodySink(fd: fd)
                return
            }
            let p = UnsafeMutableRawPointer.allocate(byteCount: object.count, alignment: 16)
            p.copyMemory(from: object, byteCount: object.count)
            let region = BodyRegion(base: p, count: object.count) { [self] p, _ in
                released += 1
                UnsafeMutableRawPointer(mutating: p)?.deallocate()
            }
            connection.respond(stream, status: 200, headers: [("content-length", "\(object.count)")], body: region)
        }
        func requestEnded(stream: HTTPStream, connection: QUICConnection, aborted: Bool) {
            guard let (fd, path) = sinks.removeValue(forKey: stream) else { return }
            close(fd)
            unlink(path)
            if aborted {
                self.aborted += 1
                return
            }
            ended += 1
            connection.respond(stream, status: 201, body: nil)
        }
        func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) { closed += 1 }
    }

    /// Records each response (status, the first bytes of its body, its close code); the body of
    /// stream `stalled` goes to `stalledFD` (a pipe nobody reads: the writer blocks, and the
    /// client stops granting flow control).
    final class Client: QUICApplication {
        struct Answer {
            var status = 0
            var code: UInt64?
            /// The body, read when the stream closed (its writes have all landed then).
            var text: String?
        }
        var answers: [Int64: Answer] = [:]
        var files: [HTTPStream: (Int32, String)] = [:]
        var stalled: Int64 = -1
        var stalledFD: Int32 = -1
        func response(_ head: HTTPResponseHead, stream: HTTPStream, connection: QUICConnection) {
            answers[stream.id, default: Answer()].status = head.status
            if stream.id == stalled { return stream.setBodySink(fd: stalledFD) }
            let path = NSTemporaryDirectory() + "stoq-stall-c-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            files[stream] = (fd, path)
            stream.setBodySink(fd: fd)
        }
        /// The body received so far (written by the client's writer thread).
        func text(_ stream: HTTPStream) -> String? {
            guard let (fd, _) = files[stream] else { return nil }
            var out = [UInt8](repeating: 0, count: 4096)
            let n = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 4096, 0) }
            return String(decoding: out.prefix(max(n, 0)), as: UTF8.self)
        }
        func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) {
            answers[stream.id, default: Answer()].code = errorCode
            answers[stream.id, default: Answer()].text = text(stream)
            guard let (fd, path) = files.removeValue(forKey: stream) else { return }
            close(fd)
            unlink(path)
        }
    }

    func settings(body: UInt64, send: UInt64) -> QUICSettings {
        var s = QUICSettings()
        (s.bodyTimeout, s.sendTimeout) = (body, send)
        return s
    }

    /// A pair whose client keeps the connection alive with PINGs, as a slowloris client would
    /// (and so that waiting out a timeout on the manual clock never meets the idle timeout).
    func connected(_ server: Server, _ client: Client, _ serverSettings: QUICSettings, clientSettings: QUICSettings = QUICSettings())
        throws -> (EndpointPair, QUICConnection)
    {
        var clientSettings = clientSettings
        clientSettings.keepAlive = 5 * Nanos.second
        let pair = try EndpointPair(identity: identity, serverSettings: serverSettings, clientSettings: clientSettings)
        pair.server.application = server
        pair.client.application = client
        let conn = try pair.connect()
        #expect(pair.run { conn.isEstablished })
        return (pair, conn)
    }

    func region(_ bytes: [UInt8]) -> BodyRegion { BodyRegion(copying: bytes) }

    /// A GET on `conn` is served whole: the connection still works.
    func fetchWorks(_ pair: EndpointPair, _ conn: QUICConnection, _ client: Client) throws {
        let s = try conn.request(method: "GET", authority: "x", path: "/objects/x")
        let id = s.id  // the handle is invalid once the stream closed
        #expect(pair.run { client.answers[id]?.code != nil })
        #expect(client.answers[id]?.status == 200 && client.answers[id]?.code == H3Error.noError)
    }

    @Test func aStalledRequestBodyIsAnswered408AndItsUploadAborted() throws {
        let server = Server(object: randomBytes(1000, seed: 1))
        let client = Client()
        let (pair, conn) = try connected(server, client, settings(body: 2 * Nanos.second, send: 0))
        let s = try conn.requestStreamed(method: "PUT", authority: "x", path: "/objects/u", headers: [("content-length", "5000")])
        let id = s.id  // the handle is invalid once the stream closed
        #expect(conn.appendBody(s, region(randomBytes(1234, seed: 2)), last: false))
        let start = pair.now
        let text = "no request body bytes for 2 s (limits.body_timeout); 1234 of 5000 bytes received\n"
        // Until the stream closes: its body is whole then (the writer thread may land it late).
        #expect(pair.run(for: 30 * Nanos.second) { client.answers[id]?.code != nil })
        #expect(client.answers[id]?.text == text)
        #expect(client.answers[id]?.status == 408)
        // Within a sweep of the timeout (simulated time).
        #expect(pair.now - start >= 2 * Nanos.second && pair.now - start < 5 * Nanos.second)
        #expect(server.aborted == 1 && server.ended == 0 && server.sinks.isEmpty)
        #expect(pair.server.counters.requestsTimedOutBody == 1 && pair.server.counters.requestsTimedOutSend == 0)
        let note = pair.server.takeStallNote()
        #expect(note?.hasPrefix("[fd00::2]:50000: no request body bytes") == true, "\(note ?? "nil")")
        #expect(pair.server.takeStallNote() == nil)
        #expect(pair.run { server.closed == 1 && client.answers[id]?.code != nil })
        try fetchWorks(pair, conn, client)
        #expect(conn.isEstablished && !conn.isClosed)
    }

    @Test func aBodyThatKeepsMovingIsNotTimedOut() throws {
        let server = Server(object: [])
        let client = Client()
        let (pair, conn) = try connected(server, client, settings(body: 3 * Nanos.second, send: 3 * Nanos.second))
        let s = try conn.requestStreamed(method: "PUT", authority: "x", path: "/objects/u")
        let id = s.id  // the handle is invalid once the stream closed
        for i in 0..<5 {
            #expect(conn.appendBody(s, region(randomBytes(100, seed: UInt64(i))), last: false))
            // A pause under the timeout: the sweep's next look comes at most a second later.
            pair.run(for: Nanos.second) { false }
        }
        #expect(conn.appendBody(s, region(randomBytes(100, seed: 9)), last: true))
        #expect(pair.run { client.answers[id]?.code != nil })
        #expect(client.answers[id]?.status == 201)
        #expect(server.ended == 1 && server.aborted == 0)
        #expect(pair.server.counters.requestsTimedOutBody == 0)
    }

    @Test func offMeansNeverTimedOut() throws {
        let server = Server(object: [])
        let client = Client()
        let (pair, conn) = try connected(server, client, settings(body: 0, send: 0))
        let s = try conn.requestStreamed(method: "PUT", authority: "x", path: "/objects/u")
        let id = s.id  // the handle is invalid once the stream closed
        #expect(conn.appendBody(s, region(randomBytes(100, seed: 3)), last: false))
        pair.run(for: 20 * Nanos.second) { false }
        #expect(client.answers[id] == nil && server.aborted == 0 && server.sinks.count == 1)
        #expect(pair.server.counters.requestsTimedOutBody == 0)
        #expect(conn.appendBody(s, region([]), last: true))
        #expect(pair.run { client.answers[id]?.code != nil })
        #expect(client.answers[id]?.status == 201)
    }

    /// The client's writer blocks on a pipe nobody reads, so the client grants no more flow
    /// control: the response is reset (H3_REQUEST_CANCELLED) and, once the client acknowledged
    /// the reset, its body is released.
    @Test func aResponseTheClientStopsTakingIsResetAndReleased() throws {
        let size = 4 << 20
        let server = Server(object: randomBytes(size, seed: 5))
        let client = Client()
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        defer { close(fds[0]) }
        client.stalledFD = fds[1]
        var small = QUICSettings()
        small.initialMaxStreamData = 256 << 10
        let (pair, conn) = try connected(server, client, settings(body: 0, send: 2 * Nanos.second), clientSettings: small)
        let s = try conn.request(method: "GET", authority: "x", path: "/objects/x")
        let id = s.id  // the handle is invalid once the stream closed
        client.stalled = id
        #expect(pair.run(for: 60 * Nanos.second) { pair.server.counters.requestsTimedOutSend == 1 })
        #expect(client.answers[id]?.status == 200 && client.answers[id]?.code == nil)
        #expect(server.released == 0)
        // Let the client's writer go: read the pipe to its end (the write end closes below).
        let done = DispatchSemaphore(value: 0)
        let readEnd = fds[0]
        Thread {
            var buf = [UInt8](repeating: 0, count: 65536)
            while buf.withUnsafeMutableBytes({ read(readEnd, $0.baseAddress, 65536) }) > 0 {}
            done.signal()
        }.start()
        #expect(pair.run { client.answers[id]?.code != nil && server.released == 1 })
        #expect(client.answers[id]?.code == H3Error.requestCancelled)
        close(fds[1])
        done.wait()
        let note = pair.server.takeStallNote() ?? ""
        #expect(note.contains("no response body bytes acknowledged for 2 s (limits.send_timeout)"), "\(note)")
        #expect(note.contains("of \(size) bytes acknowledged"), "\(note)")
        #expect(pair.server.counters.requestsTimedOutBody == 0)
        try fetchWorks(pair, conn, client)
        #expect(pair.run { server.released == 2 })
        #expect(pair.server.counters.requestsTimedOutSend == 1)
    }

    /// A client that takes the response a trickle at a time (its reader takes 16,000 bytes a
    /// second, so credit comes back in small steps, often enough that `send_timeout` never
    /// sees it stop) held it for as long as it liked: with `minSendRate` over the 10 s window it
    /// is reset as too slow; without, it is not.
    @Test func aResponseTakenATrickleAtATimeIsResetUnderTheMinimumRate() throws {
        for minRate: UInt64 in [0, 64000] {
            let size = 4 << 20
            let server = Server(object: randomBytes(size, seed: 5))
            let client = Client()
            var fds: [Int32] = [0, 0]
            #expect(pipe(&fds) == 0)
            #expect(fcntl(fds[0], F_SETFL, O_NONBLOCK) == 0)
            client.stalledFD = fds[1]
            var small = QUICSettings()
            small.initialMaxStreamData = 16 << 10
            var serverSettings = settings(body: 0, send: 10 * Nanos.second)
            serverSettings.minSendRate = minRate
            let (pair, conn) = try connected(server, client, serverSettings, clientSettings: small)
            let s = try conn.request(method: "GET", authority: "x", path: "/objects/x")
            let id = s.id
            client.stalled = id
            let start = pair.now
            var taken = 0
            var buf = [UInt8](repeating: 0, count: 65536)
            let reset = pair.run(for: 60 * Nanos.second) {
                let due = Int(Double(pair.now - start) / 1e9 * 16000) - taken
                if due > 0 {
                    let n = buf.withUnsafeMutableBytes { read(fds[0], $0.baseAddress, min(due, 65536)) }
                    if n > 0 { taken += n }
                }
                return pair.server.counters.requestsTimedOutSend > 0
            }
            // The trickle got past the pipe's own buffer: credit kept coming back.
            #expect(taken > 100_000, "rate \(minRate): took \(taken) bytes")
            if minRate == 0 {
                #expect(!reset && client.answers[id]?.code == nil, "rate 0: \(String(describing: client.answers[id]))")
            } else {
                #expect(reset)
                #expect(pair.now - start < 30 * Nanos.second)
                let note = pair.server.takeStallNote() ?? ""
                #expect(
                    note.contains("response body acknowledged at under 64000 bytes/s over 10 s while the client held it (limits.min_send_rate)"),
                    "\(note)")
            }
            // Let the client's writer go (the connection waits for it when it ends): read the
            // pipe to its end. Untrickled, the response completes; reset, it ends cancelled.
            #expect(fcntl(fds[0], F_SETFL, 0) == 0)
            let done = DispatchSemaphore(value: 0)
            let readEnd = fds[0]
            Thread {
                var buf = [UInt8](repeating: 0, count: 65536)
                while buf.withUnsafeMutableBytes({ read(readEnd, $0.baseAddress, 65536) }) > 0 {}
                done.signal()
            }.start()
            #expect(pair.run { client.answers[id]?.code != nil })
            #expect(client.answers[id]?.code == (minRate == 0 ? H3Error.noError : H3Error.requestCancelled))
            withExtendedLifetime((pair, conn)) {}
            close(fds[1])
            done.wait()
            close(fds[0])
        }
    }

    @Test func whatATimeoutSays() {
        #expect(
            StallTimeouts.bodyStalled(timeout: 60 * Nanos.second, received: 12345, expected: 1_048_576)
                == "no request body bytes for 60 s (limits.body_timeout); 12345 of 1048576 bytes received")
        #expect(
            StallTimeouts.bodyStalled(timeout: 1500 * Nanos.millisecond, received: 7, expected: nil)
                == "no request body bytes for 1500 ms (limits.body_timeout); 7 bytes received")
        #expect(
            StallTimeouts.sendStalled(timeout: 5 * Nanos.second, acknowledged: 65536, given: 1 << 20)
                == "no response body bytes acknowledged for 5 s (limits.send_timeout); 65536 of 1048576 bytes acknowledged")
    }
}
