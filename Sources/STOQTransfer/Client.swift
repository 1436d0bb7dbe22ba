import CSTOQSystem
import Crypto
import Foundation
import STOQCore
import STOQDatapath
import STOQQUIC
import STOQTrust
import STOQWorker

/// A `https://host:port/path` URL, resolved to an IPv6 endpoint.
public struct STOQURL: Sendable, CustomStringConvertible {
    public var endpoint: IPv6Endpoint
    /// What the certificate must name (host name or IPv6 literal).
    public var host: String
    public var authority: String
    public var path: String
    public var description: String { "https://\(authority)\(path)" }

    /// Parses and resolves (IPv6 only: IPv4 literals and IPv4-only names are refused).
    public init(_ text: String) throws(ClientError) {
        guard text.hasPrefix("https://") else { throw ClientError(.badURL, "\(text): expected https://[ipv6]:port/path") }
        let rest = text.dropFirst(8)
        let authority = String(rest.prefix { $0 != "/" })
        let path = String(rest.dropFirst(authority.count))
        // HTTP sends a path as it is: a space, a control character or a non-ASCII byte in it
        // is a malformed request the server ends the connection for (RFC 3986 §2.1).
        if let i = path.utf8.firstIndex(where: { $0 <= 0x20 || $0 >= 0x7f }) {
            let offset = path.utf8.distance(from: path.utf8.startIndex, to: i)
            let byte = path.utf8[i]
            let what = byte == 0x20 ? "a space" : byte < 0x20 || byte == 0x7f ? "a control character" : "a non-ASCII character"
            throw ClientError(
                .badURL,
                "\(text): its path has \(what) at byte \(offset), which HTTP does not carry: percent-encode it (\(byte == 0x20 ? "%20" : "%\(String(byte, radix: 16, uppercase: true)) for this byte"))"
            )
        }
        self.authority = authority
        self.path = path.isEmpty ? "/" : path
        var host: String, port: UInt16 = 443
        if authority.hasPrefix("[") {
            guard let close = authority.firstIndex(of: "]") else { throw ClientError(.badURL, "\(text): unterminated [") }
            host = String(authority[authority.index(after: authority.startIndex)..<close])
            let after = authority[authority.index(after: close)...]
            if after.hasPrefix(":") {
                guard let p = UInt16(after.dropFirst()) else { throw ClientError(.badURL, "\(text): bad port") }
                port = p
            }
        } else {
            let parts = authority.split(separator: ":", maxSplits: 1)
            host = String(parts.first ?? "")
            if parts.count == 2 {
                guard let p = UInt16(parts[1]) else { throw ClientError(.badURL, "\(text): bad port") }
                port = p
            }
        }
        self.host = host
        if host.contains(".") && host.allSatisfy({ $0.isNumber || $0 == "." }) {
            throw ClientError(.badURL, "\(text): IPv4 is not supported; STOQ is IPv6 only")
        }
        if let a = IPv6Address(host) {
            endpoint = IPv6Endpoint(address: a, port: port)
        } else if host.lowercased().hasPrefix("::ffff:") {
            throw ClientError(.badURL, "\(text): IPv4-mapped addresses are not supported; STOQ is IPv6 only")
        } else {
            var hints = addrinfo()
            hints.ai_family = AF_INET6
            hints.ai_socktype = Int32(SOCK_DGRAM.rawValue)
            var res: UnsafeMutablePointer<addrinfo>?
            guard getaddrinfo(host, nil, &hints, &res) == 0, let r = res else {
                throw ClientError(.badURL, "\(text): \(host) has no IPv6 address")
            }
            defer { freeaddrinfo(res) }
            let sa = r.pointee.ai_addr.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee }
            endpoint = IPv6Endpoint(address: IPv6Address(sa.sin6_addr), port: port)
        }
    }
}

/// What a transfer did.
public struct TransferResult: Sendable, Codable {
    public var status: Int
    public var bytes: UInt64
    public var seconds: Double
    public var gbps: Double { seconds > 0 ? Double(bytes) * 8 / seconds / 1e9 : 0 }
    /// SHA-256 of the body, hex: received (GET, computed here), or stored (PUT: what the
    /// node's strong ETag names, "" when it sent none).
    public var sha256: String
    /// The body of an answer that was not 2xx (the server's reason, at most 2000 bytes).
    public var message: String? = nil
    /// The handshake resumed a session kept from an earlier connection (`SessionCache`).
    public var resumed: Bool? = nil
    /// With a session cache: whether the request went in 0-RTT, and whether the server took it.
    public var earlyData: EarlyData? = nil
    /// Seconds from the start of the connection (before the handshake) to the response's head.
    public var firstByteSeconds: Double? = nil
    /// What became of the server's preferred address: "none" (not offered), "used" (the
    /// transfer moved there after the handshake), "failed" (validation failed; it stayed).
    public var preferredAddress: String? = nil
    /// The server address the connection ended on (the preferred one once used).
    public var servedFrom: String? = nil
    /// Times the connection moved to a new local address because this host's went away.
    public var localMigrations: Int? = nil
    /// The TLS cipher suite agreed on, by its IANA name (`TLS_AES_128_GCM_SHA256`, ...).
    public var cipherSuite: String? = nil
    /// With `keyUpdate`: the key updates this end started (one once the handshake is confirmed,
    /// 0 when the transfer ended before).
    public var keyUpdates: Int? = nil
}

/// Sessions kept per server between runs, one file each (`<host>_<port>.session`, mode 0600)
/// under a directory (`stoq`'s is `$XDG_CACHE_HOME/stoq` or `~/.cache/stoq`): the next
/// connection to that server resumes instead of a full handshake, and sends its GETs in 0-RTT.
/// A missing file only costs that; an unreadable, damaged or old one is reported (`warn`) and
/// costs the same — the next successful run writes a good one over it.
///
/// The file (format version 2; integers big-endian): the 8 bytes `STOQSESS`, the version byte,
/// then the TLS session (GnuTLS's resumption data: 4-byte length, bytes), then the server's
/// transport parameters that 0-RTT must respect (RFC 9000 §7.4.1; in their wire encoding,
/// RFC 9000 §18: 4-byte length, bytes; length 0 when none were kept), then the cipher suites
/// the connection that made the session offered (`QUICConnection.offeredCipherSuites`: IANA
/// names separated by ':', in ASCII; 4-byte length, bytes). Nothing follows. Version 1 had no
/// suites; its files are refused.
///
/// A session is offered only by a connection that offers the same suites in the same order:
/// GnuTLS fails a resumption that changes the suite (`QUICConnection.offerSession`), so a run
/// with other `cipherSuites` makes a full handshake and keeps its own session.
///
/// A resumed handshake verifies no certificate: the session stands for the verification that
/// made it. So a cache made with a `ClientTrust` keeps its sessions under that trust's scope
/// (`<host>_<port>-<scope>.session`, `ClientTrust.sessionScope`): a run with another `--ca` or
/// other transparency logs resumes none of them and verifies the server itself.
public struct SessionCache: Sendable {
    /// What is kept for one server.
    public struct Entry: Sendable, Equatable {
        /// GnuTLS's data to resume the session (`QUICConnection.resumableSession`).
        public var session: [UInt8]
        /// The server's limits for 0-RTT (`QUICConnection.earlyParameters`); nil: none kept.
        public var earlyParameters: [UInt8]?
        /// What the connection that made the session offered (`QUICConnection.offeredCipherSuites`).
        public var offeredCipherSuites: String
        public init(session: [UInt8], earlyParameters: [UInt8]?, offeredCipherSuites: String) {
            self.session = session
            self.earlyParameters = earlyParameters
            self.offeredCipherSuites = offeredCipherSuites
        }
    }

    /// Why a kept file is not used.
    public struct FormatError: Error, Sendable, CustomStringConvertible, Equatable {
        public var description: String
    }

    /// The format `store` writes and `load` reads; any other is refused.
    public static let formatVersion: UInt8 = 2
    static let magic = Array("STOQSESS".utf8)

    public let directory: String
    /// The trust its sessions were verified under (`ClientTrust.sessionScope`); "" for none.
    public let scope: String
    let warn: @Sendable (String) -> Void
    /// `warn` hears of a kept file that cannot be used (its path and why). `trust`: what the
    /// connections that use this cache verify servers with.
    public init(directory: String, trust: ClientTrust? = nil, warn: @escaping @Sendable (String) -> Void = { _ in }) {
        self.directory = directory
        self.scope = trust?.sessionScope ?? ""
        self.warn = warn
    }

    /// The user's cache directory for stoq.
    public static var defaultDirectory: String {
        let env = ProcessInfo.processInfo.environment
        if let x = env["XDG_CACHE_HOME"], x.hasPrefix("/") { return x + "/stoq" }
        return (env["HOME"] ?? NSHomeDirectory()) + "/.cache/stoq"
    }

    /// The file's bytes for `entry`.
    public static func encode(_ entry: Entry) -> [UInt8] {
        func put(_ bytes: [UInt8], into out: inout [UInt8]) {
            let n = UInt32(bytes.count)
            out += [UInt8(n >> 24), UInt8(n >> 16 & 0xff), UInt8(n >> 8 & 0xff), UInt8(n & 0xff)]
            out += bytes
        }
        var out = magic + [formatVersion]
        put(entry.session, into: &out)
        put(entry.earlyParameters ?? [], into: &out)
        put(Array(entry.offeredCipherSuites.utf8), into: &out)
        return out
    }

    /// Reads a file's bytes; the error says what is wrong with them.
    public static func decode(_ bytes: [UInt8]) throws(FormatError) -> Entry {
        guard bytes.count > magic.count, Array(bytes.prefix(magic.count)) == magic else {
            throw FormatError(description: "not a stoq session file (an older stoq's, or damaged)")
        }
        let version = bytes[magic.count]
        guard version == formatVersion else {
            throw FormatError(description: "format version \(version), this stoq reads version \(formatVersion)")
        }
        var at = magic.count + 1
        func take() throws(FormatError) -> [UInt8] {
            guard bytes.count - at >= 4 else { throw FormatError(description: "truncated") }
            let n = bytes[at..<at + 4].reduce(0) { $0 << 8 | Int($1) }
            at += 4
            guard bytes.count - at >= n else { throw FormatError(description: "truncated") }
            defer { at += n }
            return Array(bytes[at..<at + n])
        }
        let session = try take(), early = try take(), suites = try take()
        guard at == bytes.count else { throw FormatError(description: "\(bytes.count - at) bytes after the end") }
        guard !session.isEmpty else { throw FormatError(description: "no session in it") }
        guard !suites.isEmpty, suites.allSatisfy({ (0x21...0x7e).contains($0) }) else {
            throw FormatError(description: "no cipher suite names in it")
        }
        return Entry(
            session: session, earlyParameters: early.isEmpty ? nil : early,
            offeredCipherSuites: String(decoding: suites, as: UTF8.self))
    }

    func path(for url: STOQURL) -> String {
        let host = url.host.map { $0.isLetter || $0.isNumber || $0 == "." || $0 == "-" ? $0 : "_" }
        return directory + "/" + String(host) + "_\(url.endpoint.port)" + (scope.isEmpty ? "" : "-" + scope) + ".session"
    }

    /// What is kept for `url`'s server; nil when nothing (usable) is.
    public func load(for url: STOQURL) -> Entry? {
        let file = path(for: url)
        guard let d = FileManager.default.contents(atPath: file) else { return nil }
        do { return try Self.decode([UInt8](d)) } catch {
            warn("session cache \(file): \(error); resuming nothing (a full handshake)")
            return nil
        }
    }

    /// Writes atomically (temp file, rename), readable by the user only: a session is a secret.
    public func store(_ entry: Entry, for url: STOQURL) {
        try? FileManager.default.createDirectory(
            atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let final = path(for: url), temp = final + ".\(getpid()).tmp"
        guard
            FileManager.default.createFile(
                atPath: temp, contents: Data(Self.encode(entry)), attributes: [.posixPermissions: 0o600])
        else { return }
        if rename(temp, final) != 0 { unlink(temp) }
    }

    /// Offers `url`'s kept session to `connection` (a client's, before its first packet), and
    /// with `early` the kept 0-RTT parameters too. Returns whether requests may go now (0-RTT).
    func offer(for url: STOQURL, to connection: QUICConnection, early: Bool) -> Bool {
        guard let entry = load(for: url), connection.offerSession(entry.session, offeredCipherSuites: entry.offeredCipherSuites) else {
            return false
        }
        guard early, let p = entry.earlyParameters else { return false }
        return connection.offerEarlyParameters(p)
    }

    /// Keeps what `connection` (established) learnt of its server for the next run: its newest
    /// session, and the limits 0-RTT needs. Nothing when the server sent no ticket.
    func keep(from connection: QUICConnection, for url: STOQURL) {
        guard let session = connection.resumableSession else { return }
        store(
            Entry(session: session, earlyParameters: connection.earlyParameters, offeredCipherSuites: connection.offeredCipherSuites),
            for: url)
    }
}

/// A client-side failure, naming what went wrong.
public struct ClientError: Error, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable {
        let name: String
        public static let badURL = Code(name: "bad URL")
        public static let tls = Code(name: "TLS")
        public static let connect = Code(name: "connect")
        public static let transfer = Code(name: "transfer")
        public static let http = Code(name: "HTTP")
        public static let io = Code(name: "I/O")
        public static let integrity = Code(name: "integrity")
        /// The server has no manifest of the object (404): it may keep it as a plain file only.
        public static let noManifest = Code(name: "no manifest")
    }
    public var code: Code
    public var message: String
    public init(_ code: Code, _ message: String) { self.code = code; self.message = message }
    public var description: String { message }

    /// The client's own deadline passed (`--timeout`, `seconds`); `progress` says how far the
    /// transfer got ("" when it had not started).
    static func timedOut(after seconds: Double, _ progress: String) -> ClientError {
        ClientError(.transfer, "timed out after \(seconds) s (the transfer's timeout)" + (progress.isEmpty ? "" : ", \(progress)"))
    }
}

/// Trust settings for a client.
public struct ClientTrust: Sendable {
    /// PEM file of certificates to trust (a node's cert.pem); nil = the system store.
    public var caFile: String?
    /// Skip verification (explicit opt-in only).
    public var insecure = false
    /// A certificate chain and key to present when the server asks (mutual TLS).
    public var certificateFile: String?
    public var keyFile: String?
    /// When non-empty, transparency is required: the server's certificate must carry an
    /// embedded SCT that verifies with one of these log public keys (PEM files).
    public var transparencyLogs: [String] = []
    /// The TLS cipher suites to offer, in order (`TLSCredentials.restrict(cipherSuites:)`'s
    /// names); nil: all of QUIC's, AES-128-GCM first.
    public var cipherSuites: [String]?
    /// What a verified server's chain says it is, kept as `QUICConnection.peerIdentity` (the
    /// mesh: its node id); nil: nothing.
    public var identifyServer: (@Sendable (_ chain: [[UInt8]]) -> String)?
    public init(
        caFile: String? = nil, insecure: Bool = false, certificateFile: String? = nil, keyFile: String? = nil,
        transparencyLogs: [String] = [], cipherSuites: [String]? = nil
    ) {
        self.transparencyLogs = transparencyLogs
        self.cipherSuites = cipherSuites
        self.caFile = caFile
        self.insecure = insecure
        self.certificateFile = certificateFile
        self.keyFile = keyFile
    }

    /// What a server is verified against, as 16 hex digits (a SHA-256 prefix of the CA file's
    /// bytes, or "system", and each transparency log key's): the scope of the sessions a
    /// `SessionCache` keeps, so that a session verified under one trust never stands in for
    /// another. A file that cannot be read makes a scope of its own (the handshake then fails
    /// by name).
    public var sessionScope: String {
        var h = SHA256()
        func add(_ label: String, _ file: String?) {
            h.update(data: Data(label.utf8))
            guard let file else { return h.update(data: Data("system".utf8)) }
            let bytes = FileManager.default.contents(atPath: file) ?? Data("unreadable \(file)".utf8)
            h.update(data: Data(withUnsafeBytes(of: UInt64(bytes.count).bigEndian, Array.init)))
            h.update(data: bytes)
        }
        add("ca", caFile)
        for key in transparencyLogs.sorted() { add("log", key) }
        return h.finalize().prefix(8).map { String(format: "%02x", $0) }.joined()
    }
}

final class TransferApp: QUICApplication {
    var status: Int?
    var contentLength: Int64?
    var closed: UInt64?
    var received: UInt64 = 0
    var sha: [UInt8]?
    var connectionError: String?
    let sinkFD: Int32
    /// Where in `sinkFD` (a regular file) the body starts.
    let sinkOffset: UInt64
    let hash: Bool
    var stream: HTTPStream?
    /// Where an answer that is not 2xx lands (its text is the server's reason).
    var errorFD: Int32 = -1
    var errorText: String?
    /// errno of a failed write of the body to `sinkFD` (0: every byte landed).
    var sinkErrno: Int32 = 0
    /// A request body read as it comes (`STOQClient.put(reading:)`).
    var streamedBody: StreamedBody?
    init(sinkFD: Int32, sinkOffset: UInt64 = 0, hash: Bool) { (self.sinkFD, self.sinkOffset, self.hash) = (sinkFD, sinkOffset, hash) }
    deinit { if errorFD >= 0 { close(errorFD) } }
    /// When the response's head arrived (monotonic ns).
    var headAt: UInt64?
    /// The SHA-256 the response's ETag names (a PUT's: what the node stored).
    var storedSHA256: String?
    var head: HTTPResponseHead?
    func response(_ head: HTTPResponseHead, stream: HTTPStream, connection: QUICConnection) {
        let status = head.status, contentLength = head.contentLength
        self.head = head
        headAt = monotonicNow()
        self.status = status
        self.contentLength = contentLength
        storedSHA256 = head.etagSHA256
        let ok = status / 100 == 2
        if !ok && errorFD < 0 { errorFD = stoq_memfd("stoq-error-body") }
        // An error body is read for its message only (`errorText`): its first bytes are kept
        // and the rest refused (EFBIG, the stream reset with H3_EXCESSIVE_LOAD), so an endless
        // 404 costs 4 KiB of this memfd (RAM), not all it sends until the timeout.
        stream.setBodySink(
            fd: ok ? sinkFD : errorFD, offset: ok ? sinkOffset : 0, limit: ok ? .max : ConnectionPool.errorBodyLimit, hash: hash)
    }
    func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) {
        closed = errorCode
        received = stream.bytesReceived
        sha = stream.bodySHA256()
        sinkErrno = stream.sinkErrno
        if errorFD >= 0 {
            var bytes = [UInt8](repeating: 0, count: Int(min(stream.bytesReceived, 2000)))
            let n = bytes.withUnsafeMutableBytes { pread(errorFD, $0.baseAddress, $0.count, 0) }
            if n > 0 { errorText = String(decoding: bytes.prefix(n), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) }
        }
        self.stream = nil
    }
    func bodyWanted(stream: HTTPStream, connection: QUICConnection) {
        streamedBody?.feed(connection, stream, asked: true)
    }
    func connectionClosed(connection: QUICConnection, reason: String) {
        connectionError = reason.isEmpty ? "connection closed by the server" : reason
    }
}

/// What every client run needs: credentials, one socket and ring, a client endpoint
/// tuned for receiving, and the worker loop that drives them on the calling thread.
package struct ClientRig {
    package let queue: DatapathQueue
    package let endpoint: QUICEndpoint
    package let worker: Worker
    private let watch = AddressWatch()
    /// Whether each connection starts one TLS key update once its handshake is confirmed.
    private let updatesKeys: Bool

    /// What `followOwnAddress` saw: the datapath's send errors so far, when it last looked,
    /// and the moves made.
    private final class AddressWatch {
        var txErrors: UInt64 = 0
        var checkedAt: Timestamp = 0
        var migrations = 0
    }

    /// How often `followOwnAddress` looks even when no send failed: a client that only
    /// receives sends nothing once its address is gone (nothing arrives to acknowledge), so
    /// no failed send would ever tell it.
    static let ownAddressCheckInterval: UInt64 = 200_000_000

    /// Connections moved to a new local address because this host's old one went away.
    package var localMigrations: Int { watch.migrations }

    /// What the rig does beside the worker: follows this host's address and, with
    /// `updatesKeys`, starts the key updates. Call every turn of the loop.
    package func tend(now: Timestamp) {
        followOwnAddress(now: now)
        guard updatesKeys else { return }
        // ngtcp2 refuses the update until the handshake is confirmed: the next turn tries again.
        for conn in endpoint.allConnections where conn.keyUpdatesInitiated == 0 && conn.isEstablished && !conn.isClosed {
            _ = conn.initiateKeyUpdate(now: now)
        }
    }

    /// Follows this host's own address: when a connection's local address is no longer one
    /// of the host's (removed, or its interface renumbered), it moves to the address the
    /// kernel now picks toward the server (RFC 9000 §9.2: the server validates the new path).
    /// The socket is bound to `[::]`, so it stays. It looks when sends fail (the kernel refuses
    /// a source it no longer has) and every `ownAddressCheckInterval`: a bind test per
    /// connection, nothing per packet. `tend` calls it every turn. A NAT rebinding the source
    /// port needs nothing here: the server sees a new peer address and validates it itself.
    private func followOwnAddress(now: Timestamp) {
        let errors = queue.counters.txErrors
        guard errors != watch.txErrors || now &- watch.checkedAt >= Self.ownAddressCheckInterval else { return }
        (watch.txErrors, watch.checkedAt) = (errors, now)
        for conn in endpoint.allConnections where conn.isEstablished && !conn.isClosed {
            let local = conn.currentLocal
            guard !STOQClient.isOwnAddress(local.address) else { continue }
            let fresh = STOQClient.sourceAddress(toward: conn.currentRemote)
            guard !fresh.isUnspecified, fresh != local.address else { continue }
            do {
                try conn.migrate(to: IPv6Endpoint(address: fresh, port: local.port), now: now)
                watch.migrations += 1
            } catch {
                // No spare connection ID yet, or a preferred-address move under way: the next
                // look tries again.
            }
        }
    }

    /// Closes `conn` once the server can know that everything it sent arrived, then waits (at
    /// most 200 ms) for the close to go out. The server's side of a stream ends only when its
    /// last packet is acknowledged (a response's FIN, or the RESET_STREAM answering a refused
    /// body's STOP_SENDING), ngtcp2 holds an ACK back for `ackDelay`, and a CONNECTION_CLOSE
    /// carries none: closed at once, the server's stream ended with the connection, as
    /// H3_REQUEST_CANCELLED (a complete GET traced as an error on the node, a refusal's
    /// H3_EXCESSIVE_LOAD lost). Driving the connection for that delay first (an eighth of the
    /// RTT, at most 25 ms) sends the ACK.
    package func close(_ conn: QUICConnection) {
        if !conn.isClosed {
            let delay = conn.ackDelay
            let until = monotonicNow() + delay
            _ = try? worker.run(timeout: delay + 1_000_000) { monotonicNow() >= until || conn.isClosed }
        }
        conn.close(now: monotonicNow())
        _ = try? worker.run(timeout: 200_000_000) { endpoint.connectionCount == 0 }
    }

    /// The TLS credentials a client with `trust` handshakes with: its roots, transparency logs
    /// and client certificate read now.
    package static func credentials(_ trust: ClientTrust) throws(ClientError) -> TLSCredentials {
        do {
            // The one certificate policy (PeerVerifier, role server), as `stoq trust verify` runs it.
            var policy: PeerCertificateCheck?
            if !trust.insecure {
                let roots = try trust.caFile.map { try PEMFiles.readCertificates($0) } ?? PEMFiles.systemRoots()
                let logs = trust.transparencyLogs.isEmpty ? nil : try CertificateTransparency.loadLogKeys(trust.transparencyLogs)
                let verifier = PeerVerifier(roots: roots, role: .server, transparencyLogs: logs)
                policy = PeerCertificateCheck(identity: verifier.fingerprint, identify: trust.identifyServer, verifier.refusal)
            }
            return try TLSCredentials(
                policy: policy, insecure: trust.insecure,
                certificateFile: trust.certificateFile, keyFile: trust.keyFile, cipherSuites: trust.cipherSuites)
        } catch {
            throw ClientError(.tls, "\(error)")
        }
    }

    package init(
        trust: ClientTrust, datapath: ClientDatapath, application: QUICApplication,
        congestionControl: CongestionControl = QUICSettings().congestionControl, qlogDirectory: String? = nil,
        handshakeTimeout: Double? = nil, keepAlive: UInt64 = 0, updatesKeys: Bool = false
    ) throws(ClientError) {
        self.updatesKeys = updatesKeys
        let creds = try Self.credentials(trust)
        do { queue = try datapath.open() } catch {
            throw ClientError(.connect, "\(error)")
        }
        var settings = QUICSettings()
        settings.maxWindow = 256 << 20
        settings.maxStreamWindow = 256 << 20
        // A receiver acknowledges every 8th packet (and on the ACK-delay timer) instead of every 2nd:
        // a quarter of the ACKs to build, encrypt and send, and to process on the sender.
        settings.ackThreshold = 8
        // Matters when this end sends (uploads).
        settings.congestionControl = congestionControl
        if let handshakeTimeout {
            settings.handshakeTimeout = UInt64(handshakeTimeout * 1e9)
            // Silence for the idle timeout ends a handshake too: on a lossy link, probes backed
            // off to 1 + 2 + 4 + 8 + 16 s outlast the default 30 s, cutting a longer timeout short.
            settings.idleTimeout = max(settings.idleTimeout, settings.handshakeTimeout)
        }
        settings.keepAlive = keepAlive
        // This end's idle timeout outlasts three keep-alive intervals; the node's own bounds it.
        settings.idleTimeout = max(settings.idleTimeout, 3 * keepAlive)
        endpoint = QUICEndpoint(
            isServer: false, credentials: creds, settings: settings, workerID: 0,
            secret: StaticSecret.random())
        endpoint.application = application
        if let qlogDirectory {
            do { try endpoint.setQLog(directory: qlogDirectory, sample: 1) } catch {
                queue.close()
                throw ClientError(.io, "\(error)")
            }
        }
        worker = Worker(queue: queue, endpoint: endpoint)
    }
}

/// The STOQ client: one connection, one request, on the calling thread.
public enum STOQClient {
    /// The local address the kernel would send from toward `remote`: the QUIC path must
    /// name it exactly, because replies arrive addressed to it.
    package static func sourceAddress(toward remote: IPv6Endpoint) -> IPv6Address {
        let fd = socket(AF_INET6, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { return .any }
        defer { close(fd) }
        var sa = remote.sockaddr
        let ok = withUnsafePointer(to: &sa) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
        }
        guard ok == 0 else { return .any }
        var local = sockaddr_in6()
        var len = socklen_t(MemoryLayout<sockaddr_in6>.size)
        _ = withUnsafeMutablePointer(to: &local) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        return IPv6Address(local.sin6_addr)
    }

    /// A transfer's PING after this long without a word from the server (`QUICSettings.keepAlive`):
    /// after a NAT rebinding or with its address gone, a receiving client would otherwise wait
    /// silently for the idle timeout.
    package static let transferKeepAlive: UInt64 = 1_000_000_000

    /// Whether `address` is one of this host's (a UDP socket can bind to it).
    package static func isOwnAddress(_ address: IPv6Address) -> Bool {
        let fd = socket(AF_INET6, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { return true }
        defer { close(fd) }
        var sa = IPv6Endpoint(address: address, port: 0).sockaddr
        return withUnsafePointer(to: &sa) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
        } == 0 || errno != EADDRNOTAVAIL
    }

    /// Downloads `url` into `fd` (-1 discards). `progress(received, total)` is called as bytes arrive,
    /// at most once per `progressInterval` nanoseconds (0: after every turn of the event loop, for
    /// a benchmark timing the bytes).
    /// With `hash` the body's SHA-256 is computed as it arrives (`TransferResult.sha256`).
    /// With `qlogDirectory` the connection writes its qlog there (`<odcid-hex>.client.sqlog`).
    /// `headers` go with the request (e.g. W3C `traceparent`, so the node's spans join a trace).
    /// With `sessionCache` the server's kept session is resumed and, unless `earlyData` is
    /// false, the GET goes in 0-RTT when the server's parameters were kept too. A handshake not
    /// done within `connectTimeout` seconds fails (`QUICSettings.handshakeTimeout` by default).
    /// With `keyUpdate` the client starts one TLS key update as soon as the handshake is
    /// confirmed (RFC 9001 §6), to exercise the server's.
    public static func get(
        _ url: STOQURL, into fd: Int32, at offset: UInt64 = 0, trust: ClientTrust, datapath: ClientDatapath, hash: Bool = true,
        timeout: Double = 300,
        connectTimeout: Double? = nil, congestionControl: CongestionControl = QUICSettings().congestionControl, qlogDirectory: String? = nil,
        headers: [(String, String)] = [],
        sessionCache: SessionCache? = nil, earlyData: Bool = true, keyUpdate: Bool = false,
        progressInterval: UInt64 = 100_000_000, progress: ((UInt64, UInt64?) -> Void)? = nil
    ) throws(ClientError) -> TransferResult {
        try transfer(
            url, method: "GET", body: nil, sinkFD: fd, sinkOffset: offset, hash: hash, trust: trust, datapath: datapath, timeout: timeout,
            connectTimeout: connectTimeout, congestionControl: congestionControl, qlogDirectory: qlogDirectory, headers: headers, sessionCache: sessionCache,
            earlyData: earlyData, keyUpdate: keyUpdate, progressInterval: progressInterval, progress: progress)
    }

    /// Uploads `file` to `url` with PUT, its length announced; this end's `congestionControl`
    /// paces it. The file is read as it is sent, not mapped: one that shrinks meanwhile resets
    /// the request and throws `.io` naming it (a mapping would take SIGBUS). A file that is not
    /// a regular one (a FIFO, `/dev/stdin`, a process substitution) has no length to announce:
    /// it is read to its end as `put(reading:)` does.
    /// `progress(acknowledged, total)` is called as the server acknowledges body bytes, at
    /// most every 100 ms, and once at the end.
    public static func put(
        file: String, to url: STOQURL, trust: ClientTrust, datapath: ClientDatapath, timeout: Double = 300,
        congestionControl: CongestionControl = QUICSettings().congestionControl, headers: [(String, String)] = [],
        progress: ((UInt64, UInt64?) -> Void)? = nil
    ) throws(ClientError) -> TransferResult {
        let fd = open(file, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw ClientError(.io, "\(file): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw ClientError(.io, "\(file): \(String(cString: strerror(errno)))") }
        switch st.st_mode & S_IFMT {
        case S_IFREG: break
        case S_IFDIR: throw ClientError(.io, "\(file): is a directory")
        default:
            return try put(
                reading: fd, to: url, trust: trust, datapath: datapath, timeout: timeout, congestionControl: congestionControl, headers: headers,
                progress: progress)
        }
        do {
            return try transfer(
                url, method: "PUT", body: nil, bodyFrom: fd, bodyLength: UInt64(st.st_size), sinkFD: -1, hash: false, trust: trust,
                datapath: datapath, timeout: timeout, congestionControl: congestionControl, headers: headers, progress: progress)
        } catch let error where error.code == .io {
            throw ClientError(.io, "\(file): \(error.message)")
        }
    }

    /// Uploads what `fd` yields (a pipe, stdin: read until its end, not closed here) to `url`
    /// with PUT, as it comes and without a content-length; `bytes` in the result is how much
    /// was read. A failed read resets the request and throws `.io`. `progress` as for
    /// `put(file:)`, with no total.
    public static func put(
        reading fd: Int32, to url: STOQURL, trust: ClientTrust, datapath: ClientDatapath, timeout: Double = 300,
        congestionControl: CongestionControl = QUICSettings().congestionControl, headers: [(String, String)] = [],
        progress: ((UInt64, UInt64?) -> Void)? = nil
    ) throws(ClientError) -> TransferResult {
        try transfer(
            url, method: "PUT", body: nil, bodyFrom: fd, sinkFD: -1, hash: false, trust: trust, datapath: datapath,
            timeout: timeout, congestionControl: congestionControl, headers: headers, progress: progress)
    }

    /// Whether a GET with `headers` asks for the whole object (no `Range`): then only
    /// `wholeObjectRefusal`'s answers are it.
    static func asksForWholeObject(_ headers: [(String, String)]) -> Bool {
        !headers.contains { $0.0.lowercased() == "range" }
    }

    /// Why an answer of `status` with `received` body bytes to a GET for a whole object (one
    /// without `Range`) is not that object; nil when it is, or is no 2xx (the caller reports
    /// those). Only a 200 is the object, or a 204 with no body an empty one: a 206 is a part of
    /// it, and another 2xx (202, 203, 205, ...) is not what the server holds. Taken as the
    /// object, it would be saved over the target unchecked (`bodyMismatch` checks a 200's).
    static func wholeObjectRefusal(status: Int, received: UInt64) -> String? {
        switch status {
        case 200: return nil
        case 204: return received == 0 ? nil : "the server answered 204 (no content) with \(received) bytes of body"
        case 206: return "the server sent part of the object (206) to a request for all of it"
        case 200..<300: return "the server answered \(status), not the object (200) asked for"
        default: return nil
        }
    }

    static func transfer(
        _ url: STOQURL, method: String, body: BodyRegion?, bodyFrom: Int32? = nil, bodyLength: UInt64? = nil, sinkFD: Int32,
        sinkOffset: UInt64 = 0, hash: Bool, trust: ClientTrust,
        datapath: ClientDatapath, timeout: Double, connectTimeout: Double? = nil, congestionControl: CongestionControl,
        qlogDirectory: String? = nil,
        headers: [(String, String)] = [],
        sessionCache: SessionCache? = nil, earlyData: Bool = false, keyUpdate: Bool = false,
        progressInterval: UInt64 = 100_000_000, progress: ((UInt64, UInt64?) -> Void)?
    ) throws(ClientError) -> TransferResult {
        let app = TransferApp(sinkFD: sinkFD, sinkOffset: sinkOffset, hash: hash)
        let rig = try ClientRig(
            trust: trust, datapath: datapath, application: app, congestionControl: congestionControl,
            qlogDirectory: qlogDirectory, handshakeTimeout: connectTimeout, keepAlive: transferKeepAlive, updatesKeys: keyUpdate)
        defer { rig.queue.close() }
        let queue = rig.queue, endpoint = rig.endpoint, worker = rig.worker
        let start = monotonicNow()
        let conn: QUICConnection
        do {
            let source = IPv6Endpoint(address: sourceAddress(toward: url.endpoint), port: queue.localEndpoint.port)
            conn = try endpoint.connect(
                to: url.endpoint, from: source,
                serverName: url.host, now: start)
        } catch { throw ClientError(.connect, "\(error)") }
        // A GET (or HEAD) to a server we kept a session for goes in 0-RTT, a round trip sooner.
        let early =
            sessionCache?.offer(for: url, to: conn, early: earlyData && EarlyData.allows(method) && body == nil) ?? false
        let deadline = UInt64(timeout * 1e9)
        if !early {
            do {
                try worker.run(timeout: deadline) { conn.isEstablished || app.connectionError != nil }
            } catch { throw ClientError(.connect, "\(error)") }
            guard conn.isEstablished else {
                throw ClientError(.connect, "cannot connect to \(url.endpoint): \(app.connectionError ?? "timed out")")
            }
        }
        let stream: HTTPStream
        let streamed = bodyFrom.map { StreamedBody(fd: $0, length: bodyLength, wakeFD: endpoint.sinkWakeFileDescriptor) }
        defer { streamed?.cancel() }
        do {
            if streamed != nil {
                stream = try conn.requestStreamed(
                    method: method, authority: url.authority, path: url.path,
                    headers: headers + (bodyLength.map { [("content-length", "\($0)")] } ?? []))
            } else {
                stream = try conn.request(
                    method: method, authority: url.authority, path: url.path,
                    headers: headers + (body.map { [("content-length", "\($0.count)")] } ?? []), body: body)
            }
        } catch { throw ClientError(.transfer, "\(error)") }
        app.stream = stream
        app.streamedBody = streamed
        // Progress is the body's way: an upload's by what the server acknowledged of it.
        // nil for a download; .some(nil) for an upload of unknown length (a pipe).
        let uploadLength: UInt64?? = streamed != nil ? .some(bodyLength) : body.map { .some(UInt64($0.count)) }
        let t0 = monotonicNow()
        var lastReport: UInt64 = 0
        // STOQ_STATS=1: the transport's state every 100 ms, then the datapath's counters (stderr).
        let stats = ProcessInfo.processInfo.environment["STOQ_STATS"] != nil
        var lastSample: UInt64 = 0
        let ended: Bool
        do {
            ended = try worker.run(timeout: deadline) {
                rig.tend(now: monotonicNow())
                if let streamed, let s = app.stream { streamed.feed(conn, s) }
                if stats {
                    let now = monotonicNow()
                    if now - lastSample > 100_000_000 {
                        lastSample = now
                        let st = conn.stats
                        FileHandle.standardError.write(
                            Data(
                                ("transport: t=\((now - t0) / 1_000_000)ms cwnd=\(st.cwnd) "
                                    + "in_flight=\(st.bytes_in_flight) srtt=\(st.smoothed_rtt_ns / 1000)us min_rtt=\(st.min_rtt_ns / 1000)us\n").utf8))
                    }
                }
                if let progress, let s = app.stream {
                    let now = monotonicNow()
                    if now - lastReport >= progressInterval {
                        lastReport = now
                        if let uploadLength {
                            progress(s.bodyBytesAcknowledged, uploadLength)
                        } else {
                            progress(s.bytesReceived, app.contentLength.map { UInt64($0) })
                        }
                    }
                }
                return app.closed != nil || app.connectionError != nil
            }
        } catch { throw ClientError(.transfer, "\(error)") }
        let seconds = Double(monotonicNow() - t0) / 1e9
        if stats {
            let d = queue.counters, e = endpoint.counters
            FileHandle.standardError.write(
                Data(
                    "stats: rx \(d.rxDatagrams) datagrams in \(d.rxBuffers) buffers, tx \(d.txDatagrams) datagrams in \(d.txSends) sends; endpoint in \(e.datagramsIn) out \(e.datagramsOut)\n"
                        .utf8))
        }
        guard conn.isEstablished else {  // a request sent in 0-RTT waited for a handshake that failed
            throw ClientError(.connect, "cannot connect to \(url.endpoint): \(app.connectionError ?? "timed out")")
        }
        if let sessionCache { sessionCache.keep(from: conn, for: url) }
        let resumed = sessionCache == nil ? nil : conn.isResumed
        let earlyData = sessionCache == nil ? nil : conn.earlyData
        let preferred = conn.preferredAddress, servedFrom = conn.currentRemote, cipherSuite = conn.cipherSuite
        let keyUpdates = keyUpdate ? conn.keyUpdatesInitiated : nil
        rig.close(conn)
        if !ended {
            // Our own deadline: closing reset the stream (0x10c), which is not the server's doing.
            // An upload is counted by what was read of its body; the response's bytes say nothing.
            let progress = streamed.map { "\($0.outcome.bytes) bytes of the body read" } ?? "\(app.received) bytes received"
            throw ClientError.timedOut(after: timeout, progress)
        }
        let sent = streamed?.outcome
        if let sent, sent.errno != 0 {
            throw ClientError(.io, "reading the body failed after \(sent.bytes) bytes: \(String(cString: strerror(sent.errno)))")
        }
        if let sent, let announced = sent.shortOf {
            throw ClientError(.io, "shrank to \(sent.bytes) bytes while it was sent (\(announced) announced); the upload was cancelled")
        }
        guard let closed = app.closed else {
            throw ClientError(.transfer, "transfer failed: \(app.connectionError ?? "timed out")")
        }
        guard let status = app.status else {
            // A connection the server closed ends its streams too: its reason (a refused
            // certificate's TLS alert, say) is the one to give.
            if let why = app.connectionError { throw ClientError(.transfer, "connection closed before a response: \(why)") }
            throw ClientError(.transfer, "stream reset by the server (\(H3Error.Code(rawValue: closed).resetReason))")
        }
        // An error body past `ConnectionPool.errorBodyLimit`, refused here: the answer is the
        // status and the body's first bytes (the server's reason), not a failed transfer.
        let errorCut = status / 100 != 2 && app.sinkErrno == EFBIG
        if closed != H3Error.noError && !errorCut {
            throw ClientError(.transfer, "transfer aborted (\(H3Error.Code(rawValue: closed).resetReason)) after \(app.received) bytes")
        }
        if app.sinkErrno != 0 && status / 100 == 2 {
            throw ClientError(.io, "writing the body failed after \(app.received) bytes: \(String(cString: strerror(app.sinkErrno)))")
        }
        if method == "GET", asksForWholeObject(headers),
            let why = Self.wholeObjectRefusal(status: status, received: app.received)
        {
            throw ClientError(.http, why)
        }
        if method == "GET", let why = app.head?.bodyMismatch(sha256: app.sha) { throw ClientError(.integrity, why) }
        if let uploadLength {
            let total = sent?.bytes ?? UInt64(body?.count ?? 0)
            progress?(total, uploadLength ?? total)
        } else {
            progress?(app.received, app.contentLength.map { UInt64($0) })
        }
        let sha = method == "GET" ? app.sha.map(Hex.encode) ?? "" : app.storedSHA256 ?? ""
        return TransferResult(
            status: status, bytes: method == "GET" ? app.received : sent?.bytes ?? UInt64(body?.count ?? 0),
            seconds: seconds, sha256: sha, message: app.errorText, resumed: resumed, earlyData: earlyData,
            firstByteSeconds: app.headAt.map { Double($0 - start) / 1e9 }, preferredAddress: preferred.rawValue,
            servedFrom: "\(servedFrom)", localMigrations: rig.localMigrations, cipherSuite: cipherSuite,
            keyUpdates: keyUpdates)
    }
}
