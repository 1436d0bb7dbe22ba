import CNgtcp2
import STOQCore

/// One field of a received head. The shim keeps a head in a bounded buffer, so a value may
/// have been cut: `value` is what was kept, `valueLength` its length on the wire.
public struct HTTPField: Sendable, Equatable {
    public var name: String
    public var value: String
    /// The value's length as received (≥ `value.utf8.count`).
    public var valueLength: Int

    /// A field as received, or (with `valueLength`) as kept after a cut.
    public init(_ name: String, _ value: String, valueLength: Int? = nil) {
        self.name = name
        self.value = value
        self.valueLength = valueLength ?? value.utf8.count
    }
}

/// Why a request head is refused, and the answer it gets: `status` and `reason` (the body's
/// text) are what the node sends.
public struct HTTPRefusal: Sendable, Equatable {
    /// What was wrong with the head.
    public enum Cause: Sendable, Equatable {
        /// A required pseudo-header (`:method`, `:scheme`, `:path`) is absent.
        case missingPseudoHeader(String)
        /// `:method` or `:path` came twice.
        case repeatedPseudoHeader(String)
        /// The method is longer than `HTTPRequestHead.maxMethodLength`.
        case methodTooLong
        /// `Content-Length` announces a body, but the head ended the request (RFC 9114 §4.1.2:
        /// malformed). nghttp3 says so only after the request has ended; served, a PUT of it
        /// would replace an object with nothing.
        case bodyMissing(Int64)
        /// The path is longer than `HTTPRequestHead.maxPathLength`.
        case pathTooLong
        /// The field section is larger than `HTTPRequestHead.maxFieldSectionSize`.
        case fieldsTooLarge
    }

    public var cause: Cause
    public var status: Int
    public var reason: String

    init(_ cause: Cause) {
        self.cause = cause
        switch cause {
        case .missingPseudoHeader, .repeatedPseudoHeader, .methodTooLong:
            (status, reason) = (400, "malformed request")
        case .bodyMissing(let n): (status, reason) = (400, "content-length \(n) but no body")
        case .pathTooLong: (status, reason) = (414, "path too long")
        case .fieldsTooLarge: (status, reason) = (431, "request header fields too large")
        }
    }
}

/// The HTTP rules for a request head, applied once per request to the fields the C shim
/// gathered: required and repeated pseudo-headers, the 414 and 431 limits, `Content-Length`.
/// The first refusal wins in this order: malformed (400), path too long (414), fields too
/// large (431).
public enum HTTPRequestHead {
    /// Longest request target served; longer gets 414.
    public static let maxPathLength = Int(STOQ_MAX_PATH)
    /// Largest field section (RFC 9114 §4.2.2: name + value + 32 per field) served; larger gets 431.
    public static let maxFieldSectionSize = Int(STOQ_MAX_FIELD_SECTION)
    /// Longest method accepted (no method STOQ serves comes close); longer is malformed.
    public static let maxMethodLength = 15
    /// Longest `:authority` kept.
    public static let maxAuthorityLength = 255

    /// The request `fields` make (in the order received). `sectionSize` is the RFC 9114 size of
    /// the whole section, fields the shim could not keep included; `hasBody`: the stream did
    /// not end with the head.
    public static func parse(_ fields: [HTTPField], sectionSize: Int, hasBody: Bool) -> HTTPRequest {
        var method: String?, path: String?, authority = "", range = "", traceparent = "", tracestate = ""
        var authorization = "", ifMatch = "", ifNoneMatch = "", via = ""
        var scheme = false, pathLength = 0, noCache = false
        var repeated: String?, methodTooLong = false
        var contentLength: Int64?
        for f in fields {
            switch f.name {
            case ":method":
                if method != nil, repeated == nil { repeated = ":method" }
                method = f.value
                if f.valueLength > maxMethodLength { methodTooLong = true }
            case ":path":
                if path != nil, repeated == nil { repeated = ":path" }
                path = f.value
                pathLength = f.valueLength
            case ":scheme": scheme = true
            case ":authority": authority = cut(f.value, maxAuthorityLength)
            case "range": range = f.value
            // Kept only when whole: a cut value would name another trace.
            case "traceparent" where f.valueLength == f.value.utf8.count: traceparent = f.value
            case "tracestate" where f.valueLength == f.value.utf8.count: tracestate = f.value
            case "authorization" where f.valueLength == f.value.utf8.count: authorization = f.value
            case "if-match" where f.valueLength == f.value.utf8.count: ifMatch = f.value
            case "if-none-match" where f.valueLength == f.value.utf8.count: ifNoneMatch = f.value
            case "via" where f.valueLength == f.value.utf8.count: via = f.value
            case "content-length":
                if let n = decimal(f.value) { contentLength = n }
            case "cache-control" where f.valueLength == f.value.utf8.count: noCache = noCache || HTTPCacheControl.namesNoCache(f.value)
            default: break
            }
        }
        let pathTooLong = pathLength > maxPathLength
        let tooLarge = sectionSize > maxFieldSectionSize
        var malformed: HTTPRefusal.Cause?
        if let repeated {
            malformed = .repeatedPseudoHeader(repeated)
        } else if method == nil || path == nil || !scheme {
            malformed = .missingPseudoHeader(method == nil ? ":method" : path == nil ? ":path" : ":scheme")
        } else if methodTooLong {
            malformed = .methodTooLong
        } else if !hasBody, let n = contentLength, n > 0 {
            malformed = .bodyMissing(n)
        }
        let cause = malformed ?? (pathTooLong ? .pathTooLong : tooLarge ? .fieldsTooLarge : nil)
        return HTTPRequest(
            method: cut(method ?? "", maxMethodLength), path: cut(path ?? "", maxPathLength),
            authority: authority, range: range, contentLength: contentLength, pathTooLong: pathTooLong,
            malformed: malformed != nil, hasBody: hasBody, headersTooLarge: tooLarge, refusal: cause.map(HTTPRefusal.init),
            traceparent: traceparent, tracestate: tracestate, authorization: authorization, ifMatch: ifMatch,
            ifNoneMatch: ifNoneMatch, via: via, noCache: noCache)
    }

    /// `s` cut to at most `limit` UTF-8 bytes, at a character boundary. Cutting inside a
    /// character and decoding would put U+FFFD (3 bytes) in its place, and the result could
    /// exceed the limit (found by `scripts/fuzz http3`).
    static func cut(_ s: String, _ limit: Int) -> String {
        let u = s.utf8
        guard u.count > limit else { return s }
        var end = u.index(u.startIndex, offsetBy: limit)
        while end > u.startIndex, u[end] & 0xC0 == 0x80 { end = u.index(before: end) }
        return String(s[..<end])
    }

    /// A `Content-Length`: decimal digits only, within Int64.
    static func decimal(_ s: String) -> Int64? {
        guard !s.isEmpty, s.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return nil }
        return Int64(s)
    }
}

/// A response head as the client side sees it.
public struct HTTPResponseHead: Sendable, Equatable {
    /// `:status` (0 when absent or not a number).
    public var status: Int
    /// `Content-Length`, if sent.
    public var contentLength: Int64?
    /// `Cache-Control: max-age`, seconds, if sent.
    public var maxAge: Int64?
    /// `ETag`, as sent (quotes and all), if sent.
    public var etag: String?

    /// A response head with these values.
    public init(status: Int, contentLength: Int64?, maxAge: Int64?, etag: String? = nil) {
        self.status = status
        self.contentLength = contentLength
        self.maxAge = maxAge
        self.etag = etag
    }

    /// The SHA-256 a strong `ETag` of 64 hex digits names (how STOQ nodes tag an object:
    /// its content's digest), lowercase; nil for any other tag.
    public var etagSHA256: String? { etag.flatMap(ContentETag.sha256(in:)) }

    /// Why a body whose SHA-256 is `sha256` is not the one this response announced: for a
    /// whole body (200) with an ETag that names a SHA-256 (`etagSHA256`) it does not match.
    /// nil when it matches, or when there is nothing to check it against (no digest kept, a
    /// part of the object, another kind of tag).
    public func bodyMismatch(sha256: [UInt8]?) -> String? {
        guard status == 200, let sha256, let want = etagSHA256 else { return nil }
        let got = Hex.encode(sha256)
        guard got != want else { return nil }
        return "the body's SHA-256 is \(got), not the \(want) its ETag names: the object changed on the server while it was sent, or is damaged there"
    }

    /// The response `fields` make.
    public static func parse(_ fields: [HTTPField]) -> HTTPResponseHead {
        var head = HTTPResponseHead(status: 0, contentLength: nil, maxAge: nil)
        for f in fields {
            switch f.name {
            case ":status": head.status = Int(f.value.utf8.prefix(7).prefix { $0 >= 0x30 && $0 <= 0x39 }.reduce(0) { $0 * 10 + Int($1 - 0x30) })
            case "content-length":
                if let n = HTTPRequestHead.decimal(f.value) { head.contentLength = n }
            case "cache-control":
                if let n = HTTPCacheControl.maxAge(f.value) { head.maxAge = n }
            case "etag": head.etag = f.value
            default: break
            }
        }
        return head
    }
}

/// `Cache-Control`, as far as STOQ reads it: `max-age` (an edge node's freshness for what an
/// origin sent) and a request's `no-cache` (go past cached copies).
public enum HTTPCacheControl {
    /// The request directive that asks caches to ask their upstream (RFC 9111 §5.2.1.4).
    public static let noCache = "no-cache"

    /// Whether the directive list `value` names `no-cache` (without an argument), ignoring case
    /// and blanks (a token has none inside).
    public static func namesNoCache(_ value: String) -> Bool {
        value.split(separator: ",").contains { $0.lowercased().filter { $0 != " " && $0 != "\t" } == noCache }
    }

    /// The seconds after the first `max-age=` in `value` (saturating at Int64.max), or nil when
    /// there is none or no digit follows it.
    public static func maxAge(_ value: String) -> Int64? {
        let u = Array(value.utf8), key = Array("max-age=".utf8)
        guard u.count >= key.count else { return nil }
        for i in 0...(u.count - key.count) where u[i..<(i + key.count)].elementsEqual(key) {
            var n: Int64 = 0, digits = 0
            for c in u[(i + key.count)...] {
                guard c >= 0x30, c <= 0x39 else { break }
                let (m, o1) = n.multipliedReportingOverflow(by: 10)
                let (a, o2) = m.addingReportingOverflow(Int64(c - 0x30))
                n = o1 || o2 ? .max : a
                digits += 1
            }
            return digits > 0 ? n : nil
        }
        return nil
    }
}

/// Why a `Range` cannot be served: `malformed` gets 400 "bad Range header", `unsatisfiable`
/// gets 416 with `content-range: bytes */size`. A struct with a nested `Code`, like every STOQ
/// error, so codes can be added.
public struct HTTPRangeError: Error, Sendable, Equatable {
    /// The kind of refusal.
    public struct Code: Hashable, Sendable {
        /// Stable name.
        public let name: String
        /// Not `bytes=a-b`, `bytes=a-` or `bytes=-n` with one range: answered 400.
        public static let malformed = Code(name: "malformed")
        /// Well formed, but starts past the end (or the object is empty): answered 416.
        public static let unsatisfiable = Code(name: "unsatisfiable")
    }

    /// The kind of refusal.
    public var code: Code
    /// What a 400 says.
    public var message: String { code == .malformed ? "bad Range header" : "range not satisfiable" }

    /// The malformed refusal.
    public static let malformed = HTTPRangeError(code: .malformed)
    /// The unsatisfiable refusal.
    public static let unsatisfiable = HTTPRangeError(code: .unsatisfiable)
}

/// `Range: bytes=…` (RFC 9110 §14.2), one range only.
public enum HTTPRange {
    /// `bytes=a-b`, `bytes=a-`, `bytes=-n` against a body of `size` bytes: the bytes to send,
    /// nil when `header` is empty (no range), or why not.
    public static func resolve(_ header: String, size: UInt64) -> Result<ClosedRange<UInt64>, HTTPRangeError>? {
        guard !header.isEmpty else { return nil }
        guard header.hasPrefix("bytes="), !header.contains(",") else { return .failure(.malformed) }
        let spec = header.dropFirst(6)
        guard let dash = spec.firstIndex(of: "-") else { return .failure(.malformed) }
        let a = spec[..<dash], b = spec[spec.index(after: dash)...]
        if a.isEmpty {
            guard let n = UInt64(b), n > 0 else { return .failure(.malformed) }
            guard size > 0 else { return .failure(.unsatisfiable) }
            return .success((size - min(n, size))...(size - 1))
        }
        guard let start = UInt64(a) else { return .failure(.malformed) }
        guard start < size else { return .failure(.unsatisfiable) }
        if b.isEmpty { return .success(start...(size - 1)) }
        guard let end = UInt64(b), end >= start else { return .failure(.malformed) }
        return .success(start...min(end, size - 1))
    }
}

extension stoq_head {
    /// The packed fields, copied out (names and values as UTF-8, lossy).
    var httpFields: [HTTPField] {
        var out: [HTTPField] = []
        out.reserveCapacity(nfields)
        guard let base = fields else { return out }
        let hdr = MemoryLayout<stoq_field_hdr>.size
        var off = 0
        for _ in 0..<nfields {
            guard off + hdr <= fields_len else { break }
            let h = UnsafeRawPointer(base + off).loadUnaligned(as: stoq_field_hdr.self)
            let n = Int(h.name_len), kept = Int(h.value_kept)
            guard off + hdr + n + kept <= fields_len else { break }
            let name = String(decoding: UnsafeBufferPointer(start: base + off + hdr, count: n), as: UTF8.self)
            let value = String(decoding: UnsafeBufferPointer(start: base + off + hdr + n, count: kept), as: UTF8.self)
            out.append(HTTPField(name, value, valueLength: Int(h.value_len)))
            off += hdr + n + kept
        }
        return out
    }
}
