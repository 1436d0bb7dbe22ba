import STOQQUIC
import STOQTestSupport
import Testing

/// Answers every request with its refusal (or 200), with a Cache-Control, and keeps the heads.
final class HeadRecorder: QUICApplication {
    var requests: [HTTPRequest] = []
    func request(_ request: HTTPRequest, stream: HTTPStream, connection: QUICConnection) {
        requests.append(request)
        let status = request.refusal?.status ?? 200
        connection.respond(stream, status: status, headers: [("cache-control", "public, max-age=30")], body: nil)
    }
}

/// Keeps what the client side made of each response head.
final class ResponseRecorder: QUICApplication {
    var heads: [(status: Int, maxAge: Int64?)] = []
    var closed = 0
    func response(_ head: HTTPResponseHead, stream: HTTPStream, connection: QUICConnection) {
        let status = head.status
        heads.append((status, stream.maxAge))
    }
    func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) { closed += 1 }
}

/// Through the C shim: it keeps a head's fields and hands them over once per request; the
/// Swift rules then decide.
@Suite(.serialized) struct HTTPHeadHandoffTests {
    let identity: TestIdentity
    init() throws { identity = try TestIdentity() }

    @Test func headsCrossOncePerRequestAndTheSwiftRulesDecide() throws {
        let pair = try EndpointPair(identity: identity)
        let server = HeadRecorder(), client = ResponseRecorder()
        pair.server.application = server
        pair.client.application = client
        let conn = try pair.connect()
        #expect(pair.run { conn.isEstablished })
        let long = "/objects/" + String(repeating: "a", count: 5000)
        let requests: [(path: String, headers: [(String, String)])] = [
            ("/objects/a", [("range", "bytes=10-19"), ("x-other", "1")]),
            (long, []),
            ("/objects/b", [("x-junk", String(repeating: "j", count: 17_000))]),
        ]
        for r in requests { _ = try conn.request(method: "GET", authority: "node", path: r.path, headers: r.headers) }
        #expect(pair.run { client.closed == requests.count })

        #expect(server.requests.count == requests.count)  // one handoff per request
        let byPath = Dictionary(server.requests.map { ($0.path.prefix(20), $0) }, uniquingKeysWith: { a, _ in a })
        let plain = try #require(byPath["/objects/a"])
        #expect(plain.refusal == nil && plain.range == "bytes=10-19" && plain.contentLength == nil)
        #expect(plain.method == "GET" && plain.authority == "node" && !plain.hasBody)
        let tooLong = try #require(server.requests.first { $0.pathTooLong })
        #expect(tooLong.refusal?.status == 414 && tooLong.refusal?.reason == "path too long")
        let tooLarge = try #require(byPath["/objects/b"])
        #expect(tooLarge.refusal?.status == 431 && tooLarge.refusal?.reason == "request header fields too large")

        #expect(client.heads.map(\.status).sorted() == [200, 414, 431])
        #expect(client.heads.allSatisfy { $0.maxAge == 30 })  // Cache-Control parsed in Swift, kept on the stream
    }
}
