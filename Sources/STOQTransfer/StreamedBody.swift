import Foundation
import STOQCore
import STOQQUIC

/// A request body read from a descriptor as it comes — a pipe, a socket, a terminal
/// (`stoq put - URL`), sent without a content-length — or a regular file of a known length
/// (`stoq put FILE`), sent with one: a file cut short while it is read ends the request with a
/// reset and `outcome.shortOf` instead of a body that lies about its length (a mapping of it
/// would take SIGBUS instead). A reader thread fills buffers of
/// `pieceSize` (at most `pieces` of them at once, so memory stays bounded and a slow network
/// holds the reader back) and wakes the connection's loop, which appends each filled buffer
/// to the stream (`feed`); a buffer comes back once the server has acknowledged it. A piece
/// goes as soon as the buffer is full or the descriptor has nothing more to read right now,
/// so a slow producer's bytes are not held back waiting for a whole buffer.
final class StreamedBody: @unchecked Sendable {
    static let pieceSize = 1 << 20
    static let pieces = 8

    /// Bytes read, errno of the read that failed (0: none), and the length announced when the
    /// descriptor ended before it (nil: it did not): the body, once it ended.
    var outcome: (bytes: UInt64, errno: Int32, shortOf: UInt64?) {
        cond.withLock { (bytesRead, readErrno, endedShort ? length : nil) }
    }

    private let fd: Int32
    /// The announced length (nil: read to the end); bytes past it are not read.
    private let length: UInt64?
    private let wakeFD: Int32
    private let cond = NSCondition()
    /// Filled buffers the loop has not appended yet, and buffers free for the reader.
    private var filled: [(UnsafeMutableRawPointer, Int)] = []  // at most `pieces`
    private var free: [UnsafeMutableRawPointer] = []
    /// The reader has reached the end (or an error): after the last of `filled`, the body ends.
    private var ended = false
    /// The body's end went out (`feed` appended the last piece), or the loop gave up.
    private var closed = false
    private var bytesRead: UInt64 = 0
    private var readErrno: Int32 = 0
    private var endedShort = false
    /// The body failed: the stream is reset instead of ended.
    private var failed: Bool { readErrno != 0 || endedShort }

    /// Reads `fd` (left open) on a thread of its own, signalling `wakeFD` (an eventfd the
    /// loop waits on) whenever a piece is ready: `length` bytes of it, or to its end.
    init(fd: Int32, length: UInt64? = nil, wakeFD: Int32) {
        self.fd = fd
        self.length = length
        self.wakeFD = wakeFD
        free = (0..<Self.pieces).map { _ in UnsafeMutableRawPointer.allocate(byteCount: Self.pieceSize, alignment: 4096) }
        let t = Thread { [self] in readLoop() }
        t.name = "stoq-body-reader"
        t.start()
    }

    /// The loop's side: appends every filled buffer to `stream`, the last with the body's
    /// end. After a failed read it resets the stream instead (H3_REQUEST_CANCELLED: the server
    /// drops the partial upload, the connection stays) — never from within `bodyWanted`
    /// (`asked`), where HTTP/3 is reading the body: the loop's next call does. Cheap when
    /// there is nothing new.
    func feed(_ connection: QUICConnection, _ stream: HTTPStream, asked: Bool = false) {
        while true {
            cond.lock()
            if closed || (asked && ended && failed && filled.count <= 1) {
                cond.unlock()
                return
            }
            let next = filled.isEmpty ? nil : filled.removeFirst()
            let last = ended && filled.isEmpty
            let resets = last && failed
            if last { closed = true }
            cond.unlock()
            if resets {
                if let next { give(next.0) }
                connection.reset(stream, errorCode: H3Error.requestCancelled)
                return
            }
            if next == nil && !last { return }
            // The buffer comes back when the region goes: once acknowledged, unless appending failed.
            let owner = BufferOwner()
            let region =
                next.map { buffer, count in
                    BodyRegion(base: buffer, count: count) { [self] p, _ in if owner.returns { give(UnsafeMutableRawPointer(mutating: p!)) } }
                } ?? BodyRegion(base: nil, count: 0, onRelease: nil)
            if !connection.appendBody(stream, region, last: last) {
                // The stream holds as many pieces as it may: this one waits for `bodyWanted`.
                owner.returns = false
                cond.lock()
                if let next { filled.insert(next, at: 0) }
                closed = false
                cond.unlock()
                return
            }
            if last { return }
        }
    }

    private final class BufferOwner: @unchecked Sendable { var returns = true }

    /// Stops the reader at its next buffer (the transfer is over or abandoned).
    func cancel() {
        cond.lock()
        closed = true
        ended = true
        cond.broadcast()
        cond.unlock()
    }

    private func give(_ buffer: UnsafeMutableRawPointer) {
        cond.lock()
        free.append(buffer)
        cond.signal()
        cond.unlock()
    }

    private func readLoop() {
        defer {
            cond.lock()
            ended = true
            cond.unlock()
            wake()
        }
        while true {
            cond.lock()
            while free.isEmpty && !ended { cond.wait() }
            if ended {
                cond.unlock()
                return
            }
            let buffer = free.removeLast()
            cond.unlock()
            var count = 0
            var atEnd = false
            let room = length.map { Int(min(UInt64(Self.pieceSize), $0 - bytesRead)) } ?? Self.pieceSize
            // Fill the buffer while the descriptor has more at once; hand it over as soon as
            // it is full or a read would wait.
            while count < room {
                let n = read(fd, buffer + count, room - count)
                if n < 0 {
                    if errno == EINTR { continue }
                    cond.lock()
                    readErrno = errno
                    cond.unlock()
                    atEnd = true
                    break
                }
                if n == 0 {
                    atEnd = true
                    if let length, bytesRead + UInt64(count) < length { cond.withLock { endedShort = true } }
                    break
                }
                count += n
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                if poll(&p, 1, 0) != 1 { break }
            }
            cond.lock()
            bytesRead += UInt64(count)
            if bytesRead == length { atEnd = true }
            if count > 0 { filled.append((buffer, count)) } else { free.append(buffer) }
            if atEnd { ended = true }
            cond.unlock()
            wake()
            if atEnd { return }
        }
    }

    private func wake() {
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }

    deinit {
        for b in free { b.deallocate() }
        for (b, _) in filled { b.deallocate() }
    }
}
