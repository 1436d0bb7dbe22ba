import CNgtcp2
import Crypto
import Foundation
import STOQCore
import STOQQUIC
import STOQTestSupport
import Testing

/// A server whose answers are the test's: each event calls the closure the test set.
final class ScriptedServer: QUICApplication {
    var onRequest: (HTTPRequest, HTTPStream, QUICConnection) -> Void = { _, _, _ in }
    var requests: [HTTPRequest] = []
    /// `aborted` of each requestEnded, in order.
    var ended: [Bool] = []
    var closed: [UInt64] = []
    var connection: QUICConnection?
    func request(_ request: HTTPRequest, stream: HTTPStream, connection: QUICConnection) {
        requests.append(request)
        self.connection = connection
        onRequest(request, stream, connection)
    }
    func requestEnded(stream: HTTPStream, connection: QUICConnection, aborted: Bool) { ended.append(aborted) }
    func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) { closed.append(errorCode) }
}

/// Keeps the response head whole, and what RecordingClient keeps.
final class HeadRecordingClient: QUICApplication {
    var head: HTTPResponseHead?
    var closedCode: UInt64?
    var sha: [UInt8]?
    var received: UInt64 = 0
    var closedReason: String?
    func response(_ head: HTTPResponseHead, stream: HTTPStream, connection: QUICConnection) {
        self.head = head
        stream.setBodySink(fd: -1, hash: true)
    }
    func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) {
        closedCode = errorCode
        sha = stream.bodySHA256()
        received = stream.bytesReceived
    }
    func connectionClosed(connection: QUICConnection, reason: String) { closedReason = reason }
}

/// Set from a BodyRegion's release (which may run on any thread; here, the test's).
final class ReleaseFlag: @unchecked Sendable {
    var released = false
    /// A region of `count` bytes that sets the flag when it goes.
    func region(_ count: Int) -> BodyRegion {
        let p = UnsafeMutableRawPointer.allocate(byteCount: count, alignment: 1)
        return BodyRegion(base: p, count: count) { [self] p, _ in
            UnsafeMutableRawPointer(mutating: p)?.deallocate()
            released = true
        }
    }
}

/// How a server's answers and a request's end reach the wire, one stream at a time.
@Suite(.serialized) struct HTTPStreamTests {
    let identity: TestIdentity
    init() throws { identity = try TestIdentity() }

    private func pair(_ server: ScriptedServer, _ client: some QUICApplication) throws -> (EndpointPair, QUICConnection) {
        let pair = try EndpointPair(identity: identity)
        (pair.server.application, pair.client.application) = (server, client)
        let conn = try pair.connect()
        #expect(pair.run { conn.isEstablished })
        return (pair, conn)
    }

    /// A second answer to one request is refused: its body goes back at once (it leaked), and
    /// the first answer is not reset (it was: respond() reset the stream it refused).
    @Test func aSecondAnswerIsRefusedReleasedAndTheFirstArrivesWhole() throws {
        let object = randomBytes(50_000, seed: 8)
        let flag = ReleaseFlag()
        var second: Bool?
        let server = ScriptedServer()
        server.onRequest = { _, stream, conn in
            conn.respond(stream, status: 200, headers: [("content-length", "\(object.count)")], body: BodyRegion(copying: object))
            second = conn.respond(stream, status: 500, headers: [], body: flag.region(100))
        }
        let client = HeadRecordingClient()
        let (pair, conn) = try pair(server, client)
        _ = try conn.request(method: "GET", authority: "x", path: "/objects/x")
        #expect(pair.run { client.closedCode != nil })
        #expect(second == false)
        #expect(flag.released, "the refused answer's body was never released")
        #expect(client.head?.status == 200)
        #expect(client.closedCode == H3Error.noError)
        #expect(client.sha == Array(SHA256.hash(data: object)))
    }

    /// A HEAD answered with a streamed body sends its head and no DATA (it sent the body, which
    /// the client's nghttp3 refused on a HEAD): the piece is refused, the stream ends with its
    /// head, the connection stays.
    @Test func aHeadAnsweredStreamedSendsNoBody() throws {
        var appended: Bool?
        let server = ScriptedServer()
        server.onRequest = { _, stream, conn in
            conn.respondStreamed(stream, status: 200, headers: [("content-length", "1000")])
            appended = conn.appendBody(stream, BodyRegion(copying: randomBytes(1000, seed: 12)), last: true)
        }
        let client = HeadRecordingClient()
        let (pair, conn) = try pair(server, client)
        _ = try conn.request(method: "HEAD", authority: "x", path: "/objects/x")
        #expect(pair.run { client.closedCode != nil })
        #expect(client.head?.status == 200 && client.head?.contentLength == 1000)
        #expect(client.closedCode == H3Error.noError && client.received == 0)
        #expect(client.closedReason == nil && !conn.isClosed)
        #expect(appended == false)
        #expect(server.connection?.stats.body_bytes_sent == 0)
    }

    /// Thirty fields before content-length and etag: all reach the client (past 24 fields the
    /// rest were dropped, silently).
    @Test func aResponseCarriesEveryHeader() throws {
        let filler = (0..<30).map { ("x-filler-\($0)", "v") }
        let server = ScriptedServer()
        server.onRequest = { _, stream, conn in
            conn.respond(stream, status: 200, headers: filler + [("content-length", "3"), ("etag", "\"e\"")], body: BodyRegion(copying: [1, 2, 3]))
        }
        let client = HeadRecordingClient()
        let (pair, conn) = try pair(server, client)
        _ = try conn.request(method: "GET", authority: "x", path: "/objects/x")
        #expect(pair.run { client.closedCode != nil })
        #expect(client.head?.contentLength == 3 && client.head?.etag == "\"e\"")
        #expect(client.closedCode == H3Error.noError && client.received == 3)
    }

    /// A request's fields past the 24th reach the server too; one with more than
    /// STOQ_MAX_HEADERS is refused whole, naming why, and so is an answer with as many (its
    /// stream reset, its body released).
    @Test func aRequestCarriesEveryHeaderAndTooManyAreRefused() throws {
        let limit = Int(STOQ_MAX_HEADERS)
        let flag = ReleaseFlag()
        var answered: Bool?
        let server = ScriptedServer()
        server.onRequest = { request, stream, conn in
            if request.path == "/many" {
                conn.respond(stream, status: 200, headers: [], body: nil)
            } else {
                answered = conn.respond(stream, status: 200, headers: (0...limit).map { ("x-\($0)", "v") }, body: flag.region(10))
            }
        }
        let client = HeadRecordingClient()
        let (pair, conn) = try pair(server, client)
        let filler = (0..<30).map { ("x-filler-\($0)", "v") }
        _ = try conn.request(method: "GET", authority: "x", path: "/many", headers: filler + [("range", "bytes=0-9")])
        #expect(pair.run { client.closedCode != nil })
        #expect(server.requests.last?.range == "bytes=0-9")

        let refused = #expect(throws: QUICError.self) {
            try conn.request(method: "GET", authority: "x", path: "/many", headers: (0...limit).map { ("x-\($0)", "v") })
        }
        #expect(refused?.message.contains("\(limit + 1) header fields, at most \(limit)") == true, "\(String(describing: refused))")

        client.closedCode = nil
        _ = try conn.request(method: "GET", authority: "x", path: "/too-many-back")
        #expect(pair.run { client.closedCode != nil })
        #expect(answered == false && flag.released)
        #expect(client.closedCode == H3Error.internalError)
        #expect(!conn.isClosed)
    }

    /// A client that resets its request's body before it ends: the server's application hears
    /// the request ended, aborted, once (it never heard: only the stream's close, later).
    @Test func aRequestBodyResetByTheClientEndsTheRequestAborted() throws {
        let server = ScriptedServer()
        server.onRequest = { _, stream, _ in stream.setBodySink(fd: -1, hash: true) }
        let client = HeadRecordingClient()
        let (pair, conn) = try pair(server, client)
        let stream = try conn.requestStreamed(method: "PUT", authority: "x", path: "/objects/x")
        #expect(conn.appendBody(stream, BodyRegion(copying: randomBytes(10_000, seed: 9)), last: false))
        #expect(pair.run { server.requests.count == 1 && server.ended.isEmpty && pair.server.counters.sinkJobsPending == 0 })
        conn.reset(stream, errorCode: H3Error.requestCancelled)
        #expect(pair.run { !server.closed.isEmpty })
        #expect(server.ended == [true])
        #expect(!conn.isClosed)
    }
}
