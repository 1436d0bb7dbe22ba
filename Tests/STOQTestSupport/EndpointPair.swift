import Foundation
import STOQCore
import STOQQUIC
import STOQTrust

/// A throwaway identity for tests, in a fresh temporary directory. The directory goes with the
/// last reference to the identity (a suite that holds one in a property: when swift-testing drops
/// the suite's instance after the test, failed or not), or earlier by `remove()` from a `defer`.
public final class TestIdentity {
    public let directory: String
    public let identity: EmbeddedIdentity

    public init() throws {
        directory = NSTemporaryDirectory() + "stoq-test-\(UUID().uuidString)"
        do {
            identity = try EmbeddedIdentity.loadOrCreate(
                in: directory + "/identity", names: ["stoq.test"],
                addresses: [IPv6Address("fd00::1")!])
        } catch {
            try? FileManager.default.removeItem(atPath: directory)
            throw error
        }
    }

    deinit { remove() }

    /// Removes the directory and everything in it (again: a no-op).
    public func remove() { try? FileManager.default.removeItem(atPath: directory) }

    /// Client credentials that trust this identity (and nothing else), under STOQ's one policy.
    public func clientCredentials() throws -> TLSCredentials {
        let verifier = PeerVerifier(roots: try PEMFiles.readCertificates(identity.certificatePath))
        return try TLSCredentials(policy: PeerCertificateCheck(identity: verifier.fingerprint, verifier.refusal))
    }
}

/// A client and a server endpoint joined by two simulated links and driven by a
/// manual clock: QUIC runs end to end in memory, deterministically.
public final class EndpointPair {
    public var now: Timestamp = 1_000_000_000
    public let client: QUICEndpoint
    public let server: QUICEndpoint
    public var toServer: SimulatedLink
    public var toClient: SimulatedLink
    /// Where the client sends from (set it before connecting: a test of per-source limits).
    public var clientAddress = IPv6Endpoint(address: IPv6Address("fd00::2")!, port: 50000)
    public let serverAddress = IPv6Endpoint(address: IPv6Address("fd00::1")!, port: 4433)
    /// Datagrams delivered to the server, for tests that inspect raw packets.
    public var onServerReceive: ((UnsafeRawBufferPointer) -> Void)?
    /// 0: transmit runs are packed (GSO); otherwise datagram i of a run starts at i × stride
    /// (how the AF_XDP datapath lays them out, one frame each).
    public var transmitStride = 0
    /// Replies the server sent to addresses other than the client (stateless probes).
    public private(set) var strayReplies: [[UInt8]] = []
    private let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 16)

    public convenience init(
        identity: TestIdentity, serverSettings: QUICSettings = QUICSettings(),
        clientSettings: QUICSettings = QUICSettings(), link: SimulatedLink = SimulatedLink(),
        serverWorkerID: UInt8 = 0
    ) throws {
        let serverCreds = try TLSCredentials(
            certificateFile: identity.identity.certificatePath,
            keyFile: identity.identity.keyPath)
        let clientCreds = try identity.clientCredentials()
        try self.init(
            serverCredentials: serverCreds, clientCredentials: clientCreds, serverSettings: serverSettings,
            clientSettings: clientSettings, link: link, serverWorkerID: serverWorkerID)
    }

    /// A pair with the given credentials: the handshake runs the real C/GnuTLS code and the
    /// credentials' certificate policies, in memory.
    public init(
        serverCredentials serverCreds: TLSCredentials, clientCredentials clientCreds: TLSCredentials,
        serverSettings: QUICSettings = QUICSettings(), clientSettings: QUICSettings = QUICSettings(),
        link: SimulatedLink = SimulatedLink(), serverWorkerID: UInt8 = 0
    ) throws {
        let secret = StaticSecret.random()
        server = QUICEndpoint(isServer: true, credentials: serverCreds, settings: serverSettings, workerID: serverWorkerID, secret: secret)
        client = QUICEndpoint(
            isServer: false, credentials: clientCreds, settings: clientSettings, workerID: 0,
            secret: StaticSecret.random())
        toServer = link
        toClient = link
    }

    deinit { buffer.deallocate() }

    /// Connects the client to the server (verifying the certificate for `fd00::1`).
    public func connect(serverName: String = "fd00::1") throws -> QUICConnection {
        try client.connect(to: serverAddress, from: clientAddress, serverName: serverName, now: now)
    }

    /// Sends one raw datagram from `from` to the server, as an attacker or a broken peer would.
    public func inject(_ bytes: [UInt8], from: IPv6Endpoint) {
        bytes.withUnsafeBytes { toServer.send($0, from: from, to: serverAddress, ecn: .notECT, now: now) }
    }

    private func flush(_ ep: QUICEndpoint, _ fromAddr: IPv6Endpoint, toServerSide: Bool) -> Bool {
        var progressed = false
        while let t = ep.pollTransmit(into: buffer, maxSegments: 16, stride: transmitStride, now: now) {
            progressed = true
            var off = 0
            while off < t.length {
                let n = min(t.segmentSize, t.length - off)
                let dgram = UnsafeRawBufferPointer(rebasing: buffer[off..<off + n])
                if toServerSide {
                    toServer.send(dgram, from: fromAddr, to: t.destination, ecn: t.ecn, now: now)
                } else if t.destination == clientAddress {
                    toClient.send(dgram, from: fromAddr, to: t.destination, ecn: t.ecn, now: now)
                } else {
                    strayReplies.append(Array(dgram))
                }
                off += transmitStride > 0 ? transmitStride : n
            }
        }
        return progressed
    }

    /// Runs one step: send what is owed, deliver what arrived, or advance the clock to
    /// the next event. Returns false when nothing can ever happen again.
    @discardableResult
    public func step() -> Bool {
        var progressed = flush(client, clientAddress, toServerSide: true)
        progressed = flush(server, serverAddress, toServerSide: false) || progressed
        for p in toServer.deliver(now: now) {
            p.bytes.withUnsafeBytes { b in
                onServerReceive?(b)
                server.handle(datagram: b, from: p.from, to: p.to, ecn: p.ecn, now: now)
            }
            progressed = true
        }
        for p in toClient.deliver(now: now) {
            p.bytes.withUnsafeBytes { client.handle(datagram: $0, from: p.from, to: p.to, ecn: p.ecn, now: now) }
            progressed = true
        }
        if progressed { return true }
        // Body writers are threads and finish in real time: while one has buffers queued, give
        // it a moment and take what it finished (credit the peer may be waiting for), and let
        // the clock crawl (1 ms a step) instead of jumping to the next timer, which could be
        // the idle timeout of a connection that only waits for its writer.
        var writing = false
        if client.counters.sinkJobsPending > 0 || server.counters.sinkJobsPending > 0 {
            usleep(100)
            client.handleTimeouts(now: now)
            server.handleTimeouts(now: now)
            writing = true
        }
        let next = [client.nextTimeout(), server.nextTimeout(), toServer.nextArrival, toClient.nextArrival]
            .compactMap { $0 }.min()
        guard let next else { return writing }
        let target = writing ? min(next, now + 1_000_000) : next
        if target > now { now = target }
        client.handleTimeouts(now: now)
        server.handleTimeouts(now: now)
        return true
    }

    /// Steps until `done` holds or `limit` of simulated time passes. Returns whether `done` held.
    @discardableResult
    public func run(for limit: UInt64 = 60_000_000_000, until done: () -> Bool) -> Bool {
        let end = now + limit
        while !done() {
            if now > end || !step() { return done() }
        }
        return true
    }
}
