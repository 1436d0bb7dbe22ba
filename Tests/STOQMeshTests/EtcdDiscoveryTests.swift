import Foundation
import STOQTestSupport
import Logging
import STOQConfig
import STOQCore
import STOQTransfer
import Testing
@testable import STOQMesh

/// The etcd backend against a real etcd 3.4 (Debian's etcd-server), started here on loopback
/// ports with a temporary data directory; foreign writes come from Debian's etcdctl.
@Suite struct EtcdDiscoveryTests {
    /// One single-member etcd cluster in a temporary directory of its own, killed and the
    /// directory removed when it is dropped.
    final class Etcd {
        let client: UInt16, peer: UInt16
        let directory: TemporaryDirectory
        var dir: URL { directory.url }
        var data: URL
        var daemon: Daemon?

        init(_ name: String) throws {
            client = freePort()
            peer = freePort()
            directory = try TemporaryDirectory("stoq-\(name)")
            data = directory.url.appendingPathComponent("data")
            try start()
        }

        var url: String { "http://[::1]:\(client)" }
        var endpoint: MeshURL { try! MeshURL.parse(url, scheme: "http").get() }

        func start() throws {
            let bin = try requireBinary("/usr/bin/etcd", package: "etcd-server")
            let p = "http://[::1]:\(peer)"
            daemon = try Daemon(
                bin,
                [
                    "--name", "t", "--data-dir", data.path,
                    "--listen-client-urls", url, "--advertise-client-urls", url,
                    "--listen-peer-urls", p, "--initial-advertise-peer-urls", p,
                    "--initial-cluster", "t=\(p)", "--log-level", "warn",
                ], dir: dir, name: "etcd")
            let ok = (0..<200).contains { _ in
                if (try? ctl(["endpoint", "health"])) != nil { return true }
                usleep(50_000)
                return false
            }
            if !ok { Issue.record("etcd did not become healthy:\n\(daemon?.output ?? "")") }
        }

        /// Runs etcdctl against this cluster, its standard input `input` (a value too large for
        /// an argument); its standard output, or throws with its errors.
        @discardableResult
        func ctl(_ args: [String], input: URL? = nil) throws -> String {
            let bin = try requireBinary("/usr/bin/etcdctl", package: "etcd-client")
            let all = [bin, "--endpoints", url, "--dial-timeout", "1s", "--command-timeout", "2s"] + args
            let (status, out, _) = try runTool(
                input == nil ? bin : "/bin/sh",
                input.map { ["-c", "exec \"$@\" < \"$0\"", $0.path] + all } ?? Array(all.dropFirst()),
                dir: dir, environment: ["ETCDCTL_API=3"])
            guard status == 0 else {
                throw MissingBinary(path: "etcdctl \(args.joined(separator: " ")) failed (\(status)): \(out)", package: "etcd-client")
            }
            return out
        }

        /// SIGKILL; with `wipe`, its data is lost too (every lease and key gone).
        func crash(wipe: Bool) throws {
            daemon?.kill()
            daemon = nil
            if wipe { try FileManager.default.removeItem(at: data) }
        }

        deinit {
            daemon?.kill()
            directory.remove()
        }
    }

    /// A backend with a 4 s lease (renewed every 1.3 s: a loaded test machine does not lose it;
    /// the member whose lease must expire is etcdctl's, with 2 s).
    func backend(_ etcd: Etcd, _ me: MeshMember?, ttl: Int64 = 4) -> EtcdDiscovery {
        var o = EtcdDiscovery.Options(endpoints: [etcd.endpoint], prefix: "/stoq/mesh/")
        o.leaseTTLSeconds = ttl
        o.registration = me
        o.maxBackoff = .seconds(1)
        return EtcdDiscovery(options: o, logger: Logger(label: "test.etcd"))
    }

    static let a = member("https://[fd00:57::1]:4433", 0xA1)
    static let b = member("https://[fd00:57::2]:4433", 0xB2)
    static let c = member("https://[fd00:57::3]:4433", 0xC3)

    /// Two registrations see each other; a member whose lease is not kept alive (written by
    /// etcdctl) disappears when its TTL runs out; a node that stops revokes its lease and leaves
    /// the other's view at once.
    @Test func registrationsSeeEachOtherAndDeadLeasesExpire() async throws {
        let etcd = try Etcd("etcd")
        let na = backend(etcd, Self.a), nb = backend(etcd, Self.b)
        let la = MemberLog(), lb = MemberLog()
        let ta = start(na, into: la), tb = start(nb, into: lb)
        defer { ta.cancel(); tb.cancel() }
        #expect(await la.wait { $0 == [Self.a, Self.b] })
        #expect(await lb.wait { $0 == [Self.a, Self.b] })
        #expect(na.counters.registrations == 1 && nb.counters.registrations == 1)
        // The record as other tools see it.
        let value = try etcd.ctl(["get", "--print-value-only", "/stoq/mesh/" + String(repeating: "a1", count: 32)])
        #expect(
            value.trimmingCharacters(in: .whitespacesAndNewlines)
                == "{\"url\":\"https://[fd00:57::1]:4433\",\"node_id\":\"\(String(repeating: "a1", count: 32))\"}")

        // A third member registered with a 2 s lease nobody keeps alive. On a loaded machine the
        // put can come most of those 2 s after the grant: its member may be gone between two polls.
        let mark = await lb.count
        let grant = try etcd.ctl(["lease", "grant", "2"])  // "lease 694d… granted with TTL(2s)"
        let lease = try #require(grant.split(separator: " ").dropFirst().first.map(String.init))
        try etcd.ctl([
            "put", "--lease=\(lease)", "/stoq/mesh/" + String(repeating: "c3", count: 32),
            String(decoding: MemberRecord.encode(Self.c), as: UTF8.self),
        ])
        #expect(await lb.waitSeen(after: mark) { $0 == [Self.a, Self.b, Self.c] })
        let clock = ContinuousClock(), seen = clock.now
        #expect(await lb.wait { $0 == [Self.a, Self.b] })
        print("etcd: an unrenewed 2 s lease left the view \(clock.now - seen) after it was seen")
        // A and B kept theirs alive all along (several TTLs have passed by now).
        #expect(await la.latest == [Self.a, Self.b])

        // A stops: it revokes its lease, and B's view loses it without waiting for a TTL.
        ta.cancel()
        await ta.value
        let stopped = clock.now
        #expect(await lb.wait { $0 == [Self.b] })
        print("etcd: a stopped node left the other's view \(clock.now - stopped) after it stopped")
        #expect(nb.counters.failures == 0)
    }

    /// Malformed values under the prefix are refused with their reason and counted; the backend
    /// keeps going and still sees the valid members.
    @Test func refusesMalformedRecordsAndCountsThem() async throws {
        let etcd = try Etcd("etcd-bad")
        let nb = backend(etcd, Self.b)
        let lb = MemberLog()
        let tb = start(nb, into: lb)
        defer { tb.cancel() }
        #expect(await lb.wait { $0 == [Self.b] })
        let p = "/stoq/mesh/"
        let bad: [(String, String, String)] = [
            ("garbage", "not json at all", "not_json"),
            ("[fd00::9]:1", "{\"url\":\"https://10.0.0.1:4433\"}", "ipv4"),
            ("[fd00::9]:2", "{\"url\":\"https://node9.mesh:4433\"}", "bad_url"),
            ("[fd00::9]:3", "{\"node_id\":\"00\"}", "bad_url"),
            (String(repeating: "0", count: 64), "{\"url\":\"https://[fd00::9]:4433\",\"node_id\":\"XYZ\"}", "bad_node_id"),
            ("someone-else", "{\"url\":\"https://[fd00::9]:4433\"}", "key_mismatch"),
            ("[fd00::9]:4", "{\"url\":\"https://[fd00::9]:4\",\"pad\":\"" + String(repeating: "x", count: 2000) + "\"}", "too_large"),
        ]
        for (name, value, _) in bad { try etcd.ctl(["put", p + name, value]) }
        // Then a valid one: seeing it proves the watch outlived every refusal.
        try etcd.ctl(["put", p + String(repeating: "c3", count: 32), String(decoding: MemberRecord.encode(Self.c), as: UTF8.self)])
        #expect(await lb.wait { $0 == [Self.b, Self.c] })
        var expected: [String: UInt64] = [:]
        for (_, _, why) in bad { expected[why, default: 0] += 1 }
        #expect(nb.counters.refused == expected)
        // A fresh reader refuses the same records from its initial range.
        let reader = backend(etcd, nil)
        let lr = MemberLog()
        let tr = start(reader, into: lr)
        defer { tr.cancel() }
        #expect(await lr.wait { $0 == [Self.b, Self.c] })
        #expect(reader.counters.refused == expected)
        #expect(reader.counters.registrations == 0)
    }

    /// A prefix whose records together are more than one answer may hold (20 values of 1 MB:
    /// 27 MB in base64) is read in pages: each record too large is refused (`too_large`) by its
    /// key, and the members beside them are seen.
    @Test func readsALargePrefixInPages() async throws {
        let etcd = try Etcd("etcd-large")
        let big = etcd.dir.appendingPathComponent("big")
        try Data(repeating: 0x78, count: 1_000_000).write(to: big)
        for i in 0..<20 { try etcd.ctl(["put", "/stoq/mesh/big-\(i)"], input: big) }
        try etcd.ctl(["put", "/stoq/mesh/" + String(repeating: "c3", count: 32), String(decoding: MemberRecord.encode(Self.c), as: UTF8.self)])
        let nb = backend(etcd, Self.b)
        let lb = MemberLog()
        let tb = start(nb, into: lb)
        defer { tb.cancel() }
        #expect(await lb.wait { $0 == [Self.b, Self.c] })
        #expect(nb.counters.refused == [MemberRecord.Refusal.tooLarge: 20], "\(nb.counters)")
        #expect(nb.counters.failures == 0, "\(nb.counters)")
    }

    /// etcd dies and comes back with its data lost: both nodes register again on their own and
    /// see each other again; the outage is counted, and the last view stayed meanwhile.
    @Test func survivesAnEtcdOutageWithDataLoss() async throws {
        let etcd = try Etcd("etcd-outage")
        let na = backend(etcd, Self.a), nb = backend(etcd, Self.b)
        let la = MemberLog(), lb = MemberLog()
        let ta = start(na, into: la), tb = start(nb, into: lb)
        defer { ta.cancel(); tb.cancel() }
        #expect(await la.wait { $0 == [Self.a, Self.b] })
        #expect(await lb.wait { $0 == [Self.a, Self.b] })
        let before = await la.sets.count
        try etcd.crash(wipe: true)
        #expect(await eventually { na.counters.failures >= 1 && nb.counters.failures >= 1 })
        #expect(await la.sets.count == before)  // an outage does not empty the view
        try etcd.start()
        #expect(await eventually { na.counters.registrations >= 2 && nb.counters.registrations >= 2 })
        #expect(
            await eventually {
                let keys = (try? etcd.ctl(["get", "--prefix", "--keys-only", "/stoq/mesh/"])) ?? ""
                return keys.contains(String(repeating: "a1", count: 32)) && keys.contains(String(repeating: "b2", count: 32))
            })
        #expect(await la.wait { $0 == [Self.a, Self.b] })
        #expect(await lb.wait { $0 == [Self.a, Self.b] })
        // The recovery is counted once the new session has lasted a lease's TTL.
        #expect(await eventually { na.counters.recoveries >= 1 })
        print("etcd outage: A \(na.counters), B \(nb.counters)")
    }

    /// A stand-in for what a real etcd does not do (it is not etcd: a few lines of Python's
    /// http.server speaking the JSON gateway): a watch refused at once, or a range whose header
    /// revision is the largest there is.
    static let stub = """
        import http.server, json, socket, sys
        mode, port = sys.argv[1], int(sys.argv[2])
        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path == "/v3/watch":
                    self.send_response(500); self.send_header("content-length", "0"); self.end_headers(); return
                rev = "9223372036854775807" if mode == "revision" else "5"
                body = {"/v3/lease/grant": {"ID": "7", "TTL": "4"}, "/v3/kv/range": {"header": {"revision": rev}, "kvs": []}}
                data = json.dumps(body.get(self.path, {"header": {"revision": rev}})).encode()
                self.send_response(200); self.send_header("content-length", str(len(data))); self.end_headers()
                self.wfile.write(data)
            def log_message(self, *a): pass
        class S(http.server.ThreadingHTTPServer): address_family = socket.AF_INET6
        S(("::1", port), H).serve_forever()
        """

    /// A watch that fails as soon as it opens (a proxy that does not stream) is a failed
    /// session like any other: the waits between registrations grow instead of staying at the
    /// first one (it registered 15–25 times in 3 s), and it is one run of failures, logged once,
    /// not a recovery and a failure each time a session opens. A range at revision 2^63−1, where
    /// the watch cannot start after it, is refused by name instead of trapping the node.
    @Test(arguments: ["watch", "revision"]) func aStubWhoseWatchFailsOrWhoseRevisionIsHuge(mode: String) async throws {
        let scratch = try TemporaryDirectory("stoq-etcd-stub")
        defer { scratch.remove() }
        let dir = scratch.url
        let script = dir.appendingPathComponent("stub.py")
        try Self.stub.write(to: script, atomically: true, encoding: .utf8)
        let port = freePort()
        let daemon = try Daemon(try requireBinary("/usr/bin/python3", package: "python3"), [script.path, mode, "\(port)"], dir: dir, name: "stub")
        defer { daemon.kill() }
        var o = EtcdDiscovery.Options(endpoints: [try MeshURL.parse("http://[::1]:\(port)", scheme: "http").get()], prefix: "/stoq/mesh/")
        o.leaseTTLSeconds = 4
        o.registration = Self.a
        let log = LogCapture()
        let d = EtcdDiscovery(options: o, logger: log.logger)
        #expect(await listening(port), "the stub never listened: \(daemon.output)")
        let t = start(d, into: MemberLog())
        try await Task.sleep(for: .seconds(3))
        t.cancel()
        await t.value
        let c = d.counters
        if mode == "watch" {
            #expect((2...7).contains(c.registrations), "\(c)")
            #expect(c.failures >= 2 && c.recoveries == 0, "\(c)")
            #expect(log.messages(atLeast: .notice).count == 1, "\(log.messages(atLeast: .notice))")
        } else {
            #expect(c.failures >= 1 && c.lastError?.contains("header revision 9223372036854775807 is out of range") == true, "\(c)")
        }
    }

    /// A TCP proxy in front of a real etcd, to play a slow etcd or a watch connection that a
    /// NAT drops without a word: each request to one of the paths given (comma-separated) is
    /// held back `delay` seconds; on SIGUSR1 the connections carrying a watch then stop passing
    /// bytes either way, and stay open.
    static let proxy = """
        import asyncio, signal, socket, sys
        port, upstream, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
        held = [b"POST " + p.encode() + b" " for p in sys.argv[4].split(",") if p]
        connections = []
        def freeze():
            for c in connections:
                if c["watch"]: c["frozen"] = True
            print("frozen", sum(c["frozen"] for c in connections), flush=True)
        async def pipe(src, dst, c, request):
            while True:
                data = await src.read(65536)
                if not data: break
                if request:
                    if b"POST /v3/watch " in data: c["watch"] = True
                    if any(h in data for h in held): await asyncio.sleep(delay)
                if c["frozen"]: await asyncio.Event().wait()
                dst.write(data)
                await dst.drain()
            dst.close()
        async def serve(reader, writer):
            up_reader, up_writer = await asyncio.open_connection("::1", upstream)
            c = {"watch": False, "frozen": False}
            connections.append(c)
            await asyncio.gather(pipe(reader, up_writer, c, True), pipe(up_reader, writer, c, False), return_exceptions=True)
        async def main():
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, freeze)
            server = await asyncio.start_server(serve, "::1", port, family=socket.AF_INET6)
            await server.serve_forever()
        asyncio.run(main())
        """

    /// `proxy` in front of `etcd`, listening, holding requests to `paths` back `delay` seconds;
    /// and its endpoint.
    func proxy(_ etcd: Etcd, delay: Double = 0, holding paths: [String] = []) async throws -> (Daemon, MeshURL) {
        let script = etcd.dir.appendingPathComponent("proxy.py")
        try Self.proxy.write(to: script, atomically: true, encoding: .utf8)
        let port = freePort()
        let daemon = try Daemon(
            try requireBinary("/usr/bin/python3", package: "python3"), [script.path, "\(port)", "\(etcd.client)", "\(delay)", paths.joined(separator: ",")],
            dir: etcd.dir, name: "proxy")
        #expect(await listening(port), "the proxy never listened: \(daemon.output)")
        return (daemon, try MeshURL.parse("http://[::1]:\(port)", scheme: "http").get())
    }

    /// Behind a slow etcd (the put and the range 1 s each, with a 2 s lease), the lease is kept
    /// alive from the moment it is granted: it does not expire while the node registers and
    /// reads, so the node is registered once and stays. (It used to be renewed a third of a
    /// TTL after the range only: lease_lost every session.)
    @Test func aSlowEtcdDoesNotLetTheLeaseExpireWhileRegistering() async throws {
        let etcd = try Etcd("etcd-slow")
        let (daemon, endpoint) = try await proxy(etcd, delay: 1, holding: ["/v3/kv/put", "/v3/kv/range"])
        defer { daemon.kill() }
        var o = EtcdDiscovery.Options(endpoints: [endpoint], prefix: "/stoq/mesh/")
        o.leaseTTLSeconds = 2
        o.registration = Self.b
        o.maxBackoff = .seconds(1)
        let nb = EtcdDiscovery(options: o, logger: Logger(label: "test.etcd"))
        let lb = MemberLog()
        let tb = start(nb, into: lb)
        defer { tb.cancel() }
        #expect(await lb.wait { $0 == [Self.b] })
        // Three TTLs: before, the lease was lost 2.7 s after it was granted.
        #expect(!(await eventually(timeout: .seconds(6)) { nb.counters.failures > 0 }), "\(nb.counters)")
        #expect(nb.counters.registrations == 1, "\(nb.counters)")
        #expect(try etcd.ctl(["get", "--keys-only", "/stoq/mesh/" + String(repeating: "b2", count: 32)]).contains("b2b2"))
    }

    /// A watch whose connection stops passing bytes without closing (a NAT or a load balancer
    /// that forgot it) is noticed: every three TTLs the backend asks etcd how many keys the
    /// prefix holds and its newest change, and a watch that has not delivered them (twice in a
    /// row, a TTL apart) ends the session; the next reads the prefix again. (It used to miss
    /// every change from then on.)
    @Test func aWatchThatFallsSilentIsNoticed() async throws {
        let etcd = try Etcd("etcd-silent")
        let (daemon, endpoint) = try await proxy(etcd)
        defer { daemon.kill() }
        var o = EtcdDiscovery.Options(endpoints: [endpoint], prefix: "/stoq/mesh/")
        o.leaseTTLSeconds = 2
        o.registration = Self.b
        o.maxBackoff = .seconds(1)
        let nb = EtcdDiscovery(options: o, logger: Logger(label: "test.etcd"))
        let lb = MemberLog()
        let tb = start(nb, into: lb)
        defer { tb.cancel() }
        #expect(await lb.wait { $0 == [Self.b] })
        func put(_ m: MeshMember) throws {
            try etcd.ctl(["put", MemberRecord.key(prefix: "/stoq/mesh/", for: m), String(decoding: MemberRecord.encode(m), as: UTF8.self)])
        }
        // A change through the watch: it is open, through the proxy.
        try put(Self.a)
        #expect(await lb.wait { $0 == [Self.a, Self.b] })
        Foundation.kill(daemon.pid, SIGUSR1)
        #expect(await eventually { daemon.output.contains("frozen 1") }, "\(daemon.output)")
        try put(Self.c)
        let clock = ContinuousClock(), put = clock.now
        #expect(await lb.wait { $0 == [Self.a, Self.b, Self.c] })
        print("etcd: a change missed by a silent watch was seen \(clock.now - put) after it was made")
        #expect(nb.counters.lastError?.contains("/v3/watch: it has fallen behind") == true, "\(nb.counters)")
    }

    /// A mesh service's `stop` returns once discovery has withdrawn this node: its etcd lease is
    /// revoked and its record gone by then, even when etcd takes a second to revoke it. (`stop`
    /// used to wait for the mesh thread only: the revoke might never be sent, and the node stay
    /// listed for a whole TTL.)
    @Test func aStoppedMeshServiceHasRevokedItsLease() async throws {
        let etcd = try Etcd("etcd-stop")
        let (daemon, endpoint) = try await proxy(etcd, delay: 1, holding: ["/v3/lease/revoke"])
        defer { daemon.kill() }
        let node = MeshFixture.shared.nodes[0]
        let me = MeshMember(url: try MeshURL.parse("https://[fd00:57::9]:4433").get(), nodeID: node.id)
        var o = EtcdDiscovery.Options(endpoints: [endpoint], prefix: "/stoq/mesh/")
        o.leaseTTLSeconds = 4
        o.registration = me
        let settings = MeshService.Settings(
            chain: node.chain, key: node.key, trust: ClientTrust(), verifyChain: { _ in }, listenPort: 4433, localAddresses: [])
        let identity = try TestIdentity()
        let upstreams = try LoopbackUpstreams(identity: identity, [])
        let service = MeshService(
            settings: settings, discovery: EtcdDiscovery(options: o, logger: Logger(label: "test.etcd")),
            datapath: ClientDatapath { upstreams.queue() }, logger: Logger(label: "test.mesh"))
        try service.start()
        let key = MemberRecord.key(prefix: "/stoq/mesh/", for: me)
        #expect(await eventually { (try? etcd.ctl(["get", "--keys-only", key]))?.contains(key) == true })
        service.stop()
        #expect(try etcd.ctl(["get", "--keys-only", key]).trimmingCharacters(in: .whitespacesAndNewlines).isEmpty)
    }

    @Test func memberRecordsRoundTripAndRefuse() throws {
        for m in [Self.a, member("https://[fd00::7]:9")] {
            let key = MemberRecord.key(prefix: "/p/", for: m)
            #expect(try MemberRecord.decode(name: String(key.dropFirst(3)), value: MemberRecord.encode(m)).get() == m)
        }
        #expect(MemberRecord.key(prefix: "/p/", for: member("https://[fd00::7]:9")) == "/p/[fd00::7]:9")
        func code(_ name: String, _ value: String) -> String? {
            if case .failure(let r) = MemberRecord.decode(name: name, value: Array(value.utf8)) { return r.code }
            return nil
        }
        #expect(code("x", "[1]") == "not_json")
        #expect(code("x", "{\"url\":1}") == "bad_url")
        #expect(code("[::1]:1", "{\"url\":\"https://[::1]:1\",\"node_id\":\"" + String(repeating: "A", count: 64) + "\"}") == "bad_node_id")
        #expect(code("[::1]:2", "{\"url\":\"https://[::1]:1\"}") == "key_mismatch")
        #expect(code("[::1]:1", "{\"url\":\"https://[::1]:1\",\"future\":true}") == nil)
        #expect(EtcdDiscovery.rangeEnd("/stoq/mesh/") == Array("/stoq/mesh0".utf8))
    }
}
