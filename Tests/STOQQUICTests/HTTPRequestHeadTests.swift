import STOQCore
import STOQQUIC
import STOQTestSupport
import Testing

/// The HTTP rules for heads, applied in Swift once per request to the fields the C shim kept.
struct HTTPRequestHeadTests {
    /// A well-formed GET's fields, with `extra` after them.
    func fields(method: String = "GET", path: String = "/objects/a.bin", _ extra: [HTTPField] = []) -> [HTTPField] {
        [
            HTTPField(":method", method), HTTPField(":scheme", "https"), HTTPField(":authority", "node"),
            HTTPField(":path", path),
        ] + extra
    }

    /// The section size (RFC 9114 §4.2.2) the shim would report for `fields`.
    func size(_ fields: [HTTPField]) -> Int { fields.reduce(0) { $0 + $1.name.utf8.count + $1.valueLength + 32 } }

    func parse(_ f: [HTTPField], sectionSize: Int? = nil, hasBody: Bool = false) -> HTTPRequest {
        HTTPRequestHead.parse(f, sectionSize: sectionSize ?? size(f), hasBody: hasBody)
    }

    /// The refusal, its exact status and the exact reason the node sends.
    func refused(
        _ r: HTTPRequest, _ cause: HTTPRefusal.Cause, _ status: Int, _ reason: String,
        sourceLocation: SourceLocation = #_sourceLocation
    ) {
        #expect(r.refusal?.cause == cause, sourceLocation: sourceLocation)
        #expect(r.refusal?.status == status, sourceLocation: sourceLocation)
        #expect(r.refusal?.reason == reason, sourceLocation: sourceLocation)
    }

    @Test func aWellFormedHeadIsServed() {
        let r = parse(fields([HTTPField("range", "bytes=0-9"), HTTPField("content-length", "42")]), hasBody: true)
        #expect(r.refusal == nil)
        #expect(!r.malformed && !r.pathTooLong && !r.headersTooLarge)
        #expect(r.method == "GET" && r.path == "/objects/a.bin" && r.authority == "node")
        #expect(r.range == "bytes=0-9" && r.contentLength == 42 && r.hasBody)
    }

    /// W3C trace context is kept as received, and only whole: a value the shim cut would name
    /// another trace, so the request then starts its own.
    @Test func traceContextIsKeptOnlyWhole() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        let r = parse(fields([HTTPField("traceparent", parent), HTTPField("tracestate", "vendor=x")]))
        #expect(r.traceparent == parent && r.tracestate == "vendor=x")
        let none = parse(fields())
        #expect(none.traceparent.isEmpty && none.tracestate.isEmpty)
        let cut = parse(fields([HTTPField("traceparent", String(parent.prefix(20)), valueLength: parent.utf8.count)]))
        #expect(cut.traceparent.isEmpty && cut.refusal == nil)
    }

    /// Credentials and preconditions are kept as received, and only whole: a cut token is
    /// no token, and a cut entity tag would match another object.
    @Test func credentialsAndPreconditionsAreKeptOnlyWhole() {
        let r = parse(
            fields([
                HTTPField("authorization", "Bearer abc.def.ghi"), HTTPField("if-match", "\"e1\""),
                HTTPField("if-none-match", "*"),
            ]))
        #expect(r.authorization == "Bearer abc.def.ghi" && r.ifMatch == "\"e1\"" && r.ifNoneMatch == "*")
        #expect(r.identity.isEmpty)
        let cut = parse(fields([HTTPField("authorization", "Bearer abc", valueLength: 4000)]))
        #expect(cut.authorization.isEmpty && cut.refusal == nil)
    }

    /// `Cache-Control: no-cache` in any field, among other directives and in any case, asks
    /// caches to go upstream; other directives, and `no-cache` as a part of one, do not.
    @Test func noCacheIsFoundAmongTheDirectives() {
        #expect(!parse(fields()).noCache)
        for v in ["no-cache", "max-age=0, No-Cache", " no-cache ,no-store"] {
            #expect(parse(fields([HTTPField("cache-control", v)])).noCache, "\(v)")
        }
        for v in ["no-store", "max-age=0", "no-cache-please", "x-no-cache", ""] {
            #expect(!parse(fields([HTTPField("cache-control", v)])).noCache, "\(v)")
        }
        #expect(parse(fields([HTTPField("cache-control", "max-age=5"), HTTPField("cache-control", "no-cache")])).noCache)
        // A value cut short may have cut a longer directive down to `no-cache`.
        #expect(!parse(fields([HTTPField("cache-control", "no-cache", valueLength: 4000)])).noCache)
    }

    @Test(arguments: [":method", ":path", ":scheme"])
    func aMissingPseudoHeaderIs400(_ name: String) {
        let r = parse(fields().filter { $0.name != name })
        refused(r, .missingPseudoHeader(name), 400, "malformed request")
        #expect(r.malformed)
    }

    @Test(arguments: [":method", ":path"])
    func aRepeatedPseudoHeaderIs400(_ name: String) {
        let r = parse(fields([HTTPField(name, name == ":method" ? "PUT" : "/objects/b")]))
        refused(r, .repeatedPseudoHeader(name), 400, "malformed request")
    }

    /// `:scheme` and `:authority` may repeat (the last authority counts), as before.
    @Test func schemeAndAuthorityMayRepeat() {
        let r = parse(fields([HTTPField(":scheme", "https"), HTTPField(":authority", "other")]))
        #expect(r.refusal == nil)
        #expect(r.authority == "other")
    }

    /// A method too long is its own cause now (one flag used to mean "repeated" and "too long").
    @Test func aMethodTooLongIs400() {
        #expect(parse(fields(method: String(repeating: "M", count: 15))).refusal == nil)
        let r = parse(fields(method: String(repeating: "M", count: 16)))
        refused(r, .methodTooLong, 400, "malformed request")
    }

    /// A head that ends the request while `Content-Length` announces a body: one rule for every
    /// service (a PUT of it used to replace the object with nothing).
    @Test func aBodyAnnouncedButAbsentIs400() {
        let r = parse(fields([HTTPField("content-length", "1000")]), hasBody: false)
        refused(r, .bodyMissing(1000), 400, "content-length 1000 but no body")
        #expect(r.malformed)
        #expect(parse(fields([HTTPField("content-length", "0")]), hasBody: false).refusal == nil)
        #expect(parse(fields([HTTPField("content-length", "1000")]), hasBody: true).refusal == nil)
    }

    @Test func aPathTooLongIs414() {
        let ok = parse(fields(path: "/" + String(repeating: "a", count: 4095)))
        #expect(ok.refusal == nil && !ok.pathTooLong)
        let r = parse(fields(path: "/" + String(repeating: "a", count: 4096)))
        refused(r, .pathTooLong, 414, "path too long")
        #expect(r.pathTooLong && r.path.utf8.count == 4096)
    }

    /// A path the shim could not keep whole (its buffer ran out) is still judged by its length.
    @Test func aPathCutByTheShimIs414() {
        var f = fields()
        f[3] = HTTPField(":path", "/" + String(repeating: "a", count: 99), valueLength: 30_000)
        let r = parse(f, sectionSize: 30_200)
        refused(r, .pathTooLong, 414, "path too long")
        #expect(r.headersTooLarge)
    }

    @Test func fieldsTooLargeAre431() {
        let f = fields()
        #expect(parse(f, sectionSize: 16_384).refusal == nil)
        let r = parse(f, sectionSize: 16_385)
        refused(r, .fieldsTooLarge, 431, "request header fields too large")
        #expect(r.headersTooLarge && !r.malformed && !r.pathTooLong)
        // One big field, counted as the RFC does (name + value + 32).
        let big = fields([HTTPField("x-junk", String(repeating: "j", count: 16_384 - size(fields()) - 32 - 6))])
        #expect(size(big) == 16_384 && parse(big).refusal == nil)
        let bigger = fields([HTTPField("x-junk", String(repeating: "j", count: 16_384 - size(fields()) - 32 - 5))])
        #expect(parse(bigger).refusal?.status == 431)
    }

    /// The first refusal wins: malformed, then 414, then 431 (the order the services had).
    @Test func refusalsInOrder() {
        let long = "/" + String(repeating: "a", count: 5000)
        let both = parse(fields(path: long).filter { $0.name != ":scheme" }, sectionSize: 20_000)
        #expect(both.refusal?.status == 400)
        #expect(both.malformed && both.pathTooLong && both.headersTooLarge)
        #expect(parse(fields(path: long), sectionSize: 20_000).refusal?.status == 414)
    }

    @Test func contentLength() {
        func cl(_ values: String...) -> Int64? { parse(fields(values.map { HTTPField("content-length", $0) })).contentLength }
        #expect(cl("0") == 0)
        #expect(cl("1048576") == 1_048_576)
        #expect(cl() == nil)
        #expect(cl("") == nil && cl("12a") == nil && cl("-1") == nil && cl(" 1") == nil)
        #expect(cl("99999999999999999999") == nil)
        #expect(cl("5", "bad") == 5)  // a later bad value does not erase a good one
    }

    @Test func rangeForms() {
        func r(_ h: String, _ size: UInt64 = 1000) -> Result<ClosedRange<UInt64>, HTTPRangeError>? { HTTPRange.resolve(h, size: size) }
        #expect(r("") == nil)
        #expect(r("bytes=0-99") == .success(0...99))
        #expect(r("bytes=100-199") == .success(100...199))
        #expect(r("bytes=100-") == .success(100...999))
        #expect(r("bytes=990-5000") == .success(990...999))  // the end is cut to the body
        #expect(r("bytes=-50") == .success(950...999))
        #expect(r("bytes=-5000") == .success(0...999))
        #expect(r("bytes=5-5") == .success(5...5))
        #expect(r("bytes=1000-") == .failure(.unsatisfiable))
        #expect(r("bytes=1000-2000") == .failure(.unsatisfiable))
        #expect(r("bytes=-1", 0) == .failure(.unsatisfiable))
        #expect(r("bytes=100-50", 10) == .failure(.unsatisfiable))  // the start is judged first
        #expect(r("bytes=100-50") == .failure(.malformed))
        for bad in [
            "bytes=-0", "bytes=0-1,5-6", "items=0-1", "bytes=5", "bytes=a-9", "bytes=0-z", "bytes=-", "bytes= 1-2",
            "0-1",
        ] {
            #expect(r(bad) == .failure(.malformed), "\(bad)")
        }
    }

    @Test func cacheControlForms() {
        #expect(HTTPCacheControl.maxAge("max-age=60") == 60)
        #expect(HTTPCacheControl.maxAge("public, max-age=3600") == 3600)
        #expect(HTTPCacheControl.maxAge("max-age=0") == 0)
        #expect(HTTPCacheControl.maxAge("max-age=10, no-transform") == 10)
        #expect(HTTPCacheControl.maxAge("max-age=12abc") == 12)
        #expect(HTTPCacheControl.maxAge("max-age=99999999999999999999999") == Int64.max)
        #expect(HTTPCacheControl.maxAge("no-cache") == nil)
        #expect(HTTPCacheControl.maxAge("") == nil)
        #expect(HTTPCacheControl.maxAge("max-age=") == nil)
        #expect(HTTPCacheControl.maxAge("max-age=abc, max-age=5") == nil)  // the first max-age decides
    }

    @Test func responseHead() {
        let h = HTTPResponseHead.parse([
            HTTPField(":status", "206"), HTTPField("content-length", "100"),
            HTTPField("cache-control", "public, max-age=30"),
            HTTPField("cache-control", "no-transform"),
        ])
        #expect(h == HTTPResponseHead(status: 206, contentLength: 100, maxAge: 30))
        #expect(HTTPResponseHead.parse([HTTPField(":status", "404")]) == HTTPResponseHead(status: 404, contentLength: nil, maxAge: nil))
        #expect(HTTPResponseHead.parse([]).status == 0)
    }

    @Test func etagNamesTheSHA256OnlyWhenStrongAndWhole() {
        let hex = String(repeating: "ab", count: 32)
        func sha(_ tag: String) -> String? { HTTPResponseHead.parse([HTTPField(":status", "201"), HTTPField("etag", tag)]).etagSHA256 }
        #expect(sha("\"\(hex)\"") == hex)
        #expect(sha("\"\(hex.uppercased())\"") == hex)
        #expect(sha("W/\"\(hex)\"") == nil)
        #expect(sha("\"\(hex.dropLast())\"") == nil)
        #expect(sha("\"\(hex.dropLast())g\"") == nil)
        #expect(sha("\"1a2b-3c\"") == nil)
        #expect(HTTPResponseHead.parse([HTTPField(":status", "201")]).etagSHA256 == nil)
    }

    /// A body is checked against a SHA-256 ETag only when it is the whole object (200).
    @Test func aBodyIsCheckedOnlyWhenWholeAndTaggedWithItsDigest() {
        let digest = [UInt8](repeating: 0xab, count: 32), other = [UInt8](repeating: 0xcd, count: 32)
        func head(_ status: String, _ tag: String?) -> HTTPResponseHead {
            HTTPResponseHead.parse([HTTPField(":status", status)] + (tag.map { [HTTPField("etag", $0)] } ?? []))
        }
        let tag = "\"\(Hex.encode(digest))\""
        #expect(head("200", tag).bodyMismatch(sha256: digest) == nil)
        #expect(
            head("200", tag).bodyMismatch(sha256: other)
                == "the body's SHA-256 is \(Hex.encode(other)), not the \(Hex.encode(digest)) its ETag names: the object changed on the server while it was sent, or is damaged there"
        )
        #expect(head("206", tag).bodyMismatch(sha256: other) == nil)
        #expect(head("200", "\"f1-2-3\"").bodyMismatch(sha256: other) == nil)
        #expect(head("200", nil).bodyMismatch(sha256: other) == nil)
        #expect(head("200", tag).bodyMismatch(sha256: nil) == nil)
    }

    @Test func aResetIsNamedAndExplained() {
        #expect(
            H3Error.Code.internalError.resetReason
                == "HTTP/3 error 0x102, H3_INTERNAL_ERROR: the server could not finish the response (its log says why)")
        #expect(H3Error.Code.requestCancelled.resetReason == "HTTP/3 error 0x10c, H3_REQUEST_CANCELLED")
        #expect(H3Error.Code(rawValue: 0x1f).resetReason == "HTTP/3 error 0x1f")
    }

    /// Found by `scripts/fuzz http3`: a value cut inside a UTF-8 character came back with
    /// U+FFFD in the cut character's place, 1 or 2 bytes over the limit. Cuts fall on a
    /// character boundary now.
    @Test func cutsKeepValuesWithinTheirLimits() {
        let authority = String(repeating: "a", count: HTTPRequestHead.maxAuthorityLength - 1) + "é"
        let path = "/" + String(repeating: "p", count: HTTPRequestHead.maxPathLength - 2) + "é"
        let r = HTTPRequestHead.parse(
            [HTTPField(":method", "GET"), HTTPField(":scheme", "https"), HTTPField(":authority", authority), HTTPField(":path", path)],
            sectionSize: 0, hasBody: false)
        #expect(r.authority == String(repeating: "a", count: HTTPRequestHead.maxAuthorityLength - 1))
        #expect(r.path == String(path.dropLast()))
        #expect(r.refusal?.cause == .pathTooLong)
        let fffd = String(repeating: "\u{FFFD}", count: 100)  // what invalid bytes decode to
        let r2 = HTTPRequestHead.parse(
            [HTTPField(":method", "GET"), HTTPField(":scheme", "https"), HTTPField(":authority", fffd), HTTPField(":path", "/")],
            sectionSize: 0, hasBody: false)
        #expect(r2.authority.utf8.count == 255)
    }
}
