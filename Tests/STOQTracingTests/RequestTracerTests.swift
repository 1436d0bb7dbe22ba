import Foundation
import InMemoryTracing
import STOQQUIC
import STOQTracing
import Testing
import Tracing

/// Span names are the route, never the path: a name per object or chunk would make a tracing
/// backend's list of operations as long as the store.
@Suite struct RequestTracerTests {
    @Test(arguments: [
        ("/objects/a.bin", "/objects/{name}"),
        ("/objects/a.bin?x=1", "/objects/{name}"),
        ("/manifests/big", "/manifests/{name}"),
        ("/chunks/" + String(repeating: "ab", count: 32), "/chunks/{id}"),
        (
            "/_stoq/relay/" + String(repeating: "0f", count: 32) + "/2/chunks/" + String(repeating: "cd", count: 32),
            "/_stoq/relay/{holder}/{hops}/chunks/{id}"
        ),
        ("/_stoq/relay/" + String(repeating: "0f", count: 32) + "/1/manifests/m", "/_stoq/relay/{holder}/{hops}/manifests/{name}"),
        ("/_stoq/relay/short", "/_stoq/relay/{holder}/{hops}"),
        ("/_stoq/relay/" + String(repeating: "0f", count: 32) + "/1/x\(UUID())", "/_stoq/relay/{holder}/{hops}"),
        ("/_stoq/log/entries/7", "/_stoq/log/{entry}"),
        ("/_stoq/missing", "/_stoq/missing"),
        ("/_stoq/mesh/probe?x=1", "/_stoq/mesh/probe"),
    ])
    func routeNamesTheOperation(path: String, route: String) {
        #expect(RequestTracer.route(path) == route)
    }

    /// A client's invented path names no route: it is the client's to vary without end.
    @Test(arguments: ["/x\(UUID())", "/_stoq/\(UUID())", "/", "/" + String(repeating: "x", count: 500)])
    func anUnknownPathHasNoRoute(path: String) {
        #expect(RequestTracer.route(path) == nil)
    }

    @Test func anUnknownPathNamesTheMethodOnly() throws {
        let (tracer, spans) = Self.tracer()
        RequestTracer.end(tracer.serverSpan(Self.request("GET", "/x\(UUID())"), peer: "::1"), status: 404)
        let span = try #require(spans.finishedSpans.first)
        #expect(span.operationName == "GET")
        #expect(span.attributes.get("http.route") == nil)
        #expect(span.attributes.get("http.request.method")?.toSpanAttribute() == .string("GET"))
    }

    /// OpenTelemetry's rule: a method the node does not know is `_OTHER`, named `HTTP`.
    @Test func anUnknownMethodIsOther() throws {
        let (tracer, spans) = Self.tracer()
        let method = "FOO"
        RequestTracer.end(tracer.serverSpan(Self.request(method, "/objects/a.bin"), peer: "::1"), status: 405)
        let span = try #require(spans.finishedSpans.first)
        #expect(span.operationName == "HTTP /objects/{name}")
        #expect(span.attributes.get("http.request.method")?.toSpanAttribute() == .string("_OTHER"))
        #expect(span.attributes.get("http.request.method_original")?.toSpanAttribute() == .string(method))
        #expect(span.attributes.get("http.route")?.toSpanAttribute() == .string("/objects/{name}"))
    }

    @Test func aKnownRequestIsNamedByMethodAndRoute() throws {
        let (tracer, spans) = Self.tracer()
        RequestTracer.end(tracer.serverSpan(Self.request("PUT", "/objects/a.bin"), peer: "::1"), status: 201)
        let span = try #require(spans.finishedSpans.first)
        #expect(span.operationName == "PUT /objects/{name}")
        #expect(span.attributes.get("http.request.method")?.toSpanAttribute() == .string("PUT"))
        #expect(span.attributes.get("http.request.method_original") == nil)
    }

    static func tracer() -> (RequestTracer, InMemoryTracer) {
        let spans = InMemoryTracer()
        return (RequestTracer(spans), spans)
    }

    static func request(_ method: String, _ path: String) -> HTTPRequest {
        let fields = [HTTPField(":method", method), HTTPField(":scheme", "https"), HTTPField(":authority", "node"), HTTPField(":path", path)]
        return HTTPRequestHead.parse(fields, sectionSize: 0, hasBody: false)
    }
}
