import CNgtcp2
import DequeModule
import Glibc
import STOQCore

/// What an endpoint counted. Plain integers: an endpoint belongs to one worker thread.
public struct EndpointCounters: Sendable {
    public var datagramsIn: UInt64 = 0
    public var datagramsOut: UInt64 = 0
    /// Not a QUIC packet we can parse (too short, bad header, oversized CID).
    public var droppedMalformed: UInt64 = 0
    /// For a connection we do not know and cannot answer.
    public var droppedUnknown: UInt64 = 0
    /// Initials dropped: not an Initial, unacceptable to ngtcp2, or no room to answer.
    public var droppedInitials: UInt64 = 0
    /// Initials whose Retry token was forged, stale or from another address, answered with a
    /// stateless CONNECTION_CLOSE (INVALID_TOKEN, RFC 9000 §8.1.3).
    public var invalidTokens: UInt64 = 0
    /// Initials answered CONNECTION_REFUSED, with the reason, because the endpoint already held
    /// `maxConnections` or was draining (RFC 9000 §5.2.2: a server that cannot take a
    /// connection says so).
    public var connectionsRefused: UInt64 = 0
    /// Initials answered CONNECTION_REFUSED, with the reason, because the client's /64 already
    /// held `maxConnectionsPerClient` established connections on the endpoint.
    public var connectionsRefusedPerClient: UInt64 = 0
    /// Responses reset because the file they were sent from shrank under them (an object
    /// replaced in place rather than by a rename): `BodyRegion.guardFileMappings`.
    public var bodiesCutShort: UInt64 = 0
    /// Requests whose head was not complete `StallTimeouts.headTimeout` after it began (their stream
    /// reset, never processed), requests whose body received no byte for
    /// `QUICSettings.bodyTimeout` (answered 408, their body dropped), and responses the peer
    /// acknowledged nothing of for `QUICSettings.sendTimeout` (reset): stalled streams,
    /// `StallTimeouts`.
    public var requestsTimedOutHead: UInt64 = 0
    public var requestsTimedOutBody: UInt64 = 0
    public var requestsTimedOutSend: UInt64 = 0
    /// Replies we could not queue (reply queue full).
    public var droppedReplies: UInt64 = 0
    /// Packets that would have had a stateless reply (Retry, Version Negotiation, Stateless
    /// Reset, a refusal, INVALID_TOKEN) but got none: the second's `statelessReplyRate` was spent.
    public var repliesWithheld: UInt64 = 0
    /// Server: v1 Initials without a token for no connection we know (new clients, or an
    /// Initial flood), and of those the ones neither answered nor accepted because the reply
    /// budget was spent: what the datapath may shed (`Worker`'s `InitialShedding`).
    public var sheddableInitials: UInt64 = 0
    public var sheddableWithheld: UInt64 = 0
    public var versionNegotiations: UInt64 = 0
    public var retriesSent: UInt64 = 0
    /// Of `retriesSent`, those sent only because `QUICSettings.retryThreshold` connections were
    /// mid-handshake.
    public var retriesForced: UInt64 = 0
    /// Connections mid-handshake now (a gauge).
    public var halfOpenConnections: UInt64 = 0
    public var statelessResets: UInt64 = 0
    public var connectionsAccepted: UInt64 = 0
    public var connectionsClosed: UInt64 = 0
    /// Connections that ended with an error (handshake failure, protocol violation, timeout).
    public var connectionErrors: UInt64 = 0
    /// Handshakes refused because the peer's certificate did not verify (mutual TLS).
    public var peerCertificatesRefused: UInt64 = 0
    /// Connections that ended before their handshake completed, whichever side closed or
    /// timed out: the operator's "handshake failures" (a refused certificate is one).
    public var handshakeFailures: UInt64 = 0
    /// Handshakes that resumed an earlier session from a session ticket (no certificate sent).
    public var tlsResumed: UInt64 = 0
    /// Handshakes whose 0-RTT data the server accepted.
    public var tlsEarlyData: UInt64 = 0
    /// Requests that came in 0-RTT with a method that is not safe to replay (not GET/HEAD),
    /// answered 425 Too Early (RFC 8470) without reaching the application.
    public var requestsTooEarly: UInt64 = 0
    /// Requests that came in 0-RTT with a safe method (GET/HEAD) and were served from it.
    public var requestsEarly: UInt64 = 0
    /// Server: datagrams that arrived addressed to `QUICSettings.preferredAddress` (clients
    /// that moved there after their handshake).
    public var datagramsToPreferredAddress: UInt64 = 0
    /// Path validations that succeeded / failed on this endpoint's connections, added when
    /// each connection goes: a peer that moved (NAT rebinding, migration, preferred address).
    public var pathsValidated: UInt64 = 0
    public var pathsFailed: UInt64 = 0
    /// Connections that write a qlog (sampled, their file opened).
    public var qlogConnections: UInt64 = 0
    /// Bytes written to qlog files.
    public var qlogBytes: UInt64 = 0
    /// qlog files that could not be opened or written (that connection's qlog stops there).
    public var qlogErrors: UInt64 = 0
    /// Connections the sample picked while `setQLog`'s `maxOpen` logged ones were open (not logged).
    public var qlogSkipped: UInt64 = 0
    /// Received body bytes the body writer wrote to files (off the loop), and the most it
    /// ever held unwritten: never more than `sinkRingBytes`, one stream window.
    public var sinkBytesWritten: UInt64 = 0
    public var sinkPeakBytesQueued: UInt64 = 0
    public var sinkRingBytes: UInt64 = 0
    /// Received body bytes staged or queued and not yet written, now.
    public var sinkBytesQueued: UInt64 = 0
    /// Buffers queued to the writer whose results the loop has not taken yet.
    public var sinkJobsPending: UInt64 = 0
    /// Times the loop waited for the writer: for a free buffer (several streams together
    /// filled the ring) or for a closing stream's last writes.
    public var sinkWaits: UInt64 = 0
    public var sinkDrainWaits: UInt64 = 0
    /// Heap ngtcp2 and nghttp3 hold for this endpoint's connections now, by their own
    /// allocations (what a connection costs beyond the TLS session and STOQ's own objects).
    public var ngtcp2HeapBytes: UInt64 = 0
    public var nghttp3HeapBytes: UInt64 = 0
    /// Their freed blocks of a page and more: kept resident for the next connections, and
    /// given back to the kernel so far (`releaseLibraryPages`, or past what is kept).
    public var libraryPagesWarmBytes: UInt64 = 0
    public var libraryBlocksReleased: UInt64 = 0
    /// Runs of those given-back pages waiting for the next connections (16 bytes each), and
    /// their bytes.
    public var libraryColdRuns: UInt64 = 0
    public var libraryColdBytes: UInt64 = 0
    public init() {}
}

/// One datagram run to send: `length` bytes at the start of the caller's buffer, cut
/// into `segmentSize` datagrams (the last may be shorter).
public struct Transmit: Sendable {
    public var length: Int
    public var segmentSize: Int
    public var destination: IPv6Endpoint
    /// The local address the run must leave from: the one the peer wrote to (the
    /// connection path's local address). A socket bound to `[::]` must say so on send, or
    /// the kernel picks a source the peer does not know and drops.
    public var source: IPv6Endpoint
    public var ecn: ECN
}

/// A sans-IO QUIC endpoint (server or client): it takes datagrams and `now`, and writes
/// packets into buffers the caller owns. It never opens a socket, reads a clock or starts
/// a thread (quinn-proto's cut), so it runs the same in a worker and in a test.
public final class QUICEndpoint {
    /// Server or client.
    public let isServer: Bool
    /// The worker id carried in byte 0 of every CID this endpoint issues.
    public let workerID: UInt8
    public let settings: QUICSettings
    /// Counters (the qlog ones as the C endpoint keeps them).
    public var counters: EndpointCounters {
        var c = tally
        var q = stoq_qlog_stats()
        stoq_endpoint_ctx_qlog_stats(ctx, &q)
        (c.qlogConnections, c.qlogBytes, c.qlogErrors, c.qlogSkipped) = (q.connections, q.bytes, q.errors, q.skipped)
        var w = stoq_sink_stats()
        stoq_endpoint_ctx_sink_stats(ctx, &w)
        (c.sinkBytesWritten, c.sinkPeakBytesQueued, c.sinkRingBytes) = (w.bytes_written, w.peak_bytes_queued, w.ring_bytes)
        (c.sinkBytesQueued, c.sinkWaits, c.sinkDrainWaits) = (w.bytes_queued, w.waits, w.drain_waits)
        c.sinkJobsPending = w.jobs_pending
        var m = stoq_mem_stats()
        stoq_endpoint_ctx_mem_stats(ctx, &m)
        (c.ngtcp2HeapBytes, c.nghttp3HeapBytes) = (m.ngtcp2_bytes, m.nghttp3_bytes)
        (c.libraryPagesWarmBytes, c.libraryBlocksReleased) = (m.pages_warm_bytes, m.pages_released)
        (c.libraryColdRuns, c.libraryColdBytes) = (m.pages_cold_runs, m.pages_cold_bytes)
        c.halfOpenConnections = UInt64(max(halfOpen, 0))
        return c
    }
    private var tally = EndpointCounters()
    /// The handshake callback's way to count a resumption (it runs on this endpoint's thread).
    fileprivate func countResumed() { tally.tlsResumed &+= 1 }
    /// The handshake callback's way to count an established connection, by its /64 too.
    fileprivate func countEstablished(_ conn: QUICConnection) {
        established += 1
        if settings.maxConnectionsPerClient > 0 && isServer { establishedBy[conn.peer.address.prefix64, default: 0] += 1 }
    }
    fileprivate func countEarlyData() { tally.tlsEarlyData &+= 1 }
    fileprivate func countTooEarly() { tally.requestsTooEarly &+= 1 }
    fileprivate func countEarlyRequest() { tally.requestsEarly &+= 1 }
    /// The application that handles requests and responses.
    public var application: QUICApplication?

    private var ctx: OpaquePointer!
    private(set) var credentials: TLSCredentials
    private var table: [ConnectionID: QUICConnection] = [:]
    private var connections: [ObjectIdentifier: QUICConnection] = [:]
    private var timers = TimerHeap<QUICConnection>()
    /// Connections with something to send, served in turn: each sends one burst and goes to
    /// the back while it has more, so that no connection waits behind another's window.
    private var dirty: Deque<QUICConnection> = []
    private var replies: ReplyQueue
    private var replyBudget: ReplyBudget
    private var initialSources = InitialSources()
    private let scratch: UnsafeMutableRawBufferPointer

    /// Creates an endpoint. `secret` must be shared by all workers of a node.
    public init(
        isServer: Bool, credentials: TLSCredentials, settings: QUICSettings, workerID: UInt8,
        secret: StaticSecret
    ) {
        self.isServer = isServer
        self.workerID = workerID
        self.settings = settings
        self.credentials = credentials
        self.replies = ReplyQueue(slots: 256, slotSize: 1500)
        self.replyBudget = ReplyBudget(perSecond: settings.statelessReplyRate, perPrefix: settings.statelessReplyRatePerPrefix)
        self.scratch = .allocate(byteCount: 65536, alignment: 16)
        dirty.reserveCapacity(1024)
        var raw = settings.raw(workerID: workerID, secret: secret.bytes)
        var ev = stoq_events()
        ev.ctx = Unmanaged.passUnretained(self).toOpaque()
        ev.on_request = onRequest
        ev.on_request_end = onRequestEnd
        ev.on_response = onResponse
        ev.on_stream_close = onStreamClose
        ev.on_cid = onCID
        ev.on_handshake = onHandshake
        ev.on_body_wanted = onBodyWanted
        ev.on_sink_progress = onSinkProgress
        ev.on_body_mark = onBodyMark
        ev.on_stalled = onStalled
        ctx = stoq_endpoint_ctx_new(isServer ? 1 : 0, credentials.raw, &raw, &ev)
    }

    /// The eventfd the body writer signals after each buffer it writes (received bodies go to
    /// their files on a writer thread, off this endpoint's loop). The loop must wait on it
    /// beside its datagrams (`DatapathQueue.setWakeup`), or on the one given to
    /// `setSinkWakeup`, so that flow control credit goes back to a peer that is waiting for it.
    public var sinkWakeFileDescriptor: Int32 { stoq_endpoint_ctx_sink_wake_fd(ctx) }

    /// Makes the body writer signal `fd` (an eventfd the loop already waits on) instead of its
    /// own; -1 goes back to its own.
    public func setSinkWakeup(fileDescriptor fd: Int32) { stoq_endpoint_ctx_set_sink_wake_fd(ctx, fd) }

    deinit {
        // Silence the C endpoint first: connections freed below (or later, by an application
        // still holding one) must not call back into this object.
        stoq_endpoint_ctx_free(ctx)
        for c in connections.values { c.removed = true }
        connections.removeAll()
        table.removeAll()
        timers.removeAll()
        dirty.removeAll()
        scratch.deallocate()
        replies.deallocate()
    }

    /// Number of live connections (including closing ones).
    public var connectionCount: Int { connections.count }
    /// Live connections whose handshake completed (the rest are half-open).
    fileprivate(set) var established = 0
    /// Established connections by the /64 they came from (`IPv6Address.prefix64`), kept only
    /// while `settings.maxConnectionsPerClient` is on: one entry per /64 holding some.
    private var establishedBy: [UInt64: Int] = [:]
    /// Connections mid-handshake: a flood of spoofed Initials shows here.
    public var halfOpen: Int { connections.count - established }
    /// Server: new Initials get a Retry because `settings.retryThreshold` connections are
    /// mid-handshake, or were and `retryHeld` (whatever `settings.retry` says).
    public var retryingUnderLoad: Bool {
        isServer && settings.retryThreshold > 0 && (halfOpen >= settings.retryThreshold || retryHeld)
    }
    /// Keeps the Retry `retryingUnderLoad` started after the half-open connections fall under
    /// the threshold: the worker holds it while Initials without a token keep arriving faster
    /// than `retryThreshold` a second, or a flood's half-open connections, expiring together,
    /// would only make room for the flood's next thousand.
    public var retryHeld = false

    /// Gives the pages of the blocks ngtcp2 and nghttp3 freed back to the kernel, the ones kept
    /// warm for the next connections too. The worker calls it with its memory release.
    public func releaseLibraryPages() { stoq_endpoint_ctx_release_memory(ctx) }

    /// The entries the connection tables have room for.
    package var tableCapacity: Int { table.capacity + connections.capacity + establishedBy.capacity }

    /// Gives back what the connection tables grew to at their peak, once they are mostly empty:
    /// a Swift dictionary keeps its capacity as entries go, and after 100,000 connections (each
    /// with up to 8 connection IDs) the ID table alone kept 64 MB for none. Rebuilding costs a
    /// moment per entry left, so it waits until at most a quarter of the room is used. The
    /// worker calls it with its memory release.
    public func compactTables() {
        func compacted<K, V>(_ d: [K: V]) -> [K: V]? {
            guard d.capacity > 4 * d.count + 1024 else { return nil }
            var out = [K: V](minimumCapacity: d.count)
            for (k, v) in d { out[k] = v }
            return out
        }
        if let t = compacted(table) { table = t }
        if let c = compacted(connections) { connections = c }
        if let e = compacted(establishedBy) { establishedBy = e }
    }

    /// All live connections.
    public var allConnections: some Collection<QUICConnection> { connections.values }

    /// Swaps the credentials new handshakes use (certificate rotation); established
    /// connections keep the session they have.
    public func replaceCredentials(_ creds: TLSCredentials) {
        credentials = creds
        stoq_endpoint_ctx_set_tls(ctx, creds.raw)
    }

    /// Writes a qlog (ngtcp2's, JSON-SEQ) for a `sample` fraction (0 … 1) of the connections
    /// made from now on, each to `directory/<odcid-hex>.<server|client>.sqlog`; "" or 0 turns
    /// it off. At most `maxOpen` logged connections are open at once (64 KB of buffer and a
    /// file descriptor each); the sample's further picks are counted in `qlogSkipped`.
    /// Connections already open keep what they had. Throws `.qlog` when the directory does
    /// not exist or is not writable (and changes nothing). The endpoint's thread calls it.
    public func setQLog(directory: String, sample: Double, maxOpen: Int = 1024) throws(QUICError) {
        let rc = stoq_endpoint_ctx_set_qlog(ctx, directory, sample, UInt32(clamping: maxOpen))
        guard rc == 0 else {
            throw QUICError(.qlog, "qlog directory \"\(directory)\": \(String(cString: strerror(rc)))")
        }
    }

    // MARK: Receive

    /// Handles one received datagram.
    public func handle(
        datagram: UnsafeRawBufferPointer, from peer: IPv6Endpoint, to local: IPv6Endpoint, ecn: ECN,
        now: Timestamp
    ) {
        tally.datagramsIn &+= 1
        if let preferred = settings.preferredAddress, local == preferred { tally.datagramsToPreferredAddress &+= 1 }
        guard let base = datagram.baseAddress?.assumingMemoryBound(to: UInt8.self), datagram.count > 0 else {
            tally.droppedMalformed &+= 1
            return
        }
        var ids = stoq_pkt_ids()
        let rc = stoq_pkt_decode_ids(base, datagram.count, Int(STOQ_SCIDLEN), &ids)
        if rc == Int32(STOQ_PKT_INVALID) {
            tally.droppedMalformed &+= 1
            return
        }
        if rc == Int32(STOQ_PKT_VERSION_NEGOTIATION) {
            guard isServer else { tally.droppedUnknown &+= 1; return }
            guard replyBudget.take(to: peer.address, now: now) else { tally.repliesWithheld &+= 1; return }
            tally.versionNegotiations &+= 1
            queueReply(to: peer, from: local) { stoq_pkt_write_version_negotiation($0, $1, &ids) }
            return
        }
        let dcid = withUnsafeBytes(of: &ids.dcid) { ConnectionID(UnsafeRawBufferPointer(rebasing: $0[0..<ids.dcidlen])) }
        if let conn = table[dcid] {
            deliver(conn, base, datagram.count, from: peer, to: local, ecn: ecn, now: now)
            return
        }
        guard isServer else { tally.droppedUnknown &+= 1; return }
        if ids.is_long == 0 {
            // A short-header packet for a connection we do not have: tell the peer with a
            // stateless reset so it stops waiting (RFC 9000 §10.3).
            guard replyBudget.take(to: peer.address, now: now) else { tally.repliesWithheld &+= 1; return }
            let ctx = self.ctx
            let size = datagram.count
            let queued = withUnsafeBytes(of: &ids.dcid) { cid in
                queueReply(to: peer, from: local) { buf, cap in
                    stoq_pkt_write_stateless_reset(
                        ctx, buf, cap, cid.baseAddress!.assumingMemoryBound(to: UInt8.self),
                        ids.dcidlen, size)
                }
            }
            if queued { tally.statelessResets &+= 1 } else { tally.droppedUnknown &+= 1 }
            return
        }
        accept(base, datagram.count, from: peer, to: local, ecn: ecn, now: now)
    }

    /// Counts a v1 Initial without a token, used or `withheld`, for `takeInitialReport`.
    private func noteSheddable(from peer: IPv6Endpoint, withheld: Bool) {
        tally.sheddableInitials &+= 1
        if withheld { tally.sheddableWithheld &+= 1 }
        initialSources.note(from: peer.address, withheld: withheld)
    }

    /// Server: where v1 Initials without a token came from since the last call, and how many
    /// of them the reply budget left unanswered, with the `limit` busiest /64s.
    public func takeInitialReport(limit: Int) -> InitialReport { initialSources.take(limit: limit) }

    /// Answers an Initial the connection limit or a drain keeps out: CONNECTION_REFUSED with the reason,
    /// statelessly, so the client gives up at once instead of timing out.
    private func refuse(
        _ base: UnsafePointer<UInt8>, _ count: Int, from peer: IPv6Endpoint, to local: IPv6Endpoint, sheddable: Bool,
        perClient: Bool = false, now: Timestamp
    ) {
        // Only an Initial (long header, type 0 in QUIC v1) can be answered without keys; the C
        // writer parses it fully, this look keeps anything else from spending the reply budget.
        guard base[0] & 0xb0 == 0x80 else {
            tally.droppedInitials &+= 1
            return
        }
        guard replyBudget.take(to: peer.address, now: now) else {
            tally.repliesWithheld &+= 1
            if sheddable { noteSheddable(from: peer, withheld: true) }
            return
        }
        let reason =
            isDraining
            ? "this node is shutting down"
            : perClient
                ? "this node holds max_connections_per_client (\(settings.maxConnectionsPerClient)) connections from \(peer.address.slash64)/64"
                : "this node holds max_connections (\(settings.maxConnections)) connections"
        let queued = reason.utf8CString.withUnsafeBufferPointer { r in
            queueReply(to: peer, from: local) { buf, cap in
                stoq_pkt_write_refusal(buf, cap, base, count, r.baseAddress!, r.count - 1)
            }
        }
        if !queued {
            tally.droppedInitials &+= 1
        } else if perClient && !isDraining {
            tally.connectionsRefusedPerClient &+= 1
        } else {
            tally.connectionsRefused &+= 1
        }
        if queued && sheddable { noteSheddable(from: peer, withheld: false) }
    }

    private func accept(
        _ base: UnsafePointer<UInt8>, _ count: Int, from peer: IPv6Endpoint, to local: IPv6Endpoint,
        ecn: ECN, now: Timestamp
    ) {
        let sheddable = stoq_pkt_sheddable_initial(base, count) != 0
        guard connections.count < settings.maxConnections, !isDraining else {
            refuse(base, count, from: peer, to: local, sheddable: sheddable, now: now)
            return
        }
        // Counted once established (a spoofed Initial cannot take a /64's room): a client's
        // handshakes in progress may pass the limit by their number.
        if settings.maxConnectionsPerClient > 0, establishedBy[peer.address.prefix64, default: 0] >= settings.maxConnectionsPerClient {
            refuse(base, count, from: peer, to: local, sheddable: sheddable, perClient: true, now: now)
            return
        }
        var localSA = local.sockaddr, peerSA = peer.sockaddr
        var outlen = 0
        var action: Int32 = 0
        let holder = ConnectionHolder()
        let app = Unmanaged.passUnretained(holder).toOpaque()
        pendingHolder = holder
        defer { pendingHolder = nil }
        let forced = !settings.retry && retryingUnderLoad
        let raw = stoq_conn_accept(
            ctx, base, count, &localSA, &peerSA, now, app, settings.retry || forced ? 1 : 0,
            replyBudget.hasReply(to: peer.address, now: now) ? 1 : 0,
            scratch.baseAddress!.assumingMemoryBound(to: UInt8.self), scratch.count, &outlen, &action)
        guard let raw else {
            if action == Int32(STOQ_ACCEPT_UNANSWERED) {
                tally.repliesWithheld &+= 1
                if sheddable { noteSheddable(from: peer, withheld: true) }
                return
            }
            let reply = action == Int32(STOQ_ACCEPT_RETRY) || action == Int32(STOQ_ACCEPT_INVALID_TOKEN)
            let n = outlen
            let src = scratch
            let queued =
                reply && n > 0
                && queueReply(to: peer, from: local) { buf, cap in
                    guard n <= cap else { return -1 }
                    buf.update(from: src.baseAddress!.assumingMemoryBound(to: UInt8.self), count: n)
                    return n
                }
            if queued { _ = replyBudget.take(to: peer.address, now: now) }
            if queued && sheddable { noteSheddable(from: peer, withheld: false) }
            if !queued {
                tally.droppedInitials &+= 1
            } else if action == Int32(STOQ_ACCEPT_RETRY) {
                tally.retriesSent &+= 1
                if forced { tally.retriesForced &+= 1 }
            } else {
                tally.invalidTokens &+= 1
            }
            return
        }
        let conn = QUICConnection(raw: raw, endpoint: self, peer: peer, local: local)
        stoq_conn_set_app(raw, Unmanaged.passUnretained(conn).toOpaque())
        connections[ObjectIdentifier(conn)] = conn
        for cid in holder.cids { register(cid, conn) }
        tally.connectionsAccepted &+= 1
        if sheddable { noteSheddable(from: peer, withheld: false) }
        deliver(conn, base, count, from: peer, to: local, ecn: ecn, now: now)
    }

    private func deliver(
        _ conn: QUICConnection, _ base: UnsafePointer<UInt8>, _ count: Int, from peer: IPv6Endpoint,
        to local: IPv6Endpoint, ecn: ECN, now: Timestamp
    ) {
        switch conn.state {
        case .active:
            var localSA = local.sockaddr, peerSA = peer.sockaddr
            conn.lastHeard = now
            let rc = stoq_conn_read(conn.raw, base, count, ecn.rawValue, &localSA, &peerSA, now)
            after(conn, rc: rc, now: now)
        case .closing(_, let packet):
            // Repeat our CONNECTION_CLOSE, but ever more rarely (RFC 9000 §10.2.1).
            conn.closeResends += 1
            if conn.closeResends & (conn.closeResends - 1) == 0 {
                _ = packet.withUnsafeBytes { p in
                    queueReply(to: peer, from: local) { buf, cap in
                        guard p.count <= cap else { return -1 }
                        buf.update(from: p.baseAddress!.assumingMemoryBound(to: UInt8.self), count: p.count)
                        return p.count
                    }
                }
            }
        case .draining:
            break
        }
    }

    /// Applies the outcome of a read or timer.
    private func after(_ conn: QUICConnection, rc: Int32, now: Timestamp) {
        switch rc {
        case Int32(STOQ_CONN_OK):
            markDirty(conn)
            schedule(conn)
        case Int32(STOQ_CONN_CLOSE):
            conn.closeReason = conn.errorDescription
            tally.connectionErrors &+= 1
            if stoq_conn_peer_refused(conn.raw) != 0 { tally.peerCertificatesRefused &+= 1 }
            if !conn.isEstablished { tally.handshakeFailures &+= 1 }
            beginClosing(conn, errorCode: H3Error.noError, now: now)
        case Int32(STOQ_CONN_DRAINING):
            // The peer closed: before the handshake completed, that is a failed handshake
            // (a client refusing this node's certificate ends up here).
            if !conn.isEstablished { tally.handshakeFailures &+= 1 }
            if conn.closeReason.isEmpty { conn.closeReason = conn.errorDescription }
            conn.state = .draining(deadline: stoq_conn_close_deadline(conn.raw, now))
            schedule(conn)
        default:
            conn.closeReason = conn.errorDescription
            if conn.closeReason.isEmpty { conn.closeReason = "dropped" }
            if !conn.closeReason.hasPrefix("ERR_IDLE_CLOSE") { tally.connectionErrors &+= 1 }
            if !conn.isEstablished { tally.handshakeFailures &+= 1 }
            remove(conn)
        }
    }

    // MARK: Connect (client)

    /// Starts a client connection to `remote`, verifying the certificate for `serverName`.
    public func connect(
        to remote: IPv6Endpoint, from local: IPv6Endpoint, serverName: String,
        now: Timestamp
    ) throws(QUICError) -> QUICConnection {
        var localSA = local.sockaddr, remoteSA = remote.sockaddr
        var err = [CChar](repeating: 0, count: 256)
        let holder = ConnectionHolder()
        pendingHolder = holder
        defer { pendingHolder = nil }
        guard
            let raw = stoq_conn_connect(
                ctx, serverName, &localSA, &remoteSA, now,
                Unmanaged.passUnretained(holder).toOpaque(), &err, err.count)
        else {
            throw QUICError(.connect, String(cBuffer: err))
        }
        let conn = QUICConnection(raw: raw, endpoint: self, peer: remote, local: local)
        stoq_conn_set_app(raw, Unmanaged.passUnretained(conn).toOpaque())
        connections[ObjectIdentifier(conn)] = conn
        for cid in holder.cids { register(cid, conn) }
        markDirty(conn)
        schedule(conn)
        return conn
    }

    // MARK: Transmit

    /// Writes the next datagram run into `buffer` (at most `maxSegments` datagrams), or
    /// returns nil when nothing is owed now. Call until nil or out of buffers.
    /// `stride` 0 packs the datagrams back to back (GSO); otherwise datagram i starts at
    /// offset i × stride (one AF_XDP frame each), and `Transmit.length` ends at the last one.
    public func pollTransmit(
        into buffer: UnsafeMutableRawBufferPointer, maxSegments: Int, stride: Int = 0,
        now: Timestamp
    ) -> Transmit? {
        if let t = replies.pop(into: buffer) {
            tally.datagramsOut &+= 1
            return t
        }
        while let conn = dirty.first {
            if conn.closeOwed, !conn.removed, case .closing(_, let packet) = conn.state, packet.count <= buffer.count {
                dirty.removeFirst()
                conn.isDirty = false
                conn.closeOwed = false
                packet.withUnsafeBytes { buffer.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
                // The path's ends now: a client that moved (to the preferred address) hears it there.
                var remote = sockaddr_in6(), local = sockaddr_in6()
                stoq_conn_remote(conn.raw, &remote)
                stoq_conn_local(conn.raw, &local)
                tally.datagramsOut &+= 1
                return Transmit(
                    length: packet.count, segmentSize: packet.count, destination: IPv6Endpoint(remote), source: IPv6Endpoint(local),
                    ecn: .notECT)
            }
            guard case .active = conn.state, !conn.removed else {
                dirty.removeFirst()
                conn.isDirty = false
                continue
            }
            // Streams the client reset end now, for its application, which may close the
            // connection from `streamClosed`: then look at it again.
            if stoq_conn_end_abandoned_streams(conn.raw) > 0 { continue }
            var seg = 0
            var remote = sockaddr_in6()
            var local = sockaddr_in6()
            var ecn: UInt8 = 0
            let n = stoq_conn_write(
                conn.raw, buffer.baseAddress!.assumingMemoryBound(to: UInt8.self), buffer.count,
                maxSegments, stride, &seg, &remote, &local, &ecn, now)
            // A body's file shrank under its mapping: what it read there were zeros, so the
            // streams sending from it end now, with an error, instead of completing.
            if stoq_guard_faulted() != 0 {
                tally.bodiesCutShort &+= UInt64(stoq_conn_reset_faulted_streams(conn.raw, H3Error.internalError))
                // The datagrams just built carry those zeros, perhaps with the body's FIN, which
                // would complete it at the peer before the reset arrived: they are not sent, as
                // if lost, nor the one the write held back for the next (the shim drops it).
                // ngtcp2 does not send a reset stream's data again; the rest of what they held
                // is sent again like any loss. The connection's next write carries the reset.
                if n > 0 { continue }
            }
            if n > 0 {
                // Its turn is over; it comes round again after the others.
                dirty.removeFirst()
                dirty.append(conn)
                schedule(conn)
                let step = stride > 0 ? stride : max(seg, 1)
                let segments = (n + step - 1) / step
                tally.datagramsOut &+= UInt64(segments)
                return Transmit(
                    length: n, segmentSize: seg, destination: IPv6Endpoint(remote),
                    source: IPv6Endpoint(local), ecn: ECN(lowBitsOf: ecn))
            }
            dirty.removeFirst()
            conn.isDirty = false
            if n < 0 {
                after(conn, rc: Int32(n), now: now)
                if let t = replies.pop(into: buffer) {
                    tally.datagramsOut &+= 1
                    return t
                }
            } else {
                schedule(conn)
            }
        }
        return nil
    }

    // MARK: Timers

    /// When `handleTimeouts` must next run, or nil for never: the next timer, or the next sweep
    /// for stalled streams while some are watched.
    public func nextTimeout() -> Timestamp? {
        let timer = timers.first?.scheduled
        guard sweepsStalls, stoq_endpoint_ctx_watching(ctx) != 0 else { return timer }
        return min(timer ?? .max, nextSweep)
    }

    /// Runs every timer due at `now`, and takes the body writer's finished work first (credit
    /// back to peers, request ends whose bodies are now written); about once a
    /// `sweepInterval`, deals with the streams that stalled (`StallTimeouts`).
    public func handleTimeouts(now: Timestamp) {
        stoq_endpoint_ctx_clock(ctx, now)
        stoq_endpoint_ctx_sink_poll(ctx)
        if sweepsStalls && now >= nextSweep {
            nextSweep = now + Self.sweepInterval
            stoq_endpoint_ctx_sweep(ctx, now, settings.bodyTimeout, settings.sendTimeout, settings.minSendRate)
        }
        while let conn = timers.first, conn.scheduled <= now {
            timers.remove(conn)
            switch conn.state {
            case .active:
                if stoq_conn_expiry(conn.raw) <= now {
                    after(conn, rc: stoq_conn_handle_expiry(conn.raw, now), now: now)
                } else {
                    schedule(conn)
                }
            case .closing(let deadline, _), .draining(let deadline):
                if deadline <= now { remove(conn) } else { schedule(conn) }
            }
        }
    }

    // MARK: Stalled streams

    /// How often the streams receiving a body or sending one are looked at for stalls: a
    /// timeout fires up to this late, and the sweep's cost (a walk over those streams only) is
    /// paid this often.
    public static let sweepInterval: UInt64 = Nanos.second
    /// A server's: request heads are always timed out (`StallTimeouts.headTimeout`).
    private var sweepsStalls: Bool { isServer }
    private var nextSweep: Timestamp = 0
    /// The last stall seen since `takeStallNote`, for the worker's throttled log.
    private var stallNote: String?

    /// What the last stalled stream was, naming its peer, since the last call (nil: none).
    public func takeStallNote() -> String? {
        defer { stallNote = nil }
        return stallNote
    }

    /// A stream the sweep found stalled (it no longer watches it). A request head: the shim
    /// has reset the stream (H3_REQUEST_REJECTED); the application never heard of it. A request
    /// body: the application hears the request aborted (and frees its memfd or temp file), and
    /// the request is answered 408 saying what happened, or reset when it was answered already.
    /// A response: reset with H3_REQUEST_CANCELLED; its body (a mapping) is released when the
    /// stream closes, once the peer acknowledges the reset. The connection and its other
    /// streams go on.
    fileprivate func stalled(_ stream: HTTPStream, _ conn: QUICConnection, kind: Int32) {
        if kind == STOQ_STALL_HEAD {
            tally.requestsTimedOutHead &+= 1
            stallNote = "\(conn.peer): \(StallTimeouts.headStalled(timeout: StallTimeouts.headTimeout))"
            markDirty(conn)  // the reset goes out
        } else if kind == STOQ_STALL_BODY {
            tally.requestsTimedOutBody &+= 1
            let expected = stoq_stream_expected_length(stream.raw)
            let what = StallTimeouts.bodyStalled(
                timeout: settings.bodyTimeout, received: stream.bytesReceived, expected: expected == .max ? nil : expected)
            stallNote = "\(conn.peer): \(what)"
            application?.requestEnded(stream: stream, connection: conn, aborted: true)
            if stream.responseStatus == 0 {
                let text = BodyRegion(copying: Array("\(what)\n".utf8))
                conn.respond(stream, status: 408, headers: [("content-type", "text/plain"), ("content-length", "\(text.count)")], body: text)
            } else {
                conn.reset(stream, errorCode: H3Error.requestCancelled)
            }
        } else {
            tally.requestsTimedOutSend &+= 1
            var given: UInt64 = 0
            let acked = stoq_stream_body_acked(stream.raw, &given)
            stallNote =
                kind == STOQ_STALL_SLOW
                ? "\(conn.peer): \(StallTimeouts.sendTooSlow(window: settings.sendTimeout, minRate: settings.minSendRate, acknowledged: acked, given: given))"
                : "\(conn.peer): \(StallTimeouts.sendStalled(timeout: settings.sendTimeout, acknowledged: acked, given: given))"
            conn.reset(stream, errorCode: H3Error.requestCancelled)
        }
    }

    // MARK: Closing

    /// Server: graceful shutdown's first step, `beginDrain` was called. New connections are
    /// refused (CONNECTION_REFUSED, "this node is shutting down").
    public private(set) var isDraining = false
    /// While draining: the connections left with requests open at the last look (no new ones
    /// are accepted), so that each look costs what is left, not every connection.
    private var drainWatch: [QUICConnection] = []

    /// Server: starts a graceful shutdown. Every connection gets a GOAWAY
    /// (`stoq_conn_goaway`): the requests it has open run to their end, later ones are
    /// rejected for the client to retry elsewhere; one with no request open, or still in its
    /// handshake, is closed now, and so is one whose peer has been silent for `drainSilence`
    /// (a client that went away mid-request would hold the drain to its deadline). Call
    /// `closeFinished` as the drain goes on, and `closeAll` at its deadline.
    public func beginDrain(now: Timestamp) {
        guard isServer, !isDraining else { return }
        isDraining = true
        for conn in connections.values {
            guard case .active = conn.state, !conn.removed else { continue }
            conn.goAway()
        }
        drainWatch = Array(connections.values)
        closeFinished(now: now)
    }

    /// While draining: closes the connections whose requests have all ended (and those
    /// without HTTP/3 yet, or silent for `drainSilence`), and returns how many still have
    /// requests open.
    @discardableResult
    public func closeFinished(now: Timestamp) -> Int {
        let watched = drainWatch
        drainWatch.removeAll(keepingCapacity: true)
        for conn in watched {
            guard case .active = conn.state, !conn.removed else { continue }
            if conn.isEstablished && stoq_conn_streams_open(conn.raw) > 0 && conn.lastHeard + Self.drainSilence > now {
                drainWatch.append(conn)
            } else {
                close(conn, errorCode: H3Error.noError, now: now)
            }
        }
        return drainWatch.count
    }

    /// A peer heard from within this is still there: a transfer's receiver acknowledges or
    /// opens its window every few milliseconds, a sender sends.
    public static let drainSilence: UInt64 = 2 * Nanos.second

    /// Closes every connection gracefully (node shutdown).
    public func closeAll(errorCode: UInt64 = H3Error.noError, now: Timestamp) {
        for conn in Array(connections.values) { close(conn, errorCode: errorCode, now: now) }
    }

    func close(_ conn: QUICConnection, errorCode: UInt64, now: Timestamp) {
        guard case .active = conn.state, !conn.removed else { return }
        beginClosing(conn, errorCode: errorCode, now: now)
    }

    private func beginClosing(_ conn: QUICConnection, errorCode: UInt64, now: Timestamp) {
        let n = stoq_conn_write_close(
            conn.raw, scratch.baseAddress!.assumingMemoryBound(to: UInt8.self),
            min(scratch.count, 1500), errorCode, now)
        guard n > 0 else {
            remove(conn)
            return
        }
        let packet = Array(UnsafeRawBufferPointer(rebasing: scratch[0..<n]))
        conn.state = .closing(deadline: stoq_conn_close_deadline(conn.raw, now), packet: packet)
        conn.closeOwed = true
        markDirty(conn)
        schedule(conn)
    }

    private func remove(_ conn: QUICConnection) {
        guard !conn.removed else { return }
        conn.removed = true
        timers.remove(conn)
        for cid in conn.cids where table[cid] === conn { table.removeValue(forKey: cid) }
        conn.cids.removeAll()
        connections.removeValue(forKey: ObjectIdentifier(conn))
        if conn.countedEstablished {
            established -= 1
            if settings.maxConnectionsPerClient > 0 && isServer {
                let prefix = conn.peer.address.prefix64
                if let n = establishedBy[prefix] { establishedBy[prefix] = n > 1 ? n - 1 : nil }
            }
        }
        // The application may hold the connection a while longer; its streams, qlog file and
        // buffer go now. Streams end here, not when the connection is freed: the application
        // hears of each while the connection is alive, and may keep it (from its deinit it
        // could not: a reference taken there outliving it is a crash).
        stoq_conn_end_streams(conn.raw)
        stoq_conn_qlog_close(conn.raw)
        tally.connectionsClosed &+= 1
        tally.pathsValidated &+= conn.pathsValidated
        tally.pathsFailed &+= conn.pathsFailed
        application?.connectionClosed(connection: conn, reason: conn.closeReason)
    }

    // MARK: Bookkeeping

    func markDirty(_ conn: QUICConnection) {
        guard !conn.isDirty, !conn.removed else { return }
        conn.isDirty = true
        dirty.append(conn)
    }

    /// Sets the connection's timer to what its state says is next (none once it is removed).
    private func schedule(_ conn: QUICConnection) {
        guard !conn.removed else { return }
        switch conn.state {
        case .active: timers.schedule(conn, at: stoq_conn_expiry(conn.raw))
        case .closing(let d, _), .draining(let d): timers.schedule(conn, at: d)
        }
    }

    fileprivate func register(_ cid: ConnectionID, _ conn: QUICConnection) {
        table[cid] = conn
        conn.cids.append(cid)
    }

    fileprivate func unregister(_ cid: ConnectionID, _ conn: QUICConnection) {
        if table[cid] === conn { table.removeValue(forKey: cid) }
        if let i = conn.cids.firstIndex(of: cid) { conn.cids.remove(at: i) }
    }

    /// Holds CIDs announced while a connection is being created, before its object exists.
    fileprivate var pendingHolder: ConnectionHolder?

    @discardableResult
    private func queueReply(
        to peer: IPv6Endpoint, from local: IPv6Endpoint, _ write: (UnsafeMutablePointer<UInt8>, Int) -> Int
    ) -> Bool {
        if replies.push(to: peer, from: local, write) { return true }
        tally.droppedReplies &+= 1
        return false
    }

    fileprivate static func from(_ ctx: UnsafeMutableRawPointer?) -> QUICEndpoint {
        Unmanaged<QUICEndpoint>.fromOpaque(ctx!).takeUnretainedValue()
    }
}

/// Collects CIDs for a connection under construction.
final class ConnectionHolder {
    var cids: [ConnectionID] = []
}

/// The stateless replies an endpoint may still send: `perSecond` a second, at most a second's
/// worth at once (a token bucket; 0: no limit), and of those at most `perPrefix` a second to
/// any one /64. Under a flood of Initials from spoofed addresses nobody reads the answers, and
/// each costs a send and a Retry token; past the budget such packets go unanswered (a real
/// client sends its Initial again), and the core stays with the connections it serves. The
/// per-/64 share keeps a flood from one prefix from spending the whole budget, so that a
/// client elsewhere still gets its Retry at the first try. A flood spoofed across many /64s
/// is held by the whole budget alone.
struct ReplyBudget {
    private let perSecond: Int, perPrefix: Int
    private var total: TokenBucket
    /// Buckets of recently answered /64s, one slot per hash of the prefix: a fixed table, so
    /// that answering a flood allocates nothing. A prefix that finds its slot taken by another
    /// starts from a full bucket; a flood from many prefixes only ever meets the total.
    private var prefixes: [(prefix: UInt64, bucket: TokenBucket)]
    static let prefixSlots = 1024

    init(perSecond: Int, perPrefix: Int = 0) {
        self.perSecond = max(perSecond, 0)
        self.perPrefix = max(perPrefix, 0)
        total = Self.bucket(self.perSecond)
        prefixes = self.perPrefix > 0 ? Array(repeating: (0, Self.bucket(self.perPrefix)), count: Self.prefixSlots) : []
    }

    /// A second's worth, full.
    private static func bucket(_ perSecond: Int) -> TokenBucket {
        TokenBucket(rate: Double(perSecond), burst: Double(perSecond), now: 0)
    }

    /// Whether a reply to `peer` may be sent now (none taken).
    func hasReply(to peer: IPv6Address, now: Timestamp) -> Bool {
        guard perSecond == 0 || total.holds(1, now: now) else { return false }
        guard perPrefix > 0 else { return true }
        let i = slot(peer.prefix64)
        return prefixes[i].prefix != peer.prefix64 || prefixes[i].bucket.holds(1, now: now)
    }

    /// Takes one reply's worth for `peer`: false when its /64's share or the whole budget is spent.
    mutating func take(to peer: IPv6Address, now: Timestamp) -> Bool {
        if perPrefix > 0 {
            let prefix = peer.prefix64, i = slot(prefix)
            if prefixes[i].prefix != prefix { prefixes[i] = (prefix, Self.bucket(perPrefix)) }
            guard prefixes[i].bucket.holds(1, now: now) else { return false }
            guard perSecond == 0 || total.take(1, now: now) == 0 else { return false }
            return prefixes[i].bucket.take(1, now: now) == 0
        }
        return perSecond == 0 || total.take(1, now: now) == 0
    }

    private func slot(_ prefix: UInt64) -> Int {
        Int(truncatingIfNeeded: (prefix &* 0x9E37_79B9_7F4A_7C15) >> 54) & (Self.prefixSlots - 1)
    }
}

/// Stateless replies (Version Negotiation, Retry, Stateless Reset, repeated CONNECTION_CLOSE)
/// in fixed slots allocated once: answering a flood never allocates.
struct ReplyQueue {
    let storage: UnsafeMutableRawBufferPointer
    let slotSize: Int
    let slots: Int
    var lengths: [Int]
    var peers: [IPv6Endpoint]
    var locals: [IPv6Endpoint]
    var head = 0
    var count = 0

    init(slots: Int, slotSize: Int) {
        self.slots = slots
        self.slotSize = slotSize
        storage = .allocate(byteCount: slots * slotSize, alignment: 16)
        lengths = Array(repeating: 0, count: slots)
        peers = Array(repeating: IPv6Endpoint(address: .any, port: 0), count: slots)
        locals = peers
    }

    func deallocate() { storage.deallocate() }

    mutating func push(to peer: IPv6Endpoint, from local: IPv6Endpoint, _ write: (UnsafeMutablePointer<UInt8>, Int) -> Int) -> Bool {
        guard count < slots else { return false }
        let i = (head + count) % slots
        let p = (storage.baseAddress! + i * slotSize).assumingMemoryBound(to: UInt8.self)
        let n = write(p, slotSize)
        guard n > 0 else { return false }
        lengths[i] = n
        peers[i] = peer
        locals[i] = local
        count += 1
        return true
    }

    mutating func pop(into buffer: UnsafeMutableRawBufferPointer) -> Transmit? {
        guard count > 0 else { return nil }
        let n = lengths[head]
        let src = UnsafeRawBufferPointer(start: storage.baseAddress! + head * slotSize, count: n)
        buffer.copyMemory(from: src)
        let t = Transmit(length: n, segmentSize: n, destination: peers[head], source: locals[head], ecn: .notECT)
        head = (head + 1) % slots
        count -= 1
        return t
    }
}

// MARK: C event trampolines

private func connection(_ c: OpaquePointer?) -> QUICConnection? {
    guard let p = stoq_conn_get_app(c) else { return nil }
    return Unmanaged<QUICConnection>.fromOpaque(p).takeUnretainedValue()
}

private let onCID: @convention(c) (UnsafeMutableRawPointer?, OpaquePointer?, UnsafePointer<UInt8>?, Int, Int32) -> Void = {
    ctx, c, cid, len, added in
    let ep = QUICEndpoint.from(ctx)
    let id = ConnectionID(pointer: cid!, count: len)
    if let holder = ep.pendingHolder, stoq_conn_get_app(c) == Unmanaged.passUnretained(holder).toOpaque() {
        if added != 0 { holder.cids.append(id) } else { holder.cids.removeAll { $0 == id } }
        return
    }
    guard let conn = connection(c) else { return }
    if added != 0 { ep.register(id, conn) } else { ep.unregister(id, conn) }
}

private let onRequest: @convention(c) (UnsafeMutableRawPointer?, OpaquePointer?, OpaquePointer?, UnsafePointer<stoq_head>?) -> Void = {
    ctx, c, s, head in
    let ep = QUICEndpoint.from(ctx)
    guard let conn = connection(c), let s, let h = head?.pointee else { return }
    // Once per request: the whole head, parsed by the HTTP rules in HTTPRequestHead.
    let request = HTTPRequestHead.parse(h.httpFields, sectionSize: Int(clamping: h.section_size), hasBody: h.has_body != 0)
    // A response to HEAD has no content, whatever the application answers: an error's text
    // included (RFC 9110 §9.3.2).
    if ep.isServer && request.method == "HEAD" { stoq_stream_set_no_content(s) }
    // What a body timeout's 408 says it was waiting for.
    if ep.isServer, request.hasBody, let n = request.contentLength, n >= 0 { stoq_stream_set_expected_length(s, UInt64(n)) }
    // A server sees a request before its handshake completed only in 0-RTT, which an attacker
    // can replay: only safe, idempotent methods run from it (RFC 9001 §9.2, RFC 8470 §3). The
    // client may send the others again once the handshake is done.
    if ep.isServer && !conn.isEstablished {
        guard EarlyData.allows(request.method) else {
            ep.countTooEarly()
            conn.respond(HTTPStream(raw: s), status: 425, headers: [("content-length", "0")], body: nil)
            return
        }
        ep.countEarlyRequest()
    }
    if let app = ep.application {
        app.request(request, stream: HTTPStream(raw: s), connection: conn)
    } else {
        conn.reset(HTTPStream(raw: s), errorCode: H3Error.requestRejected)
    }
}

private let onRequestEnd: @convention(c) (UnsafeMutableRawPointer?, OpaquePointer?, OpaquePointer?, Int32) -> Void = {
    ctx, c, s, aborted in
    let ep = QUICEndpoint.from(ctx)
    guard let conn = connection(c), let s else { return }
    ep.application?.requestEnded(stream: HTTPStream(raw: s), connection: conn, aborted: aborted != 0)
    ep.markDirty(conn)
}

private let onResponse: @convention(c) (UnsafeMutableRawPointer?, OpaquePointer?, OpaquePointer?, UnsafePointer<stoq_head>?) -> Void = {
    ctx, c, s, head in
    let ep = QUICEndpoint.from(ctx)
    guard let conn = connection(c), let s, let h = head?.pointee else { return }
    let response = HTTPResponseHead.parse(h.httpFields)
    let stream = HTTPStream(raw: s)
    stream.maxAge = response.maxAge
    ep.application?.response(response, stream: stream, connection: conn)
}

private let onStreamClose: @convention(c) (UnsafeMutableRawPointer?, OpaquePointer?, OpaquePointer?, UInt64) -> Void = {
    ctx, c, s, code in
    let ep = QUICEndpoint.from(ctx)
    guard let conn = connection(c), let s else { return }
    ep.application?.streamClosed(stream: HTTPStream(raw: s), connection: conn, errorCode: code)
}

private let onBodyWanted: @convention(c) (UnsafeMutableRawPointer?, OpaquePointer?, OpaquePointer?) -> Void = { ctx, c, s in
    let ep = QUICEndpoint.from(ctx)
    guard let conn = connection(c), let s else { return }
    ep.application?.bodyWanted(stream: HTTPStream(raw: s), connection: conn)
}

private let onBodyMark: @convention(c) (UnsafeMutableRawPointer?, OpaquePointer?, OpaquePointer?) -> Void = { ctx, c, s in
    let ep = QUICEndpoint.from(ctx)
    guard let conn = connection(c), let s else { return }
    ep.application?.bodyReachedMark(stream: HTTPStream(raw: s), connection: conn)
}

private let onStalled: @convention(c) (UnsafeMutableRawPointer?, OpaquePointer?, OpaquePointer?, Int32) -> Void = {
    ctx, c, s, what in
    guard let conn = connection(c), let s else { return }
    QUICEndpoint.from(ctx).stalled(HTTPStream(raw: s), conn, kind: what)
}

private let onSinkProgress: @convention(c) (UnsafeMutableRawPointer?, OpaquePointer?) -> Void = { ctx, c in
    guard let conn = connection(c) else { return }
    QUICEndpoint.from(ctx).markDirty(conn)
}

private let onHandshake: @convention(c) (UnsafeMutableRawPointer?, OpaquePointer?) -> Void = { ctx, c in
    let ep = QUICEndpoint.from(ctx)
    guard let conn = connection(c) else { return }
    if !conn.countedEstablished, !conn.removed {
        conn.countedEstablished = true
        ep.countEstablished(conn)
    }
    if stoq_conn_is_resumed(c) != 0 { ep.countResumed() }
    if ep.isServer && stoq_conn_early_data_accepted(c) != 0 { ep.countEarlyData() }
    ep.application?.handshakeCompleted(connection: conn)
}
