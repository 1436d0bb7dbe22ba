import CNgtcp2
import Dispatch
#if canImport(Glibc)
import Glibc
#endif

/// A request head, as the server side sees it: what `HTTPRequestHead.parse` made of the
/// fields the C shim gathered.
public struct HTTPRequest: Sendable {
    public var method: String
    /// The request target, e.g. `/objects/a.bin`.
    public var path: String
    public var authority: String
    /// The `Range` header, or "" when absent.
    public var range: String
    /// `Content-Length`, if the client sent one.
    public var contentLength: Int64?
    /// The path was longer than the node accepts (and was cut).
    public var pathTooLong: Bool
    /// A pseudo-header was missing or repeated.
    public var malformed: Bool
    /// A body follows the head.
    public var hasBody: Bool
    /// The header fields were larger than the node accepts.
    public var headersTooLarge: Bool = false
    /// The answer the head gets when it cannot be served (the first of malformed, path too
    /// long, fields too large), nil when it can.
    public var refusal: HTTPRefusal? = nil
    /// W3C trace context (`traceparent`, `tracestate`), "" when absent: a traced request's
    /// spans join the caller's trace.
    public var traceparent = ""
    public var tracestate = ""
    /// `Authorization`, "" when absent or cut (a cut credential is no credential).
    public var authorization = ""
    /// `If-Match` and `If-None-Match` (RFC 9110 §13.1), "" when absent: conditional writes.
    public var ifMatch = ""
    public var ifNoneMatch = ""
    /// `Via` (RFC 9110 §7.6.3), "" when absent or cut: the intermediaries the request came
    /// through (a mesh relay names the nodes on its path: `3 <node id>, 3 <node id>`).
    public var via = ""
    /// `Cache-Control` names `no-cache` (RFC 9111 §5.2.1.4): a cache must not answer from a
    /// stored copy without asking its upstream. An edge or mesh relay honours it for manifests.
    public var noCache = false
    /// Who sent the request, as the node's access policy identified it (set before the
    /// request reaches a service): `token:<subject>`, `cert:<subject>`, or `addr:<prefix>/64`
    /// for anonymous clients. The key quotas, rate limits and object ownership use.
    public var identity = ""
    /// The credential carries the admin role: it may replace and delete others' objects.
    public var isAdmin = false
}

/// A region of memory a response or request body is sent from, without copying:
/// typically an mmap of the object's file. It stays alive until the stream closes.
public final class BodyRegion: @unchecked Sendable {
    /// Start of the bytes (nil when empty).
    public let base: UnsafeRawPointer?
    /// Number of bytes.
    public let count: Int
    private let onRelease: (@Sendable (UnsafeRawPointer?, Int) -> Void)?

    /// Wraps memory that `onRelease` frees.
    public init(base: UnsafeRawPointer?, count: Int, onRelease: (@Sendable (UnsafeRawPointer?, Int) -> Void)?) {
        self.base = base
        self.count = count
        self.onRelease = onRelease
    }

    /// Copies bytes into a region of its own (for small generated bodies).
    public convenience init(copying bytes: some Collection<UInt8>) {
        let n = bytes.count
        let p = UnsafeMutableRawPointer.allocate(byteCount: max(n, 1), alignment: 16)
        // Contiguous bytes (arrays, slices — every body here) copy with one memcpy; the
        // element-by-element fallback costs milliseconds per megabyte.
        let copied: Void? = bytes.withContiguousStorageIfAvailable { src in
            if let base = src.baseAddress { p.copyMemory(from: base, byteCount: n) }
        }
        if copied == nil {
            _ = UnsafeMutableRawBufferPointer(start: p, count: n).initializeMemory(as: UInt8.self, from: bytes)
        }
        self.init(base: UnsafeRawPointer(p), count: n) { p, _ in UnsafeMutableRawPointer(mutating: p)?.deallocate() }
    }

    /// Makes a file that shrinks under a mapping cost only the responses sent from it, not the
    /// process: the SIGBUS of a read past its new end reads zeros, and the endpoint resets the
    /// streams sending from that range (`stoq_guard.c`, `EndpointCounters.bodiesCutShort`).
    /// A server calls it once, before it serves.
    public static func guardFileMappings() { _ = stoq_guard_install() }

    /// How many mappings the guard holds at once.
    public static let guardedMappingsMax = Int(STOQ_GUARD_SLOTS)

    /// Maps `length` bytes of a file read-only from `offset` (page cache, no copy).
    /// `offset` need not be page aligned. A mapping of `offLoopBytes` or more gets its page
    /// tables built and torn down on a background queue (see `pageTables`). Guarded
    /// (`guardFileMappings`) once the process has installed the guard; nil with errno EBUSY
    /// when the guard already holds `guardedMappingsMax` mappings.
    public static func mapping(fd: Int32, offset: UInt64, length: Int) -> BodyRegion? {
        if length == 0 { return BodyRegion(base: nil, count: 0, onRelease: nil) }
        let page = UInt64(sysconf(Int32(_SC_PAGESIZE)))
        let aligned = offset & ~(page - 1)
        let delta = Int(offset - aligned)
        let mapLength = length + delta
        let p = mmap(nil, mapLength, PROT_READ, MAP_SHARED, fd, off_t(aligned))
        guard let p, p != MAP_FAILED else { return nil }
        _ = madvise(p, mapLength, MADV_SEQUENTIAL)
        let address = UInt(bitPattern: p)
        let slot = stoq_guard_add(p, mapLength)
        if slot == -2 {
            munmap(p, mapLength)
            errno = EBUSY
            return nil
        }
        guard mapLength >= offLoopBytes else {
            return BodyRegion(base: UnsafeRawPointer(p + delta), count: length) { _, _ in
                stoq_guard_remove(slot)
                munmap(UnsafeMutableRawPointer(bitPattern: address), mapLength)
            }
        }
        let populated = Populated()
        let region = BodyRegion(base: UnsafeRawPointer(p + delta), count: length) { _, _ in
            pageTables.async {
                stoq_guard_remove(slot)
                munmap(UnsafeMutableRawPointer(bitPattern: address), mapLength)
                populatedBytes -= populated.bytes
            }
        }
        populate(region, populated, start: address, length: mapLength)
        return region
    }

    /// Reading a mapping faults its pages in: ~7 % of a worker sending a 1 GiB object from
    /// tmpfs (perf, 2026-12-04: `exc_page_fault` and `filemap_map_pages` under ngtcp2's copy),
    /// and tearing the page tables down costs ~30 ms per GiB (33 ms for 1 GiB, 2026-12-03),
    /// all on the thread that does it, which for a response is the worker serving every other
    /// connection too. Mappings this large (the faults of 4 MiB take ~0.2 ms) are populated
    /// (`MADV_POPULATE_READ`, ahead of the sender) and unmapped on `pageTables` instead;
    /// smaller ones fault on the reader and are unmapped where they end.
    public static let offLoopBytes = 4 << 20

    /// One serial queue per process that builds and tears down the large mappings' page tables.
    package static let pageTables = DispatchQueue(label: "stoq.page-tables", qos: .utility)

    /// What one populate call maps before the queue checks that the region is still wanted.
    static let populateStep = 8 << 20

    /// Bytes of mapping the populates may hold, all regions together. A populated mapping has
    /// all its page tables (2 MiB per GiB) from the start instead of growing them with the
    /// transfer, so many slow downloads of large objects would hold all of theirs at once.
    /// Past this, a mapping faults in on its reader, as a small one does. Tests lower it.
    nonisolated(unsafe) package static var populateBudget = 4 << 30

    /// Bytes the populates hold now: touched only on `pageTables`.
    nonisolated(unsafe) private static var populatedBytes = 0

    /// What one region's populate mapped: touched only on `pageTables`.
    private final class Populated: @unchecked Sendable { var bytes = 0 }

    /// Maps `region`'s pages in `populateStep` pieces on `pageTables`, within `populateBudget`,
    /// holding the region only for a piece at a time: a region dropped meanwhile ends the work
    /// (its unmap is queued behind it, so no piece runs on a range already unmapped).
    private static func populate(_ region: BodyRegion, _ populated: Populated, start: UInt, length: Int) {
        pageTables.async { [weak region] in
            while populated.bytes < length {
                let n = min(populateStep, length - populated.bytes)
                guard let held = region, populatedBytes + n <= populateBudget else { return }
                // EINVAL (a kernel before 5.14) or a file cut short (EFAULT): the reader faults.
                let at = UnsafeMutableRawPointer(bitPattern: start + UInt(populated.bytes))
                let ok = madvise(at, n, MADV_POPULATE_READ) == 0
                withExtendedLifetime(held) {}
                if !ok { return }
                populated.bytes += n
                populatedBytes += n
            }
        }
    }

    /// What the populates hold, once what was queued so far is done (tests).
    package static func populatedNow() -> Int { pageTables.sync { populatedBytes } }

    /// Waits until every populate and unmap queued so far is done (tests).
    package static func waitForPageTables() { pageTables.sync {} }

    deinit { onRelease?(base, count) }
}

/// An HTTP/3 request stream. A handle: valid until the application hears
/// `streamClosed` for it.
public struct HTTPStream: Hashable, @unchecked Sendable {
    let raw: OpaquePointer

    /// The QUIC stream id.
    public var id: Int64 { stoq_stream_id(raw) }
    /// Body bytes received so far.
    public var bytesReceived: UInt64 { stoq_stream_received(raw) }
    /// Body bytes this end sent that the peer has acknowledged (an upload's progress).
    public var bodyBytesAcknowledged: UInt64 { stoq_stream_body_acked(raw, nil) }
    /// Server: the status of the response sent, 0 before one is.
    public var responseStatus: Int { Int(stoq_stream_status(raw)) }
    /// errno of a failed body write, or 0.
    public var sinkErrno: Int32 { stoq_stream_sink_errno(raw) }
    /// The peer ended the body.
    public var bodyComplete: Bool { stoq_stream_body_complete(raw) != 0 }
    /// Client: the response's `Cache-Control: max-age` in seconds, nil when it had none.
    public var maxAge: Int64? {
        get { let v = stoq_stream_max_age(raw); return v < 0 ? nil : v }
        nonmutating set { stoq_stream_set_max_age(raw, newValue.map { max($0, 0) } ?? -1) }
    }

    /// Sends the body the peer uploads to `fd` (from `offset`), refusing more than `limit`
    /// bytes; `hash` keeps a SHA-256 of it. `fd` -1 discards.
    public func setBodySink(fd: Int32, offset: UInt64 = 0, limit: UInt64 = .max, hash: Bool = false) {
        stoq_stream_set_sink(raw, fd, offset, limit, hash ? 1 : 0)
    }

    /// Server: the application's `bodyReachedMark` once `bytes` of body have been received
    /// (once; 0 clears it). Set before the body passes it.
    public func setBodyMark(_ bytes: UInt64) { stoq_stream_set_body_mark(raw, bytes) }

    /// The SHA-256 of the received body, once it is complete and hashing was on.
    public func bodySHA256() -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: 32)
        return stoq_stream_body_sha256(raw, &out) == 0 ? out : nil
    }

    /// An application value attached to the stream.
    public var userData: UnsafeMutableRawPointer? {
        get { stoq_stream_get_app(raw) }
        nonmutating set { stoq_stream_set_app(raw, newValue) }
    }
}

/// What the application does with connections and streams. Every call comes on the
/// worker thread that owns the connection, between packets: keep it short and never block.
public protocol QUICApplication: AnyObject {
    /// Server: a request head arrived; respond through `connection.respond`, now or later.
    func request(_ request: HTTPRequest, stream: HTTPStream, connection: QUICConnection)
    /// Server: the request body ended (`aborted`: the peer gave up).
    func requestEnded(stream: HTTPStream, connection: QUICConnection, aborted: Bool)
    /// Client: a response head arrived.
    func response(_ head: HTTPResponseHead, stream: HTTPStream, connection: QUICConnection)
    /// The stream is gone; `errorCode` is the HTTP/3 code (0x100 = no error). Streams still
    /// open when their connection goes end just before `connectionClosed`, with
    /// H3_REQUEST_CANCELLED (0x10c).
    func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64)
    /// A streamed body has room for its next piece: a server's response (`respondStreamed`)
    /// or a client's request (`requestStreamed`).
    func bodyWanted(stream: HTTPStream, connection: QUICConnection)
    /// Server: the request body reached the mark set with `HTTPStream.setBodyMark`.
    func bodyReachedMark(stream: HTTPStream, connection: QUICConnection)
    /// The handshake completed.
    func handshakeCompleted(connection: QUICConnection)
    /// The connection is gone. `reason` is empty for a clean close.
    func connectionClosed(connection: QUICConnection, reason: String)
}

extension QUICApplication {
    public func request(_ request: HTTPRequest, stream: HTTPStream, connection: QUICConnection) {
        connection.reset(stream, errorCode: UInt64(STOQ_H3_REQUEST_REJECTED))
    }
    public func requestEnded(stream: HTTPStream, connection: QUICConnection, aborted: Bool) {}
    public func response(_ head: HTTPResponseHead, stream: HTTPStream, connection: QUICConnection) {}
    public func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) {}
    public func bodyWanted(stream: HTTPStream, connection: QUICConnection) {}
    public func bodyReachedMark(stream: HTTPStream, connection: QUICConnection) {}
    public func handshakeCompleted(connection: QUICConnection) {}
    public func connectionClosed(connection: QUICConnection, reason: String) {}
}

/// An HTTP/3 error (RFC 9114 §8.1): the application error code a stream or connection was
/// reset or closed with, and what STOQ knows about why.
///
/// The same shape as every STOQ error: a struct with a nested `Code` (static members, so
/// codes can be added). The static `UInt64` members below are the wire values of the codes
/// STOQ sends, for `reset(_:errorCode:)` and `close(errorCode:now:)`, which take the number.
public struct H3Error: Error, Sendable, Hashable, CustomStringConvertible {
    /// An HTTP/3 application error code; any value a peer sends is representable.
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        /// The code on the wire.
        public var rawValue: UInt64
        /// Wraps a wire value.
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// H3_NO_ERROR: graceful close, or a stream no longer needed.
        public static let noError = Code(rawValue: 0x100)
        /// H3_INTERNAL_ERROR: STOQ failed (a read, a write) while serving the stream.
        public static let internalError = Code(rawValue: 0x102)
        /// H3_EXCESSIVE_LOAD: the peer generates more load than is allowed.
        public static let excessiveLoad = Code(rawValue: 0x107)
        /// H3_REQUEST_REJECTED: refused before any processing; safe to retry.
        public static let requestRejected = Code(rawValue: 0x10b)
        /// H3_REQUEST_CANCELLED: the request or its response was cancelled.
        public static let requestCancelled = Code(rawValue: 0x10c)
        /// H3_MESSAGE_ERROR: a malformed request or response.
        public static let messageError = Code(rawValue: 0x10e)
        private static let names: [UInt64: String] = [
            0x100: "H3_NO_ERROR", 0x102: "H3_INTERNAL_ERROR", 0x107: "H3_EXCESSIVE_LOAD",
            0x10b: "H3_REQUEST_REJECTED", 0x10c: "H3_REQUEST_CANCELLED", 0x10e: "H3_MESSAGE_ERROR",
        ]
        /// The RFC's name, or the number in hex for codes STOQ does not name.
        public var description: String { Self.names[rawValue] ?? "0x\(String(rawValue, radix: 16))" }

        /// What a client says of a stream reset with this code, e.g. `HTTP/3 error 0x102,
        /// H3_INTERNAL_ERROR: the server could not finish the response (its log says why)`.
        public var resetReason: String {
            let name = Self.names[rawValue].map { ", \($0)" } ?? ""
            return "HTTP/3 error 0x\(String(rawValue, radix: 16))\(name)\(Self.meanings[rawValue].map { ": \($0)" } ?? "")"
        }
        private static let meanings: [UInt64: String] = [
            0x102: "the server could not finish the response (its log says why)",
            0x107: "the server found this client's load excessive",
            0x10b: "the server refused the request before processing it; safe to retry",
        ]
    }

    /// The code sent or received.
    public var code: Code
    /// What happened, e.g. which stream and what the peer did.
    public var message: String

    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code): \(message)" }

    /// Wire value of `Code.noError`.
    public static let noError: UInt64 = Code.noError.rawValue
    /// Wire value of `Code.internalError`.
    public static let internalError: UInt64 = Code.internalError.rawValue
    /// Wire value of `Code.excessiveLoad`.
    public static let excessiveLoad: UInt64 = Code.excessiveLoad.rawValue
    /// Wire value of `Code.requestRejected`.
    public static let requestRejected: UInt64 = Code.requestRejected.rawValue
    /// Wire value of `Code.requestCancelled`.
    public static let requestCancelled: UInt64 = Code.requestCancelled.rawValue
    /// Wire value of `Code.messageError`.
    public static let messageError: UInt64 = Code.messageError.rawValue
}
