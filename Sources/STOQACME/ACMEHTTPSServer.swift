import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import STOQCore

// Transport choice: plain swift-nio + NIOSSL + NIOHTTP1 rather than Hummingbird 2. The ACME
// client already needs async-http-client, which brings exactly these packages, so the server
// adds no dependency and no compile time on our 2-core builders; ACME needs a dozen fixed routes
// and no middleware, and the whole protocol sits in `ACMEServer.handle`, so this file is only
// "collect a request, hand it over, write the answer" and could be swapped for Hummingbird
// without touching the protocol code.

/// The ACME server's HTTPS listener: TLS (NIOSSL) and HTTP/1.1 (NIOHTTP1) over TCP on one IPv6
/// address, each request handed to an `ACMEServer`.
public final class ACMEHTTPSServer: Sendable {
    /// Why the listener could not start.
    public struct StartError: Error, Sendable, CustomStringConvertible {
        /// The kind of failure.
        public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
            /// The stable name (what logs and JSON print).
            public let rawValue: String
            /// Wraps a name; STOQ's own codes are the static members.
            public init(rawValue: String) { self.rawValue = rawValue }
            public var description: String { rawValue }
            /// The certificate or key PEM does not load.
            public static let invalidTLSCredentials = Code(rawValue: "invalidTLSCredentials")
            /// The address is not IPv6 or cannot be bound.
            public static let bindFailed = Code(rawValue: "bindFailed")
        }
        /// The kind of failure.
        public var code: Code
        /// What exactly went wrong.
        public var message: String
        public var description: String { message }
    }

    /// The protocol core.
    public let server: ACMEServer
    /// The bound address (the port is the real one when 0 was asked for).
    public let localAddress: IPv6Endpoint
    private let channel: Channel

    private init(server: ACMEServer, channel: Channel, localAddress: IPv6Endpoint) {
        self.server = server
        self.channel = channel
        self.localAddress = localAddress
    }

    /// Starts listening on `address` (IPv6 only; port 0 picks a free one) with the given TLS
    /// certificate chain (leaf first) and key, both PEM.
    public static func start(
        server: ACMEServer, address: IPv6Endpoint, certificateChainPEM: String, keyPEM: String,
        group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "stoq.acme.https")
    ) async throws -> ACMEHTTPSServer {
        let context: NIOSSLContext
        do {
            let chain = try NIOSSLCertificate.fromPEMBytes(Array(certificateChainPEM.utf8))
            let key = try NIOSSLPrivateKey(bytes: Array(keyPEM.utf8), format: .pem)
            var tls = TLSConfiguration.makeServerConfiguration(
                certificateChain: chain.map { .certificate($0) },
                privateKey: .privateKey(key))
            tls.minimumTLSVersion = .tlsv12
            context = try NIOSSLContext(configuration: tls)
        } catch {
            throw StartError(code: .invalidTLSCredentials, message: "TLS certificate/key do not load: \(error)")
        }
        let maxBody = server.configuration.maxBodySize
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            // IPv6 only even when bound to [::], where Linux would otherwise accept IPv4-mapped peers.
            .serverChannelOption(ChannelOptions.Types.SocketOption(level: .ipv6, name: .ipv6_v6only), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let ops = channel.pipeline.syncOperations
                    try ops.addHandler(NIOSSLServerHandler(context: context))
                    try ops.configureHTTPServerPipeline(withErrorHandling: true)
                    try ops.addHandler(ACMEHTTPHandler(server: server, maxBody: maxBody, logger: logger))
                }
            }
        let socketAddress: SocketAddress
        do { socketAddress = try SocketAddress(ipAddress: address.address.description, port: Int(address.port)) } catch {
            throw StartError(code: .bindFailed, message: "\(address): not a usable IPv6 address (\(error))")
        }
        let channel: Channel
        do { channel = try await bootstrap.bind(to: socketAddress).get() } catch {
            throw StartError(code: .bindFailed, message: "cannot listen on \(address): \(error)")
        }
        let port = UInt16(channel.localAddress?.port ?? Int(address.port))
        return ACMEHTTPSServer(server: server, channel: channel, localAddress: IPv6Endpoint(address: address.address, port: port))
    }

    /// Stops accepting connections and closes the listener.
    public func shutdown() async {
        try? await channel.close()
    }

    /// Waits until the listener closes.
    public func waitUntilClosed() async {
        try? await channel.closeFuture.get()
    }
}

/// Collects one HTTP request (bounded body), asks the `ACMEServer`, writes the answer.
private final class ACMEHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let server: ACMEServer
    private let maxBody: Int
    private let logger: Logger
    private var head: HTTPRequestHead?
    private var body = ByteBuffer()
    private var tooLarge = false

    init(server: ACMEServer, maxBody: Int, logger: Logger) {
        self.server = server
        self.maxBody = maxBody
        self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h
            body.clear()
            tooLarge = false
        case .body(var chunk):
            // Stop buffering past the limit but keep reading, so the answer can still be sent.
            if body.readableBytes + chunk.readableBytes > maxBody { tooLarge = true } else { body.writeBuffer(&chunk) }
        case .end:
            guard let h = head else { return }
            head = nil
            var headers: [String: String] = [:]
            for (name, value) in h.headers { headers[name.lowercased()] = value }
            let path = String(h.uri.split(separator: "?", maxSplits: 1).first ?? "")
            let request = ACMEHTTPRequest(
                method: h.method.rawValue, path: path, headers: headers,
                body: tooLarge ? Data(count: maxBody + 1) : Data(body.readableBytesView))
            let keepAlive = h.isKeepAlive
            let version = h.version
            let server = self.server
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            let promise = context.eventLoop.makePromise(of: ACMEHTTPResponse.self)
            promise.completeWithTask { await server.handle(request) }
            promise.futureResult.whenSuccess { response in
                let (handler, context) = bound.value
                handler.write(response, version: version, keepAlive: keepAlive, isHead: h.method == .HEAD, context: context)
            }
        }
    }

    private func write(_ r: ACMEHTTPResponse, version: HTTPVersion, keepAlive: Bool, isHead: Bool, context: ChannelHandlerContext) {
        var headers = HTTPHeaders(r.headers)
        headers.replaceOrAdd(name: "Content-Length", value: "\(r.body.count)")
        if !keepAlive { headers.replaceOrAdd(name: "Connection", value: "close") }
        context.write(
            wrapOutboundOut(
                .head(
                    HTTPResponseHead(
                        version: version, status: HTTPResponseStatus(statusCode: r.status),
                        headers: headers))), promise: nil)
        if !isHead && !r.body.isEmpty {
            context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(bytes: r.body)))), promise: nil)
        }
        let done = context.writeAndFlushPromise()
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: done)
        if !keepAlive {
            let channel = context.channel
            done.futureResult.whenComplete { _ in channel.close(promise: nil) }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // TLS handshake failures from scanners or clients that do not trust the CA end up here.
        logger.debug("acme connection error", metadata: ["error": "\(error)"])
        context.close(promise: nil)
    }
}

extension ChannelHandlerContext {
    fileprivate func writeAndFlushPromise() -> EventLoopPromise<Void> { eventLoop.makePromise() }
}
