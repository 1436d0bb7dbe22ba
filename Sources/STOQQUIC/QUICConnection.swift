import CNgtcp2
import STOQCore
#if canImport(Glibc)
import Glibc
#endif

/// One QUIC connection (with its TLS session and HTTP/3 session), owned by one
/// endpoint on one worker thread.
public final class QUICConnection: TimerHeapElement {
    enum State {
        case active
        /// We sent CONNECTION_CLOSE; answer further packets with it until the deadline.
        case closing(deadline: Timestamp, packet: [UInt8])
        /// The peer closed; stay silent until the deadline.
        case draining(deadline: Timestamp)
    }

    let raw: OpaquePointer
    unowned let endpoint: QUICEndpoint
    var state: State = .active
    /// CIDs this connection answers to in the endpoint's table.
    var cids: [ConnectionID] = []
    /// Its deadline in the endpoint's timers (`.max`: none), and its place there (-1: none).
    var scheduled: Timestamp = .max
    var timerIndex = -1
    var isDirty = false
    /// Closing: its CONNECTION_CLOSE has not been sent yet (`pollTransmit` sends it, as it sends
    /// any connection's packets, so closing thousands at once loses none).
    var closeOwed = false
    var removed = false
    /// Counted in the endpoint's established connections (its half-open count is the rest).
    var countedEstablished = false
    /// Why it closed ("" while it is open): its own words, or the peer's.
    public internal(set) var closeReason = ""
    var closeResends = 0
    /// When the last datagram from the peer arrived (0: none yet): a drain lets a silent one go.
    var lastHeard: Timestamp = 0

    /// The peer's address as first seen (the path may migrate; packets go where ngtcp2 says).
    public let peer: IPv6Endpoint
    /// The local address the connection arrived on.
    public let local: IPv6Endpoint
    /// An application value.
    public var userData: AnyObject?

    /// The credentials this connection's TLS session was made with: kept alive as long as
    /// the session, whatever the endpoint has rotated to since.
    let credentials: TLSCredentials

    init(raw: OpaquePointer, endpoint: QUICEndpoint, peer: IPv6Endpoint, local: IPv6Endpoint) {
        self.raw = raw
        self.endpoint = endpoint
        self.credentials = endpoint.credentials
        self.peer = peer
        self.local = local
    }

    deinit {
        // Streams it still has (its endpoint went first) end without calling back with this
        // object: nothing may take a reference to it from here.
        stoq_conn_set_app(raw, nil)
        stoq_conn_free(raw)
    }

    /// The handshake completed.
    public var isEstablished: Bool { stoq_conn_is_established(raw) != 0 }
    /// The handshake is confirmed (RFC 9001 §4.1.2). A client's completes before the server
    /// has checked its certificate; it is confirmed once the server took it (HANDSHAKE_DONE).
    public var isConfirmed: Bool { stoq_conn_is_confirmed(raw) != 0 }
    /// The peer closed it with a TLS alert (it refused a certificate, perhaps after this end's
    /// handshake completed) or CONNECTION_REFUSED (its limits, its drain).
    public var wasRefusedByPeer: Bool { stoq_conn_refused_by_peer(raw) != 0 }
    /// Client: the server's GOAWAY came. No new request goes on this connection; those it
    /// will not process end with `H3Error.requestRejected`, to be sent again on another.
    public var peerIsGoingAway: Bool { stoq_conn_peer_going_away(raw) != 0 }
    /// Requests this end may still start: bidirectional streams the peer's MAX_STREAMS allows.
    public var bidiStreamsLeft: UInt64 { stoq_conn_bidi_streams_left(raw) }
    /// The handshake resumed an earlier session (a session ticket), without certificates.
    public var isResumed: Bool { stoq_conn_is_resumed(raw) != 0 }
    /// The TLS cipher suite the handshake agreed on, by its IANA name
    /// (`TLS_AES_128_GCM_SHA256`, ...); nil before the handshake completed.
    public var cipherSuite: String? { stoq_conn_cipher_suite(raw).map { String(cString: $0) } }
    /// Whether the connection still holds its TLS session: a server frees it once the
    /// handshake is done (QUIC needs nothing more from it), a client once it has the server's
    /// ticket.
    public var holdsTLSSession: Bool { stoq_conn_holds_tls(raw) != 0 }
    /// Client: the session the server's newest ticket resumes (opaque GnuTLS data to keep
    /// for the next connection to the same server); nil until a ticket arrived.
    public var resumableSession: [UInt8]? {
        var p: UnsafePointer<UInt8>?
        let n = stoq_conn_session(raw, &p)
        guard n > 0, let p else { return nil }
        return Array(UnsafeBufferPointer(start: p, count: n))
    }
    /// Client, before the first packet leaves: offer `session` (an earlier connection's
    /// `resumableSession`), which a connection offering `offeredCipherSuites` made (that
    /// connection's `offeredCipherSuites`; nil if unknown). False when it is not offered, and
    /// the handshake is then a full one: GnuTLS cannot use it, or this connection offers other
    /// suites or another order (GnuTLS, in either role, fails a resumption that changes the
    /// suite, and the same offer gets the same suite).
    @discardableResult
    public func offerSession(_ session: [UInt8], offeredCipherSuites: String? = nil) -> Bool {
        // GnuTLS 3.7 fails a resumption in which the server picks another suite than the
        // ticket's, though TLS 1.3 allows it (RFC 8446 §4.2.11): between GnuTLS ends the
        // handshake stalls until the client's timeout, or the server answers handshake_failure,
        // and a GnuTLS server answers aioquic with illegal_parameter. A server picks the same
        // suite from the same offer, so a session is offered only under the offer that made it.
        if let made = offeredCipherSuites, made != self.offeredCipherSuites { return false }
        return session.withUnsafeBufferPointer { stoq_conn_set_session(raw, $0.baseAddress, $0.count) == 0 }
    }
    /// The TLS cipher suites this end offers (client) or accepts (server), in order: their IANA
    /// names separated by ':'.
    public var offeredCipherSuites: String {
        var buf = [CChar](repeating: 0, count: Int(STOQ_SUITES_MAX))
        stoq_conn_offered_suites(raw, &buf, buf.count)
        return String(cBuffer: buf)
    }
    /// Client, once established: what 0-RTT needs to remember of the server (its stream and
    /// flow control limits, RFC 9000 §7.4.1, in transport parameter encoding): keep it with
    /// `resumableSession` and give both to the next connection. Nil before the handshake.
    public var earlyParameters: [UInt8]? {
        var buf = [UInt8](repeating: 0, count: 256)
        let n = buf.withUnsafeMutableBufferPointer { stoq_conn_early_params(raw, $0.baseAddress, $0.count) }
        return n > 0 ? Array(buf.prefix(n)) : nil
    }
    /// Client, after `offerSession` succeeded and before the first packet leaves: with the
    /// server's `earlyParameters` from that session's connection, requests may be sent at once,
    /// in 0-RTT (`canSendEarly`). False when they cannot be used: requests then wait for the
    /// handshake, as without them.
    @discardableResult
    public func offerEarlyParameters(_ parameters: [UInt8]) -> Bool {
        earlyPrepared = parameters.withUnsafeBufferPointer {
            stoq_conn_set_early_params(raw, $0.baseAddress, $0.count) == 0
        }
        return earlyPrepared
    }
    /// Client: whether a request may be sent now, before the handshake completed (0-RTT).
    /// Only methods safe to replay are (`EarlyData.allows`).
    public var canSendEarly: Bool { !isEstablished && earlyPrepared }
    private var earlyPrepared = false
    /// Client, once established: what became of 0-RTT.
    public var earlyData: EarlyData {
        switch stoq_conn_early_data(raw) {
        case Int32(STOQ_EARLY_ACCEPTED): .accepted
        case Int32(STOQ_EARLY_REJECTED): .rejected
        default: .none
        }
    }
    /// Client: what became of the server's preferred address (RFC 9000 §9.6).
    public enum PreferredAddress: String, Sendable {
        /// The server offered none.
        case none
        /// Offered; the new path is being validated.
        case validating
        /// Validated: the connection runs to the preferred address.
        case used
        /// Validation failed: the connection stayed on the address it was dialled on.
        case failed
    }
    public var preferredAddress: PreferredAddress {
        switch Int(stoq_conn_preferred_address_state(raw)) {
        case Int(STOQ_PREFERRED_VALIDATING): .validating
        case Int(STOQ_PREFERRED_USED): .used
        case Int(STOQ_PREFERRED_FAILED): .failed
        default: .none
        }
    }
    /// The current path's addresses (they move: the server's preferred address, the client's
    /// migration, a NAT rebinding the peer's).
    public var currentRemote: IPv6Endpoint {
        var sa = sockaddr_in6()
        stoq_conn_remote(raw, &sa)
        return IPv6Endpoint(sa)
    }
    public var currentLocal: IPv6Endpoint {
        var sa = sockaddr_in6()
        stoq_conn_local(raw, &sa)
        return IPv6Endpoint(sa)
    }
    /// Path validations that succeeded and failed so far.
    public var pathsValidated: UInt64 { stoq_conn_paths_validated(raw) }
    public var pathsFailed: UInt64 { stoq_conn_paths_failed(raw) }

    /// Server: starts HTTP/3's graceful shutdown on this connection (`stoq_conn_goaway`): its
    /// GOAWAY names the last request received; the requests open run to their end, later ones
    /// are rejected for the client to send again elsewhere. False when the connection has no
    /// HTTP/3 yet (mid-handshake: close it instead).
    @discardableResult
    public func goAway() -> Bool {
        guard stoq_conn_goaway(raw) == 0 else { return false }
        endpoint.markDirty(self)
        return true
    }

    /// Client: moves to `local` at once (this host's address changed and the old one is
    /// gone), validating the new path on the way. Throws when ngtcp2 refuses (no spare
    /// connection ID from the server, handshake not confirmed, already there).
    public func migrate(to local: IPv6Endpoint, now: Timestamp) throws(QUICError) {
        var sa = local.sockaddr
        let rc = stoq_conn_migrate(raw, &sa, now)
        guard rc == 0 else { throw QUICError(.connect, "migrating to \(local): ngtcp2 error \(rc)") }
        endpoint.markDirty(self)
    }

    /// Closing or draining.
    public var isClosed: Bool { if case .active = state { false } else { true } }

    /// How long an acknowledgement this end owes may be held back (ns): one owed for a packet
    /// received at t is sent by t + this, provided the connection is driven then.
    public var ackDelay: UInt64 { stoq_conn_ack_delay(raw) }

    /// Live transport numbers.
    public var stats: stoq_conn_stats {
        var s = stoq_conn_stats()
        stoq_conn_get_stats(raw, &s)
        return s
    }

    /// What the certificate policy said the peer is when it accepted its certificate
    /// (`PeerCertificateCheck.identify`): a client's roles, key id and subject (server, mutual TLS;
    /// read by the access policy on each request), a server's node id (a mesh neighbour); ""
    /// when there was no certificate or the policy says nothing. Fixed once the handshake is done.
    public var peerIdentity: String { String(cString: stoq_conn_peer_identity(raw)) }

    /// The last error, if any.
    public var errorDescription: String { String(cString: stoq_conn_error_string(raw)) }

    /// Server: answers `stream` with `status` and `headers`, the body to follow piece by
    /// piece: the application's `bodyWanted` asks for each next piece, given with
    /// `appendBody`. Each piece is released once the peer has acknowledged it. False when
    /// HTTP/3 refused: the stream is then reset, unless it was answered already (that answer
    /// goes on).
    @discardableResult
    public func respondStreamed(_ stream: HTTPStream, status: Int, headers: [(String, String)] = []) -> Bool {
        let rc = withCHeaders(headers) { hdrs, n in stoq_stream_respond_streamed(raw, stream.raw, Int32(status), hdrs, n) }
        endpoint.markDirty(self)
        return answered(stream, rc)
    }

    /// Whether an answer went (rc 0); a refused one resets the stream, unless the refusal was
    /// that the stream has its answer already (STOQ_ERR_ANSWERED): that one goes on.
    private func answered(_ stream: HTTPStream, _ rc: Int32) -> Bool {
        if rc == 0 { return true }
        if rc != STOQ_ERR_ANSWERED { reset(stream, errorCode: H3Error.internalError) }
        return false
    }

    /// The next piece of a streamed body, a response's (`respondStreamed`) or a request's
    /// (`requestStreamed`); `last` ends it. Returns false when `STOQ_BODY_PIECES` pieces are
    /// already held (wait for `bodyWanted`), or the body has ended (a HEAD's, with its head):
    /// the piece is released.
    @discardableResult
    public func appendBody(_ stream: HTTPStream, _ piece: BodyRegion, last: Bool) -> Bool {
        let arg = Unmanaged.passRetained(piece).toOpaque()
        let rc = stoq_stream_body_append(
            raw, stream.raw, piece.base?.assumingMemoryBound(to: UInt8.self),
            UInt64(piece.count), last ? 1 : 0, releaseBody, arg)
        if rc != 0 {
            Unmanaged<BodyRegion>.fromOpaque(arg).release()
            return false
        }
        endpoint.markDirty(self)
        return true
    }

    /// Server: answers `stream` with `status`, `headers` and a body sent zero-copy from `body`
    /// (nil: headers only). The stream holds `body` whatever comes of it, and lets it go once
    /// sent, or at once when refused. Returns false when HTTP/3 refused (more than
    /// `STOQ_MAX_HEADERS` headers, say): the stream is then reset, unless it was answered
    /// already (that answer goes on).
    @discardableResult
    public func respond(_ stream: HTTPStream, status: Int, headers: [(String, String)] = [], body: BodyRegion?) -> Bool {
        let rc = withCHeaders(headers) { hdrs, n in
            if let body {
                let arg = Unmanaged.passRetained(body).toOpaque()
                let rc = stoq_stream_respond(
                    raw, stream.raw, Int32(status), hdrs, n,
                    body.base?.assumingMemoryBound(to: UInt8.self), UInt64(body.count), 1,
                    releaseBody, arg)
                return rc
            }
            return stoq_stream_respond(raw, stream.raw, Int32(status), hdrs, n, nil, 0, 0, nil, nil)
        }
        endpoint.markDirty(self)
        return answered(stream, rc)
    }

    /// Client: sends a request; the body (if any) is sent zero-copy from `body`.
    public func request(
        method: String, authority: String, path: String, headers: [(String, String)] = [],
        body: BodyRegion? = nil
    ) throws(QUICError) -> HTTPStream {
        if !isEstablished && !EarlyData.allows(method) {
            throw QUICError(.stream, "\(method) \(path): only GET and HEAD go in 0-RTT (RFC 8470); wait for the handshake")
        }
        var err = [CChar](repeating: 0, count: 256)
        let s: OpaquePointer? = withCHeaders(headers) { hdrs, n in
            if let body {
                let arg = Unmanaged.passRetained(body).toOpaque()
                let s = stoq_conn_submit_request(
                    raw, method, authority, path, hdrs, n,
                    body.base?.assumingMemoryBound(to: UInt8.self), UInt64(body.count), 1,
                    releaseBody, arg, nil, &err, err.count)
                if s == nil { Unmanaged<BodyRegion>.fromOpaque(arg).release() }
                return s
            }
            return stoq_conn_submit_request(
                raw, method, authority, path, hdrs, n, nil, 0, 0, nil, nil, nil,
                &err, err.count)
        }
        guard let s else { throw QUICError(.stream, String(cBuffer: err)) }
        endpoint.markDirty(self)
        return HTTPStream(raw: s)
    }

    /// Client: sends a request whose body follows piece by piece, without a content-length:
    /// the application's `bodyWanted` asks for each next piece, given with `appendBody`, and
    /// each is released once the peer has acknowledged it. Only once established.
    public func requestStreamed(
        method: String, authority: String, path: String, headers: [(String, String)] = []
    ) throws(QUICError) -> HTTPStream {
        var err = [CChar](repeating: 0, count: 256)
        let s: OpaquePointer? = withCHeaders(headers) { hdrs, n in
            stoq_conn_submit_request(
                raw, method, authority, path, hdrs, n, nil, 0, STOQ_BODY_STREAMED, nil, nil, nil, &err, err.count)
        }
        guard let s else { throw QUICError(.stream, String(cBuffer: err)) }
        endpoint.markDirty(self)
        return HTTPStream(raw: s)
    }

    /// Abandons a stream in both directions. On a client, nothing more reaches the stream's
    /// body sink once this returns (what was queued has been written), and `streamClosed`
    /// follows with `errorCode` from the next `pollTransmit`, whether or not the server
    /// answers the reset.
    public func reset(_ stream: HTTPStream, errorCode: UInt64) {
        stoq_stream_reset(raw, stream.raw, errorCode)
        endpoint.markDirty(self)
    }

    /// Starts a TLS key update (RFC 9001 §6). False when ngtcp2 refuses: before the handshake
    /// is confirmed, or while the previous update is not yet acknowledged.
    public func initiateKeyUpdate(now: Timestamp) -> Bool {
        let ok = stoq_conn_initiate_key_update(raw, now) == 0
        if ok { keyUpdatesInitiated += 1 }
        endpoint.markDirty(self)
        return ok
    }

    /// Key updates this end started (`initiateKeyUpdate` calls that succeeded).
    public private(set) var keyUpdatesInitiated = 0

    /// 1-RTT packets received and decrypted under each key phase bit (RFC 9001 §6). Packets
    /// under phase one mean the peer has moved to updated keys at least once.
    public var packetsDecrypted: (keyPhaseZero: UInt64, keyPhaseOne: UInt64) {
        (stoq_conn_rx_key_phase_packets(raw, 0), stoq_conn_rx_key_phase_packets(raw, 1))
    }

    /// Packets dropped because they were numbered one below the largest already received in
    /// their space (they would make ngtcp2 0.12.1 abort; the peer sends their frames again).
    public var packetsDroppedBelowLargest: UInt64 { stoq_conn_rx_below_largest_dropped(raw) }

    /// Closes the connection gracefully with an HTTP/3 application code.
    public func close(errorCode: UInt64 = H3Error.noError, now: Timestamp) {
        endpoint.close(self, errorCode: errorCode, now: now)
    }
}

/// What became of a client's 0-RTT (early data) on one connection.
public enum EarlyData: String, Sendable, Codable {
    /// Nothing was sent in 0-RTT: no session or parameters were kept for the server, or the
    /// request could not go in it.
    case none
    /// The requests went in 0-RTT and the server took them: answered a round trip sooner.
    case accepted
    /// The requests went in 0-RTT and the server refused them (a new ticket key, early data
    /// off, a replay suspected): they were sent again after the handshake.
    case rejected

    /// Whether `method` may go in 0-RTT, which an attacker can replay: only the safe,
    /// idempotent ones (RFC 9001 §9.2, RFC 8470 §2). The node applies the same rule.
    public static func allows(_ method: String) -> Bool { method == "GET" || method == "HEAD" }
}

private func releaseBody(_ arg: UnsafeMutableRawPointer?) {
    guard let arg else { return }
    Unmanaged<BodyRegion>.fromOpaque(arg).release()
}

/// Calls `body` with the headers as C strings (valid only during the call).
func withCHeaders<R>(_ headers: [(String, String)], _ body: (UnsafePointer<stoq_header>?, Int) -> R) -> R {
    if headers.isEmpty { return body(nil, 0) }
    var strings: [UnsafeMutablePointer<CChar>] = []
    strings.reserveCapacity(headers.count * 2)
    var list: [stoq_header] = []
    list.reserveCapacity(headers.count)
    for (n, v) in headers {
        let cn = strdup(n)!, cv = strdup(v)!
        strings.append(cn)
        strings.append(cv)
        list.append(stoq_header(name: cn, value: cv))
    }
    defer { strings.forEach { free($0) } }
    return list.withUnsafeBufferPointer { body($0.baseAddress, $0.count) }
}

/// A QUIC failure.
public struct QUICError: Error, Sendable, CustomStringConvertible {
    /// What failed.
    public struct Code: Hashable, Sendable {
        let name: String
        public static let connect = Code(name: "connect")
        public static let stream = Code(name: "stream")
        public static let tls = Code(name: "tls")
        public static let closed = Code(name: "closed")
        /// The qlog directory cannot be used (`QUICEndpoint.setQLog`).
        public static let qlog = Code(name: "qlog")
    }
    public var code: Code
    public var message: String
    public init(_ code: Code, _ message: String) { self.code = code; self.message = message }
    public var description: String { "\(code.name): \(message)" }
}
