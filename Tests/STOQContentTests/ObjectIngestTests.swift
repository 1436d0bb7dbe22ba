import Foundation
import Logging
import STOQChunking
import STOQStore
import Testing

@testable import STOQContent

/// Dedup on ingest: a plain upload's file becomes exactly the chunked object a
/// `stoq put --chunked` of the same bytes would leave, each chunk stored once.
final class ObjectIngestTests {
    let dir: String
    let storage: String
    let index: ObjectIndex
    /// Small chunks, so a few hundred KiB make dozens of them.
    let parameters = try! ChunkingParameters(minSize: 4 << 10, avgSize: 16 << 10, maxSize: 64 << 10)

    init() throws {
        (dir, storage, index) = try makeTempNodeStore("stoq-ingest")
    }

    deinit { try? FileManager.default.removeItem(atPath: dir) }

    static func bytes(_ count: Int, seed: UInt64) -> [UInt8] {
        var s = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        return (0..<count).map { _ in
            s ^= s << 13; s ^= s >> 7; s ^= s << 17
            return UInt8(truncatingIfNeeded: s)
        }
    }

    /// A file under the storage directory holding `bytes`, open read-write (as an upload's is).
    func upload(_ bytes: [UInt8], named name: String) throws -> Int32 {
        let fd = open(storage + "/" + name, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        #expect(fd >= 0)
        #expect(write(fd, bytes, bytes.count) == bytes.count)
        return fd
    }

    func stored(_ name: String) throws -> [UInt8] {
        try index.object(name).chunkIDs.flatMap { try index.chunks.read($0) }
    }

    @Test func anUploadBecomesTheChunkedObjectAChunkedPutWouldLeave() throws {
        let data = Self.bytes(700_000, seed: 1)
        let fd = try upload(data, named: ".upload-1")
        defer { close(fd) }
        let report = try ObjectIngest.ingest(fd: fd, as: "a.bin", into: index, parameters: parameters)
        let expected = try Manifest(chunking: BytesSource(data, maxRead: 5000), parameters: parameters)
        #expect(report.manifest == expected.encode())
        #expect(try index.object("a.bin").manifest == expected.encode())
        #expect(try index.object("a.bin").chunkIDs == expected.chunks.map { ChunkID(bytes: $0.id.bytes)! })
        #expect(report.bytes == 700_000 && report.chunks == expected.chunks.count && report.chunks > 10)
        #expect(report.newBytes + report.reusedBytes == 700_000)
        #expect(try stored("a.bin") == data)
    }

    /// With the body's SHA-256 from the sink (the worker hashed it as it was written), the
    /// manifest is the same one, and that digest is the one it records.
    @Test func aDigestTheSinkComputedIsTheManifests() throws {
        let data = Self.bytes(300_000, seed: 3)
        let fd = try upload(data, named: ".upload-3")
        defer { close(fd) }
        let digest = ContentDigest.sha256(data)
        let report = try ObjectIngest.ingest(fd: fd, as: "d.bin", into: index, parameters: parameters, digest: digest)
        let expected = try Manifest(chunking: BytesSource(data), parameters: parameters)
        #expect(expected.digest == digest)
        #expect(report.manifest == expected.encode())
        #expect(try stored("d.bin") == data)
    }

    @Test func theSameBytesAgainWriteNothingNewAndAnEditWritesLittle() throws {
        var data = Self.bytes(600_000, seed: 2)
        let fd = try upload(data, named: ".upload-2")
        let first = try ObjectIngest.ingest(fd: fd, as: "v1", into: index, parameters: parameters)
        close(fd)
        #expect(first.newBytes == 600_000 && first.reusedBytes == 0)
        let written = index.chunks.counters.bytesWritten

        let again = try upload(data, named: ".upload-3")
        let second = try ObjectIngest.ingest(fd: again, as: "v1", into: index, parameters: parameters)
        close(again)
        #expect(second.newBytes == 0 && second.reusedBytes == 600_000 && second.reusedChunks == first.chunks)
        #expect(index.chunks.counters.bytesWritten == written)

        data[300_000] ^= 0xff
        let edited = try upload(data, named: ".upload-4")
        let third = try ObjectIngest.ingest(fd: edited, as: "v2", into: index, parameters: parameters)
        close(edited)
        #expect(third.newChunks >= 1 && third.newChunks <= 2 && third.newBytes <= 2 * 64 << 10)
        #expect(try stored("v2") == data)
    }

    @Test func replacingAnObjectRecordsTheNewChunks() throws {
        let a = Self.bytes(200_000, seed: 3), b = Self.bytes(90_000, seed: 4)
        for (i, bytes) in [a, b].enumerated() {
            let fd = try upload(bytes, named: ".upload-r\(i)")
            _ = try ObjectIngest.ingest(fd: fd, as: "same", into: index, parameters: parameters)
            close(fd)
        }
        #expect(try stored("same") == b)
        #expect(try Manifest(decoding: index.object("same").manifest).totalLength == 90_000)
    }

    @Test func anEmptyUploadIsAnEmptyObject() throws {
        let fd = try upload([], named: ".upload-e")
        defer { close(fd) }
        let report = try ObjectIngest.ingest(fd: fd, as: "empty", into: index, parameters: parameters)
        #expect(report.bytes == 0 && report.chunks == 0)
        let m = try Manifest(decoding: index.object("empty").manifest)
        #expect(m.totalLength == 0 && m.chunks.isEmpty)
    }

    @Test func thePoolAnswersThroughTheInboxAndRemovesTempAndFlatFiles() throws {
        let pool = try ObjectIngest(
            index: index, parameters: parameters, storagePath: storage, threads: 2, logger: Logger(label: "test"))
        defer { pool.stop() }
        let inbox = ObjectIngest.Inbox()
        let posted = DispatchSemaphore(value: 0)
        inbox.onPost = { posted.signal() }
        // An older flat copy of the name, which would shadow the chunked object.
        close(try upload(Self.bytes(1000, seed: 5), named: "obj"))
        let data = Self.bytes(150_000, seed: 6)
        pool.submit(fd: try upload(data, named: ".upload-p"), temp: ".upload-p", name: "obj", ticket: 7, inbox: inbox)
        // A name the index refuses: the outcome says why, and the temp file still goes.
        pool.submit(fd: try upload(data, named: ".upload-q"), temp: ".upload-q", name: ".hidden", ticket: 8, inbox: inbox)
        for _ in 0..<2 { #expect(posted.wait(timeout: .now() + 30) == .success) }
        var outcomes: [ObjectIngest.Outcome] = []
        inbox.drain(into: &outcomes)
        let byTicket = Dictionary(uniqueKeysWithValues: outcomes.map { ($0.ticket, $0) })
        #expect(byTicket[7]?.failure == nil && byTicket[7]?.report.bytes == 150_000)
        #expect(byTicket[8]?.failure?.contains("starts with a dot") == true)
        #expect(try FileManager.default.contentsOfDirectory(atPath: storage) == [])
        #expect(try stored("obj") == data)
    }
}

extension ObjectIngestTests {
    /// A crash between an ingest's record and its removal of the older flat copy leaves both;
    /// the pool's start removes the flat copy, but not a flat file put there after its record,
    /// even with an older modification time (as `cp -a` or a restore leaves it).
    @Test func startingThePoolRemovesFlatCopiesOlderThanTheirRecords() throws {
        // "crashed": the flat copy is from before the record; "flat-later": put there after it.
        close(try upload(Self.bytes(10, seed: 10), named: "crashed"))
        usleep(20_000)  // status change times tick coarsely
        for name in ["crashed", "flat-later"] {
            let fd = try upload(Self.bytes(50_000, seed: 9), named: ".upload-\(name)")
            _ = try ObjectIngest.ingest(fd: fd, as: name, into: index, parameters: parameters)
            close(fd)
        }
        usleep(20_000)
        close(try upload(Self.bytes(10, seed: 11), named: "flat-later"))
        var old = [timespec(tv_sec: 1_000_000, tv_nsec: 0), timespec(tv_sec: 1_000_000, tv_nsec: 0)]
        #expect(utimensat(AT_FDCWD, storage + "/flat-later", &old, 0) == 0)
        close(try upload(Self.bytes(10, seed: 12), named: "only-flat"))
        let pool = try ObjectIngest(index: index, parameters: parameters, storagePath: storage, logger: Logger(label: "test"))
        pool.stop()
        let objects = try FileManager.default.contentsOfDirectory(atPath: storage).filter { !$0.hasPrefix(".") }
        #expect(objects.sorted() == ["flat-later", "only-flat"])
    }
}

/// Following an upload: chunked while the body sink still appends to its temp file.
extension ObjectIngestTests {
    func pool() throws -> ObjectIngest {
        try ObjectIngest(index: index, parameters: parameters, storagePath: storage, logger: Logger(label: "test"))
    }

    /// An inbox, and a semaphore signalled at each post to it.
    static func signallingInbox() -> (ObjectIngest.Inbox, DispatchSemaphore) {
        let inbox = ObjectIngest.Inbox(), posted = DispatchSemaphore(value: 0)
        inbox.onPost = { posted.signal() }
        return (inbox, posted)
    }

    /// Appends `bytes` to the file at `path` in `pieces`, pausing between them, as a sink would.
    static func append(_ bytes: [UInt8], to path: String, pieces: Int) {
        let fd = open(path, O_WRONLY | O_APPEND | O_CLOEXEC)
        defer { close(fd) }
        let step = (bytes.count + pieces - 1) / pieces
        for at in stride(from: 0, to: bytes.count, by: step) {
            let n = min(step, bytes.count - at)
            _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + at, n) }
            usleep(2000)
        }
    }

    /// Waits up to 30 s for `condition`.
    static func eventually(_ condition: () throws -> Bool) rethrows -> Bool {
        for _ in 0..<3000 {
            if try condition() { return true }
            usleep(10_000)
        }
        return false
    }

    @Test func aFollowedUploadIsChunkedWhileItArrivesAndStoredOnceComplete() throws {
        let ingest = try pool()
        defer { ingest.stop() }
        let (inbox, posted) = Self.signallingInbox()
        let data = Self.bytes(900_000, seed: 20)
        let fd = try upload([], named: ".upload-f")
        let follower = try #require(
            ingest.follow(fd: fd, temp: ".upload-f", name: "followed", ticket: 3, inbox: inbox, sinkHashes: false))
        Self.append(Array(data[..<600_000]), to: storage + "/.upload-f", pieces: 30)
        // Before the end: chunks of what has landed are in the store already, and nothing is posted.
        let firstCut = try Manifest(chunking: BytesSource(Array(data[..<600_000])), parameters: parameters).chunks.first!
        #expect(try Self.eventually { try index.chunks.has(ChunkID(bytes: firstCut.id.bytes)!) })
        #expect(posted.wait(timeout: .now() + 0.2) == .timedOut)
        Self.append(Array(data[600_000...]), to: storage + "/.upload-f", pieces: 10)
        follower.complete(size: 900_000, digest: nil)
        #expect(posted.wait(timeout: .now() + 30) == .success)
        var outcomes: [ObjectIngest.Outcome] = []
        inbox.drain(into: &outcomes)
        let expected = try Manifest(chunking: BytesSource(data), parameters: parameters)
        #expect(outcomes.count == 1 && outcomes[0].ticket == 3 && outcomes[0].failure == nil)
        #expect(outcomes[0].report.manifest == expected.encode() && outcomes[0].report.bytes == 900_000)
        #expect(try stored("followed") == data)
        #expect(try FileManager.default.contentsOfDirectory(atPath: storage) == [])
    }

    /// The sink's digest, given at `complete`, is the one the manifest records; a follower
    /// told the body is longer than what landed fails and stores no object.
    @Test func theVerdictSaysTheDigestAndALengthThatDidNotLandFails() throws {
        let ingest = try pool()
        defer { ingest.stop() }
        let (inbox, posted) = Self.signallingInbox()
        let data = Self.bytes(200_000, seed: 21)
        let digest = ContentDigest.sha256(data)
        for (ticket, claimed) in [(UInt64(1), 200_000), (2, 200_005)] {
            let temp = ".upload-\(ticket)"
            let fd = try upload(data, named: temp)
            let follower = try #require(
                ingest.follow(fd: fd, temp: temp, name: "v\(ticket)", ticket: ticket, inbox: inbox, sinkHashes: true))
            follower.complete(size: UInt64(claimed), digest: digest)
            #expect(posted.wait(timeout: .now() + 30) == .success)
        }
        var outcomes: [ObjectIngest.Outcome] = []
        inbox.drain(into: &outcomes)
        let byTicket = Dictionary(uniqueKeysWithValues: outcomes.map { ($0.ticket, $0) })
        #expect(try Manifest(decoding: byTicket[1]!.report.manifest).digest == digest)
        #expect(byTicket[2]?.failure?.contains("changed size while it was ingested (200000 of 200005 bytes)") == true)
        #expect(throws: StoreError.self) { try index.object("v2") }
    }

    /// An upload of unannounced length under a storage cap: the follower reserves each chunk's
    /// room before storing it, and the cap's refusal is the outcome once the body is complete;
    /// nothing is recorded and the reservations are let go.
    @Test func aFollowerOfUnknownLengthReservesEachChunkAndStopsAtTheCap() throws {
        let ingest = try pool()
        defer { ingest.stop() }
        let gate = try ObjectGate(settings: .init(storageCap: 300_000), storagePath: storage, index: index)
        let (inbox, posted) = Self.signallingInbox()
        let data = Self.bytes(900_000, seed: 22)
        let fd = try upload([], named: ".upload-u")
        let follower = try #require(
            ingest.follow(
                fd: fd, temp: ".upload-u", name: "unsized", ticket: 5, inbox: inbox, gate: gate,
                writer: .init(identity: "token:u"), reservesChunks: true, sinkHashes: false))
        Self.append(data, to: storage + "/.upload-u", pieces: 30)
        // Refused part-way, it posts nothing before the worker's verdict.
        #expect(posted.wait(timeout: .now() + 0.2) == .timedOut)
        follower.complete(size: 900_000, digest: nil)
        #expect(posted.wait(timeout: .now() + 30) == .success)
        var outcomes: [ObjectIngest.Outcome] = []
        inbox.drain(into: &outcomes)
        #expect(outcomes.count == 1 && outcomes[0].ticket == 5 && outcomes[0].status == 507)
        #expect(outcomes[0].failure?.hasPrefix("storage cap of this node: ") == true)
        #expect(outcomes[0].failure?.contains("(300000 bytes) (limits.storage_cap), this upload needs ") == true)
        #expect(throws: StoreError.self) { try index.object("unsized") }
        // What it reserved is free again: only the chunks it stored count.
        #expect(gate.counters.storedBytes <= 300_000)
        #expect(gate.reserve(300_000 - gate.counters.storedBytes) == nil)
    }

    /// An upload's hold goes with it to the pool: a commit turns it into the writer's usage,
    /// an upload abandoned or refused there ends it; either way the room is the quota's again.
    @Test func theIngestTurnsTheUploadsHoldIntoUsageOrEndsIt() throws {
        let ingest = try pool()
        defer { ingest.stop() }
        let gate = try ObjectGate(settings: .init(storageCap: 4 << 20, writerQuota: 1 << 20), storagePath: storage, index: index)
        let (inbox, posted) = Self.signallingInbox()
        let w = ObjectGate.Writer(identity: "token:u")
        let data = Self.bytes(300_000, seed: 23)
        // Submitted whole: committed, the hold becomes usage.
        let submitted = try #require(try gate.hold("whole", by: w, size: 300_000).get())
        ingest.submit(
            fd: try upload(data, named: ".upload-w"), temp: ".upload-w", name: "whole", ticket: 1, inbox: inbox, gate: gate, writer: w,
            hold: submitted)
        // Followed, then abandoned: the hold ends with it.
        let followedHold = try #require(try gate.hold("gone", by: w, size: 300_000).get())
        let follower = try #require(
            ingest.follow(
                fd: try upload(data, named: ".upload-g"), temp: ".upload-g", name: "gone", ticket: 2, inbox: inbox, gate: gate, writer: w,
                hold: followedHold, sinkHashes: false))
        #expect(posted.wait(timeout: .now() + 30) == .success)
        follower.abandon()
        #expect(Self.eventually { gate.counters.inFlightUploads == 0 })
        #expect(gate.usage(of: "token:u") == 300_000 && gate.counters.inFlightBytes == 0)
        // Refused at the commit (If-None-Match: * on an object that exists): ended too.
        let refusedHold = try #require(try gate.hold("whole", by: w, size: 300_000).get())
        ingest.submit(
            fd: try upload(data, named: ".upload-r"), temp: ".upload-r", name: "whole", ticket: 3, inbox: inbox, gate: gate,
            writer: .init(identity: "token:u", ifNoneMatch: "*"), hold: refusedHold)
        #expect(posted.wait(timeout: .now() + 30) == .success)
        var outcomes: [ObjectIngest.Outcome] = []
        inbox.drain(into: &outcomes)
        #expect(outcomes.map(\.ticket) == [1, 3] && outcomes[0].failure == nil && outcomes[1].status == 412)
        #expect(gate.usage(of: "token:u") == 300_000 && gate.counters.inFlightBytes == 0 && gate.counters.inFlightUploads == 0)
    }

    /// `count` bytes (a multiple of 8) of seeded noise, 8 at a time: fast enough for tens of MiB.
    static func noise(_ count: Int, seed: UInt64) -> [UInt8] {
        var s = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        var out = [UInt8](repeating: 0, count: count)
        out.withUnsafeMutableBytes { raw in
            for at in stride(from: 0, to: count, by: 8) {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17
                raw.storeBytes(of: s, toByteOffset: at, as: UInt64.self)
            }
        }
        return out
    }

    /// Ingests `data` as `name` followed under a 40 MiB storage cap, the worker's part played
    /// here: the body lands 1 MiB at a time while the follower keeps up (on a real link it
    /// does), an upload of unannounced length (`announced` false) growing its hold as its body
    /// reaches it; then the body settles and completes. Returns where it stopped growing (nil:
    /// it did not), the settle's refusal, the outcome and the gate.
    func followUnderCap(
        _ data: [UInt8], as name: String, announced: Bool
    ) throws -> (stoppedAt: Int?, settle: ObjectGate.Refusal?, outcome: ObjectIngest.Outcome?, gate: ObjectGate) {
        let ingest = try ObjectIngest(index: index, parameters: .default, storagePath: storage, logger: Logger(label: "test"))
        defer { ingest.stop() }
        let gate = try ObjectGate(settings: .init(storageCap: 40 << 20), storagePath: storage, index: index)
        let (inbox, posted) = Self.signallingInbox()
        let w = ObjectGate.Writer(identity: "token:u")
        let hold = try #require(try gate.hold(name, by: w, size: announced ? UInt64(data.count) : nil).get())
        let temp = ".upload-\(name)"
        let follower = try #require(
            ingest.follow(
                fd: try upload([], named: temp), temp: temp, name: name, ticket: 1, inbox: inbox, gate: gate, writer: w, hold: hold,
                sinkHashes: false))
        var held = Int(hold.bytes), received = 0, stoppedAt: Int?
        let lag = 2 * ChunkingParameters.default.maxSize  // what the chunker keeps until the next bytes come
        while received < data.count {
            if !announced, received >= held {
                guard case .success(let bytes) = gate.grow(hold, received: UInt64(received)) else {
                    stoppedAt = received
                    break
                }
                held = Int(bytes)
            }
            let n = min(1 << 20, data.count - received, announced ? .max : held - received)
            Self.append(Array(data[received..<received + n]), to: storage + "/" + temp, pieces: 1)
            received += n
            #expect(Self.eventually { index.chunks.counters.bytesWritten + UInt64(lag) >= UInt64(received) })
        }
        guard stoppedAt == nil else {
            follower.abandon()
            return (stoppedAt, nil, nil, gate)
        }
        let settle = gate.settle(hold, name, by: w, size: UInt64(data.count))
        guard settle == nil else {
            follower.abandon()
            return (nil, settle, nil, gate)
        }
        follower.complete(size: UInt64(data.count), digest: nil)
        #expect(posted.wait(timeout: .now() + 60) == .success)
        var outcomes: [ObjectIngest.Outcome] = []
        inbox.drain(into: &outcomes)
        return (nil, nil, outcomes.first, gate)
    }

    /// A followed upload's chunks, stored before its commit, are inside its hold: 24 MiB under
    /// a 40 MiB cap settles and commits (counted twice, its end needed 48 MiB free), and its
    /// chunks are then the bytes stored, once.
    @Test func aFollowedUploadsChunksCountOnceAgainstTheCap() throws {
        let data = Self.noise(24 << 20, seed: 24)
        let (_, settle, outcome, gate) = try followUnderCap(data, as: "announced", announced: true)
        #expect(settle == nil)
        #expect(outcome?.failure == nil && outcome?.report.newBytes == 24 << 20)
        #expect(gate.counters.storedBytes == 24 << 20 && gate.counters.storageCapRefused == 0)
        #expect(gate.counters.inFlightBytes == 0 && gate.counters.inFlightUploads == 0)
        #expect(try stored("announced") == data)
    }

    /// An upload of unannounced length grows into all the room the cap leaves while it is
    /// followed: 32 MiB under 40 (counted twice, it stopped at about half of the room).
    @Test func aFollowedUploadOfUnknownLengthGrowsIntoAllTheRoomLeft() throws {
        let data = Self.noise(32 << 20, seed: 25)
        let (stoppedAt, settle, outcome, gate) = try followUnderCap(data, as: "unannounced", announced: false)
        #expect(stoppedAt == nil, "stopped growing at \(stoppedAt ?? 0) bytes")
        #expect(settle == nil)
        #expect(outcome?.failure == nil && outcome?.report.newBytes == 32 << 20)
        #expect(gate.counters.storedBytes == 32 << 20 && gate.counters.inFlightBytes == 0 && gate.counters.inFlightUploads == 0)
        #expect(try stored("unannounced") == data)
    }

    /// At most `maxFollowers` at once; an abandoned upload posts nothing, records no object,
    /// and frees its follower for the next one.
    @Test func abandonedFollowersPostNothingAndFreeTheirPlace() throws {
        let ingest = try pool()
        let inbox = ObjectIngest.Inbox()
        var followers: [ObjectIngest.Follower] = []
        for i in 0..<ObjectIngest.maxFollowers {
            let temp = ".upload-a\(i)"
            let fd = try upload(Self.bytes(100_000, seed: UInt64(30 + i)), named: temp)
            followers.append(
                try #require(ingest.follow(fd: fd, temp: temp, name: "a\(i)", ticket: UInt64(i), inbox: inbox, sinkHashes: false)))
        }
        let spare = try upload([1, 2, 3], named: ".upload-spare")
        #expect(ingest.follow(fd: spare, temp: ".upload-spare", name: "spare", ticket: 99, inbox: inbox, sinkHashes: false) == nil)
        for f in followers { f.abandon() }
        // Their places come back: the spare upload is followed once one has ended.
        var last: ObjectIngest.Follower?
        #expect(
            Self.eventually {
                last = ingest.follow(fd: spare, temp: ".upload-spare", name: "spare", ticket: 99, inbox: inbox, sinkHashes: false)
                return last != nil
            })
        last?.abandon()
        ingest.stop()  // returns once every follower has ended
        var outcomes: [ObjectIngest.Outcome] = []
        inbox.drain(into: &outcomes)
        #expect(outcomes.isEmpty)
        for i in 0..<ObjectIngest.maxFollowers { #expect(throws: StoreError.self) { try index.object("a\(i)") } }
        #expect(throws: StoreError.self) { try index.object("spare") }
        #expect(try FileManager.default.contentsOfDirectory(atPath: storage) == [])
    }
}
