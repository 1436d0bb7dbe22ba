import Crypto
import Foundation
import STOQCore
import STOQQUIC
import STOQTestSupport
import Testing

/// Stores PUT bodies in a file descriptor the test chooses, as ObjectService does, and
/// answers once the request ended: 201, or 500 naming the sink's errno.
final class FileSinkServer: QUICApplication {
    let fd: Int32
    var ended = false
    var sinkErrno: Int32 = 0
    var uploadedSHA: [UInt8]?
    init(fd: Int32) { self.fd = fd }
    func request(_ request: HTTPRequest, stream: HTTPStream, connection: QUICConnection) {
        stream.setBodySink(fd: fd, hash: true)
    }
    func requestEnded(stream: HTTPStream, connection: QUICConnection, aborted: Bool) {
        ended = true
        sinkErrno = stream.sinkErrno
        uploadedSHA = stream.bodySHA256()
        connection.respond(stream, status: sinkErrno == 0 ? 201 : 500, body: nil)
    }
}

/// Downloads into a file descriptor the test chooses.
final class FileSinkClient: QUICApplication {
    let fd: Int32
    var status: Int?
    var closedCode: UInt64?
    var sha: [UInt8]?
    var sinkErrno: Int32 = 0
    var received: UInt64 = 0
    init(fd: Int32) { self.fd = fd }
    func response(_ head: HTTPResponseHead, stream: HTTPStream, connection: QUICConnection) {
        let status = head.status
        self.status = status
        stream.setBodySink(fd: fd, hash: true)
    }
    func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) {
        closedCode = errorCode
        sha = stream.bodySHA256()
        sinkErrno = stream.sinkErrno
        received = stream.bytesReceived
    }
}

/// Reads a pipe to its end on a thread of its own.
final class PipeReader: @unchecked Sendable {
    private let lock = NSCondition()
    private var bytes: [UInt8] = []
    private var done = false
    init(fd: Int32, expecting: Int) {
        bytes.reserveCapacity(expecting)
        Thread.detachNewThread { [self] in
            var buf = [UInt8](repeating: 0, count: 1 << 16)
            while true {
                let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n <= 0 { break }
                lock.lock(); bytes.append(contentsOf: buf[0..<n]); lock.unlock()
            }
            lock.lock(); done = true; lock.broadcast(); lock.unlock()
        }
    }
    /// Everything read, once the write end is closed.
    func wait() -> [UInt8] {
        lock.lock()
        defer { lock.unlock() }
        while !done { lock.wait() }
        return bytes
    }
}

/// Received bodies go to their files on the endpoint's writer thread; flow control is what
/// holds a sender back when the writer is slower than the network.
@Suite(.serialized) struct BodyWriterTests {
    let identity: TestIdentity
    init() throws { identity = try TestIdentity() }

    /// A pair running `server` and `client`, connected.
    func connected(
        _ server: QUICApplication, _ client: QUICApplication, serverSettings: QUICSettings = QUICSettings()
    ) throws -> (EndpointPair, QUICConnection) {
        let pair = try EndpointPair(identity: identity, serverSettings: serverSettings)
        pair.server.application = server
        pair.client.application = client
        let conn = try pair.connect()
        #expect(pair.run { conn.isEstablished })
        return (pair, conn)
    }

    func tempFile(_ flags: Int32 = O_RDWR) -> (Int32, String) {
        let path = NSTemporaryDirectory() + "stoq-sink-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fd = open(path, flags | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        return (fd, path)
    }

    func contents(_ fd: Int32, _ count: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        let n = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, 0) }
        return Array(out.prefix(max(n, 0)))
    }

    @Test func downloadToFileIsByteIdentical() throws {
        for size in [1, 300_000, 5 << 20 + 17] {
            let object = randomBytes(size, seed: UInt64(size) &+ 3)
            let (fd, path) = tempFile()
            defer { close(fd); unlink(path) }
            let client = FileSinkClient(fd: fd)
            let (pair, conn) = try connected(MemoryServer(object: object), client)
            _ = try conn.request(method: "GET", authority: "x", path: "/objects/x")
            #expect(pair.run(for: 600_000_000_000) { client.closedCode != nil })
            #expect(client.status == 200 && client.sinkErrno == 0)
            #expect(client.received == UInt64(size))
            // The stream closed only after its last write: the file is whole now.
            #expect(contents(fd, size + 1) == object, "size \(size)")
            #expect(client.sha == Array(SHA256.hash(data: object)))
            #expect(pair.client.counters.sinkBytesWritten == UInt64(size))
            #expect(pair.client.counters.sinkBytesQueued == 0)
        }
    }

    @Test func uploadToFileIsByteIdenticalBeforeRequestEnds() throws {
        let (fd, path) = tempFile()
        defer { close(fd); unlink(path) }
        let server = FileSinkServer(fd: fd)
        let client = RecordingClient()
        let (pair, conn) = try connected(server, client)
        let body = randomBytes(3 << 20 + 5, seed: 41)
        _ = try conn.request(method: "PUT", authority: "x", path: "/objects/up", body: BodyRegion(copying: body))
        var wholeAtEnd = false
        #expect(
            pair.run {
                if server.ended && !wholeAtEnd { wholeAtEnd = contents(fd, body.count + 1) == body }; return client.closedCode != nil
            })
        #expect(client.status == 201)
        // requestEnded came after every write landed (ObjectService fsyncs and renames there).
        #expect(wholeAtEnd)
        #expect(server.uploadedSHA == Array(SHA256.hash(data: body)))
    }

    /// A request body given piece by piece as `bodyWanted` asks (no content-length) arrives
    /// whole, in order, and each piece is released once the server acknowledged it.
    @Test func aStreamedRequestBodyArrivesWholeWithoutALength() throws {
        final class StreamingClient: QUICApplication, @unchecked Sendable {
            var pieces: [[UInt8]]
            var status: Int?
            var closedCode: UInt64?
            var released = 0
            init(_ pieces: [[UInt8]]) { self.pieces = pieces }
            func bodyWanted(stream: HTTPStream, connection: QUICConnection) {
                guard !pieces.isEmpty else { return }
                let piece = pieces.removeFirst()
                let p = UnsafeMutableRawPointer.allocate(byteCount: piece.count, alignment: 16)
                p.copyMemory(from: piece, byteCount: piece.count)
                let region = BodyRegion(base: p, count: piece.count) { [self] p, _ in
                    released += 1
                    UnsafeMutableRawPointer(mutating: p)?.deallocate()
                }
                #expect(connection.appendBody(stream, region, last: pieces.isEmpty))
            }
            func response(_ head: HTTPResponseHead, stream: HTTPStream, connection: QUICConnection) {
                let status = head.status
                self.status = status
            }
            func streamClosed(stream: HTTPStream, connection: QUICConnection, errorCode: UInt64) { closedCode = errorCode }
        }
        final class LengthServer: QUICApplication {
            let sink: FileSinkServer
            var contentLength: Int64?? = .none
            init(fd: Int32) { sink = FileSinkServer(fd: fd) }
            func request(_ request: HTTPRequest, stream: HTTPStream, connection: QUICConnection) {
                contentLength = .some(request.contentLength)
                sink.request(request, stream: stream, connection: connection)
            }
            func requestEnded(stream: HTTPStream, connection: QUICConnection, aborted: Bool) {
                sink.requestEnded(stream: stream, connection: connection, aborted: aborted)
            }
        }
        let (fd, path) = tempFile()
        defer { close(fd); unlink(path) }
        let pieces = [randomBytes(700_000, seed: 43), randomBytes(1, seed: 44), randomBytes(2 << 20, seed: 45)]
        let server = LengthServer(fd: fd)
        let client = StreamingClient(pieces)
        let (pair, conn) = try connected(server, client)
        _ = try conn.requestStreamed(method: "PUT", authority: "x", path: "/objects/s")
        #expect(pair.run { client.closedCode != nil })
        #expect(client.status == 201 && client.closedCode == H3Error.noError)
        #expect(server.contentLength == .some(nil))
        let body = pieces.flatMap { $0 }
        #expect(contents(fd, body.count + 1) == body)
        #expect(server.sink.uploadedSHA == Array(SHA256.hash(data: body)))
        #expect(client.released == 3)
    }

    /// An empty body (a region with no base, as an empty file maps to) ends at once: it is
    /// a whole body of zero bytes, not a streamed one waiting for pieces.
    @Test func anEmptyRequestBodyEndsTheRequest() throws {
        let (fd, path) = tempFile()
        defer { close(fd); unlink(path) }
        let server = FileSinkServer(fd: fd)
        let client = RecordingClient()
        let (pair, conn) = try connected(server, client)
        _ = try conn.request(method: "PUT", authority: "x", path: "/objects/e", body: BodyRegion(base: nil, count: 0, onRelease: nil))
        #expect(pair.run { client.closedCode != nil })
        #expect(client.status == 201 && server.ended)
    }

    /// A body one byte over its sink's limit, in the one frame that also ends it: the request
    /// ends once, when the limit is passed (the rest is not read), not again at the FIN, which
    /// nghttp3 passes on in the same read (the application answered twice: its second answer
    /// reset the stream).
    @Test func aBodyOverItsLimitWithItsEndEndsTheRequestOnce() throws {
        final class LimitedServer: QUICApplication {
            var ends: [(aborted: Bool, sinkErrno: Int32)] = []
            func request(_ request: HTTPRequest, stream: HTTPStream, connection: QUICConnection) {
                stream.setBodySink(fd: -1, limit: 100)
            }
            func requestEnded(stream: HTTPStream, connection: QUICConnection, aborted: Bool) {
                ends.append((aborted, stream.sinkErrno))
                if ends.count == 1 { connection.respond(stream, status: 413, body: nil) }
            }
        }
        let server = LimitedServer()
        let client = RecordingClient()
        let (pair, conn) = try connected(server, client)
        _ = try conn.request(method: "PUT", authority: "x", path: "/objects/l", body: BodyRegion(copying: randomBytes(101, seed: 6)))
        #expect(pair.run { client.closedCode != nil })
        #expect(server.ends.count == 1)
        #expect(server.ends.first.map { !$0.aborted && $0.sinkErrno == EFBIG } == true)
        #expect(client.status == 413 && client.closedCode == H3Error.noError)
    }

    /// The body mark fires once, while the body is still arriving, once it has passed the mark.
    @Test func theBodyMarkFiresOnceWhenTheBodyPassesIt() throws {
        final class MarkingServer: QUICApplication {
            var marks: [(received: UInt64, ended: Bool)] = []
            var ended = false
            func request(_ request: HTTPRequest, stream: HTTPStream, connection: QUICConnection) {
                stream.setBodySink(fd: -1)
                stream.setBodyMark(1 << 20)
            }
            func bodyReachedMark(stream: HTTPStream, connection: QUICConnection) {
                marks.append((stream.bytesReceived, ended))
            }
            func requestEnded(stream: HTTPStream, connection: QUICConnection, aborted: Bool) {
                ended = true
                connection.respond(stream, status: 201, body: nil)
            }
        }
        let server = MarkingServer()
        let client = RecordingClient()
        let (pair, conn) = try connected(server, client)
        let body = randomBytes(3 << 20 + 5, seed: 42)
        _ = try conn.request(method: "PUT", authority: "x", path: "/objects/m", body: BodyRegion(copying: body))
        #expect(pair.run { client.closedCode != nil })
        #expect(client.status == 201)
        #expect(server.marks.count == 1)
        // At the mark, well before the body's end.
        #expect(server.marks.first.map { $0.received >= 1 << 20 && $0.received < 2 << 20 && !$0.ended } == true)
    }

    /// The writer blocked (a pipe nobody reads): the sender is stopped by flow control, the
    /// receiver holds at most one ring of body, and once the pipe is read the transfer ends
    /// byte-identical.
    /// Once a client resets a download, what it received is in its file and nothing more is
    /// written there, so the file may be closed at once (EdgeCache closes the loser of a hedge
    /// right after cancelling it); the rest of the response is dropped.
    @Test func nothingReachesTheSinkAfterAReset() throws {
        let object = randomBytes(8 << 20, seed: 51)
        let (fd, path) = tempFile()
        defer { close(fd); unlink(path) }
        let client = FileSinkClient(fd: fd)
        let (pair, conn) = try connected(MemoryServer(object: object), client)
        let stream = try conn.request(method: "GET", authority: "x", path: "/objects/x")
        #expect(pair.run { stream.bytesReceived > 1 << 20 })
        conn.reset(stream, errorCode: H3Error.requestCancelled)
        var st = stat()
        fstat(fd, &st)
        let size = Int(st.st_size)
        #expect(UInt64(size) == stream.bytesReceived)
        #expect(pair.run(for: 1_000_000_000) { client.closedCode != nil })
        pair.run(for: 200_000_000) { false }
        fstat(fd, &st)
        #expect(Int(st.st_size) == size && size < object.count)
        #expect(contents(fd, size) == Array(object.prefix(size)))
        #expect(client.closedCode == H3Error.requestCancelled)
    }

    @Test func blockedWriterHoldsTheSenderByFlowControl() throws {
        var settings = QUICSettings()
        settings.initialMaxStreamData = 1 << 20
        settings.maxStreamWindow = 4 << 20
        var p: [Int32] = [0, 0]
        #expect(pipe(&p) == 0)
        defer { close(p[0]) }
        let server = FileSinkServer(fd: p[1])
        let client = RecordingClient()
        let (pair, conn) = try connected(server, client, serverSettings: settings)
        let body = randomBytes(24 << 20, seed: 5)
        _ = try conn.request(method: "PUT", authority: "x", path: "/objects/up", body: BodyRegion(copying: body))
        // Until nothing more arrives for a simulated second: the writer is stuck after the
        // pipe's 64 KB (the pair's clock crawls while a writer has work queued).
        var last: UInt64 = 0, changed = pair.now
        while pair.now - changed < 1_000_000_000 && pair.step() {
            let q = pair.server.counters.sinkBytesQueued
            if q != last { last = q; changed = pair.now }
        }
        let c = pair.server.counters
        #expect(c.sinkRingBytes == 4 << 20)
        // The initial stream window (1 MB, less the DATA frame's header) arrived and waits.
        #expect(c.sinkBytesQueued > 1 << 19, "the body reached the server")
        #expect(c.sinkPeakBytesQueued <= c.sinkRingBytes)
        // The sender stopped far short of the body: flow control, not the loop, held it.
        #expect(c.sinkBytesQueued + c.sinkBytesWritten < UInt64(body.count) / 2)
        #expect(server.ended == false && client.closedCode == nil && client.closedReason == nil)
        // Now the pipe is read.
        let reader = PipeReader(fd: p[0], expecting: body.count)
        #expect(pair.run(for: 600_000_000_000) { client.closedCode != nil })
        close(p[1])
        let got = reader.wait()
        #expect(client.status == 201)
        #expect(got == body)
        #expect(server.uploadedSHA == Array(SHA256.hash(data: body)))
        let end = pair.server.counters
        #expect(end.sinkPeakBytesQueued <= end.sinkRingBytes)
        #expect(end.sinkWaits == 0, "one stream never fills the ring: flow control stops it first")
        #expect(end.sinkBytesWritten == UInt64(body.count))
    }

    /// A write error fails the request as before: the server's requestEnded sees the errno.
    @Test func writeErrorsFailTheUpload() throws {
        // /dev/full: every write is ENOSPC. A read-only descriptor: EBADF.
        let full = open("/dev/full", O_WRONLY | O_CLOEXEC)
        let (ro, path) = tempFile(O_RDONLY)
        defer { close(full); close(ro); unlink(path) }
        for (fd, errno) in [(full, ENOSPC), (ro, EBADF)] {
            let server = FileSinkServer(fd: fd)
            let client = RecordingClient()
            let (pair, conn) = try connected(server, client)
            let body = randomBytes(2 << 20, seed: 9)
            _ = try conn.request(method: "PUT", authority: "x", path: "/objects/up", body: BodyRegion(copying: body))
            #expect(pair.run { client.closedCode != nil })
            #expect(server.sinkErrno == errno)
            #expect(client.status == 500)
        }
    }

    /// A download whose file cannot take it reports the errno when the stream closes.
    @Test func writeErrorsReachTheDownloader() throws {
        let full = open("/dev/full", O_WRONLY | O_CLOEXEC)
        defer { close(full) }
        let client = FileSinkClient(fd: full)
        let (pair, conn) = try connected(MemoryServer(object: randomBytes(1 << 20, seed: 2)), client)
        _ = try conn.request(method: "GET", authority: "x", path: "/objects/x")
        #expect(pair.run { client.closedCode != nil })
        #expect(client.sinkErrno == ENOSPC)
    }
}
