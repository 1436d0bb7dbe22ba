import Foundation
import Logging
import NIOCore
import NIOPosix
import STOQCore
import STOQStore
import STOQTestSupport
import Testing

@testable import STOQAdmin
@testable import STOQNode
@testable import STOQTrust

/// The admin API's server on a real socket on [::1]: what a scraper, or someone holding its
/// connections, sees.
@Suite struct AdminServerTests {
    /// A server answering `ok` to every GET, with `requestDeadline` shortened for the test and
    /// an hour between refusal notices.
    static func server(
        requestDeadline: TimeAmount = .milliseconds(600), protection: AdminProtection = .none, logger: Logger = Logger(label: "test"),
        act: AdminServer.Action? = nil
    ) throws -> AdminServer {
        try AdminServer(
            listen: IPv6Endpoint(address: .loopback, port: 0), protection: protection, logger: logger, act: act,
            requestDeadline: requestDeadline, refusalLogInterval: .hours(1)
        ) { _ in ("ok\n", "text/plain") }
    }

    /// Requests refused for their token are counted each; the log has one line for them in the
    /// interval (an hour here), and the client's path in it is cut.
    @Test func refusedRequestsAreCountedEachAndLoggedOnce() throws {
        let log = LogCapture()
        let server = try Self.server(protection: .token(authorize: AdminBearerToken(token: "s3cret").authorize), logger: log.logger)
        defer { server.shutdown() }
        let s = try AdminSocket(port: server.localAddress.port)
        let long = "/" + String(repeating: "a", count: 5000)
        for i in 0..<50 {
            #expect(s.send(AdminSocket.request("GET", i == 0 ? long : "/metrics")))
            #expect(s.readResponse()?.status == 401)
        }
        #expect(server.refused == 50)
        let line = "admin API: request refused: no Authorization header: send Authorization: Bearer <token>"
        #expect(log.messages(atLeast: .notice).filter { $0.contains("refused") } == [line])
        #expect(log.metadata("path", of: line) == ["/" + String(repeating: "a", count: 63) + "… (5001 bytes)"])
    }

    /// At most one refusal notice per interval: the first at once; the interval's end tells
    /// how many more came and the last of them, and opens the next interval, whose refusals
    /// wait for its end in turn.
    @Test func refusalNoticesAreOnePerInterval() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let log = LogCapture()
        let refusals = AdminRefusals(logger: log.logger, interval: .seconds(1))
        let lines = { log.messages(atLeast: .notice) }
        /// Waits (polling, at most 10 s) until `n` lines were logged.
        func waitFor(_ n: Int) {
            let end = ContinuousClock.now + .seconds(10)
            while lines().count < n && ContinuousClock.now < end { Thread.sleep(forTimeInterval: 0.02) }
        }
        let start = ContinuousClock.now
        for i in 1...50 { refusals.notice("request refused: #\(i)", ["path": "/p\(i)"], on: group.next()) }
        #expect(lines() == ["admin API: request refused: #1"])
        waitFor(2)
        #expect(ContinuousClock.now - start >= .seconds(1))
        let summary = "admin API: 49 more refused in the last 1 s (stoq_admin_refused_total counts each); the last: request refused: #50"
        #expect(lines() == ["admin API: request refused: #1", summary])
        #expect(log.metadata("path", of: summary) == ["/p50"])

        refusals.notice("request refused: #51", ["path": "/p51"], on: group.next())
        #expect(lines().count == 2, "logged within the interval the summary opened")
        waitFor(3)
        #expect(lines().last == "admin API: 1 more refused in the last 1 s (stoq_admin_refused_total counts each); the last: request refused: #51")
    }

    /// Every answered POST was logged: one client could fill the log. Now one line per action
    /// and status an interval (an hour here), the path in it cut; each is still answered.
    @Test func answeredPostsAreLoggedOncePerActionAndStatus() throws {
        let log = LogCapture()
        let server = try Self.server(logger: log.logger) { path in
            path == "/store/collect" ? .now(status: 200, text: "collected") : .now(status: 200, text: "purged")
        }
        defer { server.shutdown() }
        let s = try AdminSocket(port: server.localAddress.port)
        let long = "/edge/purge/" + String(repeating: "a", count: 5000)
        for i in 0..<20 {
            #expect(s.send(AdminSocket.request("POST", i == 0 ? long : "/edge/purge/n\(i)")))
            #expect(s.readResponse()?.status == 200)
        }
        for _ in 0..<3 {
            #expect(s.send(AdminSocket.request("POST", "/store/collect")))
            #expect(s.readResponse()?.status == 200)
        }
        #expect(
            log.messages(atLeast: .notice) == [
                "admin API: POST /edge/purge/" + String(repeating: "a", count: 52) + "… (5012 bytes): 200 purged",
                "admin API: POST /store/collect: 200 collected",
            ])
    }

    /// The throttle keeps an interval per kind: one kind's lines do not hold another's back,
    /// and each interval's end tells its own kind's count and last line.
    @Test func throttledKindsHaveIntervalsOfTheirOwn() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let log = LogCapture()
        let throttle = AdminLogThrottle(logger: log.logger, interval: .seconds(1))
        let lines = { log.messages(atLeast: .notice) }
        for i in 1...3 { throttle.notice("POST /edge/purge answered 200", "POST /edge/purge/n\(i): 200", [:], on: group.next()) }
        throttle.notice("POST /store/collect answered 200", "POST /store/collect: 200", [:], on: group.next())
        #expect(lines() == ["admin API: POST /edge/purge/n1: 200", "admin API: POST /store/collect: 200"])
        let end = ContinuousClock.now + .seconds(10)
        while lines().count < 3 && ContinuousClock.now < end { Thread.sleep(forTimeInterval: 0.02) }
        #expect(lines().last == "admin API: 2 more POST /edge/purge answered 200 in the last 1 s; the last: POST /edge/purge/n3: 200")
    }

    /// Sends `first`, then one byte every 100 ms, until the server closes the connection: how
    /// long that took, or nil when it did not within 5 s.
    static func trickle(_ s: AdminSocket, first: [UInt8], byte: UInt8) -> Duration? {
        let start = ContinuousClock.now
        guard s.send(first) else { return .zero }
        while ContinuousClock.now - start < .seconds(5) {
            Thread.sleep(forTimeInterval: 0.1)  // the trickle itself: the pace is the scenario
            if s.closedByPeer() || !s.send([byte]) { return ContinuousClock.now - start }
        }
        return nil
    }

    /// A connection that trickles a request's head a byte at a time (each arriving well
    /// within any read timeout) is closed at the deadline counted from its accept; a kept-alive
    /// one, at the deadline counted from its last response's end. A whole request is answered.
    @Test func aTrickledRequestIsClosedAtTheDeadline() throws {
        let server = try Self.server()
        defer { server.shutdown() }
        let trickled = try AdminSocket(port: server.localAddress.port)
        let took = try #require(Self.trickle(trickled, first: Array("GET /metrics HTTP/1.1\r\n".utf8), byte: UInt8(ascii: "x")))
        #expect(took >= .milliseconds(600) && took < .milliseconds(2_600), "closed after \(took)")

        let kept = try AdminSocket(port: server.localAddress.port)
        #expect(kept.send(Array("GET /status HTTP/1.1\r\nhost: a\r\n\r\n".utf8)))
        #expect(kept.readResponse()?.status == 200)
        let again = try #require(Self.trickle(kept, first: Array("GET /status HTTP/1.1\r\n".utf8), byte: UInt8(ascii: "x")))
        #expect(again >= .milliseconds(500) && again < .milliseconds(2_600), "closed after \(again)")
    }

    /// Under mutual TLS the handshake counts against the same deadline: a ClientHello sent a
    /// byte at a time is closed at it.
    @Test func aTrickledTLSHandshakeIsClosedAtTheDeadline() throws {
        let dir = try TemporaryDirectory("stoq-admin-tls")
        defer { dir.remove() }
        let ca = try TrustAuthority.create(in: dir.path + "/trust")
        let issued = try ca.issueWithNewKey(dnsNames: ["admin.test"])
        try issued.chainPEM.write(toFile: dir.path + "/cert.pem", atomically: true, encoding: .utf8)
        try issued.keyPEM.write(toFile: dir.path + "/key.pem", atomically: true, encoding: .utf8)
        let tls = try AdminTLS(certificateFile: dir.path + "/cert.pem", keyFile: dir.path + "/key.pem") { _ in nil }
        let server = try Self.server(protection: .mtls(tls))
        defer { server.shutdown() }
        let s = try AdminSocket(port: server.localAddress.port)
        // A TLS record header announcing a 512-byte handshake message: the server waits for the rest.
        let took = try #require(Self.trickle(s, first: [0x16, 0x03, 0x01, 0x02, 0x00, 0x01], byte: 0))
        #expect(took >= .milliseconds(600) && took < .milliseconds(2_600), "closed after \(took)")
    }

    /// `POST /store/collect` runs off the admin API's event loop: while a collection is under
    /// way (held by the hook), `/metrics` is answered and a second `POST /store/collect` gets a
    /// 409 saying why; the first is answered once its collection returns, and the next one runs.
    @Test func aCollectionLeavesTheAdminAPIAnswering() throws {
        let started = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0)
        let result = ObjectIndex.CollectResult(objectsScanned: 3, chunksReferenced: 5, chunksInGracePeriod: 1, chunksRemoved: 2, bytesFreed: 8192)
        let server = try Self.server(
            act: Node.adminAction(edge: nil) {
                started.signal()
                // Bounded, so that a failing test ends: where the collection blocked the event
                // loop, a later one would hold the shutdown.
                _ = release.wait(timeout: .now() + 30)
                return result
            })
        defer { server.shutdown() }
        var held = true
        defer { if held { release.signal() } }
        let port = server.localAddress.port

        let first = try AdminSocket(port: port)
        #expect(first.send(AdminSocket.request("POST", "/store/collect")))
        try #require(started.wait(timeout: .now() + 10) == .success, "the collection did not start")
        let scrape = try AdminSocket(port: port)
        #expect(scrape.send(AdminSocket.request("GET", "/metrics")))
        #expect(scrape.readResponse()?.status == 200, "/metrics not answered during a collection")
        let second = try AdminSocket(port: port)
        #expect(second.send(AdminSocket.request("POST", "/store/collect")))
        let busy = second.readResponse()
        #expect(busy?.status == 409)
        #expect(busy?.body == "a garbage collection asked for by POST /store/collect is already running: try again once it has answered\n")

        release.signal()
        held = false
        let done = first.readResponse()
        #expect(done?.status == 200)
        #expect(
            done?.body
                == "garbage collection: 3 object(s) scanned, 5 chunk(s) referenced, 1 unreferenced kept for the grace period, 2 removed (8192 bytes freed)\n"
        )
        release.signal()  // the next one returns at once
        #expect(first.send(AdminSocket.request("POST", "/store/collect")))
        #expect(first.readResponse()?.status == 200)
    }
}

/// A blocking TCP connection to [::1]:`port`, as a scraper (or someone holding its slot) opens.
final class AdminSocket {
    let fd: Int32

    init(port: UInt16) throws {
        fd = socket(AF_INET6, Int32(SOCK_STREAM.rawValue), 0)
        var sa = IPv6Endpoint(address: .loopback, port: port).sockaddr
        let ok = withUnsafePointer(to: &sa) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) == 0 }
        }
        guard ok else {
            close(fd)
            throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO)
        }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)  // a read that gets nothing fails the test, not hangs it
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { close(fd) }

    /// A whole HTTP/1.1 request without a body.
    static func request(_ method: String, _ path: String) -> [UInt8] { Array("\(method) \(path) HTTP/1.1\r\nhost: admin\r\n\r\n".utf8) }

    /// Whether all of `bytes` went out (false once the server closed the connection).
    func send(_ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) == $0.count }
    }

    /// Whether the server closed the connection (what it sent before is read and dropped).
    func closedByPeer() -> Bool {
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = recv(fd, &buffer, buffer.count, Int32(MSG_DONTWAIT))
            if n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) { return true }
            if n < 0 { return false }
        }
    }

    /// The next response: its status and body (read as its content-length says), or nil when
    /// the connection closed or nothing came for 10 s.
    func readResponse() -> (status: Int, body: String)? {
        var data = [UInt8]()
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            if let end = data.indices.dropLast(3).first(where: { data[$0..<$0 + 4].elementsEqual("\r\n\r\n".utf8) }) {
                let head = String(decoding: data[..<end], as: UTF8.self).lowercased()
                let length =
                    head.split(separator: "\r\n").first { $0.hasPrefix("content-length:") }
                    .flatMap { Int($0.dropFirst("content-length:".count).trimmingCharacters(in: .whitespaces)) } ?? 0
                if data.count >= end + 4 + length {
                    let status = Int(head.split(separator: " ").dropFirst().first ?? "") ?? 0
                    return (status, String(decoding: data[(end + 4)..<(end + 4 + length)], as: UTF8.self))
                }
            }
            let n = recv(fd, &buffer, buffer.count, 0)
            guard n > 0 else { return nil }
            data += buffer[..<n]
        }
    }
}
