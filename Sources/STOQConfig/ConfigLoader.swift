import Foundation
import Logging
import STOQChunking
import STOQCore
import STOQQUIC
import STOQRouting
import STOQTrust
import TOMLKit

/// TOML → validated `NodeConfig`. Unknown keys, wrong types and bad values are all
/// reported together, each naming key, value and what is allowed.
public enum ConfigLoader {
    /// What a received AF_XDP frame holds besides the datagram: the kernel's
    /// XDP_PACKET_HEADROOM (256), then Ethernet (14), one VLAN tag (4), IPv6 (40) and UDP (8).
    public static let xdpReceiveOverhead = 256 + 66

    /// Reads and validates a file, and with `files` the files it names (`unreadableFiles`).
    public static func load(path: String, files: Bool = true) throws(ConfigErrors) -> NodeConfig {
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
            throw ConfigErrors(
                source: path,
                errors: [
                    ConfigError(
                        code: .io, key: "", value: "",
                        allowed: "cannot read the file (missing, unreadable or not UTF-8)")
                ])
        }
        let config = try parse(text, source: path)
        let missing = files ? unreadableFiles(config) : []
        if !missing.isEmpty { throw ConfigErrors(source: path, errors: missing) }
        return config
    }

    /// The files `config` names that the node reads at start, each one that is not there or
    /// cannot be read: an error naming its key, so that `stoq config check` says so and the
    /// node refuses to start (exit 2) instead of failing later (a first fetch, an admin
    /// request). Relative paths are taken from the working directory, as the node takes them.
    /// Paths under `node.data_dir` are not checked: the node makes its own files there at start
    /// (its CA's `trust/root.pem`, its log key), which a `trust.bundle` may name (the
    /// Kubernetes ConfigMap does).
    public static func unreadableFiles(_ config: NodeConfig) -> [ConfigError] {
        func absolute(_ p: String) -> String { URL(fileURLWithPath: p).standardizedFileURL.path }
        let own = absolute(config.node.dataDir) + "/"
        var files = [
            ("tls.cert_file", config.tls.certFile), ("tls.key_file", config.tls.keyFile),
            ("trust.bundle", config.trust.bundle),
            // Read only with auth = "token" (a notice says so otherwise).
            ("admin.token_file", config.admin.auth == .token ? config.admin.tokenFile : ""),
            // The ACME server's root, read at each issuance (the first at start).
            ("trust.acme.ca", config.trust.mode == .acme ? config.trust.acme.ca : ""),
        ]
        files += config.trust.transparencyLogs.map { ("trust.transparency_logs", $0) }
        files += config.access.tokenKeys.map { ("access.token_keys", $0) }
        return files.compactMap { key, path in
            guard !path.isEmpty, !absolute(path).hasPrefix(own) else { return nil }
            var isDirectory: ObjCBool = false
            let exists = FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory)
            if exists && !isDirectory.boolValue && FileManager.default.isReadableFile(atPath: path) { return nil }
            let why =
                !exists
                ? "no such file" + (path.hasPrefix("/") ? "" : " (relative to \(FileManager.default.currentDirectoryPath))")
                : isDirectory.boolValue ? "a directory, not a file" : "not readable by this user"
            return ConfigError(code: .io, key: key, value: "\"\(path)\"", allowed: "a readable file: \(why)")
        }
    }

    /// Validates TOML text.
    public static func parse(_ text: String, source: String = "<config>") throws(ConfigErrors) -> NodeConfig {
        if let (line, problem) = tomlHazard(text) {
            throw ConfigErrors(
                source: source,
                errors: [ConfigError(code: .syntax, key: "", value: "", allowed: "TOML syntax error at line \(line): \(problem)")])
        }
        let table: TOMLTable
        do {
            table = try TOMLTable(string: text)
        } catch let e as TOMLParseError {
            throw ConfigErrors(
                source: source,
                errors: [
                    ConfigError(
                        code: .syntax, key: "", value: "",
                        allowed: "TOML syntax error at \(e.source.begin.debugDescription): \(e.description)")
                ])
        } catch {
            throw ConfigErrors(source: source, errors: [ConfigError(code: .syntax, key: "", value: "", allowed: "\(error)")])
        }
        let (c, r) = read(table, collecting: false)
        if !r.errors.isEmpty { throw ConfigErrors(source: source, errors: r.errors) }
        return c
    }

    /// The first place where `text` would reach an assertion in toml++ (under TOMLKit), with
    /// the syntax error to report instead, or nil. toml++ checks these only by assertions: a
    /// debug build aborts (a reload would kill the node) and a release build compiles them into
    /// optimiser assumptions, undefined behaviour when false. Both found by `scripts/fuzz
    /// config`:
    /// - a table header whose key starts with neither a bare-key character nor a quote
    ///   (`[.a]`, `[ ` + newline, `[[.]]`);
    /// - `}` where an array expects a value (`x = [}`, `x = [1, }`).
    /// Strings and comments are skipped, and brackets tracked, so `[` and `}` inside values and
    /// strings are not taken for either.
    static func tomlHazard(_ text: String) -> (line: Int, problem: String)? {
        let u = Array(text.utf8)
        // toml++ skips a UTF-8 byte order mark, so the first line starts after it.
        var i = u.starts(with: [0xEF, 0xBB, 0xBF]) ? 3 : 0, line = 1, lineStart = true, expectElement = false
        var open: [UInt8] = []  // the brackets and braces of the value being read
        func at(_ s: String) -> Bool { u[i...].starts(with: s.utf8) }
        while i < u.count {
            let c = u[i]
            if c == 0x0A { line += 1; lineStart = true; i += 1; continue }
            if c == 0x20 || c == 0x09 || c == 0x0D { i += 1; continue }
            if lineStart, open.isEmpty, c == UInt8(ascii: "[") {
                var j = i + 1
                if j < u.count, u[j] == UInt8(ascii: "[") { j += 1 }
                while j < u.count, u[j] == 0x20 || u[j] == 0x09 { j += 1 }
                if j < u.count {
                    let k = u[j]
                    let bare = (k >= 0x30 && k <= 0x39) || (k >= 0x41 && k <= 0x5A) || (k >= 0x61 && k <= 0x7A) || k == 0x5F || k == 0x2D
                    if !(bare || k == 0x22 || k == 0x27 || k == UInt8(ascii: "]")) {
                        return (line, "a table header must start with a bare or quoted key")
                    }
                }
                while i < u.count, u[i] != 0x0A { i += 1 }  // the rest of a header line is its own
                continue
            }
            lineStart = false
            if c == UInt8(ascii: "#") {
                while i < u.count, u[i] != 0x0A { i += 1 }
                continue
            }
            if expectElement, c == UInt8(ascii: "}") { return (line, "an array value cannot start with '}'") }
            expectElement = false
            if at("\"\"\"") || at("'''") {
                let close = Array(u[i..<(i + 3)])
                i += 3
                while i < u.count, !u[i...].starts(with: close) {
                    if u[i] == 0x0A { line += 1 }
                    if close[0] == 0x22, u[i] == 0x5C { i += 1 }
                    i += 1
                }
                i += 3
                // Up to two more quotes belong to the value: `"""x""""` is `x"`.
                var extra = 0
                while extra < 2, i < u.count, u[i] == close[0] { i += 1; extra += 1 }
            } else if c == 0x22 || c == 0x27 {
                i += 1
                while i < u.count, u[i] != c, u[i] != 0x0A {
                    if c == 0x22, u[i] == 0x5C, i + 1 < u.count, u[i + 1] != 0x0A { i += 1 }
                    i += 1
                }
                // An unclosed string ends at its line; the newline starts the next one.
                if i < u.count, u[i] == c { i += 1 }
            } else {
                switch c {
                case UInt8(ascii: "["): open.append(c); expectElement = true
                case UInt8(ascii: "{"): open.append(c)
                case UInt8(ascii: "]"), UInt8(ascii: "}"): _ = open.popLast()
                case UInt8(ascii: ","): expectElement = open.last == UInt8(ascii: "[")
                default: break
                }
                i += 1
            }
        }
        return nil
    }

    /// Every key the loader reads, dotted (`network.quic_config.max_window`): what
    /// config/node.toml must document.
    static var knownKeys: [String] { read(TOMLTable(), collecting: true).1.known }

    private static func read(_ table: TOMLTable, collecting: Bool) -> (NodeConfig, Reader) {
        var r = Reader(root: table)
        r.collecting = collecting
        var c = NodeConfig()
        r.section("node") { s in
            s.string("data_dir", &c.node.dataDir, nonEmpty: true)
        }
        r.section("network") { s in
            s.endpoint("listen_addr", &c.network.listenAddress)
            var preferred = IPv6Endpoint(address: .any, port: 0)
            var preferredGiven = false
            s.optionalEndpoint("preferred_address", &preferred, given: &preferredGiven)
            c.network.quic.preferredAddress = preferredGiven ? preferred : nil
            s.int("max_connections", &c.network.quic.maxConnections, 1...1_000_000)
            s.int("max_connections_per_client", &c.network.quic.maxConnectionsPerClient, 0...1_000_000)
            s.int("workers", &c.network.workers, 0...ConnectionID.maxWorkers)
            s.bool("retry", &c.network.quic.retry)
            s.int("retry_threshold", &c.network.quic.retryThreshold, 0...1_000_000)
            s.int("stateless_reply_rate", &c.network.quic.statelessReplyRate, 0...10_000_000)
            s.int("stateless_reply_rate_per_prefix", &c.network.quic.statelessReplyRatePerPrefix, 0...10_000_000)
            s.choice("cc", &c.network.quic.congestionControl)
            s.choice("datapath", &c.network.datapath)
            s.choice("client_auth", &c.network.clientAuth)
            s.string("interface", &c.network.interface)
            s.int("queues", &c.network.queues, 0...64)
            s.choice("xdp_mode", &c.network.xdpMode)
            s.choice("zero_copy", &c.network.zeroCopy)
            s.duration("drain_timeout", &c.network.drainTimeout, 0...600_000_000_000)
            s.subsection("xdp") { x in
                x.int("frame_size", &c.network.xdp.frameSize, 2048...4096)
                x.int("frames", &c.network.xdp.frames, 1024...1 << 20)
                x.int("ring_size", &c.network.xdp.ringSize, 64...1 << 16)
                x.int("busy_poll_usec", &c.network.xdp.busyPollMicroseconds, 0...10_000)
            }
            s.profileOrTable("quic_config", { $0.apply(to: &c.network.quic) }, QUICProfile.allCases.map { ($0.rawValue, $0) }) { q in
                q.duration("idle_timeout", &c.network.quic.idleTimeout, 1_000_000_000...3_600_000_000_000)
                q.duration("handshake_timeout", &c.network.quic.handshakeTimeout, 1_000_000_000...600_000_000_000)
                q.int("max_streams_bidi", &c.network.quic.maxStreamsBidi, 1...65535)
                q.size("initial_max_data", &c.network.quic.initialMaxData, 1 << 16...1 << 40)
                q.size("initial_max_stream_data", &c.network.quic.initialMaxStreamData, 1 << 16...1 << 40)
                q.size("max_window", &c.network.quic.maxWindow, 1 << 16...1 << 40)
                q.size("max_stream_window", &c.network.quic.maxStreamWindow, 1 << 16...1 << 40)
                q.int("max_udp_payload_size", &c.network.quic.maxUDPPayloadSize, 1200...IPv6Address.largestUDPPayload)
                q.int("ack_thresh", &c.network.quic.ackThreshold, 1...64)
            }
        }
        r.section("storage") { s in
            s.string("path", &c.storage.path, nonEmpty: true)
            s.string("content_path", &c.storage.contentPath, nonEmpty: true)
            s.size("max_object_size", &c.storage.maxObjectSize, 1...(1 << 50))
            s.duration("gc_interval", &c.storage.gcInterval, 0...604_800_000_000_000)
            s.duration("gc_grace_period", &c.storage.gcGracePeriod, 60_000_000_000...2_592_000_000_000_000)
        }
        // Each collection walks the whole chunk tree while puts wait: not many times a second.
        if c.storage.gcInterval > 0 && c.storage.gcInterval < 1_000_000_000 {
            r.errors.append(
                ConfigError(
                    code: .outOfRange, key: "storage.gc_interval", value: "\"\(c.storage.gcInterval / 1_000_000)ms\"",
                    allowed: "\"0s\" (no scheduled collection), or a duration from 1s to 604800s"))
        }
        r.section("tls") { s in
            s.string("cert_file", &c.tls.certFile)
            s.string("key_file", &c.tls.keyFile)
            s.bool("session_tickets", &c.network.quic.sessionTickets)
            s.duration("ticket_lifetime", &c.network.quic.ticketLifetime, 1_000_000_000...604_800_000_000_000)
            s.bool("early_data", &c.network.quic.earlyData)
            s.cipherSuites("cipher_suites", &c.tls.cipherSuites)
        }
        if c.network.xdp.frameSize != 2048 && c.network.xdp.frameSize != 4096 {
            r.errors.append(
                ConfigError(
                    code: .badValue, key: "network.xdp.frame_size", value: "\(c.network.xdp.frameSize)",
                    allowed: "2048 or 4096"))
        }
        if c.network.xdp.ringSize.nonzeroBitCount != 1 || c.network.xdp.frames <= c.network.xdp.ringSize {
            r.errors.append(
                ConfigError(
                    code: .badValue, key: "network.xdp.ring_size/frames",
                    value: "\(c.network.xdp.ringSize)/\(c.network.xdp.frames)",
                    allowed: "ring_size a power of two and frames > ring_size (the fill ring takes ring_size frames)"))
        }
        let mayUseXDP = c.network.datapath == .afXDP || (c.network.datapath == .auto && !c.network.interface.isEmpty)
        // A received frame gives the kernel's XDP_PACKET_HEADROOM (256) first, then the
        // Ethernet header, a VLAN tag (the program takes one), IPv6 and UDP (66), then the
        // datagram; the program is not multi-buffer aware, so a larger one never arrives. A
        // transmitted frame needs less (62 of headers and 24 of TX metadata).
        let largestPayload = c.network.xdp.frameSize - ConfigLoader.xdpReceiveOverhead
        if mayUseXDP && c.network.quic.maxUDPPayloadSize > largestPayload {
            r.errors.append(
                ConfigError(
                    code: .outOfRange, key: "network.quic_config.max_udp_payload_size",
                    value: "\(c.network.quic.maxUDPPayloadSize)",
                    allowed:
                        "at most network.xdp.frame_size \(c.network.xdp.frameSize) - 256 (the kernel's XDP headroom) - 66 (Ethernet, VLAN tag, IPv6, UDP) = \(largestPayload) when AF_XDP may be used (a received datagram must fit one frame)"
                ))
        }
        if let preferred = c.network.quic.preferredAddress {
            let listen = c.network.listenAddress
            let value = "\"\(preferred)\""
            if preferred.address.isUnspecified || preferred.port == 0 {
                r.errors.append(
                    ConfigError(
                        code: .badValue, key: "network.preferred_address", value: value,
                        allowed:
                            "one of this node's own IPv6 addresses and a port, e.g. \"[2001:db8::2]:\(listen.port)\" (not [::] nor port 0: clients move to exactly this address), or \"\" for none"
                    ))
            } else if !listen.address.isUnspecified || preferred.port != listen.port {
                // The node receives on its listen_addr sockets only: the preferred address must be
                // one of the addresses they already cover.
                r.errors.append(
                    ConfigError(
                        code: .badValue, key: "network.preferred_address", value: value,
                        allowed:
                            "an address the node already receives on: network.listen_addr = \"\(listen)\" covers only \(listen.address.isUnspecified ? "port \(listen.port) of every address" : "itself"); use listen_addr = \"[::]:\(preferred.port)\" or preferred_address on port \(listen.port)"
                    ))
            }
        }
        if c.network.datapath == .afXDP && c.network.interface.isEmpty {
            r.errors.append(
                ConfigError(
                    code: .badValue, key: "network.interface", value: "\"\"",
                    allowed: "the interface to bind when network.datapath = \"af_xdp\""))
        }
        if c.tls.certFile.isEmpty != c.tls.keyFile.isEmpty {
            r.errors.append(
                ConfigError(
                    code: .badValue, key: "tls.cert_file/tls.key_file",
                    value: "\"\(c.tls.certFile)\"/\"\(c.tls.keyFile)\"",
                    allowed: "both set, or both empty for the embedded identity"))
        }
        r.section("trust") { s in
            s.choice("mode", &c.trust.mode)
            s.duration("cert_lifetime", &c.trust.certLifetime, 10_000_000_000...(397 * 86_400_000_000_000))
            s.duration("renew_before", &c.trust.renewBefore, 0...(397 * 86_400_000_000_000))
            s.string("bundle", &c.trust.bundle)
            s.bool("require_transparency", &c.trust.requireTransparency)
            s.stringArray("transparency_logs", &c.trust.transparencyLogs)
            s.subsection("acme") { a in
                a.string("directory", &c.trust.acme.directory)
                a.string("eab_kid", &c.trust.acme.eabKid)
                a.string("eab_hmac_key", &c.trust.acme.eabHmacKey)
                a.string("ca", &c.trust.acme.ca)
            }
        }
        if c.trust.requireTransparency && c.trust.transparencyLogs.isEmpty && (c.trust.mode == .acme || !c.tls.certFile.isEmpty) {
            r.errors.append(
                ConfigError(
                    code: .badValue, key: "trust.transparency_logs", value: "[]",
                    allowed: "PEM files of the trusted logs' public keys, when trust.require_transparency is on and the node does not run its own CA"))
        }
        if c.trust.renewBefore >= c.trust.certLifetime {
            r.errors.append(
                ConfigError(
                    code: .outOfRange, key: "trust.renew_before", value: "\(c.trust.renewBefore / 1_000_000_000)s",
                    allowed: "less than trust.cert_lifetime (\(c.trust.certLifetime / 1_000_000_000)s)"))
        }
        let eab = c.trust.acme
        if eab.eabKid.isEmpty != eab.eabHmacKey.isEmpty {
            r.errors.append(
                ConfigError(
                    code: .badValue, key: eab.eabKid.isEmpty ? "trust.acme.eab_kid" : "trust.acme.eab_hmac_key", value: "\"\"",
                    allowed: "set together with trust.acme.\(eab.eabKid.isEmpty ? "eab_hmac_key" : "eab_kid") (external account binding)"))
        }
        if !eab.eabHmacKey.isEmpty, Base64URL.decode(eab.eabHmacKey) == nil {
            r.errors.append(
                ConfigError(
                    code: .badValue, key: "trust.acme.eab_hmac_key", value: "(\(eab.eabHmacKey.utf8.count) characters, not shown)",
                    allowed: "unpadded base64url (A-Z a-z 0-9 - _), as the ACME server gave it"))
        }
        if c.trust.mode == .acme && !c.trust.acme.directory.hasPrefix("https://") {
            r.errors.append(
                ConfigError(
                    code: .badValue, key: "trust.acme.directory", value: "\"\(c.trust.acme.directory)\"",
                    allowed: "the https:// URL of the ACME directory when trust.mode = \"acme\""))
        }
        r.section("routing") { s in
            s.choice("algorithm", &c.routing.algorithm)
            // Adverts live three intervals, and an hour at most; routes have at most hopLimit links.
            s.duration("update_interval", &c.routing.updateInterval, 100_000_000...(UInt64(LinkStateAdvert.maxLifetimeMillis) / 3 * 1_000_000))
            s.int("max_hops", &c.routing.maxHops, 1...HopLimitedSearch.hopLimit)
            s.choice("multipath_scheduler", &c.routing.multipathScheduler, NodeConfig.Routing.multipathSchedulers.map { ($0.rawValue, $0) })
        }
        r.section("chunking") { s in
            s.choice("algorithm", &c.chunking.algorithm, ChunkingAlgorithm.allCases.map { ($0.description, $0) })
            s.size("min_chunk_size", &c.chunking.minChunkSize, 1 << 10...1 << 30)
            s.size("avg_chunk_size", &c.chunking.avgChunkSize, 1 << 10...1 << 30)
            s.size("max_chunk_size", &c.chunking.maxChunkSize, 1 << 10...1 << 30)
            s.bool("dedup_enabled", &c.chunking.dedupEnabled)
            s.bool("cut_plain_files", &c.chunking.cutPlainFiles)
        }
        if let problem = ChunkingParameters.problem(
            minSize: Int(c.chunking.minChunkSize), avgSize: Int(c.chunking.avgChunkSize),
            maxSize: Int(c.chunking.maxChunkSize))
        {
            r.errors.append(
                ConfigError(
                    code: .badValue, key: "chunking.min_chunk_size/avg_chunk_size/max_chunk_size",
                    value: "\(c.chunking.minChunkSize)/\(c.chunking.avgChunkSize)/\(c.chunking.maxChunkSize)",
                    allowed: "min_chunk_size < avg_chunk_size < max_chunk_size, avg a power of two (\(problem))"))
        }
        r.section("edge") { s in
            s.bool("enable_caching", &c.edge.enableCaching)
            s.size("cache_size", &c.edge.cacheSize, 1 << 20...1 << 50)
            s.duration("ttl_default", &c.edge.ttlDefault, 0...(365 * 86_400_000_000_000))
            s.origin("origin", &c.edge.origin)
            var maxAge = UInt64.max
            s.duration("origin_max_age", &maxAge, 0...(365 * 86_400_000_000_000))
            c.edge.originMaxAge = maxAge == .max ? nil : maxAge
        }
        // edge.enable_caching with no origin is accepted: the mesh fetches for it, and without
        // a mesh it is a `NodeConfig.notices` line.
        r.section("log") { s in
            s.choice("level", &c.log.level)
            s.string("qlog_dir", &c.log.qlogDir)
            s.fraction("qlog_sample", &c.log.qlogSample, of: "the fraction of connections (0.01 = one in a hundred)")
        }
        r.section("admin") { s in
            var listen = IPv6Endpoint(address: .any, port: 0)
            var given = false
            s.optionalEndpoint("listen", &listen, given: &given)
            c.admin.listen = given ? listen : nil
            s.choice("auth", &c.admin.auth)
            s.string("token_file", &c.admin.tokenFile)
        }
        if let listen = c.admin.listen, listen.address != .loopback, c.admin.auth == .none {
            // Anyone who can reach the port could read the node's metrics and status.
            r.errors.append(
                ConfigError(
                    code: .unsafe, key: "admin.listen", value: "\"\(listen)\"",
                    allowed: "is not loopback: set admin.auth = \"token\" or \"mtls\""))
        }
        r.mesh(&c.mesh)  // [mesh]: MeshConfig.swift
        if c.network.listenAddress.port == 0 && (c.mesh.enabled || !c.network.interface.isEmpty) {
            // Port 0 is a free port picked at each start (printed as `listening:`): fine for a
            // test node, not where others must know it.
            let needs = c.mesh.enabled ? "mesh peers reach this node on it" : "the XDP program on network.interface steers it"
            r.errors.append(
                ConfigError(
                    code: .badValue, key: "network.listen_addr", value: "\"\(c.network.listenAddress)\"",
                    allowed: "a fixed port, e.g. \"[::]:4433\" (port 0 picks a new one at each start, and \(needs))"))
        }
        if c.trust.bundle.isEmpty {
            // Who is verified against trust.bundle, and when nothing else would stand in for it:
            // the node's own CA verifies clients in embedded mode; nothing but the bundle should
            // verify mesh nodes (the system store would let any publicly trusted certificate in).
            var needs: [String] = []
            if c.trust.mode == .acme || !c.tls.certFile.isEmpty {  // the node runs no CA of its own
                if c.network.clientAuth != .none { needs.append("network.client_auth is on") }
                if c.admin.auth == .mtls { needs.append("admin.auth = \"mtls\"") }
            }
            let noCA = needs.isEmpty ? "" : "; the node does not run its own CA"
            if c.mesh.enabled { needs.append("the node is in a mesh (its neighbours and their adverts are verified against it)") }
            if !needs.isEmpty {
                r.errors.append(
                    ConfigError(
                        code: .badValue, key: "trust.bundle", value: "\"\"",
                        allowed: "a PEM file of the roots peers' certificates chain to, when " + needs.joined(separator: " and ") + noCA))
            }
        }
        r.tracing(&c.tracing)  // [tracing]: TracingConfig.swift
        r.limits(&c.limits)  // [limits]: LimitsConfig.swift
        r.access(&c.access, overwrite: &c.overwrite)  // [access]: AccessConfig.swift
        r.rejectUnknownSections(
            ["node", "network", "storage", "tls", "trust", "routing", "chunking", "edge", "log", "admin", "mesh", "tracing", "limits", "access"])
        return (c, r)
    }
}

/// Walks one table, taking the keys it knows and remembering what it saw.
struct Reader {
    let root: TOMLTable
    var errors: [ConfigError] = []
    /// Walk absent sections too, recording every key asked for in `known` (`knownKeys`).
    var collecting = false
    var known: [String] = []

    init(root: TOMLTable) { self.root = root }

    mutating func section(_ name: String, _ body: (inout Section) -> Void) {
        guard let v = root[name] ?? (collecting ? TOMLTable() : nil) else { return }
        guard let t = v.table else {
            errors.append(ConfigError(code: .badType, key: name, value: "\(v)", allowed: "a [\(name)] table"))
            return
        }
        var s = Section(prefix: name, table: t)
        s.collecting = collecting
        body(&s)
        s.rejectUnknown()
        errors += s.errors
        known += s.known
    }

    mutating func rejectUnknownSections(_ known: [String]) {
        for k in root.keys where !known.contains(k) {
            errors.append(
                ConfigError(
                    code: .unknownKey, key: k, value: "…",
                    allowed: "one of the sections " + known.map { "[\($0)]" }.joined(separator: ", ")))
        }
    }
}

struct Section {
    let prefix: String
    let table: TOMLTable
    var seen: [String] = []
    var errors: [ConfigError] = []
    var collecting = false
    var known: [String] = []

    init(prefix: String, table: TOMLTable) {
        self.prefix = prefix
        self.table = table
    }

    /// The value of `key`, marking it read (and known, for `ConfigLoader.knownKeys`).
    mutating func value(_ key: String) -> TOMLValueConvertible? {
        seen.append(key)
        known.append("\(prefix).\(key)")
        return table[key]
    }

    /// A nested table, or when collecting and it is absent, an empty one to walk.
    private mutating func nested(_ key: String, _ v: TOMLValueConvertible?) -> TOMLValueConvertible? {
        v ?? (collecting ? TOMLTable() : nil)
    }

    private mutating func walk(_ key: String, _ t: TOMLTable, _ body: (inout Section) -> Void) {
        var s = Section(prefix: "\(prefix).\(key)", table: t)
        s.collecting = collecting
        body(&s)
        s.rejectUnknown()
        errors += s.errors
        known += s.known
    }

    mutating func fail(_ code: ConfigError.Code, _ key: String, _ v: TOMLValueConvertible, _ allowed: String) {
        fail(code, key, shown: render(v), allowed)
    }

    /// An error whose value is already shown as the operator wrote it (an array element).
    mutating func fail(_ code: ConfigError.Code, _ key: String, shown: String, _ allowed: String) {
        errors.append(ConfigError(code: code, key: "\(prefix).\(key)", value: shown, allowed: allowed))
    }

    private func render(_ v: TOMLValueConvertible) -> String {
        if let s = v.string { return "\"\(s)\"" }
        return v.debugDescription
    }

    mutating func string(_ key: String, _ out: inout String, nonEmpty: Bool = false) {
        guard let v = value(key) else { return }
        guard let s = v.string else { return fail(.badType, key, v, "a string") }
        if nonEmpty && s.isEmpty { return fail(.badValue, key, v, "a non-empty string") }
        out = s
    }

    mutating func stringArray(_ key: String, _ out: inout [String]) {
        guard let v = value(key) else { return }
        let allowed = "an array of non-empty strings, e.g. [\"log.pem\"]"
        guard let a = v.array else { return fail(.badType, key, v, allowed) }
        var r: [String] = []
        for e in a {
            guard let s = e.string, !s.isEmpty else { return fail(.badValue, key, v, allowed) }
            r.append(s)
        }
        out = r
    }

    /// TLS 1.3 suites by name, checked against the TLS shim's table (`TLSCredentials`).
    mutating func cipherSuites(_ key: String, _ out: inout [String]) {
        guard let v = value(key) else { return }
        let known = TLSCredentials.cipherSuiteTable.map { "\"\($0.gnutls)\"" }.joined(separator: ", ")
        let allowed = "a non-empty array of \(known) (or their IANA names), each once"
        guard let a = v.array, a.count > 0 else { return fail(.badType, key, v, allowed) }
        var names: [String] = [], seen: Set<UInt8> = []
        for e in a {
            guard let s = e.string else { return fail(.badType, key, v, allowed) }
            // One suite per element, named once: the element that is not is the one shown.
            guard !s.contains(where: { ":, ".contains($0) }), let i = (try? TLSCredentials.cipherSuiteIndices([s]))?.first,
                seen.insert(i).inserted
            else { return fail(.badValue, key, shown: "\"\(s)\"", allowed) }
            names.append(s)
        }
        out = names
    }

    /// One of `options` by name: the only place a config word becomes its type.
    mutating func choice<T>(_ key: String, _ out: inout T, _ options: [(String, T)]) {
        guard let v = value(key) else { return }
        let list = "one of " + options.map { "\"\($0.0)\"" }.joined(separator: ", ")
        guard let s = v.string else { return fail(.badType, key, v, list) }
        guard let hit = options.first(where: { $0.0 == s }) else { return fail(.badValue, key, v, list) }
        out = hit.1
    }

    mutating func choice<T: RawRepresentable & CaseIterable>(_ key: String, _ out: inout T) where T.RawValue == String {
        choice(key, &out, T.allCases.map { ($0.rawValue, $0) })
    }

    mutating func bool(_ key: String, _ out: inout Bool) {
        guard let v = value(key) else { return }
        guard let b = v.bool else { return fail(.badType, key, v, "true or false") }
        out = b
    }

    mutating func int<T: BinaryInteger>(_ key: String, _ out: inout T, _ range: ClosedRange<Int>) {
        guard let v = value(key) else { return }
        let allowed = "an integer from \(range.lowerBound) to \(range.upperBound)"
        guard v.type == .int, let i = v.int else { return fail(.badType, key, v, allowed) }
        guard range.contains(i) else { return fail(.outOfRange, key, v, allowed) }
        out = T(i)
    }

    /// A fraction from 0 to 1, written as a float (`0.01`) or as 0 or 1; `of` says of what.
    mutating func fraction(_ key: String, _ out: inout Double, of meaning: String) {
        number(key, &out, 0...1, allowed: "a number from 0.0 to 1.0, \(meaning)")
    }

    /// A number in `range`, written as a float or an integer; `allowed` says what is.
    mutating func number(_ key: String, _ out: inout Double, _ range: ClosedRange<Double>, allowed: String) {
        guard let v = value(key) else { return }
        let d: Double
        if v.type == .double, let x = v.double {
            d = x
        } else if v.type == .int, let i = v.int {
            d = Double(i)
        } else {
            return fail(.badType, key, v, allowed)
        }
        guard d.isFinite, range.contains(d) else { return fail(.outOfRange, key, v, allowed) }
        out = d
    }

    mutating func size(_ key: String, _ out: inout UInt64, _ range: ClosedRange<UInt64>) {
        guard let v = value(key) else { return }
        let allowed = "a size such as 64KB, 1MB, 10GB (from \(range.lowerBound) to \(range.upperBound) bytes)"
        var parsed: UInt64?
        if v.type == .int, let i = v.int, i >= 0 { parsed = UInt64(i) } else if let s = v.string { parsed = Units.size(s) }
        guard let n = parsed else { return fail(.badValue, key, v, allowed) }
        guard range.contains(n) else { return fail(.outOfRange, key, v, allowed) }
        out = n
    }

    mutating func duration(_ key: String, _ out: inout UInt64, _ range: ClosedRange<UInt64>) {
        guard let v = value(key) else { return }
        let allowed = "a duration such as 250ms, 1s, 5m, 1h, 24h (from \(range.lowerBound / 1_000_000)ms to \(range.upperBound / 1_000_000_000)s)"
        if v.type == .int || v.type == .double {
            let n = v.int.map(String.init) ?? "\(v.double ?? 0)"
            return fail(.badType, key, v, "\(allowed) — a bare number has no unit: quote it with one, e.g. \"\(n)ms\" or \"\(n)s\"")
        }
        guard let s = v.string, let n = Units.duration(s) else { return fail(.badValue, key, v, allowed) }
        guard range.contains(n) else { return fail(.outOfRange, key, v, allowed) }
        out = n
    }

    mutating func endpoint(_ key: String, _ out: inout IPv6Endpoint) {
        guard let v = value(key) else { return }
        let allowed = "\"[ipv6-address]:port\", e.g. \"[::]:4433\" (STOQ is IPv6 only)"
        guard let s = v.string else { return fail(.badType, key, v, allowed) }
        switch IPv6Endpoint.parse(s) {
        case .success(let ep): out = ep
        case .failure(let e):
            fail(e.reason.contains("IPv4") ? .ipv4NotSupported : .badValue, key, v, "\(allowed) — \(e.reason)")
        }
    }

    /// Like `endpoint`, but "" means "not set".
    mutating func optionalEndpoint(_ key: String, _ out: inout IPv6Endpoint, given: inout Bool) {
        guard let v = table[key], let s = v.string, s.isEmpty else {
            let before = errors.count
            endpoint(key, &out)
            given = table[key] != nil && errors.count == before
            return
        }
        seen.append(key)
        given = false
    }

    mutating func origin(_ key: String, _ out: inout String) {
        guard let v = value(key) else { return }
        let allowed = "\"\" or an https://[ipv6]:port URL (STOQ is IPv6 only)"
        guard let s = v.string else { return fail(.badType, key, v, allowed) }
        if s.isEmpty { out = s; return }
        // A node's URL, as a mesh peer's: no path (the edge asks for /objects/… itself), a port,
        // an address it can be reached at.
        if case .failure(let e) = MeshURL.parse(s) {
            return fail(e.code == .ipv4Refused ? .ipv4NotSupported : .badValue, key, v, "\(allowed) — \(e.reason)")
        }
        out = s
    }

    /// A named profile (`key = "name"`), or a table whose optional `profile` key names the
    /// one its other keys start from. `apply` sets the profile before `body` reads the keys.
    mutating func profileOrTable<P>(
        _ key: String, _ apply: (P) -> Void, _ profiles: [(String, P)],
        _ body: (inout Section) -> Void
    ) {
        guard let v = nested(key, value(key)) else { return }
        let names = profiles.map { "\"\($0.0)\"" }.joined(separator: ", ")
        if let name = v.string {
            guard let p = profiles.first(where: { $0.0 == name }) else {
                return fail(.badValue, key, v, "a profile (\(names)) or a [\(prefix).\(key)] table")
            }
            return apply(p.1)
        }
        guard let t = v.table else { return fail(.badType, key, v, "a profile (\(names)) or a [\(prefix).\(key)] table") }
        walk(key, t) { s in
            var chosen: P?
            s.choice("profile", &chosen, profiles.map { ($0.0, Optional($0.1)) })
            if let chosen { apply(chosen) }
            body(&s)
        }
    }

    mutating func subsection(_ key: String, _ body: (inout Section) -> Void) {
        guard let v = nested(key, value(key)) else { return }
        guard let t = v.table else { return fail(.badType, key, v, "a [\(prefix).\(key)] table") }
        walk(key, t, body)
    }

    /// Keys that moved to another section, and where to: their old place is still an unknown
    /// key, named with the new one.
    static let movedKeys = ["mesh.cut_plain_files": "chunking.cut_plain_files"]

    mutating func rejectUnknown() {
        for k in table.keys where !seen.contains(k) {
            let key = "\(prefix).\(k)"
            errors.append(
                ConfigError(
                    code: .unknownKey, key: key, value: render(table[k]!),
                    allowed: Self.movedKeys[key].map { "none here: it moved to \($0)" } ?? "one of " + seen.joined(separator: ", ")))
        }
    }
}
