import STOQQUIC
import Tracing

/// One worker's request spans, by stream: the server span a request opens when its head arrives
/// and closes with its stream, and the context its handlers make child spans in. The worker's
/// thread only.
public final class StreamSpans {
    /// The node's tracer.
    public let tracer: RequestTracer
    private var spans: [HTTPStream: any Span] = [:]

    public init(tracer: RequestTracer) { self.tracer = tracer }

    /// Opens `request`'s server span (a child of its `traceparent`).
    public func begin(_ request: HTTPRequest, stream: HTTPStream, peer: String) {
        spans[stream] = tracer.serverSpan(request, peer: peer)
    }

    /// The context of `stream`'s request, for child spans and the next hop's `traceparent`;
    /// nil when the request has no span.
    public func context(of stream: HTTPStream) -> ServiceContext? { spans[stream]?.context }

    /// A child span of `stream`'s request (nil when it has none): a handler, a store read.
    public func child(_ name: String, of stream: HTTPStream) -> (any Span)? {
        guard let parent = spans[stream] else { return nil }
        return tracer.startSpan(name, parent: parent.context)
    }

    /// Ends `stream`'s server span with the status sent on it and the stream's HTTP/3 code.
    public func end(_ stream: HTTPStream, errorCode: UInt64) {
        guard let span = spans.removeValue(forKey: stream) else { return }
        RequestTracer.end(span, status: stream.responseStatus, errorCode: errorCode)
    }
}
