import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import STOQCore
import Synchronization

/// The admin API: HTTP/1.1 over TCP on one IPv6 address (`admin.listen`), on its own event
/// loop thread, far from the workers: `GET /metrics` (Prometheus text) and `GET /status`
/// (JSON), which read the snapshots workers publish, and the operator's actions as `POST`s
/// (`act`; `POST /edge/purge/<name>`, `POST /store/collect`), which the node answers. An action
/// that blocks (a garbage collection) runs on a thread of the server's own (`AdminAnswer.blocking`),
/// so the event loop answers everyone else meanwhile.
///
/// Who may ask is `protection` (`admin.auth`): anyone (loopback only), a bearer token checked
/// per request (401 otherwise), or HTTPS with a client certificate (the handshake fails
/// otherwise). Refusals are counted in `stoq_admin_refused_total`, which the server appends to
/// `/metrics` itself since it is the only one that sees them, and logged at notice, at most one
/// line per `refusalLogInterval` (`AdminRefusals.notice`): anyone who can reach the port can be
/// refused as often as they like, and the log is not theirs to fill.
///
/// Connections are bounded before anyone is authenticated (a token is checked only once a
/// request is whole): one that has not sent a whole request `requestDeadline` after it opened,
/// or after the response before it, is closed, however many bytes it trickled meanwhile (no
/// request, half a request, a TLS handshake left unfinished); and at most
/// `maxConnectionsPerClient` are open from one /64 and `maxConnections` in all; past them a new
/// one is closed at once. So no one who can reach the port holds the node's file descriptors,
/// nor a connection for longer than `requestDeadline` without asking something: one /64 keeps
/// no other out, and to hold every connection takes many /64s reconnecting without pause.
package final class AdminServer: @unchecked Sendable {
    /// How long a connection has, from its accept (and, kept alive, from each response's end),
    /// to finish its TLS handshake (under mutual TLS) and send a whole request: its head and
    /// the body if it sends one. An absolute deadline, not a read timeout: bytes arriving do
    /// not extend it, so one trickled a byte at a time is closed at it like one that sends
    /// nothing. A scraper's request is a few hundred bytes sent at once; a client waiting for
    /// its answer is not limited.
    package static let requestDeadline = TimeAmount.seconds(10)
    /// Connections open at once from one /64, and in all.
    package static let maxConnectionsPerClient = 32
    package static let maxConnections = 512
    /// At most one notice of a kind (a refusal; an answered POST of one action and status)
    /// per this long: the first at once; the others of the interval counted, and told in one
    /// line at its end (`AdminLogThrottle`). A request's path, the client's choice, is shown
    /// cut (`ShownText`).
    package static let refusalLogInterval = TimeAmount.seconds(60)

    private let group: MultiThreadedEventLoopGroup
    /// Where `AdminAnswer.blocking` work runs: one thread, so one such action at a time (the
    /// node refuses a second with 409 before it gets here).
    private let pool = NIOThreadPool(numberOfThreads: 1)
    private let channel: Channel
    /// Where it listens (the port the kernel chose, for port 0).
    package let localAddress: IPv6Endpoint
    /// `https` under mutual TLS, else `http`.
    package let scheme: String
    private let refusals: AdminRefusals

    /// Requests and TLS handshakes refused since the start.
    package var refused: UInt64 { refusals.count.load(ordering: .relaxed) }

    /// What a `POST` to a path does: its answer, or nil when the path names no action.
    package typealias Action = @Sendable (String) -> AdminAnswer?

    /// Binds and starts serving `render(path)` (nil for 404) for GET and HEAD, and `act(path)`
    /// for POST, to whom `protection` lets in. `requestDeadline` and `refusalLogInterval` are
    /// `Self`'s but in tests.
    package init(
        listen: IPv6Endpoint, protection: AdminProtection = .none, logger: Logger, act: Action? = nil,
        requestDeadline: TimeAmount = AdminServer.requestDeadline, refusalLogInterval: TimeAmount = AdminServer.refusalLogInterval,
        render: @escaping @Sendable (String) -> (String, String)?
    ) throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        pool.start()
        let refusals = AdminRefusals(logger: logger, interval: refusalLogInterval)
        self.refusals = refusals
        var authorize: (@Sendable (String) -> AdminAuthResult)?
        var tls: AdminTLS?
        switch protection {
        case .none: break
        case .token(let a): authorize = a
        case .mtls(let t): tls = t
        }
        scheme = tls == nil ? "http" : "https"
        let open = AdminConnections()
        let pool = self.pool
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            // IPv6 only, even on [::].
            .serverChannelOption(ChannelOptions.Types.SocketOption(level: .ipv6, name: .ipv6_v6only), value: 1)
            .childChannelInitializer { [authorize, tls, pool] channel in
                channel.eventLoop.makeCompletedFuture {
                    let ops = channel.pipeline.syncOperations
                    if let why = open.admit(channel) {
                        refusals.addConnection()
                        logger.debug("admin API: connection closed: \(why)", metadata: ["peer": "\(channel.remoteAddress.map { "\($0)" } ?? "?")"])
                        channel.close(promise: nil)
                        return
                    }
                    if let tls {
                        // A fresh look at the identity files per connection: rotation takes
                        // effect from the next one.
                        let context = try tls.context()
                        let peer = "\(channel.remoteAddress.map { "\($0)" } ?? "?")"
                        try ops.addHandler(
                            NIOSSLServerHandler(context: context) { chain, promise in
                                let der = chain.compactMap { try? $0.toDERBytes() }
                                if let why = tls.verify(der) {
                                    refusals.notice("client certificate refused: \(why)", ["peer": "\(peer)"], on: channel.eventLoop)
                                    promise.succeed(.failed)
                                } else {
                                    promise.succeed(.certificateVerified)
                                }
                            })
                    }
                    try ops.configureHTTPServerPipeline(withErrorHandling: true)
                    // After the decoder, so a request counts as sent once whole; armed now, so
                    // the TLS handshake counts against it too.
                    try ops.addHandler(AdminRequestDeadline(requestDeadline))
                    try ops.addHandler(
                        AdminHandler(render: render, act: act, pool: pool, authorize: authorize, refusals: refusals, logger: logger))
                    if tls != nil { try ops.addHandler(AdminTLSErrors(refusals: refusals, logger: logger)) }
                }
            }
        do {
            let address = try SocketAddress(ipAddress: listen.address.description, port: Int(listen.port))
            channel = try bootstrap.bind(to: address).wait()
        } catch {
            try? pool.syncShutdownGracefully()
            try? group.syncShutdownGracefully()
            throw NodeError(.config, "admin.listen = \"\(listen)\": cannot listen: \(error)")
        }
        localAddress = IPv6Endpoint(address: listen.address, port: UInt16(channel.localAddress?.port ?? Int(listen.port)))
        let how: String
        switch protection {
        case .none: how = "no authentication (loopback)"
        case .token: how = "bearer token"
        case .mtls: how = "client certificates"
        }
        logger.info("admin API on \(scheme)://\(localAddress)/metrics and /status, \(how)")
    }

    /// Stops listening, waits for a blocking action under way (its answer still goes out if
    /// its connection is open), then stops the event loop.
    package func shutdown() {
        try? channel.close().wait()
        try? pool.syncShutdownGracefully()
        try? group.syncShutdownGracefully()
    }
}

/// What the admin API answers a `POST` (`AdminServer.Action`).
package enum AdminAnswer: Sendable {
    /// Its status and text, now.
    case now(status: Int, text: String)
    /// Work that blocks for as long as it takes (a garbage collection walks the whole store):
    /// run on the server's own thread, never its event loop, which answers other requests
    /// meanwhile; the request is answered with what it returns once it does.
    case blocking(@Sendable () -> (status: Int, text: String))
}

/// The admin API's notices, at most one line of each kind per `interval`: anyone who can
/// reach the port may send requests as often as they like, and the log is not theirs to fill.
/// The first of a kind is logged at once; the others of its interval are counted, and told in
/// one line at its end: `<n> more <kind> in the last <interval><note>; the last: …`, with the
/// last one's text and metadata.
final class AdminLogThrottle: Sendable {
    private let logger: Logger
    private let interval: TimeAmount
    /// The kinds with an interval open: the lines not logged yet, the last of them, its note.
    private let open = Mutex<[String: (more: Int, last: (what: String, metadata: Logger.Metadata)?, note: String)]>([:])

    init(logger: Logger, interval: TimeAmount) { (self.logger, self.interval) = (logger, interval) }

    /// Logs `what` at notice when no line of `kind` was logged in the last `interval`; else
    /// keeps it for the interval's end. `loop` keeps that time.
    func notice(_ kind: String, note: String = "", _ what: String, _ metadata: Logger.Metadata, on loop: any EventLoop) {
        let now = open.withLock { o in
            if o[kind] != nil {
                o[kind]!.more += 1
                o[kind]!.last = (what, metadata)
                return false
            }
            o[kind] = (0, nil, note)
            return true
        }
        guard now else { return }
        logger.notice("admin API: \(what)", metadata: metadata)
        loop.scheduleTask(in: interval) { self.endInterval(kind, on: loop) }
    }

    /// Tells what `kind`'s interval kept back, which starts another (the line just logged is
    /// its first); with nothing kept, its next line is logged at once.
    private func endInterval(_ kind: String, on loop: any EventLoop) {
        let kept = open.withLock { o -> (more: Int, what: String, metadata: Logger.Metadata, note: String)? in
            guard let k = o[kind], k.more > 0, let last = k.last else {
                o[kind] = nil
                return nil
            }
            o[kind] = (0, nil, k.note)
            return (k.more, last.what, last.metadata, k.note)
        }
        guard let kept else { return }
        let ns = interval.nanoseconds
        let span = ns % 1_000_000_000 == 0 ? "\(ns / 1_000_000_000) s" : "\(ns / 1_000_000) ms"
        logger.notice("admin API: \(kept.more) more \(kind) in the last \(span)\(kept.note); the last: \(kept.what)", metadata: kept.metadata)
        loop.scheduleTask(in: interval) { self.endInterval(kind, on: loop) }
    }
}

/// What the server refused, shared by its connections: counted, every one, and noticed in
/// the log at most once per interval (`AdminLogThrottle`).
final class AdminRefusals: Sendable {
    let count = Atomic<UInt64>(0)
    let connections = Atomic<UInt64>(0)
    let log: AdminLogThrottle

    init(logger: Logger, interval: TimeAmount) { log = AdminLogThrottle(logger: logger, interval: interval) }

    func add() { count.add(1, ordering: .relaxed) }
    func addConnection() { connections.add(1, ordering: .relaxed) }

    /// Logs `what` (`request refused: …`) as the throttle lets it: one line a refusal kind per
    /// interval, then `<n> more refused …` at its end.
    func notice(_ what: String, _ metadata: Logger.Metadata, on loop: any EventLoop) {
        log.notice("refused", note: " (stoq_admin_refused_total counts each)", what, metadata, on: loop)
    }

    /// The families appended to `/metrics`.
    var prometheus: String {
        "# HELP stoq_admin_refused_total Admin API requests refused (no or wrong bearer token) and TLS handshakes refused (no or bad client certificate).\n"
            + "# TYPE stoq_admin_refused_total counter\nstoq_admin_refused_total \(count.load(ordering: .relaxed))\n"
            + "# HELP stoq_admin_connections_refused_total Admin API connections closed as they opened: their /64, or everyone, held as many as the server keeps.\n"
            + "# TYPE stoq_admin_connections_refused_total counter\n"
            + "stoq_admin_connections_refused_total \(connections.load(ordering: .relaxed))\n"
    }
}

/// The admin connections open, by the /64 they come from (`AdminServer`'s bounds). Touched
/// once per connection, on its open and its close.
final class AdminConnections: Sendable {
    private let open = Mutex<(all: Int, by: [UInt64: Int])>((0, [:]))

    /// Counts `channel` in and has it counted out when it closes, or says why it may not open.
    func admit(_ channel: Channel) -> String? {
        let prefix = channel.remoteAddress.flatMap { Self.prefix64($0) } ?? 0
        let why: String? = open.withLock { o in
            if o.all >= AdminServer.maxConnections { return "\(o.all) admin connections are open, the most kept" }
            let mine = o.by[prefix, default: 0]
            if mine >= AdminServer.maxConnectionsPerClient { return "\(mine) admin connections are open from its /64, the most kept" }
            o.all += 1
            o.by[prefix] = mine + 1
            return nil
        }
        guard why == nil else { return why }
        channel.closeFuture.whenComplete { _ in self.close(prefix) }
        return nil
    }

    private func close(_ prefix: UInt64) {
        open.withLock { o in
            o.all -= 1
            let n = o.by[prefix, default: 1] - 1
            o.by[prefix] = n > 0 ? n : nil
        }
    }

    /// The first 64 bits of an IPv6 peer's address (the admin API listens on IPv6 only).
    static func prefix64(_ address: SocketAddress) -> UInt64? {
        guard case .v6(let a) = address else { return nil }
        return withUnsafeBytes(of: a.address.sin6_addr) { b in b.prefix(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
    }
}

/// Closes a connection that has not sent a whole request `AdminServer.requestDeadline` after
/// it was accepted (this handler is added then), or after the end of the response before it.
/// Not armed while the server works on an answer: that wait is the server's, not the client's.
/// With HTTP pipelining, `HTTPServerPipelineHandler` holds the next request back until the
/// response ends, so its parts arrive here after the deadline is armed again.
private final class AdminRequestDeadline: ChannelDuplexHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart
    private let deadline: TimeAmount
    private var timer: Scheduled<Void>?

    init(_ deadline: TimeAmount) { self.deadline = deadline }

    func handlerAdded(context: ChannelHandlerContext) { arm(context) }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .end = unwrapInboundIn(data) {
            timer?.cancel()
            timer = nil
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if case .end = unwrapOutboundIn(data) { arm(context) }
        context.write(data, promise: promise)
    }

    /// From now: an absolute time, which nothing the client sends moves.
    private func arm(_ context: ChannelHandlerContext) {
        timer?.cancel()
        let channel = context.channel
        timer = context.eventLoop.scheduleTask(deadline: .now() + deadline) { channel.close(promise: nil) }
    }
}

/// Counts TLS handshakes that failed (no client certificate, one that did not verify) and
/// closes their connections.
private final class AdminTLSErrors: ChannelInboundHandler {
    typealias InboundIn = NIOAny
    private let refusals: AdminRefusals
    private let logger: Logger
    init(refusals: AdminRefusals, logger: Logger) { (self.refusals, self.logger) = (refusals, logger) }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let e = error as? NIOSSLError, case .handshakeFailed = e {
            refusals.add()
            logger.debug("admin API: TLS handshake refused: \(error)", metadata: ["peer": "\(context.remoteAddress.map { "\($0)" } ?? "?")"])
        }
        context.close(promise: nil)
    }
}

private final class AdminHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    private let render: @Sendable (String) -> (String, String)?
    private let act: AdminServer.Action?
    private let pool: NIOThreadPool
    private let authorize: (@Sendable (String) -> AdminAuthResult)?
    private let refusals: AdminRefusals
    private let logger: Logger
    private var head: HTTPRequestHead?

    init(
        render: @escaping @Sendable (String) -> (String, String)?, act: AdminServer.Action?, pool: NIOThreadPool,
        authorize: (@Sendable (String) -> AdminAuthResult)?, refusals: AdminRefusals, logger: Logger
    ) {
        (self.render, self.act, self.pool, self.authorize, self.refusals, self.logger) = (render, act, pool, authorize, refusals, logger)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let h = head else { return }
            head = nil
            let path = String(h.uri.split(separator: "?", maxSplits: 1).first ?? "")
            var status = HTTPResponseStatus.ok
            var body = "", type = "text/plain; charset=utf-8"
            var challenge = false
            if let authorize, case .deny(let why) = authorize(h.headers["authorization"].first ?? "") {
                refusals.add()
                refusals.notice(
                    "request refused: \(why)",
                    ["peer": "\(context.remoteAddress.map { "\($0)" } ?? "?")", "path": "\(ShownText.cut(path))"], on: context.eventLoop)
                status = .unauthorized
                body = "\(why)\n"
                challenge = true
            } else if h.method == .POST {
                switch act?(path) {
                case .now(let code, let text)?:
                    (status, body) = answered(context, path, code, text)
                case .blocking(let work)?:
                    // HTTPServerPipelineHandler holds this connection's next request until the
                    // answer ends; the event loop serves the others meanwhile.
                    pool.runIfActive(eventLoop: context.eventLoop, work).assumeIsolated().whenComplete { result in
                        let (code, text) = (try? result.get()) ?? (503, "the admin API is shutting down")
                        let (status, body) = self.answered(context, path, code, text)
                        guard context.channel.isActive else { return }  // the client left: logged only
                        self.respond(context, to: h, status: status, body: body)
                    }
                    return
                case nil:
                    status = .notFound
                    body = "no action \(path): try POST /edge/purge/<name> or POST /store/collect\n"
                }
            } else if h.method != .GET && h.method != .HEAD {
                status = .methodNotAllowed
                body = "only GET, HEAD and POST\n"
            } else if let (text, contentType) = render(path) {
                body = path == "/metrics" ? text + refusals.prometheus : text
                type = contentType
            } else {
                status = .notFound
                body = "no \(path): try /metrics or /status\n"
            }
            respond(context, to: h, status: status, body: body, type: type, challenge: challenge)
        }
    }

    /// An action's answer as a response, logged with the peer: the audit of who changed what,
    /// one line per action and status an interval, then how many more (`AdminLogThrottle`).
    private func answered(_ context: ChannelHandlerContext, _ path: String, _ code: Int, _ text: String) -> (HTTPResponseStatus, String) {
        // The action is the path's first two segments (`/edge/purge`, `/store/collect`); only
        // a path an action answered comes here, so the kinds are few.
        let action = "/" + path.split(separator: "/", maxSplits: 2).prefix(2).joined(separator: "/")
        refusals.log.notice(
            "POST \(action) answered \(code)", "POST \(ShownText.cut(path)): \(code) \(text)",
            ["peer": "\(context.remoteAddress.map { "\($0)" } ?? "?")"], on: context.eventLoop)
        return (HTTPResponseStatus(statusCode: code), text + "\n")
    }

    private func respond(
        _ context: ChannelHandlerContext, to h: HTTPRequestHead, status: HTTPResponseStatus, body: String,
        type: String = "text/plain; charset=utf-8", challenge: Bool = false
    ) {
        var headers = HTTPHeaders([("content-type", type), ("content-length", "\(body.utf8.count)")])
        if challenge { headers.add(name: "www-authenticate", value: "Bearer realm=\"stoq-admin\"") }
        if !h.isKeepAlive { headers.add(name: "connection", value: "close") }
        context.write(
            wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: status, headers: headers))),
            promise: nil)
        if h.method != .HEAD { context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil) }
        let keepAlive = h.isKeepAlive
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { [channel = context.channel] _ in
            if !keepAlive { channel.close(promise: nil) }
        }
    }
}
