import Crypto
import STOQCore
import STOQQUIC
import STOQTestSupport
import Testing

/// A client's 0-RTT, in memory against the node's endpoint: a GET sent before the handshake
/// on a kept session and the server's kept limits, served from early data; and, when the
/// server refuses early data, the same GET sent again after the handshake, under the same
/// stream handle (ngtcp2 0.12 forgets the streams 0-RTT opened).
@Suite(.serialized) struct EarlyDataTests {
    let identity: TestIdentity
    let object = randomBytes(50_000, seed: 7)
    init() throws { identity = try TestIdentity() }

    /// A first connection: what it leaves to resume with (the newest session and 0-RTT's limits).
    func firstVisit(_ pair: EndpointPair) throws -> (session: [UInt8], parameters: [UInt8]) {
        let client = RecordingClient()
        pair.client.application = client
        let conn = try pair.connect()
        #expect(pair.run { conn.isEstablished })
        #expect(!conn.canSendEarly && conn.earlyData == .none)
        _ = try conn.request(method: "GET", authority: "x", path: "/objects/x")
        #expect(pair.run { client.closedCode != nil && conn.resumableSession != nil })
        return (try #require(conn.resumableSession), try #require(conn.earlyParameters))
    }

    /// A second connection that offers them and sends its GET at once.
    /// Returns too when (the pair's clock) the response's head arrived.
    func earlyGet(_ pair: EndpointPair, _ kept: (session: [UInt8], parameters: [UInt8])) throws -> (
        RecordingClient, QUICConnection, Timestamp
    ) {
        let client = RecordingClient()
        pair.client.application = client
        let conn = try pair.connect()
        #expect(conn.offerSession(kept.session))
        #expect(conn.offerEarlyParameters(kept.parameters))
        #expect(conn.canSendEarly)
        _ = try conn.request(method: "GET", authority: "x", path: "/objects/x")
        #expect(pair.run { client.status != nil || client.closedCode != nil })
        let head = pair.now
        #expect(pair.run { client.closedCode != nil })
        return (client, conn, head)
    }

    /// A pair whose client made its first visit and opened a second connection that offers
    /// what it kept (0-RTT is open), with nothing sent on it yet.
    func resumed(
        serverSettings: QUICSettings = QUICSettings(), clientSettings: QUICSettings = QUICSettings()
    ) throws -> (EndpointPair, MemoryServer, RecordingClient, QUICConnection) {
        let pair = try EndpointPair(identity: identity, serverSettings: serverSettings, clientSettings: clientSettings)
        let server = MemoryServer(object: object)
        pair.server.application = server
        let kept = try firstVisit(pair)
        let client = RecordingClient()
        pair.client.application = client
        let conn = try pair.connect()
        #expect(conn.offerSession(kept.session) && conn.offerEarlyParameters(kept.parameters))
        return (pair, server, client, conn)
    }

    @Test func aGetInZeroRTTIsServedFromEarlyData() throws {
        let rtt: UInt64 = 2_000_000
        let pair = try EndpointPair(identity: identity, link: SimulatedLink(delay: rtt / 2))
        let server = MemoryServer(object: object)
        pair.server.application = server
        let kept = try firstVisit(pair)
        let start = pair.now
        let (client, conn, head) = try earlyGet(pair, kept)
        #expect(client.status == 200 && client.closedCode == H3Error.noError)
        #expect(client.sha == Array(SHA256.hash(data: object)))
        #expect(conn.isResumed && conn.earlyData == .accepted)
        #expect(pair.server.counters.requestsEarly == 1 && pair.server.counters.tlsEarlyData == 1)
        #expect(server.requests.count == 2)
        // The simulated clock: the handshake and the GET share the first round trip, so the
        // response's head is back after one (after 1-RTT's handshake it takes two).
        let roundTrips = Double(head - start) / Double(rtt)
        #expect(roundTrips <= 1.5, "the head of a GET in 0-RTT came after \(roundTrips) round trips of simulated time")
        // Side by side: resumed, but the GET waits for the handshake.
        let later = RecordingClient()
        pair.client.application = later
        let start1 = pair.now
        let resumed = try pair.connect()
        #expect(resumed.offerSession(try #require(conn.resumableSession)))
        #expect(pair.run { resumed.isEstablished })
        _ = try resumed.request(method: "GET", authority: "x", path: "/objects/x")
        #expect(pair.run { later.status != nil })
        let oneRTT = Double(pair.now - start1) / Double(rtt)
        #expect(resumed.isResumed && resumed.earlyData == .none && oneRTT >= roundTrips + 0.9, "1-RTT: \(oneRTT), 0-RTT: \(roundTrips)")
    }

    @Test func refusedEarlyDataIsSentAgainAfterTheHandshake() throws {
        var settings = QUICSettings()
        settings.earlyData = false
        let pair = try EndpointPair(identity: identity, serverSettings: settings)
        let server = MemoryServer(object: object)
        pair.server.application = server
        let kept = try firstVisit(pair)
        let (client, conn, _) = try earlyGet(pair, kept)
        #expect(client.status == 200 && client.closedCode == H3Error.noError)
        #expect(client.received == UInt64(object.count) && client.sha == Array(SHA256.hash(data: object)))
        #expect(conn.isResumed && conn.earlyData == .rejected)
        #expect(pair.server.counters.requestsEarly == 0 && pair.server.counters.tlsEarlyData == 0)
        // The server heard the GET once: the copy sent again after the handshake.
        #expect(server.requests.count == 2)
    }

    /// A 0-RTT request the client resets before the server refuses early data is not sent
    /// again: the client hears it closed with its own code, and the next request is served.
    @Test func aResetEarlyRequestIsNotSentAgainWhenEarlyDataIsRefused() throws {
        var settings = QUICSettings()
        settings.earlyData = false
        let (pair, server, client, conn) = try resumed(serverSettings: settings)
        conn.reset(try conn.request(method: "GET", authority: "x", path: "/objects/x"), errorCode: H3Error.requestCancelled)
        #expect(pair.run { conn.isEstablished && client.closedCode != nil })
        #expect(client.closedCode == H3Error.requestCancelled && conn.earlyData == .rejected)
        client.closedCode = nil
        _ = try conn.request(method: "GET", authority: "x", path: "/objects/x")
        #expect(pair.run { client.closedCode != nil })
        #expect(client.status == 200 && client.received == UInt64(object.count))
        // The first visit's GET and this one: the reset request never reached the server.
        #expect(server.requests.count == 2)
    }

    /// Found by the interop matrix (handshakeloss, ngtcp2 serving `stoq get`): a client with a
    /// keep-alive whose 0-RTT handshake outlasts it. ngtcp2 0.12 sent the keep-alive PING alone
    /// in a 0-RTT packet, too short to protect, and aborted (ngtcp2_ppe.c:135). The keep-alive
    /// now starts with the handshake's completion.
    @Test func aKeepAliveDuringALongZeroRTTHandshakeDoesNotAbort() throws {
        var settings = QUICSettings()
        settings.keepAlive = 100_000_000
        let (pair, _, client, conn) = try resumed(clientSettings: settings)
        _ = try conn.request(method: "GET", authority: "x", path: "/objects/x")
        // Nothing comes back for 3 s: 30 keep-alive periods, while the client only has 0-RTT keys.
        pair.toClient.down = true
        let start = pair.now
        #expect(!pair.run(for: 3_000_000_000) { client.closedCode != nil })
        #expect(pair.now - start >= 3_000_000_000 && !conn.isEstablished)
        pair.toClient.down = false
        #expect(pair.run { client.closedCode != nil })
        #expect(client.status == 200 && client.sha == Array(SHA256.hash(data: object)))
    }

    /// A /64 of its own, so that what a test puts in the process's anti-replay table does not
    /// spend another test's share (fd00::2, the pair's client).
    func freshPrefix() -> IPv6Address {
        let r = UInt32.random(in: 1...UInt32.max)
        return IPv6Address("fd00:\(String(r >> 16, radix: 16)):\(String(r & 0xffff, radix: 16)):1::1")!
    }

    /// Distinct ClientHello identities, none another run has made.
    func helloIDs(_ n: Int) -> [[UInt8]] {
        let run = UInt64.random(in: 0...UInt64.max)
        return (0..<n).map { i in withUnsafeBytes(of: (run, UInt64(i))) { Array($0) } }
    }

    /// One ticket holder sends more distinct early-data ClientHellos than the whole anti-replay
    /// table holds, inside its window. It used to fill every slot, after which the node refused
    /// 0-RTT to everyone for 10 s. Now its /64 holds its share and no more: the rest of its
    /// ClientHellos get no 0-RTT, another client's 0-RTT is accepted, and a replay of one of
    /// the flood's ClientHellos, from any address, is still refused.
    @Test func aFloodOfEarlyClientHellosCostsOnlyItsSourceItsZeroRTT() throws {
        let pair = try EndpointPair(identity: identity)
        let server = MemoryServer(object: object)
        pair.server.application = server
        let kept = try firstVisit(pair)
        let attacker = freshPrefix()
        let ids = helloIDs(AntiReplay.slots)
        let before = AntiReplay.counters
        var verdicts: [AntiReplay.Verdict: Int] = [:]
        for id in ids { verdicts[AntiReplay.record(id, from: attacker), default: 0] += 1 }
        #expect(verdicts == [.new: AntiReplay.perPrefix, .overShare: AntiReplay.slots - AntiReplay.perPrefix])
        let (client, conn, _) = try earlyGet(pair, kept)
        #expect(client.status == 200 && client.sha == Array(SHA256.hash(data: object)))
        #expect(conn.earlyData == .accepted && pair.server.counters.tlsEarlyData == 1)
        // A replay of the flood's first ClientHello, from another address or its own.
        #expect(AntiReplay.record(ids[0], from: IPv6Address("fd00:beef::1")!) == .seen)
        #expect(AntiReplay.record(ids[0], from: attacker) == .seen)
        let after = AntiReplay.counters
        #expect(after.accepted - before.accepted == UInt64(AntiReplay.perPrefix) + 1)
        #expect(after.overShare - before.overShare == UInt64(AntiReplay.slots - AntiReplay.perPrefix))
        #expect(after.replays - before.replays == 2 && after.full == before.full)
    }

    /// The share is counted by the /64 a handshake's ClientHello came from: once the client's
    /// /64 holds its share, its next 0-RTT is refused (the GET goes again after the handshake),
    /// and counted so.
    @Test func aSourceOverItsShareResumesWithoutZeroRTT() throws {
        let pair = try EndpointPair(identity: identity)
        pair.clientAddress = IPv6Endpoint(address: freshPrefix(), port: 50000)
        let server = MemoryServer(object: object)
        pair.server.application = server
        let kept = try firstVisit(pair)
        var neighbour = pair.clientAddress.address.bytes
        neighbour.15 = 0x99  // the same /64
        for id in helloIDs(AntiReplay.perPrefix) {
            #expect(AntiReplay.record(id, from: IPv6Address(bytes: neighbour)) == .new)
        }
        let before = AntiReplay.counters
        let (client, conn, _) = try earlyGet(pair, kept)
        #expect(client.status == 200 && client.sha == Array(SHA256.hash(data: object)))
        #expect(conn.isResumed && conn.earlyData == .rejected && pair.server.counters.tlsEarlyData == 0)
        let after = AntiReplay.counters
        #expect(after.overShare - before.overShare == 1 && after.accepted == before.accepted)
    }

    @Test func onlyGetAndHeadGoInZeroRTT() throws {
        let pair = try EndpointPair(identity: identity)
        pair.server.application = MemoryServer(object: object)
        let kept = try firstVisit(pair)
        let conn = try pair.connect()
        #expect(conn.offerSession(kept.session) && conn.offerEarlyParameters(kept.parameters))
        #expect(throws: QUICError.self) { try conn.request(method: "PUT", authority: "x", path: "/objects/y") }
        #expect(throws: QUICError.self) {
            try conn.request(method: "GET", authority: "x", path: "/objects/y", body: BodyRegion(copying: [1, 2, 3]))
        }
        // Garbage is not taken for the server's limits: the connection waits for its handshake.
        let other = try pair.connect()
        #expect(other.offerSession(kept.session))
        #expect(!other.offerEarlyParameters([0xff, 0x01]) && !other.canSendEarly)
    }
}
