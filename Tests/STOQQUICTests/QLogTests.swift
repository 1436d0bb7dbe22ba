import Crypto
import Foundation
import STOQCore
import STOQQUIC
import STOQTestSupport
import Testing

/// One qlog file read back as JSON-SEQ (RFC 7464), the way qvis reads it.
struct QLogFile {
    let name: String
    /// Every record, parsed; the first is the header.
    let records: [[String: Any]]

    /// Reads `path`, failing the test on anything that is not JSON-SEQ: a record must start
    /// with 0x1E, end with a newline and hold one JSON object.
    init(path: String) throws {
        name = (path as NSString).lastPathComponent
        let bytes = try #require(FileManager.default.contents(atPath: path))
        #expect(bytes.first == 0x1E, "\(name): a JSON-SEQ file starts with RS")
        var out: [[String: Any]] = []
        for piece in bytes.split(separator: 0x1E, omittingEmptySubsequences: false).dropFirst() {
            #expect(piece.last == 0x0A, "\(name): record \(out.count) does not end with a newline")
            let object = try JSONSerialization.jsonObject(with: Data(piece))
            out.append(try #require(object as? [String: Any], "\(name): record \(out.count) is not an object"))
        }
        records = out
    }

    var header: [String: Any] { records.first ?? [:] }
    var trace: [String: Any] { header["trace"] as? [String: Any] ?? [:] }
    var groupID: String? { (trace["common_fields"] as? [String: Any])?["group_id"] as? String }
    var vantage: String? { (trace["vantage_point"] as? [String: Any])?["type"] as? String }
    var events: ArraySlice<[String: Any]> { records.dropFirst() }
    func count(_ name: String) -> Int { events.filter { $0["name"] as? String == name }.count }
}

@Suite(.serialized) struct QLogTests {
    let identity: TestIdentity
    let directory: String
    init() throws {
        identity = try TestIdentity()
        directory = identity.directory + "/qlog"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    /// A GET of `size` bytes, then a graceful close; both ends gone when it returns.
    func transfer(
        size: Int, sample: Double, link: SimulatedLink = SimulatedLink(), connections: Int = 1
    ) throws -> EndpointPair {
        let pair = try EndpointPair(identity: identity, link: link)
        try pair.server.setQLog(directory: directory, sample: sample)
        try pair.client.setQLog(directory: directory, sample: sample)
        let object = randomBytes(size, seed: 17)
        pair.server.application = MemoryServer(object: object)
        for _ in 0..<connections {
            let client = RecordingClient()
            pair.client.application = client
            let conn = try pair.connect()
            #expect(pair.run { conn.isEstablished })
            _ = try conn.request(method: "GET", authority: "x", path: "/objects/x")
            #expect(pair.run(for: 600_000_000_000) { client.closedCode != nil })
            #expect(client.sha == Array(SHA256.hash(data: object)))
        }
        pair.server.closeAll(now: pair.now)
        pair.run(for: 10_000_000_000) { pair.server.connectionCount == 0 && pair.client.connectionCount == 0 }
        #expect(pair.server.connectionCount == 0 && pair.client.connectionCount == 0)
        return pair
    }

    func files() throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: directory).sorted()
    }

    @Test func transferOnALossyLinkIsLoggedAsJSONSEQ() throws {
        defer { identity.remove() }
        let link = SimulatedLink(delay: 10_000_000, lossRate: 0.03, reorderRate: 0.05, reorderDelay: 5_000_000, seed: 3)
        let pair = try transfer(size: 3 << 20, sample: 1.0, link: link)
        #expect(pair.toClient.lost > 0, "the link must lose packets for recovery events to show")
        let names = try files()
        #expect(names.count == 2, "one file per end: \(names)")
        let server = try QLogFile(path: directory + "/" + #require(names.first { $0.hasSuffix(".server.sqlog") }))
        let client = try QLogFile(path: directory + "/" + #require(names.first { $0.hasSuffix(".client.sqlog") }))
        for f in [server, client] {
            #expect(f.header["qlog_format"] as? String == "JSON-SEQ")
            // The file is named after the ODCID the trace carries; both ends agree on it.
            let odcid = try #require(f.groupID)
            #expect(f.name.hasPrefix(odcid + "."))
            #expect(odcid.count >= 16 && odcid.allSatisfy(\.isHexDigit))
            #expect(f.count("transport:packet_sent") > 0, "\(f.name)")
            #expect(f.count("transport:packet_received") > 0, "\(f.name)")
            #expect(f.count("recovery:metrics_updated") > 0, "\(f.name)")
        }
        #expect(server.groupID == client.groupID)
        #expect(server.vantage == "server" && client.vantage == "client")
        // The sender of 3 MB: ~2,200 packets out, its congestion window moving, losses seen.
        #expect(server.count("transport:packet_sent") > 2000)
        #expect(server.count("recovery:packet_lost") > 0)
        let cwnds = Set(server.events.compactMap { ($0["data"] as? [String: Any])?["congestion_window"] as? Int })
        #expect(cwnds.count > 3, "congestion_window must move: \(cwnds.sorted().prefix(8))")
        let written = pair.server.counters
        #expect(written.qlogConnections == 1 && written.qlogErrors == 0)
        let size = try #require(FileManager.default.attributesOfItem(atPath: directory + "/" + server.name)[.size] as? UInt64)
        #expect(written.qlogBytes == size)
    }

    @Test func sampleZeroWritesNothing() throws {
        defer { identity.remove() }
        let pair = try transfer(size: 100_000, sample: 0, connections: 3)
        #expect(try files().isEmpty)
        #expect(pair.server.counters.qlogConnections == 0 && pair.server.counters.qlogBytes == 0)
    }

    /// Each connection is drawn once: with 0.5, some of 40 are logged and some are not
    /// (each outcome alone has odds 2^-40).
    @Test func sampleHalfLogsSomeConnections() throws {
        defer { identity.remove() }
        let pair = try transfer(size: 1000, sample: 0.5, connections: 40)
        let logged = pair.server.counters.qlogConnections
        #expect(logged > 0 && logged < 40)
        #expect(try files().filter { $0.hasSuffix(".server.sqlog") }.count == Int(logged))
    }

    /// Logged connections open at once are bounded; a closed one makes room again.
    @Test func openLoggedConnectionsAreBounded() throws {
        defer { identity.remove() }
        let pair = try EndpointPair(identity: identity)
        try pair.server.setQLog(directory: directory, sample: 1, maxOpen: 2)
        pair.server.application = MemoryServer(object: [])
        pair.client.application = RecordingClient()
        let conns = try (0..<3).map { _ in try pair.connect() }
        #expect(pair.run { conns.allSatisfy(\.isEstablished) })
        #expect(pair.server.counters.qlogConnections == 2 && pair.server.counters.qlogSkipped == 1)
        pair.server.closeAll(now: pair.now)
        pair.run(for: 10_000_000_000) { pair.server.connectionCount == 0 }
        let again = try pair.connect()
        #expect(pair.run { again.isEstablished })
        #expect(pair.server.counters.qlogConnections == 3 && pair.server.counters.qlogSkipped == 1)
        #expect(try files().filter { $0.hasSuffix(".server.sqlog") }.count == 3)
    }

    @Test func unusableDirectoryIsRefused() throws {
        defer { identity.remove() }
        let pair = try EndpointPair(identity: identity)
        let missing = directory + "/missing"
        let e = try #require(throws: QUICError.self) { try pair.server.setQLog(directory: missing, sample: 1) }
        #expect(e.code == .qlog)
        #expect(e.message == "qlog directory \"\(missing)\": No such file or directory")
    }
}
