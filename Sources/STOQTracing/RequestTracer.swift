import STOQCore
import STOQQUIC
import Tracing

/// The node's tracer, as the workers and the edge fetcher use it: W3C trace context in and out
/// of HTTP/3 header fields, and spans through swift-distributed-tracing's synchronous API
/// (`startSpan` … `end`), since workers run to completion and never `await`.
///
/// Whoever holds one traces; a node with `[tracing]` off holds none (nil), so a request costs
/// nothing then: no span, no context, no header parsed beyond the two fields kept as they came.
/// Thread-safe (the tracer behind it is): one per node, shared by every worker and the fetcher.
public final class RequestTracer: Sendable {
    let tracer: any Tracer

    /// Traces through `tracer` (swift-otel's in the node; any `Tracer` in tests).
    public init(_ tracer: any Tracer) { self.tracer = tracer }

    /// The context a request's `traceparent` and `tracestate` carry (empty when there is none
    /// or it is not valid W3C: the request then starts a trace of its own).
    public func context(traceparent: String, tracestate: String) -> ServiceContext {
        var context = ServiceContext.topLevel
        guard !traceparent.isEmpty else { return context }
        tracer.extract(TraceHeaders(traceparent: traceparent, tracestate: tracestate), into: &context, using: TraceHeaders.Extract())
        return context
    }

    /// A span named `name` of `kind`, child of `parent`'s span (a root when it has none).
    public func startSpan(_ name: String, parent: ServiceContext, kind: SpanKind = .internal) -> any Span {
        tracer.startSpan(name, context: parent, ofKind: kind)
    }

    /// The header fields that carry `context` to the next hop (`traceparent`, and `tracestate`
    /// when it has one).
    public func headers(for context: ServiceContext) -> [(String, String)] {
        var out: [(String, String)] = []
        tracer.inject(context, into: &out, using: HeaderFields())
        return out
    }

    /// A request's server span: `GET /objects/{name}` (the route, so names stay few), with the
    /// method and path as attributes, child of the caller's `traceparent`. Nothing the client
    /// chooses reaches the name (OpenTelemetry's HTTP conventions): a path of no known route
    /// leaves the method alone (`GET`), a method not in `knownMethods` is named `HTTP` and
    /// recorded as `_OTHER` with the original beside it.
    public func serverSpan(_ request: HTTPRequest, peer: String) -> any Span {
        let parent = context(traceparent: request.traceparent, tracestate: request.tracestate)
        let route = Self.route(request.path)
        let span = startSpan(Self.spanName(method: request.method, route: route), parent: parent, kind: .server)
        Self.setMethod(request.method, on: span)
        if let route { span.attributes["http.route"] = route }
        span.attributes["url.path"] = String(request.path.prefix { $0 != "?" })
        span.attributes["url.scheme"] = "https"
        span.attributes["network.protocol.name"] = "http"
        span.attributes["network.protocol.version"] = "3"
        span.attributes["client.address"] = peer
        return span
    }

    /// An upstream request's client span (an edge's origin fetch, a mesh relay's next hop),
    /// child of `parent`, with its attributes; named as `serverSpan` names its span.
    public func clientSpan(method: String, path: String, server: String, label: String, parent: ServiceContext) -> any Span {
        let span = startSpan(Self.spanName(method: method, route: Self.route(path)), parent: parent, kind: .client)
        Self.setMethod(method, on: span)
        span.attributes["url.path"] = path
        span.attributes["server.address"] = server
        span.attributes["stoq.upstream"] = label
        return span
    }

    /// The methods a span is named after (OpenTelemetry's default: RFC 9110's and PATCH); any
    /// other is `_OTHER`, so a client cannot mint span names or attribute values by inventing
    /// methods.
    public static let knownMethods: Set<String> = ["CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"]

    /// A span's name: `{method} {route}`, or `{method}` when the path has no known route;
    /// `{method}` is `HTTP` for a method not in `knownMethods`.
    static func spanName(method: String, route: String?) -> String {
        let method = knownMethods.contains(method) ? method : "HTTP"
        guard let route else { return method }
        return method + " " + route
    }

    private static func setMethod(_ method: String, on span: any Span) {
        if knownMethods.contains(method) {
            span.attributes["http.request.method"] = method
        } else {
            span.attributes["http.request.method"] = "_OTHER"
            span.attributes["http.request.method_original"] = method
        }
    }

    /// Ends a request's span with its status (0: none was sent) and the stream's HTTP/3 code.
    public static func end(_ span: any Span, status: Int, errorCode: UInt64? = nil, failure: String? = nil) {
        if status > 0 { span.attributes["http.response.status_code"] = status }
        if let errorCode, errorCode != H3Error.noError { span.attributes["stoq.h3_error_code"] = Int(truncatingIfNeeded: errorCode) }
        if let failure {
            span.attributes["error.type"] = failure
            span.setStatus(SpanStatus(code: .error, message: failure))
        } else if status >= 500 || (errorCode ?? H3Error.noError) != H3Error.noError {
            span.setStatus(SpanStatus(code: .error))
        }
        span.end()
    }

    /// The route a path belongs to: `/objects/{name}`, `/chunks/{id}`, `/manifests/{name}`, a
    /// mesh relay's `/_stoq/relay/{holder}/{hops}/chunks/{id}`, the transparency log's
    /// `/_stoq/log/{entry}`, or the node-internal path itself for the few fixed ones
    /// (`NodePaths`); nil for any other path, whose name would be the client's to choose.
    public static func route(_ path: String) -> String? {
        let p = path.prefix { $0 != "?" }
        if p.hasPrefix(NodePaths.relayPrefix) {
            let parts = p.split(separator: "/", maxSplits: 5, omittingEmptySubsequences: false)
            let relay = NodePaths.relayPrefix + "{holder}/{hops}"
            guard parts.count == 6, let resource = route("/" + parts[5]) else { return relay }
            return relay + resource
        }
        for prefix in ["/objects/", "/manifests/"] where p.hasPrefix(prefix) { return prefix + "{name}" }
        if p.hasPrefix("/chunks/") { return "/chunks/{id}" }
        if p.hasPrefix(NodePaths.logPrefix) { return NodePaths.logPrefix + "{entry}" }
        if fixedRoutes.contains(String(p)) { return String(p) }
        return nil
    }

    /// The node's own paths that are routes as they stand.
    private static let fixedRoutes: Set<String> = [NodePaths.meshProbe, NodePaths.meshAdvert, NodePaths.missing]
}

/// A request's W3C trace context fields, as received.
struct TraceHeaders: Sendable {
    var traceparent: String
    var tracestate: String

    struct Extract: Extractor {
        func extract(key: String, from carrier: TraceHeaders) -> String? {
            switch key {
            case "traceparent": carrier.traceparent
            case "tracestate": carrier.tracestate.isEmpty ? nil : carrier.tracestate
            default: nil
            }
        }
    }
}

/// Header fields as the HTTP/3 client sends them.
struct HeaderFields: Injector {
    func inject(_ value: String, forKey key: String, into carrier: inout [(String, String)]) {
        carrier.append((key.lowercased(), value))
    }
}
