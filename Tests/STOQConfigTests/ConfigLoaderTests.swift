import Foundation
import STOQCore
import Testing
@testable import STOQConfig

@Suite struct ConfigLoaderTests {
    @Test func seedFileIsTheDefault() throws {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../config/node.toml").path
        #expect(try ConfigLoader.load(path: path) == NodeConfig.default)
    }

    @Test func emptyFileIsTheDefault() throws {
        #expect(try ConfigLoader.parse("") == NodeConfig.default)
    }

    @Test func readsValues() throws {
        let c = try ConfigLoader.parse("""
            [network]
            listen_addr = "[::1]:9000"
            workers = 2
            cc = "bbr"
            [network.quic_config]
            max_window = "128MB"
            idle_timeout = "5s"
            [storage]
            path = "/srv/objects"
            """)
        #expect(c.network.listenAddress == IPv6Endpoint(address: .loopback, port: 9000))
        #expect(c.network.workers == 2)
        #expect(c.network.congestionControl == "bbr")
        #expect(c.network.quic.maxWindow == 128 << 20)
        #expect(c.network.quic.idleTimeout == 5_000_000_000)
        #expect(c.storage.path == "/srv/objects")
    }

    @Test func readsTheEdgeKeys() throws {
        let c = try ConfigLoader.parse("""
            [edge]
            enable_caching = true
            origin = "https://[::1]:4433"
            cache_size = "2MB"
            ttl_default = "30s"
            origin_max_age = "0s"
            """)
        #expect(c.edge.enableCaching && c.edge.origin == "https://[::1]:4433")
        #expect(c.edge.cacheSize == 2 << 20 && c.edge.ttlDefault == 30_000_000_000)
        #expect(c.edge.originMaxAge == 0)
        #expect(try ConfigLoader.parse("").edge.originMaxAge == nil)
        #expect(errors("[edge]\norigin_max_age = \"soon\"").first?.key == "edge.origin_max_age")
        #expect(errors("[edge]\nenable_caching = true").first?.key == "edge.origin")
    }

    func errors(_ text: String) -> [ConfigError] {
        do {
            _ = try ConfigLoader.parse(text, source: "t.toml")
            return []
        } catch { return error.errors }
    }

    @Test func refusesIPv4NamingTheKey() {
        let e = errors("[network]\nlisten_addr = \"127.0.0.1:4433\"")
        #expect(e.count == 1)
        #expect(e.first?.key == "network.listen_addr")
        #expect(e.first?.code == .ipv4NotSupported)
        #expect(e.first?.description.contains("IPv6 only") == true)
        #expect(errors("[network]\nlisten_addr = \"[::ffff:1.2.3.4]:1\"").first?.code == .ipv4NotSupported)
        #expect(errors("[edge]\norigin = \"https://10.0.0.1:4433\"").first?.key == "edge.origin")
    }

    /// A datagram, its headers and the TX metadata must fit one UMEM frame when AF_XDP may be used.
    @Test func refusesADatagramTooLargeForAnXDPFrame() throws {
        let xdp = "[network]\ndatapath = \"af_xdp\"\ninterface = \"eth0\"\n"
        let e = errors(xdp + "[network.quic_config]\nmax_udp_payload_size = 1963\n")
        #expect(e.count == 1)
        #expect(e.first?.key == "network.quic_config.max_udp_payload_size")
        #expect(e.first?.description.contains("at most network.xdp.frame_size - 86 = 1962") == true)
        #expect(try ConfigLoader.parse(xdp + "[network.quic_config]\nmax_udp_payload_size = 1962\n").network.quic.maxUDPPayloadSize == 1962)
        #expect(try ConfigLoader.parse(xdp + "[network.xdp]\nframe_size = 4096\n[network.quic_config]\nmax_udp_payload_size = 4010\n")
            .network.quic.maxUDPPayloadSize == 4010)
        // io_uring only: no frame to fit.
        #expect(errors("[network.quic_config]\nmax_udp_payload_size = 4000\n").isEmpty)
    }

    @Test func reportsEveryErrorTogether() {
        let e = errors("""
            [network]
            workers = -1
            cc = "vegas"
            colour = "blue"
            [network.quic_config]
            idle_timeout = "soon"
            max_window = "10XB"
            [bogus]
            x = 1
            """)
        let keys = Set(e.map(\.key))
        #expect(keys == ["network.workers", "network.cc", "network.colour", "network.quic_config.idle_timeout",
                         "network.quic_config.max_window", "bogus"])
        let cc = e.first { $0.key == "network.cc" }!
        #expect(cc.description == "network.cc = \"vegas\": bad value; expected one of \"reno\", \"cubic\", \"bbr\", \"bbr2\"")
        #expect(e.first { $0.key == "network.workers" }?.code == .outOfRange)
        #expect(e.first { $0.key == "network.colour" }?.code == .unknownKey)
    }

    @Test func readsTransparencySettings() throws {
        #expect(NodeConfig.default.trust.requireTransparency == false && NodeConfig.default.trust.transparencyLogs.isEmpty)
        let c = try ConfigLoader.parse("[trust]\nrequire_transparency = true\ntransparency_logs = [\"a.pem\", \"b.pem\"]")
        #expect(c.trust.requireTransparency && c.trust.transparencyLogs == ["a.pem", "b.pem"])
        #expect(errors("[trust]\ntransparency_logs = \"a.pem\"").first?.key == "trust.transparency_logs")
        #expect(errors("[trust]\ntransparency_logs = [\"\"]").first?.key == "trust.transparency_logs")
        #expect(errors("[trust]\nrequire_transparency = \"yes\"").first?.key == "trust.require_transparency")
        // Without its own CA the node must be told which logs to trust.
        let e = errors("[trust]\nmode = \"acme\"\nrequire_transparency = true\n[trust.acme]\ndirectory = \"https://[::1]:1/d\"")
        #expect(e.map(\.key) == ["trust.transparency_logs"])
    }

    @Test func crossChecksChunkSizes() {
        let e = errors("[chunking]\nmin_chunk_size = \"2MB\"\nmax_chunk_size = \"1MB\"")
        #expect(e.first?.key.hasPrefix("chunking.min_chunk_size") == true)
    }

    /// The chunker's own rule: a config that passes check must chunk.
    @Test func refusesChunkSizesTheChunkerWouldRefuse() {
        let e = errors("[chunking]\nmin_chunk_size = \"64KB\"\navg_chunk_size = \"300KB\"\nmax_chunk_size = \"1MB\"")
        #expect(e.count == 1)
        #expect(e.first?.allowed.contains("avg 307200 is not a power of two") == true)
        #expect(errors("[chunking]\nmin_chunk_size = \"256KB\"\navg_chunk_size = \"256KB\"").first?.allowed
            .contains("expected min < avg < max") == true)
    }

    @Test func syntaxErrorsSayWhere() {
        let e = errors("[network\nworkers = 1")
        #expect(e.first?.code == .syntax)
        #expect(e.first?.description.contains("line") == true)
    }

    @Test func unitsParseAndReject() {
        #expect(Units.size("64KB") == 65536)
        #expect(Units.size("1MB") == 1 << 20)
        #expect(Units.size("10GB") == 10 << 30)
        #expect(Units.size("512") == 512)
        #expect(Units.size("10XB") == nil)
        #expect(Units.size("-1MB") == nil)
        #expect(Units.size("1.5.2GB") == nil)
        #expect(Units.duration("1s") == 1_000_000_000)
        #expect(Units.duration("24h") == 86_400_000_000_000)
        #expect(Units.duration("250ms") == 250_000_000)
        #expect(Units.duration("1x") == nil)
        #expect(Units.duration("s") == nil)
    }
}
