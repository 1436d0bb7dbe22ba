import Foundation
import Logging
import STOQChunking
import STOQCore
import STOQQUIC
import Testing
import TOMLKit
@testable import STOQConfig

@Suite struct ConfigLoaderTests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path
    static let seedFile = repository + "/config/node.toml"

    /// config/node.toml shows every key with its default: loaded, it is the one definition
    /// (`NodeConfig()`, whose transport part is `QUICSettings()`).
    @Test func seedFileIsTheDefault() throws {
        #expect(try ConfigLoader.load(path: Self.seedFile) == NodeConfig.default)
        #expect(NodeConfig.default.network.quic == QUICSettings())
    }

    /// …and it documents every key the loader reads, and no other.
    @Test func seedFileDocumentsEveryKey() throws {
        let text = try String(contentsOfFile: Self.seedFile, encoding: .utf8)
        var inFile: Set<String> = []
        func flatten(_ t: TOMLTable, _ prefix: String) {
            for k in t.keys {
                let key = prefix.isEmpty ? k : prefix + "." + k
                // access.read's keys are path prefixes, not config keys: the table is one value.
                if let sub = t[k]?.table, key != "access.read" { flatten(sub, key) } else { inFile.insert(key) }
            }
        }
        flatten(try TOMLTable(string: text), "")
        let known = ConfigLoader.knownKeys
        let leaves = Set(known.filter { k in !known.contains { $0.hasPrefix(k + ".") } })
        // Optional with no default: shown commented out.
        #expect(text.contains("# origin_max_age = "))
        let expected = leaves.subtracting(["edge.origin_max_age"])
        #expect(inFile == expected, "undocumented: \(expected.subtracting(inFile).sorted()); unknown: \(inFile.subtracting(expected).sorted())")
    }

    /// Each profile's line in config/node.toml, read as TOML, is exactly what the profile sets.
    @Test func profilesAreDocumentedWithTheValuesTheySet() throws {
        let text = try String(contentsOfFile: Self.seedFile, encoding: .utf8)
        var documented: Set<String> = []
        for line in text.split(separator: "\n") where line.hasPrefix("#   profile \"") {
            let rest = line.dropFirst("#   profile \"".count)
            let name = String(rest.prefix { $0 != "\"" })
            let assignments = rest.drop { $0 != ":" }.dropFirst().split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
            let profile = try #require(QUICProfile(rawValue: name), "node.toml documents an unknown profile \(name)")
            documented.insert(name)
            let asTable = try ConfigLoader.parse("[network.quic_config]\n" + assignments.joined(separator: "\n"))
            let named = try ConfigLoader.parse("[network]\nquic_config = \"\(name)\"")
            var settings = QUICSettings()
            profile.apply(to: &settings)
            #expect(named.network.quic == asTable.network.quic, "profile \(name)")
            #expect(named.network.quic == settings, "profile \(name)")
        }
        #expect(documented == Set(QUICProfile.allCases.map(\.rawValue)))
    }

    @Test func quicConfigTakesAProfileOrATableStartingFromOne() throws {
        let hp = try ConfigLoader.parse("[network]\nquic_config = \"high_performance\"\ncc = \"bbr2\"").network.quic
        #expect(hp.maxWindow == 256 << 20 && hp.initialMaxData == 64 << 20 && hp.maxStreamsBidi == 1024)
        #expect(hp.congestionControl == .bbr2 && hp.idleTimeout == QUICSettings().idleTimeout)
        let t = try ConfigLoader.parse("[network.quic_config]\nprofile = \"low_memory\"\nmax_window = \"8MB\"").network.quic
        #expect(t.maxWindow == 8 << 20 && t.initialMaxData == 1 << 20 && t.idleTimeout == 15_000_000_000)
        let e = errors("[network]\nquic_config = \"fast\"")
        #expect(e.map(\.key) == ["network.quic_config"])
        #expect(e.first?.allowed.contains("\"high_performance\"") == true)
        #expect(errors("[network]\nquic_config = 3").first?.code == .badType)
        #expect(errors("[network.quic_config]\nprofile = \"fast\"").map(\.key) == ["network.quic_config.profile"])
    }

    /// `[tls]` session tickets and 0-RTT land in the QUIC settings the workers get.
    @Test func sessionTicketKeysAreValidatedByName() throws {
        let d = NodeConfig.default.network.quic
        #expect(d.sessionTickets && d.earlyData && d.ticketLifetime == 24 * 3_600_000_000_000)
        let q = try ConfigLoader.parse("[tls]\nsession_tickets = false\nticket_lifetime = \"1h\"\nearly_data = false").network.quic
        #expect(!q.sessionTickets && !q.earlyData && q.ticketLifetime == 3_600_000_000_000)
        let long = errors("[tls]\nticket_lifetime = \"169h\"")
        #expect(long.map(\.key) == ["tls.ticket_lifetime"] && long.first?.code == .outOfRange)
        #expect(errors("[tls]\nsession_tickets = \"yes\"").first?.code == .badType)
        #expect(errors("[tls]\nearly_data = 1").map(\.key) == ["tls.early_data"])
    }

    /// Every choice is a type once loaded; nothing downstream parses a config word again.
    @Test func choicesAreParsedIntoTheirTypes() throws {
        let c = try ConfigLoader.parse(
            """
            [network]
            cc = "reno"
            datapath = "io_uring"
            client_auth = "optional"
            xdp_mode = "skb"
            zero_copy = "off"
            [trust]
            mode = "embedded"
            [routing]
            algorithm = "ml_optimized"
            [chunking]
            algorithm = "fixed"
            [log]
            level = "debug"
            """)
        #expect(c.network.quic.congestionControl == .reno && c.network.datapath == .ioURing)
        #expect(c.network.clientAuth == .optional && c.network.xdpMode == .skb && c.network.zeroCopy == .off)
        #expect(c.trust.mode == .embedded && c.routing.algorithm == .mlOptimized)
        #expect(c.chunking.algorithm == .fixed && c.log.level == .debug)
        #expect(errors("[log]\nlevel = \"loud\"").first?.key == "log.level")
        #expect(
            errors("[routing]\nalgorithm = \"random\"").first?.allowed
                == "one of \"shortest_path\", \"latency\", \"adaptive\", \"ml_optimized\"")
    }

    /// The operator's file from issue #17, as written: valid, with a notice for each thing
    /// that needs the mesh.
    @Test func operatorsConfigFromTheIssueIsValid() throws {
        let c = try ConfigLoader.load(path: Self.repository + "/Tests/fixtures/operator-node.toml")
        #expect(c.network.listenAddress == IPv6Endpoint(address: .any, port: 8443))
        #expect(c.network.quic.maxConnections == 100_000)
        var hp = QUICSettings()
        QUICProfile.highPerformance.apply(to: &hp)
        hp.maxConnections = 100_000
        #expect(c.network.quic == hp)
        #expect(c.routing == NodeConfig.Routing(algorithm: .mlOptimized, updateInterval: 1_000_000_000, maxHops: 8))
        #expect(c.chunking.algorithm == .contentAware && c.chunking.minChunkSize == 64 << 10 && c.chunking.maxChunkSize == 1 << 20)
        #expect(c.edge.enableCaching && c.edge.origin.isEmpty && c.edge.cacheSize == 10 << 30 && c.edge.ttlDefault == 3_600_000_000_000)
        #expect(c.notices.count == 2)
        #expect(c.notices.first?.hasPrefix("routing: algorithm = ml_optimized, update_interval and max_hops have no effect without a mesh") == true)
        #expect(c.notices.last?.hasPrefix("edge: enable_caching = true with neither edge.origin nor [mesh]") == true)
        #expect(NodeConfig.default.notices.count == 1)  // routing only
    }

    @Test func filesTheNodeReadsAtStartMustBeThere() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("stoq-cfg-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(FileManager.default.createFile(atPath: dir + "/root.pem", contents: Data("x".utf8)))
        let text = """
            [node]
            data_dir = "\(dir)/data"
            [tls]
            cert_file = "\(dir)/data/identity/cert.pem"
            key_file = "\(dir)/data/../data/identity/key.pem"
            [trust]
            bundle = "\(dir)/root.pem"
            transparency_logs = ["\(dir)/log.pem", "\(dir)"]
            [admin]
            auth = "token"
            token_file = "\(dir)/token"
            """
        #expect(FileManager.default.createFile(atPath: dir + "/node.toml", contents: Data(text.utf8)))
        // parse() reads text only; load(path:) checks the files too, every missing one named, but
        // not those under data_dir (the node makes its own files there at start).
        let c = try ConfigLoader.parse(text)
        #expect(ConfigLoader.unreadableFiles(c).map(\.key) == ["admin.token_file", "trust.transparency_logs", "trust.transparency_logs"])
        let errors = #expect(throws: ConfigErrors.self) { try ConfigLoader.load(path: dir + "/node.toml") }
        #expect(
            errors?.errors.map(\.description) == [
                "admin.token_file = \"\(dir)/token\": io; expected a readable file: no such file",
                "trust.transparency_logs = \"\(dir)/log.pem\": io; expected a readable file: no such file",
                "trust.transparency_logs = \"\(dir)\": io; expected a readable file: a directory, not a file",
            ])
        // A token file the node never reads (auth is not "token") is not asked for: a notice says it has no effect.
        let mtls = try ConfigLoader.parse(text.replacingOccurrences(of: "auth = \"token\"", with: "auth = \"mtls\""))
        #expect(!ConfigLoader.unreadableFiles(mtls).map(\.key).contains("admin.token_file"))
        #expect(mtls.notices.contains("admin: token_file has no effect unless auth = \"token\" (it is \"mtls\")"))
    }

    /// Keys set where they do nothing say so, rather than being silently ignored.
    @Test func keysThatDoNothingWhereTheyAreSaySo() throws {
        let c = try ConfigLoader.parse(
            """
            [network]
            client_auth = "none"
            [tls]
            session_tickets = false
            early_data = true
            [edge]
            origin = "https://[2001:db8::1]:4433"
            enable_caching = false
            [limits]
            requests_per_second = 100
            [mesh]
            peers = ["https://[fd00:57::2]:4433"]
            [trust]
            bundle = "/etc/stoq/mesh-roots.pem"
            """)
        let n = c.notices.map { String($0.prefix(while: { $0 != ":" })) }
        #expect(Set(n) == ["limits", "edge", "tls"], "\(c.notices)")
    }

    /// A fixed certificate wins over trust.mode = "acme": the node asks no ACME server, and said
    /// nothing about it.
    @Test func acmeBesideAFixedCertificateSaysItIsUnused() throws {
        let acme = "[trust]\nmode = \"acme\"\n[trust.acme]\ndirectory = \"https://[::1]:14000/dir\"\n"
        let fixed = try ConfigLoader.parse("[tls]\ncert_file = \"/etc/stoq/cert.pem\"\nkey_file = \"/etc/stoq/key.pem\"\n" + acme)
        #expect(
            fixed.notices.contains(
                "trust: mode = \"acme\" has no effect while tls.cert_file is set: the node serves that fixed certificate and asks no ACME server ([trust.acme] is unused)"
            ), "\(fixed.notices)")
        #expect(try !ConfigLoader.parse(acme).notices.contains { $0.hasPrefix("trust:") })
    }

    @Test func emptyFileIsTheDefault() throws {
        #expect(try ConfigLoader.parse("") == NodeConfig.default)
    }

    @Test func readsValues() throws {
        let c = try ConfigLoader.parse(
            """
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
        #expect(c.network.quic.congestionControl == .bbr)
        #expect(c.network.quic.maxWindow == 128 << 20)
        #expect(c.network.quic.idleTimeout == 5_000_000_000)
        #expect(c.storage.path == "/srv/objects")
    }

    @Test func readsTheEdgeKeys() throws {
        let c = try ConfigLoader.parse(
            """
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
        #expect(errors("[edge]\nenable_caching = true").isEmpty)  // a notice, not an error (operatorsConfigFromTheIssueIsValid)
    }

    func errors(_ text: String) -> [ConfigError] { configErrors(text) }

    @Test func multipathSchedulerIsAScheduleNotAFixedSplit() throws {
        #expect(try ConfigLoader.parse("[routing]\nmultipath_scheduler = \"round_robin\"").routing.multipathScheduler == .roundRobin)
        let e = errors("[routing]\nmultipath_scheduler = \"fixed_split\"")
        #expect(e.count == 1 && e.first?.key == "routing.multipath_scheduler")
        #expect(e.first?.allowed == "one of \"ml_optimized\", \"min_rtt\", \"round_robin\", \"best_single\"")
    }

    @Test func refusesIPv4NamingTheKey() {
        let e = errors("[network]\nlisten_addr = \"127.0.0.1:4433\"")
        #expect(e.count == 1)
        #expect(e.first?.key == "network.listen_addr")
        #expect(e.first?.code == .ipv4NotSupported)
        #expect(e.first?.description.contains("IPv6 only") == true)
        #expect(errors("[network]\nlisten_addr = \"[::ffff:1.2.3.4]:1\"").first?.code == .ipv4NotSupported)
        #expect(errors("[edge]\norigin = \"https://10.0.0.1:4433\"").first?.key == "edge.origin")
        #expect(errors("[edge]\norigin = \"https://[::ffff:10.0.0.1]:4433\"").first?.code == .ipv4NotSupported)
    }

    /// `edge.origin` is a node's URL, as a mesh peer's: a path, port 0, [::] or a multicast
    /// group was taken, and failed (or went nowhere) only at the first miss.
    @Test func anEdgeOriginIsANodesURL() {
        for bad in ["https://[::1]:4433/objects", "https://[::1]:0", "https://[::]:4433", "https://[ff02::1]:4433", "https://[::1]"] {
            let e = errors("[edge]\norigin = \"\(bad)\"")
            #expect(e.count == 1 && e.first?.key == "edge.origin" && e.first?.code == .badValue, "\(bad): \(e)")
        }
        #expect(errors("[edge]\norigin = \"https://[::1]:4433/\"").isEmpty)
    }

    /// External account binding: both keys or neither, and the HMAC key is base64url; the
    /// ACME server's root (`trust.acme.ca`) is a file that must be there at start.
    @Test func externalAccountBindingAndTheACMERootAreChecked() {
        let acme = "[trust]\nmode = \"acme\"\n[trust.acme]\ndirectory = \"https://[::1]:14000/dir\"\n"
        #expect(errors(acme + "eab_kid = \"kid-1\"\n").map(\.key) == ["trust.acme.eab_hmac_key"])
        #expect(errors(acme + "eab_hmac_key = \"c2VjcmV0\"\n").map(\.key) == ["trust.acme.eab_kid"])
        let bad = errors(acme + "eab_kid = \"kid-1\"\neab_hmac_key = \"c2Vj+cmV0\"\n")
        #expect(bad.map(\.key) == ["trust.acme.eab_hmac_key"] && bad.first?.value.contains("c2Vj") == false, "\(bad)")
        #expect(errors(acme + "eab_kid = \"kid-1\"\neab_hmac_key = \"c2VjcmV0LWtleS0xMjM0NTY3ODkw_-\"\n").isEmpty)
        var config = try! ConfigLoader.parse(acme + "ca = \"/nonexistent/pebble.minica.pem\"\n")
        #expect(ConfigLoader.unreadableFiles(config).map(\.key) == ["trust.acme.ca"])
        config.trust.mode = .embedded
        #expect(ConfigLoader.unreadableFiles(config).isEmpty)
    }

    /// A received datagram must fit one UMEM frame after the kernel's 256-byte XDP headroom and
    /// its Ethernet/VLAN/IPv6/UDP headers when AF_XDP may be used (1962 was accepted and such a
    /// datagram could never arrive).
    @Test func refusesADatagramTooLargeForAnXDPFrame() throws {
        let xdp = "[network]\ndatapath = \"af_xdp\"\ninterface = \"eth0\"\n"
        let e = errors(xdp + "[network.quic_config]\nmax_udp_payload_size = 1727\n")
        #expect(e.count == 1)
        #expect(e.first?.key == "network.quic_config.max_udp_payload_size")
        #expect(e.first?.description.contains("at most network.xdp.frame_size 2048 - 256 (the kernel's XDP headroom) - 66") == true)
        #expect(e.first?.description.contains("= 1726") == true)
        #expect(!errors(xdp + "[network.quic_config]\nmax_udp_payload_size = 1962\n").isEmpty)
        #expect(try ConfigLoader.parse(xdp + "[network.quic_config]\nmax_udp_payload_size = 1726\n").network.quic.maxUDPPayloadSize == 1726)
        #expect(!errors(xdp + "[network.xdp]\nframe_size = 4096\n[network.quic_config]\nmax_udp_payload_size = 3775\n").isEmpty)
        #expect(
            try ConfigLoader.parse(xdp + "[network.xdp]\nframe_size = 4096\n[network.quic_config]\nmax_udp_payload_size = 3774\n")
                .network.quic.maxUDPPayloadSize == 3774)
        // io_uring only: no frame to fit.
        #expect(errors("[network.quic_config]\nmax_udp_payload_size = 4000\n").isEmpty)
    }

    @Test func reportsEveryErrorTogether() {
        let e = errors(
            """
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
        #expect(
            keys == [
                "network.workers", "network.cc", "network.colour", "network.quic_config.idle_timeout",
                "network.quic_config.max_window", "bogus",
            ])
        let cc = e.first { $0.key == "network.cc" }!
        #expect(cc.description == "network.cc = \"vegas\": bad value; expected one of \"reno\", \"cubic\", \"bbr\", \"bbr2\"")
        #expect(e.first { $0.key == "network.workers" }?.code == .outOfRange)
        #expect(e.first { $0.key == "network.colour" }?.code == .unknownKey)
    }

    /// A worker's id is one byte of its connection IDs: 256 workers at most, refused in the
    /// config rather than trapping when the node builds its workers.
    @Test func workersStopAtWhatAConnectionIDCanName() throws {
        #expect(try ConfigLoader.parse("[network]\nworkers = 256\n").network.workers == 256)
        let e = errors("[network]\nworkers = 257\n")
        #expect(e.map(\.key) == ["network.workers"] && e.first?.code == .outOfRange)
        #expect(e.first?.description.contains("257") == true)
    }

    /// An advert lives three update intervals and an hour at most: a longer interval would
    /// leave the node with no advert it may sign. Routes stop at the search's hop limit.
    @Test func routingStopsWhereAdvertsAndRoutesDo() throws {
        #expect(try ConfigLoader.parse("[routing]\nupdate_interval = \"20m\"\nmax_hops = 63\n").routing.maxHops == 63)
        let e = errors("[routing]\nupdate_interval = \"21m\"\nmax_hops = 64\n")
        #expect(Set(e.map(\.key)) == ["routing.update_interval", "routing.max_hops"])
        #expect(e.allSatisfy { $0.code == .outOfRange })
    }

    @Test func aBareNumberForADurationIsToldToTakeAUnit() throws {
        let e = errors("[network]\ndrain_timeout = 5\n")
        #expect(e.map(\.key) == ["network.drain_timeout"] && e.first?.code == .badType)
        #expect(e.first?.description.hasSuffix("a bare number has no unit: quote it with one, e.g. \"5ms\" or \"5s\"") == true)
        #expect(errors("[network]\ndrain_timeout = 1.5\n").first?.code == .badType)
        #expect(try ConfigLoader.parse("[network]\ndrain_timeout = \"0s\"").network.drainTimeout == 0)
        #expect(NodeConfig.default.network.drainTimeout == 15_000_000_000)
        #expect(errors("[network]\ndrain_timeout = \"11m\"\n").first?.code == .outOfRange)
    }

    /// Port 0 (a free port at each start) serves a test node; a mesh or XDP needs a fixed one.
    @Test func port0IsRefusedWhereOthersMustKnowThePort() throws {
        #expect(try ConfigLoader.parse("[network]\nlisten_addr = \"[::1]:0\"").network.listenAddress.port == 0)
        let mesh = errors("[network]\nlisten_addr = \"[::]:0\"\n[mesh]\npeers = [\"https://[fd00::2]:4433\"]\n[trust]\nbundle = \"r.pem\"\n")
        #expect(
            mesh.map(\.description) == [
                "network.listen_addr = \"[::]:0\": bad value; expected a fixed port, e.g. \"[::]:4433\" (port 0 picks a new one at each start, and mesh peers reach this node on it)"
            ])
        let xdp = errors("[network]\nlisten_addr = \"[::]:0\"\ninterface = \"eth0\"\n")
        #expect(xdp.map(\.key) == ["network.listen_addr"])
        #expect(xdp.first?.description.hasSuffix("the XDP program on network.interface steers it)") == true)
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

    @Test func readsTheCipherSuitesByTheShimsNames() throws {
        #expect(NodeConfig.default.tls.cipherSuites == ["AES-128-GCM", "AES-256-GCM", "CHACHA20-POLY1305", "AES-128-CCM"])
        let c = try ConfigLoader.parse("[tls]\ncipher_suites = [\"aes-256-gcm\", \"TLS_AES_128_GCM_SHA256\"]")
        #expect(c.tls.cipherSuites == ["aes-256-gcm", "TLS_AES_128_GCM_SHA256"])
        let allowed =
            "a non-empty array of \"AES-128-GCM\", \"AES-256-GCM\", \"CHACHA20-POLY1305\", \"AES-128-CCM\" (or their IANA names), each once"
        for (toml, shown, code) in [
            ("[\"AES-128-GCM\", \"AES-128-CCM-8\"]", "\"AES-128-CCM-8\"", ConfigError.Code.badValue),
            ("[\"AES-128-GCM:AES-256-GCM\"]", "\"AES-128-GCM:AES-256-GCM\"", .badValue),
            ("[\"AES-128-GCM\", \"TLS_AES_128_GCM_SHA256\"]", "\"TLS_AES_128_GCM_SHA256\"", .badValue),
            ("[]", "[]", .badType),
            ("\"AES-128-GCM\"", "\"AES-128-GCM\"", .badType),
        ] {
            let e = errors("[tls]\ncipher_suites = \(toml)")
            #expect(e == [ConfigError(code: code, key: "tls.cipher_suites", value: shown, allowed: allowed)], "\(toml)")
        }
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
        #expect(
            errors("[chunking]\nmin_chunk_size = \"256KB\"\navg_chunk_size = \"256KB\"").first?.allowed
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

    /// Found by `scripts/fuzz config` (Tests/Fuzz/corpus/config/regression-*): a table header
    /// whose key does not start with a key character, or `}` where an array expects a value,
    /// made toml++ abort on an assertion (debug) or reach an optimiser assumption that is false
    /// (release). Each is now a syntax error naming the line, before TOMLKit sees the text.
    @Test(arguments: ["[.", "[.]", "[[.]]", "[ .a]", "[\t.", "[\n", "log.level = \"info\"\n[[\n", "[a]\nx = 1\n[ {"])
    func tableHeaderWithoutAKeyIsASyntaxError(_ text: String) {
        let line = text.split(separator: "\n", omittingEmptySubsequences: false).firstIndex { $0.hasPrefix("[") && !$0.hasPrefix("[a]") }! + 1
        #expect {
            _ = try ConfigLoader.parse(text, source: "t.toml")
        } throws: { error in
            guard let e = error as? ConfigErrors, e.errors.count == 1 else { return false }
            return e.errors[0].code == .syntax && e.errors[0].allowed.hasPrefix("TOML syntax error at line \(line): a table header")
        }
    }

    /// Found by `scripts/fuzz config` (regression-quote-run-header): a string that ends in a
    /// run of quotes, or is not closed, hid the header on the next line from the check.
    @Test(arguments: [
        "a = \"\"\"x\"\"\"\"\n[$b]\n", "a = '''x'''''\n[$b]\n", "a = \"x\n[$b]\n", "a = \"x\\\n[$b]\n",
        "[x]\na = \"\"\"\"\n[$b]\nm = \"e\"\n[x.y]\na = \"\"\"\"\n[$b]\n",
    ])
    func headerAfterAQuoteRunIsChecked(_ text: String) {
        let line = text.split(separator: "\n", omittingEmptySubsequences: false).lastIndex { $0 == "[$b]" }! + 1
        #expect(ConfigLoader.tomlHazard(text)?.line == line)
        #expect(throws: ConfigErrors.self) { _ = try ConfigLoader.parse(text, source: "t.toml") }
    }

    /// A byte order mark does not hide a header from the check (toml++ skips it too).
    @Test func tableHeaderAfterAByteOrderMarkIsChecked() {
        #expect(ConfigLoader.tomlHazard("\u{FEFF}[{")?.line == 1)
        #expect(ConfigLoader.tomlHazard("\u{FEFF}[log]\nlevel = \"info\"\n") == nil)
    }

    @Test(arguments: ["s=[}", "s=[1,}", "s=[\n}", "s=[ # c\n}", "s=[[}]]", "a = 1\ns={a=[}]}"])
    func arrayValueStartingWithABraceIsASyntaxError(_ text: String) {
        let line = text.split(separator: "\n", omittingEmptySubsequences: false).lastIndex { $0.contains("}") }! + 1
        #expect {
            _ = try ConfigLoader.parse(text, source: "t.toml")
        } throws: { error in
            guard let e = error as? ConfigErrors, e.errors.count == 1 else { return false }
            return e.errors[0].code == .syntax && e.errors[0].allowed == "TOML syntax error at line \(line): an array value cannot start with '}'"
        }
    }

    /// The checks look at headers and array values only: brackets inside values, strings and comments, and
    /// well-formed headers, pass through to TOMLKit unchanged.
    @Test func tableHeaderCheckLeavesValuesAlone() throws {
        let text = """
            # [. not a header
            [log]
            level = "info"  # [ .
            [mesh]
            peers = [
              "https://[fd00::1]:4433",
            ]
            [ "trust" ]
            mode = "embedded"
            bundle = "/etc/stoq/mesh-roots.pem"
            """
        #expect(ConfigLoader.tomlHazard(text) == nil)
        #expect(ConfigLoader.tomlHazard("x = \"\"\"\n[.\n\"\"\"\n") == nil)
        #expect(ConfigLoader.tomlHazard("x = [\n[\n1]]\n") == nil)
        #expect(ConfigLoader.tomlHazard("x = [{a = 1}, {b = \"}\"}]\ny = []\n") == nil)
        #expect(ConfigLoader.tomlHazard("x = \"\"\"a\"\"\"\"\"\ny = [1]\n[z]\n") == nil)
        _ = try ConfigLoader.parse(text)
    }
}
