import Foundation
import STOQChunking
import STOQCore
import STOQQUIC
import STOQTestSupport
import Testing

@testable import STOQTransfer

/// What `stoq get`, `stoq put`, the chunked transfers and `stoq trust audit` keep of a hostile
/// or broken server's answers: an error body's first bytes only, no answer larger than the most
/// a legitimate one can be, and no part of an object taken for all of it. Against upstreams in
/// this process (`LoopbackUpstreams`), in real time; the memfds the client holds answers in are
/// sampled from another thread as it waits.
@Suite(.serialized) final class STOQClientTests {
    let identity: TestIdentity
    let upstream = TestUpstream()
    let loop: LoopbackUpstreams
    let directory: String

    init() throws {
        identity = try TestIdentity()
        loop = try LoopbackUpstreams(identity: identity, [(4433, upstream)])
        directory = NSTemporaryDirectory() + "stoq-client-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    deinit {
        identity.remove()
        try? FileManager.default.removeItem(atPath: directory)
    }

    var trust: ClientTrust { ClientTrust(insecure: true) }
    var datapath: ClientDatapath { ClientDatapath { [loop] in loop.queue() } }
    func url(_ path: String) throws -> STOQURL { try STOQURL("https://[::1]:4433" + path) }

    /// The largest of this process's memfds named `stoq-<prefix>…`, sampled every 0.5 ms on
    /// another thread while `body` runs (the client runs on this one).
    final class MemfdWatch: @unchecked Sendable {
        private let lock = NSLock()
        private var largest = 0, running = true
        let prefix: String
        init(_ prefix: String) { self.prefix = "/memfd:" + prefix }
        var largestSeen: Int { lock.withLock { largest } }

        func run<T>(_ body: () throws -> T) rethrows -> T {
            let thread = Thread { [self] in
                while lock.withLock({ running }) {
                    let n = sample()
                    lock.withLock { largest = max(largest, n) }
                    usleep(500)
                }
            }
            thread.start()
            defer { lock.withLock { running = false } }
            return try body()
        }

        private func sample() -> Int {
            var out = 0
            for name in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? [] {
                guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + name),
                    target.hasPrefix(prefix)
                else { continue }
                var st = stat()
                if stat("/proc/self/fd/" + name, &st) == 0 { out = max(out, Int(st.st_size)) }
            }
            return out
        }
    }

    /// How `path`'s streams closed, once one has (the reset's last packets may still be on
    /// their way when the client returns). Only for a client that waits for its connection's
    /// close: the upstreams run on its thread, and stop when it returns.
    func closed(_ path: String) -> [UInt64] {
        let until = monotonicNow() + 2_000_000_000
        while upstream.closed(path).isEmpty && monotonicNow() < until { usleep(1000) }
        return upstream.closed(path)
    }

    func thrown(_ body: () throws(ClientError) -> Void) -> ClientError? {
        do { try body() } catch { return error }
        return nil
    }

    // MARK: An error body's first bytes only

    @Test func anEndlessErrorBodyToAGetEndsWithItsStatusAndReason() throws {
        upstream.answer("/objects/gone", .endless(status: 404, filler: "no such object here; "))
        let watch = MemfdWatch("stoq-error-body")
        let t0 = monotonicNow()
        let r = try watch.run { () throws(ClientError) in
            try STOQClient.get(try! url("/objects/gone"), into: -1, trust: trust, datapath: datapath, timeout: 10)
        }
        let seconds = Double(monotonicNow() - t0) / 1e9
        #expect(r.status == 404)
        #expect(r.message?.hasPrefix("no such object here; no such object here;") == true, "\(r.message ?? "no message")")
        #expect(r.message.map { $0.utf8.count <= 2000 } == true)
        #expect(watch.largestSeen <= Int(ConnectionPool.errorBodyLimit), "the error body's memfd held \(watch.largestSeen) bytes")
        #expect(seconds < 10, "it took \(seconds) s: the transfer's own timeout, not the cap, ended it")
        #expect(closed("/objects/gone") == [H3Error.excessiveLoad])
        #expect(upstream.sent("/objects/gone") < 1 << 20)
    }

    /// A server's stream ends once the client acknowledges its last packet: a response's FIN,
    /// or the RESET_STREAM answering the STOP_SENDING that refused an endless error body. The
    /// client closed its connection as soon as its own stream ended, with that ACK still held
    /// back (ngtcp2 delays one by an eighth of the RTT), and a CONNECTION_CLOSE carries none: the
    /// server's stream then ended with the connection, H3_REQUEST_CANCELLED, a complete GET
    /// traced as an error on the node and the refusal's H3_EXCESSIVE_LOAD lost. On loopback's
    /// microsecond RTT that was 1 run in 100 (`anEndlessErrorBodyToAGetEndsWithItsStatusAndReason`
    /// saw 0x10c); with 20 ms of round trip it was nearly every run.
    @Test func theServerHearsEveryStreamEndBeforeTheClientCloses() throws {
        let far = TestUpstream()
        let link = try LoopbackUpstreams(identity: identity, [(4434, far)], replyDelay: 20_000_000)
        let datapath = ClientDatapath { link.queue() }
        far.answer("/objects/small", .whole(status: 200, body: Array("all of it".utf8)))
        far.answer("/objects/gone", .endless(status: 404, filler: "no such object here; "))
        for _ in 0..<3 {
            let ok = try STOQClient.get(try STOQURL("https://[::1]:4434/objects/small"), into: -1, trust: trust, datapath: datapath, timeout: 10)
            #expect(ok.status == 200 && ok.bytes == 9)
            let gone = try STOQClient.get(try STOQURL("https://[::1]:4434/objects/gone"), into: -1, trust: trust, datapath: datapath, timeout: 10)
            #expect(gone.status == 404)
        }
        // The upstream runs on the client's thread: what it saw is all there is once `get` returns.
        #expect(far.closed("/objects/small") == Array(repeating: H3Error.noError, count: 3))
        #expect(far.closed("/objects/gone") == Array(repeating: H3Error.excessiveLoad, count: 3))
    }

    @Test func anEndlessErrorBodyToAPutEndsWithItsStatusAndReason() throws {
        let file = directory + "/up"
        try Data("the object".utf8).write(to: URL(fileURLWithPath: file))
        upstream.answer("/objects/up", .endless(status: 403, filler: "not yours to write; "))
        let watch = MemfdWatch("stoq-error-body")
        let r = try watch.run { () throws(ClientError) in
            try STOQClient.put(file: file, to: try! url("/objects/up"), trust: trust, datapath: datapath, timeout: 10)
        }
        #expect(r.status == 403)
        #expect(r.message?.hasPrefix("not yours to write; not yours to write;") == true, "\(r.message ?? "no message")")
        #expect(watch.largestSeen <= Int(ConnectionPool.errorBodyLimit), "the error body's memfd held \(watch.largestSeen) bytes")
        // Its stream ended (the code the upstream sees for a PUT's is not the reset's own).
        #expect(closed("/objects/up").count == 1)
    }

    @Test func aShortErrorBodyIsStillTheReasonWhole() throws {
        upstream.answer("/objects/busy", .whole(status: 503, body: Array("busy, try again\n".utf8)))
        let r = try STOQClient.get(try url("/objects/busy"), into: -1, trust: trust, datapath: datapath, timeout: 10)
        #expect(r.status == 503 && r.message == "busy, try again")
    }

    // MARK: No part of an object for all of it

    @Test func aPartOfTheObjectToAPlainGetIsRefused() throws {
        upstream.answer("/objects/part", .whole(status: 206, body: Array("the first half".utf8)))
        let e = thrown { () throws(ClientError) in
            _ = try STOQClient.get(try! url("/objects/part"), into: -1, trust: trust, datapath: datapath, timeout: 10)
        }
        #expect(e?.code == .http)
        #expect(e?.message == "the server sent part of the object (206) to a request for all of it")
        upstream.answer("/objects/other", .whole(status: 203, body: Array("a proxy's copy".utf8)))
        let other = thrown { () throws(ClientError) in
            _ = try STOQClient.get(try! url("/objects/other"), into: -1, trust: trust, datapath: datapath, timeout: 10)
        }
        #expect(other?.message == "the server answered 203, not the object (200) asked for")
        // A 200 is the object, a 204 with no body an empty one.
        upstream.answer("/objects/whole", .whole(status: 200, body: Array("all of it".utf8)))
        upstream.answer("/objects/empty", .whole(status: 204, body: []))
        #expect(try STOQClient.get(try url("/objects/whole"), into: -1, trust: trust, datapath: datapath, timeout: 10).bytes == 9)
        #expect(try STOQClient.get(try url("/objects/empty"), into: -1, trust: trust, datapath: datapath, timeout: 10).bytes == 0)
        // A request for a part may have one.
        let ranged = try STOQClient.get(
            try url("/objects/part"), into: -1, trust: trust, datapath: datapath, timeout: 10, headers: [("range", "bytes=0-13")])
        #expect(ranged.status == 206 && ranged.bytes == 14)
    }

    @Test func aPartOfTheObjectFailsItsURLInAGetMany() throws {
        upstream.answer("/objects/part", .whole(status: 206, body: Array("the first half".utf8)))
        upstream.answer("/objects/whole", .whole(status: 200, body: Array("all of it".utf8)))
        let report = try STOQClient.getMany(
            [try url("/objects/part"), try url("/objects/whole")], into: [-1, -1], trust: trust, datapath: datapath, timeout: 10)
        #expect(report.results[0].status == 206)
        #expect(report.results[0].failure == "the server sent part of the object (206) to a request for all of it")
        #expect(report.results[1].status == 200 && report.results[1].failure == nil)
    }

    // MARK: No answer larger than a legitimate one can be

    @Test func anEndlessManifestIsRefusedAtTheLargestAManifestCanBe() throws {
        upstream.answer("/manifests/big", .endless(status: 200, filler: "STQM"))
        let output = directory + "/big"
        let watch = MemfdWatch("stoq-response")
        let e = watch.run {
            thrown { () throws(ClientError) in
                _ = try STOQClient.getChunked(try! url("/objects/big"), output: output, trust: trust, datapath: datapath, timeout: 30)
            }
        }
        let limit = Manifest.maxListedSize
        #expect(e?.message == "the node's manifest for big is larger than any manifest can be (\(limit) bytes)")
        #expect(watch.largestSeen <= limit, "the manifest's memfd held \(watch.largestSeen) bytes")
        #expect(!FileManager.default.fileExists(atPath: output + ".part") && !FileManager.default.fileExists(atPath: output))
    }

    @Test func anEndlessErrorBodyForAManifestKeepsItsReason() throws {
        upstream.answer("/manifests/none", .endless(status: 404, filler: "no manifest; "))
        let e = thrown { () throws(ClientError) in
            _ = try STOQClient.getChunked(try! url("/objects/none"), output: directory + "/none", trust: trust, datapath: datapath, timeout: 10)
        }
        #expect(e?.code == .noManifest)
        #expect(e?.message.hasPrefix("GET /manifests/none: HTTP 404 no manifest; no manifest;") == true, "\(e?.message ?? "")")
    }

    @Test func aMissingAnswerLongerThanTheQueryIsRefused() throws {
        let file = directory + "/chunked"
        try Data((0..<(64 << 10)).map { UInt8(truncatingIfNeeded: $0 * 7) }).write(to: URL(fileURLWithPath: file))
        upstream.answer(NodePaths.missing, .endless(status: 200, filler: String(repeating: "a", count: 32)))
        let watch = MemfdWatch("stoq-response")
        let e = watch.run {
            thrown { () throws(ClientError) in
                _ = try STOQClient.putChunked(
                    file: file, to: try! url("/objects/chunked"),
                    parameters: try! ChunkingParameters(minSize: 1 << 12, avgSize: 1 << 14, maxSize: 1 << 16), trust: trust, datapath: datapath,
                    timeout: 10)
            }
        }
        // 64 KiB cut at least 4 KiB apart: at most 17 chunks, a 544-byte query.
        #expect(watch.largestSeen <= 17 * 32, "the answer's memfd held \(watch.largestSeen) bytes")
        #expect(e?.message.hasPrefix("POST \(NodePaths.missing): the node's answer is longer than the query it answers (") == true, "\(e?.message ?? "")")
        #expect(!upstream.paths.contains { $0.hasPrefix("/chunks/") || $0.hasPrefix("/manifests/") })
    }

    @Test func aManifestPutTheNodeIsTooBusyToVerifyIsSentAgain() throws {
        // The node has every chunk; its first answer to the manifest is 503 (all its manifest
        // verifications are under way: ManifestChecks), its second 201.
        let file = directory + "/busy"
        try Data((0..<(64 << 10)).map { UInt8(truncatingIfNeeded: $0 * 7) }).write(to: URL(fileURLWithPath: file))
        upstream.answer(NodePaths.missing, .whole(status: 200, body: []))
        upstream.answer("/manifests/busy", .whole(status: 201, body: []))
        upstream.answer("/manifests/busy", first: [.whole(status: 503, body: Array("manifest verifications busy".utf8))])
        let r = try STOQClient.putChunked(
            file: file, to: try url("/objects/busy"),
            parameters: try ChunkingParameters(minSize: 1 << 12, avgSize: 1 << 14, maxSize: 1 << 16), trust: trust, datapath: datapath,
            timeout: 10)
        #expect(r.chunksSent == 0)
        #expect(upstream.paths.filter { $0 == "/manifests/busy" }.count == 2)
    }

    @Test func aFetchIsRefusedPastItsLimit() throws {
        upstream.answer("/_stoq/log/sth", .endless(status: 200, filler: "{\"tree_size\": "))
        let watch = MemfdWatch("stoq-response")
        let e = watch.run {
            thrown { () throws(ClientError) in _ = try STOQClient.fetch(try! url("/_stoq/log/sth"), trust: trust, datapath: datapath, timeout: 10) }
        }
        #expect(STOQClient.fetchLimit == 64 << 10)
        #expect(e?.message == "GET /_stoq/log/sth: the answer is larger than this client reads whole (65536 bytes)")
        #expect(watch.largestSeen <= 64 << 10, "the answer's memfd held \(watch.largestSeen) bytes")
        // One within it comes back whole.
        upstream.answer("/_stoq/log/key", .whole(status: 200, body: Array(repeating: 0x41, count: 5000)))
        let r = try STOQClient.fetch(try url("/_stoq/log/key"), trust: trust, datapath: datapath, timeout: 10)
        #expect(r.status == 200 && r.body.count == 5000)
    }
}
