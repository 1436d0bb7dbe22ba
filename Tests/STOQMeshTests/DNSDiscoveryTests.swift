import Foundation
import STOQTestSupport
import Logging
import STOQConfig
import STOQCore
import Testing
@testable import STOQMesh

/// The DNS backend against Debian's dnsmasq, and its answer parser against hostile bytes.
@Suite struct DNSDiscoveryTests {
    // MARK: the parser, on crafted answers

    static func name(_ n: String) -> [UInt8] {
        n.split(separator: ".").flatMap { [UInt8($0.utf8.count)] + Array($0.utf8) } + [0]
    }

    /// A response to `q`: its header with `flags` and counts, the question, then `records` raw.
    static func response(to q: [UInt8], flags: UInt16 = 0x8180, an: UInt16, ar: UInt16 = 0, _ records: [UInt8]) -> [UInt8] {
        var m =
            Array(q[0..<2]) + [
                UInt8(flags >> 8), UInt8(flags & 0xFF), 0, 1, UInt8(an >> 8), UInt8(an & 0xFF), 0, 0,
                UInt8(ar >> 8), UInt8(ar & 0xFF),
            ]
        // The question as sent, without the query's OPT record (11 bytes at the end).
        m += q[12..<(q.count - 11)]
        return m + records
    }

    static func aaaa(owner: [UInt8], _ last: UInt8, length: UInt16 = 16) -> [UInt8] {
        owner + [0, 28, 0, 1, 0, 0, 0, 30, UInt8(length >> 8), UInt8(length & 0xFF)] + [0xFD, 0, 0, 0x57] + [UInt8](repeating: 0, count: 11) + [last]
    }

    static func parse(_ bytes: [UInt8], _ q: [UInt8], _ name: String, type: UInt16 = 28) -> Result<DNSMessage.Response, DiscoveryError> {
        let id = UInt16(q[0]) << 8 | UInt16(q[1])
        do { return .success(try DNSMessage.parse(bytes, id: id, name: name, type: type)) } catch { return .failure(error) }
    }

    @Test func parsesAnswersWithCompression() throws {
        let q = DNSMessage.query(id: 0xBEEF, name: "stoq.test.", type: DNSMessage.typeAAAA)
        // Owner "stoq.test" as a pointer to the question name at offset 12.
        let ok = Self.response(to: q, an: 2, Self.aaaa(owner: [0xC0, 12], 1) + Self.aaaa(owner: [0xC0, 12], 2))
        let r = try Self.parse(ok, q, "stoq.test").get()
        #expect(r.answers.map(\.owner) == ["stoq.test", "stoq.test"])
        #expect(r.answers.map(\.data) == [.aaaa(IPv6Address("fd00:57::1")!), .aaaa(IPv6Address("fd00:57::2")!)])
    }

    @Test func refusesHostileAnswersNamingWhy() {
        let q = DNSMessage.query(id: 0x1234, name: "stoq.test", type: DNSMessage.typeAAAA)
        let good = Self.aaaa(owner: [0xC0, 12], 1)
        let cases: [(String, [UInt8])] = [
            ("shorter than a header", Array(q[0..<5])),
            ("id 4661, expected 4660", [0x12, 0x35] + Self.response(to: q, an: 1, good).dropFirst(2)),
            ("not a response", Self.response(to: q, flags: 0x0100, an: 1, good)),
            ("cannot fit", Self.response(to: q, an: 40, good)),
            ("does not point backwards", Self.response(to: q, an: 1, Self.aaaa(owner: [0xC0, 40], 1))),
            // A pointer to itself: the classic decompression loop.
            ("does not point backwards", Self.response(to: q, an: 1, Self.aaaa(owner: [0xC0, 27], 1))),
            ("AAAA data is 4 bytes", Self.response(to: q, an: 1, Array(Self.aaaa(owner: [0xC0, 12], 1, length: 4).prefix(16)))),
            ("runs past the message", Self.response(to: q, an: 1, Array(good.dropLast(3)))),
            ("after the last record", Self.response(to: q, an: 1, good + [0])),
            ("not the one asked", Self.response(to: DNSMessage.query(id: 0x1234, name: "other.test", type: 28), an: 1, good)),
            ("label type 0x40", Self.response(to: q, an: 1, [0x41] + Array(good.dropFirst(2)))),
            (
                "longer than 255",
                Self.response(
                    to: q, an: 1,
                    [UInt8](repeating: 0, count: 0) + (0..<5).flatMap { _ in [63] + [UInt8](repeating: 0x61, count: 63) } + [0]
                        + Array(good.dropFirst(2)))
            ),
            ("not printable", Self.response(to: q, an: 1, [1, 0x00, 0] + Array(good.dropFirst(2)))),
        ]
        for (why, bytes) in cases {
            switch Self.parse(bytes, q, "stoq.test") {
            case .success: Issue.record("accepted a message that is \(why)")
            case .failure(let e):
                #expect(e.code == .malformed, "\(why)")
                #expect(e.detail.contains(why), "\(why): \(e.detail)")
            }
        }
    }

    /// Random bytes and every truncation of a real answer: refused, never a crash or a hang.
    @Test func survivesGarbage() {
        let q = DNSMessage.query(id: 7, name: "stoq.test", type: DNSMessage.typeAAAA)
        let ok = Self.response(to: q, an: 1, Self.aaaa(owner: [0xC0, 12], 1))
        for n in 0..<ok.count { #expect((try? DNSMessage.parse(Array(ok.prefix(n)), id: 7, name: "stoq.test", type: 28)) == nil) }
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<20_000 {
            var b = ok
            for _ in 0..<Int.random(in: 1...6, using: &rng) { b[Int.random(in: 0..<b.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng) }
            _ = try? DNSMessage.parse(b, id: 7, name: "stoq.test", type: 28)
        }
    }

    @Test func refusesAddressesNoMemberCanHave() {
        for bad in ["::", "ff02::1", "fe80::1"] { #expect(DNSDiscovery.refusal(IPv6Address(bad)!) == "bad_address", "\(bad)") }
        var mapped = IPv6Address.loopback
        mapped.bytes = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 10, 0, 0, 1)
        #expect(DNSDiscovery.refusal(mapped) == "bad_address")
        #expect(DNSDiscovery.refusal(IPv6Address("fd00:57::1")!) == nil)
        #expect(DNSDiscovery.refusal(.loopback) == nil)
    }

    @Test func readsResolvConf() {
        let text = """
            # generated
            search cluster.local
            nameserver fd00::a ; the first
            nameserver 10.96.0.10
            options ndots:5
            nameserver ::1
            nameserver ::2
            """
        #expect(ResolvConf.nameservers(text).map(\.description) == ["[fd00::a]:53", "[::ffff:10.96.0.10]:53", "[::1]:53"])
    }

    // MARK: against dnsmasq

    static func dnsmasq(port: UInt16, dir: URL, records: [String]) throws -> Daemon {
        let bin = try requireBinary("/usr/sbin/dnsmasq", package: "dnsmasq")
        let d = try Daemon(
            bin,
            [
                "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--pid-file=",
                "--port=\(port)", "--listen-address=::1", "--bind-interfaces", "--local=/stoq.test/",
                "--log-queries", "--log-facility=-",
            ] + records, dir: dir, name: "dnsmasq")
        // Ready when it answers on TCP (it binds UDP and TCP together).
        let ready = (0..<100).contains { _ in
            let fd = socket(AF_INET6, Int32(SOCK_STREAM.rawValue), 0)
            defer { close(fd) }
            var sa = IPv6Endpoint(address: .loopback, port: port).sockaddr
            let ok = withUnsafePointer(to: &sa) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) == 0 }
            }
            if !ok { usleep(50_000) }
            return ok
        }
        if !ready { Issue.record("dnsmasq did not start:\n\(d.output)") }
        return d
    }

    static let first = [
        "--host-record=node1.stoq.test,fd00:57::1", "--host-record=node2.stoq.test,fd00:57::2",
        "--srv-host=_stoq._udp.stoq.test,node1.stoq.test,4501", "--srv-host=_stoq._udp.stoq.test,node2.stoq.test,4502",
        "--host-record=headless.stoq.test,fd00:57::3", "--host-record=headless.stoq.test,fd00:57::4",
        // Refused, counted: multicast and a port of 0.
        "--host-record=bad.stoq.test,ff02::1", "--srv-host=_stoq._udp.stoq.test,bad.stoq.test,4503",
        "--srv-host=_stoq._udp.stoq.test,node1.stoq.test,0",
    ]

    /// SRV (with the targets' AAAA) and plain AAAA, re-resolved: a change of records is picked
    /// up at the next round, an outage keeps the last set and is counted, and the backend works
    /// again when the server is back.
    @Test func followsDnsmasq() async throws {
        let dir = try TemporaryDirectory("stoq-dns")
        defer { dir.remove() }
        let port = freePort()
        var server = try Self.dnsmasq(port: port, dir: dir.url, records: Self.first)
        defer { server.stop() }
        let logger = Logger(label: "test.dns")
        var srvOptions = DNSDiscovery.Options(name: "_stoq._udp.stoq.test", defaultPort: 4433)
        srvOptions.server = IPv6Endpoint(address: .loopback, port: port)
        srvOptions.interval = .seconds(1)
        srvOptions.timeout = .seconds(2)
        var aaaaOptions = srvOptions
        aaaaOptions.name = "headless.stoq.test"
        let srv = DNSDiscovery(options: srvOptions, logger: logger), headless = DNSDiscovery(options: aaaaOptions, logger: logger)
        let srvLog = MemberLog(), headlessLog = MemberLog()
        let tasks = [start(srv, into: srvLog), start(headless, into: headlessLog)]
        defer { for t in tasks { t.cancel() } }

        let expected: Set = [member("https://[fd00:57::1]:4501"), member("https://[fd00:57::2]:4502")]
        #expect(await srvLog.wait { $0 == expected })
        #expect(await headlessLog.wait { $0 == [member("https://[fd00:57::3]:4433"), member("https://[fd00:57::4]:4433")] })
        #expect(srv.counters.refused["bad_address"] ?? 0 >= 1)
        #expect(srv.counters.refused["bad_port"] ?? 0 >= 1)
        #expect(srv.counters.failures == 0)

        // Node 2 leaves, node 3 joins: dnsmasq restarts with the new records on the same port.
        server.stop()
        server = try Self.dnsmasq(
            port: port, dir: dir.url,
            records: [
                "--host-record=node1.stoq.test,fd00:57::1", "--host-record=node3.stoq.test,fd00:57::5",
                "--srv-host=_stoq._udp.stoq.test,node1.stoq.test,4501", "--srv-host=_stoq._udp.stoq.test,node3.stoq.test,4505",
                "--host-record=headless.stoq.test,fd00:57::3",
            ])
        let changed: Set = [member("https://[fd00:57::1]:4501"), member("https://[fd00:57::5]:4505")]
        #expect(await srvLog.wait { $0 == changed })
        #expect(await headlessLog.wait { $0 == [member("https://[fd00:57::3]:4433")] })

        // An outage: failures are counted, the last set stays (nothing reported), then recovery.
        let updatesBefore = await srvLog.sets.count
        server.stop()
        #expect(await eventually { srv.counters.failures >= 2 })
        #expect(await srvLog.sets.count == updatesBefore)
        #expect(srv.counters.lastError?.contains("[::1]:\(port)") == true)
        server = try Self.dnsmasq(
            port: port, dir: dir.url,
            records: [
                "--srv-host=_stoq._udp.stoq.test,node1.stoq.test,4501",
                "--host-record=node1.stoq.test,fd00:57::1",
            ])
        #expect(await srvLog.wait { $0 == [member("https://[fd00:57::1]:4501")] })
        #expect(srv.counters.recoveries >= 1)
        print("dns: srv backend counters \(srv.counters)")
    }

    /// No record at all (NXDOMAIN) is an empty mesh, not a failure.
    @Test func nxdomainIsAnEmptyMesh() async throws {
        let dir = try TemporaryDirectory("stoq-dns-nx")
        defer { dir.remove() }
        let port = freePort()
        let server = try Self.dnsmasq(port: port, dir: dir.url, records: [])
        defer { server.stop() }
        var o = DNSDiscovery.Options(name: "nobody.stoq.test", defaultPort: 4433)
        o.server = IPv6Endpoint(address: .loopback, port: port)
        let backend = DNSDiscovery(options: o, logger: Logger(label: "test.dns"))
        let (members, refused) = try await backend.resolve()
        #expect(members.isEmpty && refused.isEmpty)
    }

    /// An SRV target whose address is not in the additional section is asked for; a CNAME
    /// chain (the SRV target's, and the name's own) is followed to the AAAA.
    @Test func looksUpSRVTargetsAndFollowsCNAMEs() async throws {
        let dir = try TemporaryDirectory("stoq-dns-cname")
        defer { dir.remove() }
        let port = freePort()
        let server = try Self.dnsmasq(
            port: port, dir: dir.url,
            records: [
                "--host-record=node1.stoq.test,fd00:57::1", "--cname=alias.stoq.test,node1.stoq.test",
                "--srv-host=_c._udp.stoq.test,alias.stoq.test,4500", "--cname=svc.stoq.test,node1.stoq.test",
            ])
        defer { server.stop() }
        var o = DNSDiscovery.Options(name: "_c._udp.stoq.test", defaultPort: 4433)
        o.server = IPv6Endpoint(address: .loopback, port: port)
        let (viaTarget, _) = try await DNSDiscovery(options: o, logger: Logger(label: "test.dns")).resolve()
        #expect(viaTarget == [member("https://[fd00:57::1]:4500")])
        o.name = "svc.stoq.test"
        let (viaCNAME, _) = try await DNSDiscovery(options: o, logger: Logger(label: "test.dns")).resolve()
        #expect(viaCNAME == [member("https://[fd00:57::1]:4433")])
        #expect(server.output.contains("query[AAAA] alias.stoq.test"))
    }

    /// An SRV target whose own lookup fails (dnsmasq, with no upstream, REFUSES names outside
    /// its zones, a server error like SERVFAIL) fails that target only: the round still gives
    /// the other members, counting it `target_unresolved`; a target that resolved before keeps
    /// its last addresses meanwhile.
    @Test func aTargetThatDoesNotResolveFailsAloneAndKeepsItsLastAddresses() async throws {
        let dir = try TemporaryDirectory("stoq-dns-target")
        defer { dir.remove() }
        let port = freePort()
        let srv = [
            "--srv-host=_t._udp.stoq.test,node1.stoq.test,4501", "--srv-host=_t._udp.stoq.test,far.other.test,4502",
            "--srv-host=_t._udp.stoq.test,gone.other.test,4503", "--host-record=node1.stoq.test,fd00:57::1",
        ]
        var server = try Self.dnsmasq(port: port, dir: dir.url, records: srv + ["--host-record=far.other.test,fd00:57::7"])
        defer { server.stop() }
        var o = DNSDiscovery.Options(name: "_t._udp.stoq.test", defaultPort: 4433)
        o.server = IPv6Endpoint(address: .loopback, port: port)
        let backend = DNSDiscovery(options: o, logger: Logger(label: "test.dns"))
        let (first, firstRefused) = try await backend.resolve()
        #expect(first == [member("https://[fd00:57::1]:4501"), member("https://[fd00:57::7]:4502")])
        #expect(firstRefused == ["target_unresolved": 1])
        #expect(server.output.contains("query[AAAA] gone.other.test"))

        // far.other.test no longer resolves either: it keeps the address it had.
        server.stop()
        server = try Self.dnsmasq(port: port, dir: dir.url, records: srv)
        let (second, secondRefused) = try await backend.resolve()
        #expect(second == first)
        #expect(secondRefused == ["target_unresolved": 2])
        #expect(server.output.contains("query[AAAA] far.other.test"))
    }

    /// Without `dns_server`, the nameservers of resolv.conf are asked (port 53).
    @Test func usesTheSystemResolver() async throws {
        let dir = try TemporaryDirectory("stoq-dns-sys")
        defer { dir.remove() }
        let server = try Self.dnsmasq(port: 53, dir: dir.url, records: ["--host-record=sys.stoq.test,fd00:57::9"])
        defer { server.stop() }
        let conf = dir.url.appendingPathComponent("resolv.conf")
        try "nameserver ::1\n".write(to: conf, atomically: true, encoding: .utf8)
        var o = DNSDiscovery.Options(name: "sys.stoq.test", defaultPort: 4433)
        o.resolvConf = conf.path
        let backend = DNSDiscovery(options: o, logger: Logger(label: "test.dns"))
        let (members, _) = try await backend.resolve()
        #expect(members == [member("https://[fd00:57::9]:4433")])
    }

    /// The selection builds the backend `[mesh]` names.
    @Test func selectionNamesTheBackend() throws {
        let logger = Logger(label: "test")
        let roots = "\n[trust]\nbundle = \"/etc/stoq/mesh-roots.pem\"\n"
        let s = try ConfigLoader.parse("[mesh]\npeers = [\"https://[::1]:1\"]" + roots).mesh
        #expect(DiscoverySelection.backend(for: s, listenPort: 4433, registration: nil, logger: logger).backendName == "static")
        let d = try ConfigLoader.parse("[mesh]\ndiscovery = \"dns\"\ndns_name = \"a.b\"\ndns_interval = \"5s\"" + roots).mesh
        let dns = DiscoverySelection.backend(for: d, listenPort: 4433, registration: nil, logger: logger)
        #expect((dns as? DNSDiscovery)?.options.interval == .seconds(5))
        #expect((dns as? DNSDiscovery)?.options.defaultPort == 4433)
        let e = try ConfigLoader.parse("[mesh]\ndiscovery = \"etcd\"\netcd_endpoints = [\"http://[::1]:2379\"]\netcd_lease_ttl = \"4s\"" + roots).mesh
        let etcd = DiscoverySelection.backend(for: e, listenPort: 4433, registration: nil, logger: logger)
        #expect((etcd as? EtcdDiscovery)?.options.leaseTTLSeconds == 4)
    }

    @Test func staticReportsThePeersOnce() async {
        let backend = StaticDiscovery(peers: [try! MeshURL.parse("https://[::1]:1").get()])
        var it = backend.memberSets().makeAsyncIterator()
        #expect(await it.next() == [member("https://[::1]:1")])
        #expect(backend.counters.updates == 1)
    }
}
