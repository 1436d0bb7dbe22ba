import CNgtcp2
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

    /// Maps `length` bytes of a file read-only from `offset` (page cache, no copy).
    /// `offset` need not be page aligned.
    public static func mapping(fd: Int32, offset: UInt64, length: Int) -> BodyRegion? {
        if length == 0 { return BodyRegion(base: nil, count: 0, onRelease: nil) }
        let page = UInt64(sysconf(Int32(_SC_PAGESIZE)))
        let aligned = offset & ~(page - 1)
        let delta = Int(offset - aligned)
        let mapLength = length + delta
        let p = mmap(nil, mapLength, PROT_READ, MAP_SHARED, fd, off_t(aligned))
        guard let p, p != MAP_FAILED else { return nil }
        _ = madvise(p, mapLength, MADV_SEQUENTIAL)
        return BodyRegion(base: UnsafeRawPointer(p + delta), count: length) { base, _ in
            if let base { munmap(UnsafeMutableRawPointer(mutating: base - delta), mapLength) }
        }
    }

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
    func response(status: Int, contentLength: Int64?, stream: HTTPStream, connection: QUICConnection)
    /// The stream is gone; `errorCode` is the HTTP/3 code (0x100 = no error).
    func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64)
    /// Server: a streamed response (`respondStreamed`) has room for its next piece.
    func bodyWanted(stream: HTTPStream, connection: QUICConnection)
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
    public func response(status: Int, contentLength: Int64?, stream: HTTPStream, connection: QUICConnection) {}
    public func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) {}
    public func bodyWanted(stream: HTTPStream, connection: QUICConnection) {}
    public func handshakeCompleted(connection: QUICConnection) {}
    public func connectionClosed(connection: QUICConnection, reason: String) {}
}

/// HTTP/3 error codes (RFC 9114 §8.1).
public enum H3Error {
    public static let noError: UInt64 = 0x100
    public static let internalError: UInt64 = 0x102
    public static let excessiveLoad: UInt64 = 0x107
    public static let requestRejected: UInt64 = 0x10b
    public static let requestCancelled: UInt64 = 0x10c
    public static let messageError: UInt64 = 0x10e
}
