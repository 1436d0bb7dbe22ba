import Foundation
import Logging
import STOQChunking
import STOQCore
import STOQQUIC
import STOQStore
import STOQTestSupport
import STOQTransfer
import Testing

@testable import STOQEdge

/// What an upstream can make the edge fetcher hold and wait for: a chunk's or a manifest's
/// body past the most one can be is refused as it arrives (the memfd it goes to never holds
/// more) and the fetch moves on to the next upstream; an error's body is kept to its first
/// bytes; a body that trickles in ends at the fetch's deadline. Other fetches are served
/// meanwhile. Against two upstreams in this process (`LoopbackUpstreams`): `bad` is asked
/// first, `good` next; in real time.
@Suite(.serialized) final class EdgeFetcherTests {
    /// Where the fetcher asks, in order, and which attempts it said failed.
    final class Upstreams: FetchUpstream, @unchecked Sendable {
        let sources: [(url: STOQURL, label: String)]
        private let lock = NSLock()
        private var failures: [String] = []
        init(_ sources: [(STOQURL, String)]) { self.sources = sources.map { (url: $0.0, label: $0.1) } }
        var description: String { "the test's upstreams" }
        func attempts(for resource: UpstreamResource, hint: RelayHint?) -> [UpstreamAttempt] {
            sources.map { UpstreamAttempt(url: $0.url, path: resource.path, label: $0.label) }
        }
        func unreachable(_ resource: UpstreamResource, hint: RelayHint?) -> String? { nil }
        func isDown(_ url: STOQURL) -> Bool { false }
        func fetched(_ resource: UpstreamResource, via attempt: UpstreamAttempt, body: UnsafeRawBufferPointer, seconds: Double) {
            lock.withLock { times.append((attempt.label, seconds)) }
        }
        func failed(_ resource: UpstreamResource, via attempt: UpstreamAttempt, notFound: Bool) {
            lock.withLock { failures.append("\(attempt.label) \(resource.path)\(notFound ? " 404" : "")") }
        }
        /// "<label> <path>[ 404]" for each attempt that failed, in order.
        var failed: [String] { lock.withLock { failures } }
        /// Each delivery's attempt and the time the fetcher said it took, in order.
        var fetchedTimes: [(label: String, seconds: Double)] { lock.withLock { times } }
        private var times: [(label: String, seconds: Double)] = []
        /// What `hedgeDelay` answers (nil: never hedge).
        var hedgeAfter: UInt64? {
            get { lock.withLock { hedge } }
            set { lock.withLock { hedge = newValue } }
        }
        private var hedge: UInt64?
        func hedgeDelay(_ resource: UpstreamResource, via attempt: UpstreamAttempt) -> UInt64? { lock.withLock { hedge } }
    }

    let identity: TestIdentity
    let bad = TestUpstream()
    let good = TestUpstream()
    let loop: LoopbackUpstreams
    let upstreams: Upstreams
    let root: String
    let cache: EdgeCache
    let inbox = EdgeCache.Inbox()
    /// The largest fetch file (memfd) seen so far, sampled as the test waits.
    var largestFetchFile = 0
    /// Every completion drained so far, and when it came.
    var completions: [UInt64: (completion: EdgeCache.Completion, at: UInt64)] = [:]
    /// The most a chunk may be here (the cache's `[chunking]` max).
    let maxChunk = 1 << 16

    init() throws {
        identity = try TestIdentity()
        loop = try LoopbackUpstreams(identity: identity, [(4433, bad), (4434, good)])
        upstreams = Upstreams([(try STOQURL("https://[::1]:4433/"), "bad [::1]:4433"), (try STOQURL("https://[::1]:4434/"), "good [::1]:4434")])
        root = FileManager.default.temporaryDirectory.appendingPathComponent("stoq-fetcher-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        cache = try EdgeCache(
            root: root, capacity: 64 << 20, ttlDefault: 3_600_000_000_000, upstream: upstreams, trust: ClientTrust(insecure: true),
            datapath: ClientDatapath { [loop] in loop.queue() },
            chunking: try ChunkingParameters(minSize: 1 << 12, avgSize: 1 << 14, maxSize: maxChunk), logger: Logger(label: "test"))
    }

    deinit {
        cache.stop()
        identity.remove()
        try? FileManager.default.removeItem(atPath: root)
    }

    func chunk(_ seed: Int, _ size: Int = 30_000) -> (ChunkID, [UInt8]) {
        let bytes = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ seed &* 7919 &+ $0 >> 7) }
        return (ChunkID(digestOf: bytes), bytes)
    }

    /// The size of the largest of the fetcher's files (memfds) open now.
    func fetchFilesLargest() -> Int {
        var largest = 0
        for name in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? [] {
            guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + name),
                target.hasPrefix("/memfd:stoq-edge-"), let fd = Int32(name)
            else { continue }
            var st = stat()
            if fstat(fd, &st) == 0 { largest = max(largest, Int(st.st_size)) }
        }
        return largest
    }

    /// Waits for the completions of `tickets` (at most `seconds`), sampling the fetch files'
    /// sizes meanwhile (`largestFetchFile`); gives up early once one holds more than `cap`
    /// bytes, before it can take the machine's memory. The completions, and when each came.
    func wait(
        for tickets: Set<UInt64>, seconds: Double = 10, cap: Int = 64 << 20
    ) -> [UInt64: (completion: EdgeCache.Completion, at: UInt64)] {
        let deadline = monotonicNow() + UInt64(seconds * 1e9)
        while !tickets.isSubset(of: completions.keys), monotonicNow() < deadline, largestFetchFile <= cap {
            var out: [EdgeCache.Completion] = []
            inbox.drain(into: &out)
            for c in out { completions[c.ticket] = (c, monotonicNow()) }
            largestFetchFile = max(largestFetchFile, fetchFilesLargest())
            usleep(500)
        }
        return completions
    }

    /// How `upstream`'s streams for `path` closed, once one has (at most 2 s: the last
    /// packets of a reset may still be on their way when the fetch ends).
    func closed(_ upstream: TestUpstream, _ path: String) -> [UInt64] {
        let until = monotonicNow() + 2_000_000_000
        while upstream.closed(path).isEmpty && monotonicNow() < until { usleep(1000) }
        return upstream.closed(path)
    }

    /// What a delivery tells its upstream it took (a route's delivery rate, the hedge delay) is
    /// its own attempt's time: a hedge that delivers at once, after the first attempt sat a
    /// second without a byte, is not charged that second.
    @Test func aDeliveryIsTimedFromItsOwnAttempt() throws {
        let (a, aBytes) = chunk(21)
        bad.answer("/chunks/\(a.hex)", .trickle(status: 200, filler: "x", every: 60_000_000_000))
        good.answer("/chunks/\(a.hex)", .whole(status: 200, body: aBytes))
        upstreams.hedgeAfter = 1_000_000_000
        cache.start()
        let started = monotonicNow()
        let ticket = cache.fetch(.chunk(a), inbox: inbox)
        let done = wait(for: [ticket])
        let took = Double(monotonicNow() - started) / 1e9
        #expect(try #require(done[ticket]).completion.failure == nil)
        #expect(cache.readChunk(a) == aBytes)
        let times = upstreams.fetchedTimes
        #expect(times.count == 1 && times.first?.label == "good [::1]:4434", "\(times)")
        // The whole fetch took the hedge delay and more; the delivering attempt far less.
        #expect(took >= 1.0)
        #expect((times.first?.seconds ?? 9) < 0.9, "\(times)")
    }

    @Test func aChunkBodyPastTheLargestChunkFailsOverAndIsNeverHeld() throws {
        let (a, aBytes) = chunk(1)
        let (b, _) = chunk(2)
        let (c, cBytes) = chunk(3)
        bad.answer("/chunks/\(a.hex)", .huge(status: 200, filler: "0123456789abcdef", total: 4 << 20))
        good.answer("/chunks/\(a.hex)", .whole(status: 200, body: aBytes))
        bad.answer("/chunks/\(b.hex)", .endless(status: 200, filler: "0123456789abcdef"))
        good.answer("/chunks/\(c.hex)", .whole(status: 200, body: cBytes))
        cache.start()
        let tickets = [a, b, c].map { cache.fetch(.chunk($0), inbox: inbox) }
        let done = wait(for: Set(tickets), cap: 4 * maxChunk)
        #expect(largestFetchFile <= maxChunk, "a fetch file held \(largestFetchFile) bytes")
        // A: the next upstream had it; B: nobody else had it, and the failure says why.
        #expect(try #require(done[tickets[0]]).completion.failure == nil)
        #expect(cache.readChunk(a) == aBytes)
        let failure = try #require(done[tickets[1]]?.completion.failure)
        #expect(failure.status == 502)
        #expect(
            failure.reason
                == "edge: bad [::1]:4433 sent more than \(maxChunk) bytes for chunk \(b.hex) (the most a chunk may be here, chunking.max_chunk_size)"
        )
        #expect(try #require(done[tickets[2]]).completion.failure == nil)
        #expect(cache.readChunk(c) == cBytes)
        // Counted as the upstream's failures (a failover each), not as bytes that do not verify.
        #expect(upstreams.failed.contains("bad [::1]:4433 /chunks/\(a.hex)"))
        #expect(upstreams.failed.contains("bad [::1]:4433 /chunks/\(b.hex)"))
        let counted = cache.counters
        #expect(counted.failovers == 2 && counted.originErrors == 1 && counted.verificationFailures == 0)
        // The upstream heard the refusal: its streams were reset, it sends no more.
        #expect(closed(bad, "/chunks/\(a.hex)") == [H3Error.excessiveLoad])
        #expect(closed(bad, "/chunks/\(b.hex)") == [H3Error.excessiveLoad])
    }

    @Test func aManifestBodyPastTheLargestManifestFailsOver() throws {
        let data = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ $0 >> 7) }
        let p = try ChunkingParameters(algorithm: .fixed, minSize: 1 << 12, avgSize: 1 << 14, maxSize: 1 << 16)
        let manifest = try Manifest(chunking: BytesSource(data), parameters: p).encode()
        bad.answer("/manifests/m", .endless(status: 200, filler: "STQM"))
        good.answer("/manifests/m", .whole(status: 200, body: manifest))
        bad.answer("/manifests/lost", .endless(status: 200, filler: "STQM"))
        cache.start()
        let m = cache.fetch(.manifest("m"), inbox: inbox)
        let lost = cache.fetch(.manifest("lost"), inbox: inbox)
        let done = wait(for: [m, lost], seconds: 30, cap: 2 * Manifest.maxListedSize)
        #expect(Manifest.maxListedSize == 37_748_800)
        #expect(largestFetchFile <= Manifest.maxListedSize, "a fetch file held \(largestFetchFile) bytes")
        let fetched = try #require(done[m]?.completion)
        #expect(fetched.failure == nil && fetched.manifest == manifest)
        let failure = try #require(done[lost]?.completion.failure)
        #expect(
            failure.reason
                == "edge: bad [::1]:4433 sent more than 37748800 bytes for the manifest of lost (the most a manifest may be: 1048576 chunks)"
        )
        #expect(closed(bad, "/manifests/m") == [H3Error.excessiveLoad])
    }

    @Test func anErrorBodyIsKeptToItsFirstBytesAndItsStatusCounts() throws {
        let filler = "upstream trouble; "
        let (e, eBytes) = chunk(4, 1000)  // under an error body's limit, as every fetch file here must be
        let (f, _) = chunk(5)
        let (g, _) = chunk(6)
        bad.answer("/chunks/\(e.hex)", .endless(status: 502, filler: filler))
        good.answer("/chunks/\(e.hex)", .whole(status: 200, body: eBytes))
        bad.answer("/chunks/\(f.hex)", .endless(status: 404, filler: "not here "))
        bad.answer("/chunks/\(g.hex)", .huge(status: 502, filler: filler, total: 8 << 20))
        cache.start()
        let tickets = [e, f, g].map { cache.fetch(.chunk($0), inbox: inbox) }
        let done = wait(for: Set(tickets), cap: 16 << 20)
        #expect(largestFetchFile <= Int(ConnectionPool.errorBodyLimit), "a fetch file held \(largestFetchFile) bytes")
        #expect(try #require(done[tickets[0]]).completion.failure == nil)
        #expect(cache.readChunk(e) == eBytes)
        // A 404 is a 404 however long its body: nobody has F.
        let notFound = try #require(done[tickets[1]]?.completion.failure)
        #expect(notFound.status == 404 && notFound.reason == "edge: no upstream has /chunks/\(f.hex) (the test's upstreams)")
        // The message is the body's start, as with any error body.
        let text = String(String(repeating: filler, count: 20).prefix(300)).trimmingCharacters(in: .whitespacesAndNewlines)
        let failure = try #require(done[tickets[2]]?.completion.failure)
        #expect(failure.status == 502 && failure.reason == "edge: bad [::1]:4433 answered HTTP 502 for /chunks/\(g.hex): \(text)")
        #expect(closed(bad, "/chunks/\(g.hex)") == [H3Error.excessiveLoad])
    }

    @Test func aTricklingBodyEndsAtTheFetchDeadlineWhileOthersAreServed() throws {
        cache.fetchDeadline = 2_000_000_000
        let (t, _) = chunk(7)
        bad.answer("/chunks/\(t.hex)", .trickle(status: 200, filler: "x", every: 50_000_000))
        let started = monotonicNow()
        cache.start()
        let trickling = cache.fetch(.chunk(t), inbox: inbox)
        usleep(200_000)
        // A request for the same chunk joins the fetch, and ends with it.
        let joined = cache.fetch(.chunk(t), inbox: inbox)
        #expect(cache.counters.coalesced == 1)
        // Others are fetched meanwhile, one after the other (bad has none of them: good does).
        var served: [UInt64] = []
        for i in 0..<5 {
            let (id, bytes) = chunk(100 + i)
            good.answer("/chunks/\(id.hex)", .whole(status: 200, body: bytes))
            let ticket = cache.fetch(.chunk(id), inbox: inbox)
            let done = wait(for: [ticket])
            #expect(done[ticket]?.completion.failure == nil && cache.readChunk(id) == bytes)
            served.append(done[ticket]?.at ?? .max)
        }
        let done = wait(for: [trickling, joined], seconds: 6)
        let ended = try #require(done[trickling], "a trickling fetch never ended")
        #expect(served.allSatisfy { $0 < ended.at })
        let elapsed = ended.at - started
        // Not before the deadline; that it ended at all, within the 6 s waited, is the bound.
        #expect(elapsed >= 2_000_000_000, "ended after \(elapsed / 1_000_000) ms")
        let failure = try #require(ended.completion.failure)
        #expect(failure.status == 502)
        let reason = failure.reason
        #expect(reason.hasPrefix("edge: bad [::1]:4433 was still sending /chunks/\(t.hex) after 2 s at "), "\(reason)")
        #expect(reason.contains(" bytes/s, under the 65536 a fetch must keep to go on ("), "\(reason)")
        #expect(reason.hasSuffix(" bytes received)"), "\(reason)")
        #expect(done[joined]?.completion.failure?.reason == reason)
        // Given up, not moved on: the deadline is the whole fetch's.
        #expect(good.paths.contains("/chunks/\(t.hex)") == false)
        #expect(upstreams.failed.contains("bad [::1]:4433 /chunks/\(t.hex)"))
        #expect(cache.counters.originErrors == 1)
        // Its stream was reset: the upstream stops.
        #expect(closed(bad, "/chunks/\(t.hex)") == [H3Error.requestCancelled])
    }

    @Test func aTricklingPlainObjectEndsAtTheFetchDeadline() throws {
        // bad has no manifest of "o", so the fetcher asks it for the object whole; the body
        // then trickles in. Bounded by the cache's share alone, that would take days.
        cache.fetchDeadline = 2_000_000_000
        bad.answer("/manifests/o", .whole(status: 404, body: Array("no such object".utf8)))
        bad.answer("/objects/o", .trickle(status: 200, filler: "x", every: 50_000_000))
        let started = monotonicNow()
        cache.start()
        let ticket = cache.fetch(.manifest("o"), inbox: inbox)
        let done = wait(for: [ticket], seconds: 6)
        let ended = try #require(done[ticket], "a trickling plain fetch never ended")
        #expect(ended.at - started >= 2_000_000_000)
        let reason = try #require(ended.completion.failure).reason
        #expect(reason.hasPrefix("edge: bad [::1]:4433 was still sending /objects/o after 2 s at "), "\(reason)")
        #expect(reason.hasSuffix(" bytes received)"), "\(reason)")
        #expect(bad.paths == ["/manifests/o", "/objects/o"])
        #expect(good.paths.isEmpty)
        #expect(closed(bad, "/objects/o") == [H3Error.requestCancelled])
    }
}
