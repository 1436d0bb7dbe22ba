import Foundation
import Logging
import STOQCore
import STOQAccess
import STOQQUIC
import STOQStore
import STOQTracing

/// The access check's outcomes on one worker.
public struct AccessCounters: Sendable {
    /// Refused with 401: no credential where one is needed, or an invalid token.
    public var refusedUnauthenticated: UInt64 = 0
    /// Refused with 403: the credential does not cover the request.
    public var refusedForbidden: UInt64 = 0
    /// Writes (PUT, DELETE, POST) let through to a service.
    public var allowedWrites: UInt64 = 0
    public init() {}
}

/// Sends each request to the service that owns its path: content (chunks, manifests,
/// have/want), objects, or the CA's transparency log. The services ignore stream events for
/// streams they do not own. One per worker, on its thread.
///
/// It is also the node's one access check (`[access]`, docs/access.md): every request's
/// principal is established and judged here, before any service sees it.
package final class NodeRouter: QUICApplication {
    package let objects: ObjectService
    package let content: ContentService
    /// Who may do what: the policy and the accepted token keys (a reload replaces them).
    package let access: AccessGate
    /// What the access check decided, for `/metrics`.
    package private(set) var accessCounters = AccessCounters()
    /// "access refused" lines, at most one per status and identity every `LogThrottle.interval`.
    private var refusalLog = LogThrottle()

    let logger: Logger

    package init(objects: ObjectService, content: ContentService, access: AccessGate, logger: Logger) {
        self.objects = objects
        self.content = content
        self.access = access
        self.logger = logger
        content.serveOwnObject = { [weak self] name, request, stream, connection in
            var own = request
            own.path = "/objects/" + name
            return self?.serveOwn(name, own, stream, connection) ?? false
        }
    }

    /// Answers a `GET`/`HEAD /_stoq/log/…` request (status, content type, body): the
    /// embedded CA's transparency log, which certificate renewal keeps (nil: this node keeps
    /// none). A closure, so that content knows nothing of renewal; the assembly wires them.
    package var log: (@Sendable (String) -> (Int, String, [UInt8]))?

    /// The worker's request spans, when `[tracing]` is on: every request gets a server span
    /// from its head to its stream's close, and a handler span for its dispatch.
    package var spans: StreamSpans? {
        didSet { content.spans = spans }
    }

    /// The node's per-client rate limits (nil: none): NodeRouter+Limits.swift.
    package var rates: RateLimiter?
    /// Uploads under a byte rate: their client and what their head was charged (the announced
    /// length), settled against what arrived when they end.
    var unmetered: [HTTPStream: (client: String, charged: UInt64)] = [:]

    package func request(_ request: HTTPRequest, stream: HTTPStream, connection: QUICConnection) {
        objects.countRequest()
        guard let spans else { return dispatch(request, stream: stream, connection: connection) }
        spans.begin(request, stream: stream, peer: "\(connection.peer)")
        let handler = spans.child("handler", of: stream)
        dispatch(request, stream: stream, connection: connection)
        handler?.end()
    }

    private func dispatch(_ request: HTTPRequest, stream: HTTPStream, connection: QUICConnection) {
        var request = request
        guard admit(&request, stream: stream, connection: connection) else { return }
        guard admitRate(request, stream, connection) else { return }
        // A head refused as it was parsed (malformed, path too long, fields too large) gets
        // its refusal, whichever service its path names: none may serve a cut path or head.
        if let refused = request.refusal { return objects.refuse(refused, stream: stream, connection: connection) }
        if request.path.hasPrefix(NodePaths.logPrefix) {
            guard let log, request.method == "GET" || request.method == "HEAD" else {
                let body = BodyRegion(copying: Array("this node keeps no transparency log\n".utf8))
                connection.respond(stream, status: log == nil ? 404 : 405, headers: [("content-length", "\(body.count)")], body: body)
                return
            }
            let (status, type, bytes) = log(request.path)
            connection.respond(
                stream, status: status, headers: [("content-type", type), ("content-length", "\(bytes.count)")],
                body: request.method == "HEAD" ? nil : BodyRegion(copying: bytes))
        } else if ContentService.handles(request.path) {
            content.request(request, stream: stream, connection: connection)
        } else if request.method == "GET" || request.method == "HEAD",
            let name = ObjectService.objectName(fromPath: request.path), !objects.hasFile(name),
            let record = content.storedObject(name)
        {
            content.serveObject(name, record, request, stream, connection)
        } else if content.edge != nil, request.method == "GET" || request.method == "HEAD",
            let name = ObjectService.objectName(fromPath: request.path), (try? ObjectIndex.validateName(name)) != nil,
            !objects.hasFile(name)
        {
            content.serveEdgeObject(name, request, stream, connection)
        } else {
            objects.request(request, stream: stream, connection: connection)
        }
    }

    /// A read of object `name` from this node's own storage: its plain file if it has one,
    /// else its chunked form. False, having answered nothing, when it has neither.
    private func serveOwn(_ name: String, _ request: HTTPRequest, _ stream: HTTPStream, _ connection: QUICConnection) -> Bool {
        if objects.hasFile(name) {
            objects.request(request, stream: stream, connection: connection)
        } else if let record = content.storedObject(name) {
            content.serveObject(name, record, request, stream, connection)
        } else {
            return false
        }
        return true
    }

    /// Establishes who sent `request` (bearer token, else client certificate, else address),
    /// records it as `request.identity`, and asks the policy. A refusal is answered here (401
    /// with `WWW-Authenticate`, or 403), logged and counted; the body, if any, is discarded.
    private func admit(_ request: inout HTTPRequest, stream: HTTPStream, connection: QUICConnection) -> Bool {
        let now = Int64(time(nil))
        let principal: AccessPrincipal
        do {
            principal = try access.principal(
                authorization: request.authorization, certificate: connection.peerIdentity, peer: connection.peer.address, now: now)
        } catch {
            request.identity = AccessPrincipal.anonymous(connection.peer.address).identity
            let why = "invalid bearer token: \(error)"
            refuse(
                request, 401, why, challenge: "Bearer realm=\"stoq\", error=\"invalid_token\", error_description=\"\(Self.quotable(why))\"", stream, connection)
            return false
        }
        request.identity = principal.identity
        request.isAdmin = principal.role == .admin
        let decision = access.settings.policy.decide(method: request.method, path: request.path, principal: principal)
        if decision.allowed {
            if AccessPolicy.isWrite(request.method) { accessCounters.allowedWrites &+= 1 }
            return true
        }
        var challenge: String?
        if decision.status == 401 {
            challenge = "Bearer realm=\"stoq\""
        } else if case .token = principal {
            challenge = "Bearer realm=\"stoq\", error=\"insufficient_scope\", error_description=\"\(Self.quotable(decision.reason))\""
        }
        refuse(request, decision.status, decision.reason, challenge: challenge, stream, connection)
        return false
    }

    private func refuse(_ request: HTTPRequest, _ status: Int, _ why: String, challenge: String?, _ stream: HTTPStream, _ connection: QUICConnection) {
        if status == 401 { accessCounters.refusedUnauthenticated &+= 1 } else { accessCounters.refusedForbidden &+= 1 }
        // Counted every one; logged once per status and identity (an anonymous client's is its
        // /64) every `LogThrottle.interval`: a client may send refused requests as fast as it
        // likes, and the log is not its to fill.
        if let more = refusalLog.allow("\(status) \(request.identity)", now: monotonicNow()) {
            logger.notice(
                "access refused\(more)",
                metadata: [
                    "peer": "\(connection.peer)", "status": "\(status)", "method": "\(ShownText.cut(request.method))",
                    "path": "\(ShownText.cut(request.path))", "identity": "\(ShownText.cut(request.identity))", "reason": "\(why)",
                ])
        }
        let body = BodyRegion(copying: Array("\(why)\n".utf8))
        var headers = [("content-type", "text/plain"), ("content-length", "\(body.count)")]
        if let challenge { headers.append(("www-authenticate", challenge)) }
        connection.respond(stream, status: status, headers: headers, body: body)
    }

    /// `text` made safe inside a quoted header parameter (no quotes, backslashes or controls).
    static func quotable(_ text: String) -> String {
        String(text.unicodeScalars.map { $0 == "\"" || $0 == "\\" || $0.value < 0x20 || $0.value > 0x7e ? "'" : Character($0) })
    }

    package func bodyWanted(stream: HTTPStream, connection: QUICConnection) {
        content.bodyWanted(stream: stream, connection: connection)
    }

    package func bodyReachedMark(stream: HTTPStream, connection: QUICConnection) {
        objects.bodyReachedMark(stream: stream, connection: connection)
    }

    package func connectionClosed(connection: QUICConnection, reason: String) {
        content.connectionClosed(connection)
        objects.connectionClosed(connection)
        // A refused certificate, or a handshake that failed for another reason (named by the
        // TLS alert): both are what an operator looks for when a peer cannot connect.
        if reason.hasPrefix("client certificate refused") || reason.hasPrefix("TLS handshake failed") {
            logger.notice("\(reason)", metadata: ["peer": "\(connection.peer)"])
            return
        }
        let s = connection.stats
        logger.debug(
            "connection closed",
            metadata: [
                "peer": "\(connection.peer)", "reason": "\(reason.isEmpty ? "clean" : reason)",
                "cwnd": "\(s.cwnd)", "srtt_us": "\(s.smoothed_rtt_ns / 1000)", "min_rtt_us": "\(s.min_rtt_ns / 1000)",
                "body_sent": "\(s.body_bytes_sent)", "body_received": "\(s.body_bytes_received)",
            ])
    }

    package func requestEnded(stream: HTTPStream, connection: QUICConnection, aborted: Bool) {
        if !unmetered.isEmpty { meterEnded(stream) }
        objects.requestEnded(stream: stream, connection: connection, aborted: aborted)
        content.requestEnded(stream: stream, connection: connection, aborted: aborted)
    }

    package func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) {
        if !unmetered.isEmpty { meterEnded(stream) }
        objects.streamClosed(stream: stream, connection: connection, errorCode: errorCode)
        content.streamClosed(stream: stream, connection: connection, errorCode: errorCode)
        spans?.end(stream, errorCode: errorCode)
    }
}
