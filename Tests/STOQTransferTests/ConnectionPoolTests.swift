import Foundation
import STOQCore
import STOQQUIC
import STOQTestSupport
import Testing

@testable import STOQTransfer

/// What a pool keeps of a response body: no more than the request's limit of a 2xx body, and
/// only the first `ConnectionPool.errorBodyLimit` bytes of an error's, however much (or for how
/// long) the upstream sends; the connection carries on serving its other requests. Against
/// upstreams in this process (`LoopbackUpstreams`), in real time.
@Suite(.serialized) final class ConnectionPoolTests {
    let identity: TestIdentity
    let upstream = TestUpstream()
    let loop: LoopbackUpstreams
    let url: STOQURL
    var files: [Int32] = []

    init() throws {
        identity = try TestIdentity()
        loop = try LoopbackUpstreams(identity: identity, [(4433, upstream)])
        url = try STOQURL("https://[::1]:4433/")
    }

    deinit {
        for fd in files { close(fd) }
        identity.remove()
    }

    func pool() throws -> ConnectionPool {
        try ConnectionPool(trust: ClientTrust(insecure: true), datapath: ClientDatapath { [loop] in loop.queue() })
    }

    /// An unnamed file for a body.
    func file() -> Int32 {
        let path = NSTemporaryDirectory() + "stoq-pool-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        unlink(path)
        files.append(fd)
        return fd
    }

    func size(_ fd: Int32) -> Int {
        var st = stat()
        return fstat(fd, &st) == 0 ? Int(st.st_size) : -1
    }

    func contents(_ fd: Int32) -> String {
        var out = [UInt8](repeating: 0, count: size(fd))
        let n = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        return String(decoding: out.prefix(max(n, 0)), as: UTF8.self)
    }

    /// Drives `pool` until every request in `tags` has ended, for at most `seconds`; what ended.
    func drive(_ pool: ConnectionPool, until tags: Set<Int>, seconds: Double = 10) throws -> [Int: ConnectionPool.Done] {
        var done: [Int: ConnectionPool.Done] = [:]
        let deadline = monotonicNow() + UInt64(seconds * 1e9)
        while !tags.isSubset(of: done.keys), monotonicNow() < deadline {
            for d in try pool.drive(forNanoseconds: 2_000_000) { done[d.tag] = d }
        }
        return done
    }

    /// A request's end is stamped as its stream closes, inside `drive`: a caller that does
    /// other work between drives (the mesh thread, timing probes) times the answer by it, not
    /// by when it got round to looking.
    /// A server going away (its GOAWAY, as a node draining for a restart sends): the request it
    /// took is answered on the old connection; one sent with it, which the GOAWAY says will not
    /// be processed, and one submitted afterwards go on a new connection and are answered. (The
    /// pool used to keep sending on the old one: every later request failed at once, "CONN
    /// CLOSING", and burned a stream.)
    @Test func requestsAfterAGoAwayGoOnANewConnection() throws {
        upstream.answer("/a", .whole(status: 200, body: Array("a".utf8)))
        upstream.answer("/b", .whole(status: 200, body: Array("b".utf8)))
        upstream.answer("/c", .whole(status: 200, body: Array("c".utf8)))
        upstream.goAway(after: "/a")
        let pool = try pool()
        defer { pool.close() }
        pool.submit(to: url, "GET", "/a", tag: 1)
        pool.submit(to: url, "GET", "/b", tag: 2)
        var done = try drive(pool, until: [1, 2])
        pool.submit(to: url, "GET", "/c", tag: 3)
        done.merge(try drive(pool, until: [3])) { $1 }
        for tag in [1, 2, 3] {
            let d = try #require(done[tag], "request \(tag) never ended")
            #expect(d.status == 200 && d.failure == nil, "request \(tag): \(d)")
        }
        #expect(pool.handshakes == 2)
    }

    @Test func aRequestsEndIsStampedWhenItsStreamCloses() throws {
        upstream.answer("/small", .whole(status: 200, body: Array("hello".utf8)))
        let p = try pool()
        defer { p.close() }
        p.submit(to: url, "GET", "/small", tag: 1)
        let deadline = monotonicNow() + 10_000_000_000
        while monotonicNow() < deadline {
            let before = monotonicNow()
            let done = try p.drive(forNanoseconds: 2_000_000)
            let after = monotonicNow()
            if let d = done.first(where: { $0.tag == 1 }) {
                #expect(d.status == 200)
                #expect(before <= d.endedAt && d.endedAt <= after, "ended at \(d.endedAt), drive from \(before) to \(after)")
                return
            }
            usleep(20_000)  // the caller's other work
        }
        Issue.record("GET /small never ended")
    }

    @Test func aBodyPastItsLimitIsCutThereAndTheConnectionServesOn() throws {
        upstream.answer("/endless", .endless(status: 200, filler: "0123456789abcdef"))
        upstream.answer("/small", .whole(status: 200, body: Array("hello".utf8)))
        let p = try pool()
        defer { p.close() }
        let (big, small) = (file(), file())
        p.submit(to: url, "GET", "/endless", sinkFD: big, limit: 100_000, tag: 1)
        p.submit(to: url, "GET", "/small", sinkFD: small, limit: 100_000, tag: 2)
        let done = try drive(p, until: [1, 2])
        let d = try #require(done[1], "an endless body past its limit never ended")
        #expect(d.status == 200 && d.sinkErrno == EFBIG && d.failure == nil)
        #expect(d.errorCode == H3Error.excessiveLoad)
        #expect(d.received <= 100_000)
        #expect(size(big) <= 100_000)
        #expect(done[2]?.status == 200 && done[2]?.received == 5 && contents(small) == "hello")
        // The upstream heard the refusal and stopped; the connection still serves.
        let sent = upstream.sent("/endless")
        p.submit(to: url, "GET", "/small", sinkFD: file(), tag: 3)
        let after = try drive(p, until: [3])
        #expect(after[3]?.status == 200 && after[3]?.received == 5)
        #expect(upstream.closed("/endless").count == 1)
        #expect(upstream.sent("/endless") == sent)
        #expect(p.handshakes == 1)
    }

    /// An error body is only ever read for its message: its first bytes are kept, the rest
    /// refused, and the request ends with the status it had: not a write failure here.
    @Test func anErrorBodyIsKeptToItsFirstBytesOnly() throws {
        let filler = "upstream trouble; "
        upstream.answer("/huge-error", .huge(status: 502, filler: filler, total: 2 << 20))
        upstream.answer("/endless-404", .endless(status: 404, filler: "not here "))
        upstream.answer("/small", .whole(status: 200, body: Array("hello".utf8)))
        let p = try pool()
        defer { p.close() }
        let (huge, endless, small) = (file(), file(), file())
        p.submit(to: url, "GET", "/huge-error", sinkFD: huge, tag: 1, keepErrors: true)
        p.submit(to: url, "GET", "/endless-404", sinkFD: endless, tag: 2, keepErrors: true)
        p.submit(to: url, "GET", "/small", sinkFD: small, tag: 3, keepErrors: true)
        let done = try drive(p, until: [1, 2, 3])
        let limit = ConnectionPool.errorBodyLimit
        #expect(limit == 4096)
        let h = try #require(done[1])
        #expect(h.status == 502 && h.sinkErrno == EFBIG && h.failure == nil && h.received <= limit)
        #expect(size(huge) <= Int(limit) && size(huge) > 0, "\(size(huge)) bytes of a 2 MiB error body kept")
        #expect(contents(huge).hasPrefix(filler + filler))
        let e = try #require(done[2], "an endless 404 body never ended")
        #expect(e.status == 404 && e.sinkErrno == EFBIG && e.failure == nil && e.received <= limit)
        #expect(size(endless) <= Int(limit))
        #expect(done[3]?.status == 200 && contents(small) == "hello")
        // An error body within the limit is kept whole, as before.
        upstream.answer("/short-error", .whole(status: 503, body: Array("busy, try again".utf8)))
        let short = file()
        p.submit(to: url, "GET", "/short-error", sinkFD: short, tag: 4, keepErrors: true)
        let after = try drive(p, until: [4])
        #expect(after[4]?.status == 503 && after[4]?.sinkErrno == 0 && contents(short) == "busy, try again")
        // One that is discarded (no `keepErrors`) costs nothing: it is read to its end.
        p.submit(to: url, "GET", "/huge-error", tag: 5)
        let discarded = try drive(p, until: [5])
        #expect(discarded[5]?.status == 502 && discarded[5]?.errorCode == H3Error.noError && discarded[5]?.sinkErrno == 0)
        #expect(discarded[5]?.received == 2 << 20)
    }
}
