import STOQCore
import Testing
@testable import STOQConfig

@Suite struct MeshConfigTests {
    /// A mesh's nodes are verified against `trust.bundle`: every config here names one.
    static let roots = "\n[trust]\nbundle = \"/etc/stoq/mesh-roots.pem\"\n"

    func parse(_ text: String) throws -> NodeConfig { try ConfigLoader.parse(text + Self.roots) }

    func errors(_ text: String) -> [ConfigError] { configErrors(text + Self.roots) }

    /// Without it, a mesh would verify its neighbours and their adverts against the system
    /// store, where any publicly trusted certificate would pass: refused by name.
    @Test func aMeshNeedsTheRootsItsNodesChainTo() {
        do {
            _ = try ConfigLoader.parse("[mesh]\npeers = [\"https://[fd00:57::2]:4433\"]")
            Issue.record("a mesh without trust.bundle was accepted")
        } catch {
            #expect(error.errors.map(\.key) == ["trust.bundle"])
            #expect(error.errors.first?.description.contains("when the node is in a mesh") == true)
        }
    }

    func ep(_ s: String) -> IPv6Endpoint { try! IPv6Endpoint.parse(s).get() }

    @Test func defaults() throws {
        let m = try parse("[mesh]\n").mesh
        #expect(m == NodeConfig.Mesh())
        #expect(m.discovery == .static && m.peers.isEmpty)
        #expect(m.dnsInterval == 30_000_000_000 && m.dnsServer == nil)
        #expect(m.etcdPrefix == "/stoq/mesh/" && m.etcdLeaseTTL == 10_000_000_000)
        #expect(m.probeInterval == 100_000_000 && m.downAfter == 600_000_000)
        #expect(m.flapDamping)
    }

    @Test func readsFlapDamping() throws {
        #expect(try !parse("[mesh]\nflap_damping = false").mesh.flapDamping)
        #expect(try parse("[mesh]\nflap_damping = true").mesh.flapDamping)
        for bad in ["\"false\"", "0", "\"off\""] {
            let e = errors("[mesh]\nflap_damping = \(bad)")
            #expect(e.map(\.key) == ["mesh.flap_damping"] && e.first?.code == .badType, "\(bad)")
            #expect(e.first?.description.contains("true or false") == true, "\(e.first?.description ?? "")")
        }
    }

    /// A configured mesh runs: no notice says it is ignored, and routing's keys take effect.
    @Test func aConfiguredMeshRaisesNoNotice() throws {
        let c = try parse("[mesh]\npeers = [\"https://[fd00:57::2]:4433\"]")
        #expect(c.notices.isEmpty)
        #expect(NodeConfig.default.notices.count == 1 && NodeConfig.default.notices[0].hasPrefix("routing:"))
    }

    @Test func readsStaticPeers() throws {
        let m = try parse(
            """
            [mesh]
            peers = ["https://[fd00:57::2]:4433", "https://[2001:db8::9]:443/"]
            probe_interval = "50ms"
            down_after = "1s"
            """
        ).mesh
        #expect(m.peers == [MeshURL(endpoint: ep("[fd00:57::2]:4433")), MeshURL(endpoint: ep("[2001:db8::9]:443"))])
        #expect(m.peers.map(\.description) == ["https://[fd00:57::2]:4433", "https://[2001:db8::9]:443"])
        #expect(m.probeInterval == 50_000_000 && m.downAfter == 1_000_000_000)
    }

    @Test func readsCutPlainFiles() throws {
        #expect(NodeConfig.default.chunking.cutPlainFiles)
        #expect(try !ConfigLoader.parse("[chunking]\ncut_plain_files = false").chunking.cutPlainFiles)
    }

    @Test func readsDNSAndEtcd() throws {
        let d = try parse(
            """
            [mesh]
            discovery = "dns"
            dns_name = "_stoq._udp.stoq.mesh.svc.cluster.local."
            dns_server = "[::1]:5353"
            dns_interval = "5s"
            """
        ).mesh
        #expect(d.discovery == .dns)
        #expect(d.dnsName == "_stoq._udp.stoq.mesh.svc.cluster.local.")
        #expect(d.dnsServer == ep("[::1]:5353"))
        #expect(d.dnsInterval == 5_000_000_000)
        let e = try parse(
            """
            [mesh]
            discovery = "etcd"
            etcd_endpoints = ["http://[::1]:2379", "http://[fd00::2]:2379"]
            etcd_prefix = "/prod/stoq/"
            etcd_lease_ttl = "3s"
            """
        ).mesh
        #expect(e.discovery == .etcd)
        #expect(e.etcdEndpoints.map(\.description) == ["http://[::1]:2379", "http://[fd00::2]:2379"])
        #expect(e.etcdPrefix == "/prod/stoq/" && e.etcdLeaseTTL == 3_000_000_000)
    }

    @Test func refusesIPv4ByName() {
        let e = errors("[mesh]\npeers = [\"https://[::1]:1\", \"https://10.0.0.1:4433\"]")
        #expect(e.count == 1)
        #expect(e.first?.key == "mesh.peers[1]")
        #expect(e.first?.value == "\"https://10.0.0.1:4433\"")
        #expect(e.first?.code == .ipv4NotSupported)
        #expect(e.first?.description.contains("IPv6 only") == true)
        #expect(errors("[mesh]\npeers = [\"https://[::ffff:10.0.0.1]:4433\"]").first?.code == .ipv4NotSupported)
        #expect(errors("[mesh]\ndiscovery = \"etcd\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]").first?.code == .ipv4NotSupported)
        #expect(errors("[mesh]\ndns_server = \"127.0.0.53:53\"").first?.code == .ipv4NotSupported)
    }

    @Test func refusesMalformedURLsNamingWhy() {
        let cases: [(String, String)] = [
            ("http://[::1]:4433", "https://"),
            ("https://node1.mesh:4433", "not a host name"),
            ("https://[::1]", "port"),
            ("https://[::1]:0", "port 0"),
            ("https://[::]:4433", "[::]"),
            ("https://[ff02::1]:4433", "ff02::1 is a multicast group"),
            ("https://[::1]:4433/objects", "no path"),
            ("https://u@[::1]:4433", "user info"),
        ]
        for (url, why) in cases {
            let e = errors("[mesh]\npeers = [\"\(url)\"]")
            #expect(e.count == 1, "\(url)")
            #expect(e.first?.key == "mesh.peers[0]")
            #expect(e.first?.code == .badValue)
            #expect(e.first?.description.contains(why) == true, "\(url): \(e.first?.description ?? "")")
        }
        #expect(errors("[mesh]\npeers = \"https://[::1]:1\"").first?.code == .badType)
        #expect(errors("[mesh]\npeers = [1]").first?.key == "mesh.peers[0]")
        let twice = errors("[mesh]\npeers = [\"https://[::1]:1\", \"https://[0::1]:1\"]")
        #expect(twice.first?.key == "mesh.peers[1]")
        #expect(twice.first?.description.contains("listed twice") == true)
    }

    @Test func requiredKeysPerBackend() {
        let dns = errors("[mesh]\ndiscovery = \"dns\"")
        #expect(dns.map(\.key) == ["mesh.dns_name"])
        #expect(dns.first?.description.contains("mesh.discovery = \"dns\"") == true)
        // A name refused on its own is one error, not that and "dns_name is empty".
        let bad = errors("[mesh]\ndiscovery = \"dns\"\ndns_name = \"a..b\"")
        #expect(bad.map(\.key) == ["mesh.dns_name"] && bad.first?.description.contains("empty label") == true)
        let etcd = errors("[mesh]\ndiscovery = \"etcd\"")
        #expect(etcd.map(\.key) == ["mesh.etcd_endpoints"])
        let mixed = errors("[mesh]\ndiscovery = \"dns\"\ndns_name = \"a.b\"\npeers = [\"https://[::1]:1\"]")
        #expect(mixed.map(\.key) == ["mesh.peers"])
        let unknown = errors("[mesh]\ndiscovery = \"consul\"")
        #expect(unknown.first?.key == "mesh.discovery")
        #expect(unknown.first?.description.contains("\"static\", \"dns\", \"etcd\"") == true)
    }

    @Test func refusesBadValues() {
        #expect(errors("[chunking]\ncut_plain_files = \"yes\"").map(\.key) == ["chunking.cut_plain_files"])
        // The key's old home names its new one.
        let moved = errors("[mesh]\ncut_plain_files = false")
        #expect(moved.map(\.key) == ["mesh.cut_plain_files"] && moved.first?.code == .unknownKey)
        #expect(moved.first?.description.contains("it moved to chunking.cut_plain_files") == true)
        #expect(errors("[mesh]\ndown_after = \"100ms\"").map(\.key) == ["mesh.down_after"])
        #expect(
            errors("[mesh]\nprobe_interval = \"1s\"\ndown_after = \"1s\"").first?.description
                .contains("more than mesh.probe_interval (1000ms)") == true)
        #expect(errors("[mesh]\netcd_lease_ttl = \"2500ms\"").first?.description.contains("whole seconds") == true)
        #expect(errors("[mesh]\netcd_lease_ttl = \"1s\"").first?.code == .outOfRange)
        #expect(errors("[mesh]\ndns_interval = \"10ms\"").first?.code == .outOfRange)
        #expect(errors("[mesh]\netcd_prefix = \"/stoq/mesh\"").first?.key == "mesh.etcd_prefix")
        #expect(errors("[mesh]\netcd_prefix = \"/a b/\"").first?.key == "mesh.etcd_prefix")
        #expect(errors("[mesh]\ndns_server = \"[::1]:0\"").first?.key == "mesh.dns_server")
        #expect(errors("[mesh]\ndns_server = \"[::]:53\"").first?.key == "mesh.dns_server")
        #expect(errors("[mesh]\ndns_name = \"a..b\"").first?.description.contains("empty label") == true)
        #expect(errors("[mesh]\ndns_name = \"a b.c\"").first?.key == "mesh.dns_name")
        #expect(errors("[mesh]\ndns_name = \"\(String(repeating: "x", count: 64)).c\"").first?.description.contains("63") == true)
        #expect(errors("[mesh]\nseeds = []").first?.code == .unknownKey)
    }
}
