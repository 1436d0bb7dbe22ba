import STOQTracing
import Testing

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
        ("/_stoq/log/entries/7", "/_stoq/log/{entry}"),
        ("/_stoq/missing", "/_stoq/missing"),
    ])
    func routeNamesTheOperation(path: String, route: String) {
        #expect(RequestTracer.route(path) == route)
    }

    @Test func anUnknownPathIsCut() {
        #expect(RequestTracer.route("/" + String(repeating: "x", count: 500)).count == 64)
    }
}
