import Foundation
import STOQConfig
import STOQTestSupport
import STOQTransfer
import STOQTrust
import Testing

@testable import STOQNode

/// `Node.reload` on a running node (one worker on [::1]): what a reload applies live judges
/// clients with the node's own CA as it runs, and what it hands the edge and the mesh it hands
/// them once.
@Suite(.serialized) struct NodeReloadTests {
    /// A node on `[::1]:0` with its data under `dir/d1`, serving `dir/objects` (`a.bin`).
    static func config(_ dir: TemporaryDirectory, network: String = "", sections: String = "") throws -> NodeConfig {
        try FileManager.default.createDirectory(atPath: dir.path + "/objects", withIntermediateDirectories: true)
        try Data("hello".utf8).write(to: URL(fileURLWithPath: dir.path + "/objects/a.bin"))
        return try ConfigLoader.parse(
            """
            [node]
            data_dir = "\(dir.path)/d1"
            [network]
            listen_addr = "[::1]:0"
            workers = 1
            \(network)
            [storage]
            path = "\(dir.path)/objects"
            content_path = "\(dir.path)/content"
            \(sections)
            """)
    }

    /// A client certificate from the CA in `caDirectory`, as files under `dir`.
    static func client(_ name: String, caDirectory: String, in dir: TemporaryDirectory) throws -> (cert: String, key: String) {
        let issued = try TrustAuthority.load(from: caDirectory).issueWithNewKey(dnsNames: ["\(name).example"])
        let (cert, key) = (dir.path + "/\(name).pem", dir.path + "/\(name).key")
        try Data(issued.chainPEM.utf8).write(to: URL(fileURLWithPath: cert))
        try Data(issued.keyPEM.utf8).write(to: URL(fileURLWithPath: key))
        return (cert, key)
    }

    /// GET a.bin from `node`, presenting `client`'s certificate when given: its status, or the error.
    static func get(_ node: Node, as client: (cert: String, key: String)?) -> Result<Int, ClientError> {
        let fd = open("/dev/null", O_WRONLY)
        defer { close(fd) }
        let trust = ClientTrust(caFile: node.certificatePath, certificateFile: client?.cert, keyFile: client?.key)
        do {
            let url = try STOQURL("https://[::1]:\(node.listenAddress.port)/objects/a.bin")
            return .success(try STOQClient.get(url, into: fd, trust: trust, datapath: DatapathSelection.originFetch, timeout: 10).status)
        } catch {
            return .failure(error)
        }
    }

    /// data_dir needs a restart; client_auth changed with it applies at once, with the CA the
    /// node runs. It was judged from the new data_dir, where the reload made a CA of its own:
    /// every client of the running CA was refused, and going back to the old data_dir
    /// ("unchanged") did not undo it until a restart.
    @Test func clientRulesAppliedWithANewDataDirUseTheRunningCA() throws {
        let dir = try TemporaryDirectory("stoq-reload-datadir")
        defer { dir.remove() }
        let cfg = try Self.config(dir)
        let node = Node(config: cfg, logger: LogCapture().logger)
        try node.start()
        defer {
            node.stop()
            node.wait(timeout: 10)
        }
        var fresh = cfg
        fresh.node.dataDir = dir.path + "/d9"
        fresh.network.clientAuth = .required
        let report = try node.reload(fresh)
        #expect(report.applied == ["network.client_auth"] && report.restartNeeded == ["node"], "\(report)")
        #expect(!FileManager.default.fileExists(atPath: dir.path + "/d9"), "the reload made a CA under the new data_dir")
        let alice = try Self.client("alice", caDirectory: dir.path + "/d1/trust", in: dir)
        #expect(try Self.get(node, as: alice).get() == 200)
        guard case .failure = Self.get(node, as: nil) else {
            Issue.record("client_auth = required is not applied")
            return
        }
    }

    /// A [trust] change that needs a restart (here with a [tls] one) still reaches the edge's
    /// upstreams at once, and only once: `config.trust` stays the running one, and every later
    /// reload of the same file handed it to the edge and the mesh again, closing every upstream
    /// and neighbour connection each time. Going back to the running [trust] hands that back.
    @Test func aTrustChangeThatNeedsARestartRetrustsTheEdgeOnce() throws {
        let dir = try TemporaryDirectory("stoq-reload-retrust")
        defer { dir.remove() }
        let cfg = try Self.config(dir, sections: "[edge]\nenable_caching = true\norigin = \"https://[::1]:9\"\n")
        let log = LogCapture()
        let node = Node(config: cfg, logger: log.logger)
        try node.start()
        defer {
            node.stop()
            node.wait(timeout: 10)
        }
        let warning =
            "reload: the new [trust] verifies the edge's upstreams and mesh neighbours now; clients and this node's own certificate are judged with the old one until a restart"
        var fresh = cfg
        fresh.tls.cipherSuites = ["AES-256-GCM"]
        fresh.trust.certLifetime /= 2
        for _ in 0..<3 {
            let report = try node.reload(fresh)
            #expect(report.applied.isEmpty && Set(report.restartNeeded) == ["trust", "tls"], "\(report)")
            #expect(node.peersTrust == fresh.trust && node.config.trust == cfg.trust)
        }
        #expect(log.messages(atLeast: .warning).filter { $0 == warning }.count == 1, "\(log.messages(atLeast: .warning))")
        let back = try node.reload(cfg)
        #expect(back.applied == ["trust"] && back.restartNeeded.isEmpty, "\(back)")
        #expect(node.peersTrust == cfg.trust)
        #expect(try node.reload(cfg).applied.isEmpty)
    }

    /// A serial added to the CA's revoked.txt refuses its certificate from the next handshake
    /// once a reload has read it (SIGHUP: the same file again). The checks held the serials
    /// read at start: SIGHUP said "unchanged" and the revoked client kept its access.
    @Test func aReloadAppliesTheCAsRevokedSerials() throws {
        let dir = try TemporaryDirectory("stoq-reload-revoked")
        defer { dir.remove() }
        let cfg = try Self.config(dir, network: "client_auth = \"required\"")
        let node = Node(config: cfg, logger: LogCapture().logger)
        try node.start()
        defer {
            node.stop()
            node.wait(timeout: 10)
        }
        let alice = try Self.client("alice", caDirectory: dir.path + "/d1/trust", in: dir)
        let bob = try Self.client("bob", caDirectory: dir.path + "/d1/trust", in: dir)
        #expect(try Self.get(node, as: alice).get() == 200)
        let serial = try CertificateSummary(#require(try PEMFiles.readCertificates(alice.cert).first)).serial
        let revoked = URL(fileURLWithPath: node.revocationListPath)
        try Data("\(serial)\n".utf8).write(to: revoked)
        let report = try node.reload(cfg)
        #expect(report.applied == ["trust.revocations"] && report.restartNeeded.isEmpty, "\(report)")
        switch Self.get(node, as: alice) {
        case .success(let status): Issue.record("a revoked certificate got \(status)")
        case .failure(let error): #expect("\(error)".contains("TLS alert 42"), "\(error)")
        }
        #expect(try Self.get(node, as: bob).get() == 200)
        #expect(try node.reload(cfg).applied.isEmpty, "read again, and the same")
        // A line that is not a serial refuses the reload, naming the file and the line; the
        // serials applied stay.
        try Data("\(serial)\nnot-a-serial\n".utf8).write(to: revoked)
        #expect {
            try node.reload(cfg)
        } throws: { "\($0)".contains("\(revoked.path):2: not-a-serial is not a hex serial number") }
        guard case .failure = Self.get(node, as: alice) else {
            Issue.record("a revoked certificate got through after a refused reload")
            return
        }
    }
}
