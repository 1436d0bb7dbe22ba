import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import STOQCore

/// The admin API: plain HTTP/1.1 over TCP on one IPv6 address (`admin.listen`), on its own
/// event loop thread, far from the workers: `GET /metrics` (Prometheus text) and
/// `GET /status` (JSON). It reads the snapshots workers publish and nothing else.
package final class AdminServer: @unchecked Sendable {
    private let group: MultiThreadedEventLoopGroup
    private let channel: Channel
    /// Where it listens (the port the kernel chose, for port 0).
    package let localAddress: IPv6Endpoint

    /// Binds and starts serving `render(path)`: nil for 404.
    package init(listen: IPv6Endpoint, logger: Logger, render: @escaping @Sendable (String) -> (String, String)?) throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            // IPv6 only, even on [::].
            .serverChannelOption(ChannelOptions.Types.SocketOption(level: .ipv6, name: .ipv6_v6only), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(AdminHandler(render: render))
                }
            }
        do {
            let address = try SocketAddress(ipAddress: listen.address.description, port: Int(listen.port))
            channel = try bootstrap.bind(to: address).wait()
        } catch {
            try? group.syncShutdownGracefully()
            throw NodeError(.config, "admin.listen = \"\(listen)\": cannot listen: \(error)")
        }
        localAddress = IPv6Endpoint(address: listen.address, port: UInt16(channel.localAddress?.port ?? Int(listen.port)))
        logger.info("admin API on http://\(localAddress)/metrics and /status")
    }

    package func shutdown() {
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
    }
}

private final class AdminHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    private let render: @Sendable (String) -> (String, String)?
    private var head: HTTPRequestHead?

    init(render: @escaping @Sendable (String) -> (String, String)?) { self.render = render }

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
            if h.method != .GET && h.method != .HEAD {
                status = .methodNotAllowed
                body = "only GET and HEAD\n"
            } else if let (text, contentType) = render(path) {
                body = text
                type = contentType
            } else {
                status = .notFound
                body = "no \(path): try /metrics or /status\n"
            }
            var headers = HTTPHeaders([("content-type", type), ("content-length", "\(body.utf8.count)")])
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
}
