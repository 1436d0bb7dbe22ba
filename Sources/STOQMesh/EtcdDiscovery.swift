import AsyncHTTPClient
import Foundation
import Synchronization
import Logging
import NIOCore
import STOQConfig

/// `mesh.discovery = "etcd"`: every node registers under `mesh.etcd_prefix` with a lease it keeps
/// alive, and watches the prefix; the members are the records under it (`MemberRecord`). Spoken
/// over etcd's JSON gateway (etcd 3.4: `/v3/lease/grant`, `/v3/lease/keepalive`, `/v3/kv/put`,
/// `/v3/kv/range`, `/v3/watch`, `/v3/lease/revoke`), base64 keys and values.
///
/// One session: grant a lease of `mesh.etcd_lease_ttl` and keep it alive from then on (every
/// TTL/3), put this node's record with it, read the prefix, then follow the watch from the
/// revision read, checking every three TTLs that it still follows etcd (`checkWatch`).
/// Anything that ends a session — an endpoint gone, the lease unknown to etcd (expired during an
/// outage, or the cluster's data lost), the watch cancelled, compacted or fallen silent — is
/// counted, logged once per run of failures, and a new session starts on the next endpoint after
/// a backoff: it registers again and reads the prefix afresh. A session that lasts a lease's TTL ends the run
/// (logged once: working again). Until then the last member set stays. A node that stops
/// keeping its lease alive is removed by etcd when the lease expires, and the watch reports it;
/// a node that stops cleanly revokes its lease, so it disappears at once.
public final class EtcdDiscovery: DiscoveryBackend {
    /// Where and how.
    public struct Options: Sendable {
        /// `mesh.etcd_endpoints`, tried in turn.
        public var endpoints: [MeshURL]
        /// `mesh.etcd_prefix` (ends with "/").
        public var prefix: String
        /// `mesh.etcd_lease_ttl`, in seconds.
        public var leaseTTLSeconds: Int64 = 10
        /// This node's record; nil = watch only.
        public var registration: MeshMember?
        /// One request's time limit (the watch has none: it ends with its connection; a
        /// keepalive's is at most a third of the TTL).
        public var requestTimeout: Duration = .seconds(3)
        /// The longest wait between two sessions.
        public var maxBackoff: Duration = .seconds(5)
        /// Records beyond this many are refused (`too_many`).
        public var maxMembers = 4096

        /// Options for the cluster at `endpoints`, records under `prefix`.
        public init(endpoints: [MeshURL], prefix: String) {
            self.endpoints = endpoints
            self.prefix = prefix
        }
    }

    /// The options it runs with.
    public let options: Options
    private let logger: Logger
    private let box = CounterBox()
    private let state = State()
    /// The client given, if any; else `run` makes its own for as long as it runs.
    private let given: HTTPClient?
    private let current = Mutex<HTTPClient?>(nil)
    private var client: HTTPClient { current.withLock { $0 } ?? given ?? .shared }

    /// A backend; nothing happens until `run`. Without a `client`, `run` makes its own whose
    /// connection attempts give up after at most a second (see `run`).
    public init(options: Options, logger: Logger, client: HTTPClient? = nil) {
        self.options = options
        self.logger = logger
        self.given = client
    }

    public var backendName: String { "etcd" }
    public var counters: DiscoveryCounters { box.snapshot }

    /// The last set reported, the lease held, and the refusals already logged.
    private final class State: @unchecked Sendable {
        let lock = NSLock()
        var last: Set<MeshMember>?
        var lease: (MeshURL, Int64)?
        var logged: Set<String> = []
    }

    public func run(_ report: @escaping @Sendable (Set<MeshMember>) async -> Void) async {
        var own: HTTPClient?
        if given == nil {
            var c = HTTPClient.Configuration()
            // AsyncHTTPClient retries a refused connection until the connect timeout; the
            // default (10 s, capped by the request's 3 s deadline) made every attempt against a
            // dead endpoint cost the whole request timeout. One second still rides out a
            // transient refusal (an etcd restarting), and fails over sooner.
            c.timeout.connect = .nanoseconds(min(options.requestTimeout.nanoseconds, 1_000_000_000))
            own = HTTPClient(eventLoopGroupProvider: .singleton, configuration: c)
            current.withLock { $0 = own }
        }
        var log = FailureLog(logger: logger, what: "mesh discovery (etcd)")
        var backoff = Backoff(initial: .milliseconds(200), maximum: options.maxBackoff)
        var index = 0
        while !Task.isCancelled && !options.endpoints.isEmpty {
            let endpoint = options.endpoints[index % options.endpoints.count]
            do {
                try await session(endpoint, report) {
                    // A session works once it has lived a lease's TTL: that is when the backend
                    // is working again, and earns the first, short wait after its end. One that
                    // ends at once (a proxy that does not stream the watch) is one failure more
                    // of the same run: not a recovery and a failure logged each time, nor a
                    // registration again and again in a tight loop.
                    log.succeeded(counters: box)
                    backoff.reset()
                }
            } catch {
                if Task.isCancelled { break }
                let e = error as? DiscoveryError ?? DiscoveryError(.unreachable, "etcd \(endpoint): \(error)")
                index += 1
                let wait = backoff.next()
                log.failed(e, counters: box, retryIn: wait)
                if !(await pause(wait)) { break }
            }
        }
        await withdraw()
        if let own {
            current.withLock { $0 = nil }
            try? await own.shutdown()
        }
    }

    /// One session on `endpoint`: registers (if this node has a record) and reads the prefix,
    /// then follows the watch, keeping the lease alive from the moment it is granted (a slow put
    /// or range must not let it expire). Always throws. Calls `matured` once, when the session
    /// has lasted a lease's TTL.
    private func session(
        _ endpoint: MeshURL, _ report: @escaping @Sendable (Set<MeshMember>) async -> Void, matured: () -> Void
    ) async throws {
        var lease: Int64?
        if options.registration != nil {
            let granted = try await post(endpoint, "/v3/lease/grant", ["TTL": options.leaseTTLSeconds])
            guard let id = Self.int(granted["ID"]), id != 0 else {
                throw DiscoveryError(.malformed, "etcd \(endpoint) /v3/lease/grant: no lease ID in the answer")
            }
            state.lock.withLock { state.lease = (endpoint, id) }
            lease = id
        }
        // Each child returns whether it is the one that marks the session matured; the others
        // only end by throwing.
        try await withThrowingTaskGroup(of: Bool.self) { group in
            defer { group.cancelAll() }
            if let lease {
                group.addTask {
                    try await self.keepAlive(endpoint, lease: lease)
                    return false
                }
            }
            if let lease, let me = options.registration {
                let key = MemberRecord.key(prefix: options.prefix, for: me)
                _ = try await post(
                    endpoint, "/v3/kv/put",
                    [
                        "key": Self.b64(Array(key.utf8)),
                        "value": Self.b64(MemberRecord.encode(me)), "lease": String(lease),
                    ])
                box.update { $0.registrations += 1 }
                logger.info("mesh discovery (etcd): registered \(key) at \(endpoint), lease \(lease) of \(options.leaseTTLSeconds)s")
            }
            let (revision, view, keys) = try await read(endpoint)
            await publish(view, report)
            let progress = WatchProgress(keys: keys, revision: revision)
            group.addTask {
                try await self.watch(endpoint, from: revision + 1, view: view, progress, report)
                return false
            }
            group.addTask {
                try await self.checkWatch(endpoint, progress)
                return false
            }
            let ttl = Duration.seconds(options.leaseTTLSeconds)
            group.addTask {
                try await Task.sleep(for: ttl)
                return true
            }
            while try await group.next() == true { matured() }
            throw DiscoveryError(.watchEnded, "etcd \(endpoint): session ended")
        }
    }

    /// The records a page of the prefix holds at most: a page of records of the largest size
    /// allowed is well within `maxPageBytes`.
    static let pageRecords = 256
    /// The largest answer to one page (base64 and JSON included).
    static let maxPageBytes = 1 << 20

    /// Reads the prefix at one revision, `pageRecords` keys a page: the revision read at, the
    /// members by key, and how many keys it holds (refused ones too). A page larger than `maxPageBytes` (a record far beyond the 1 KiB
    /// allowed: etcd takes values of 1.5 MiB) is asked for again in halves, down to one key;
    /// a single record that large is refused (`too_large`) by its key alone, and the read goes
    /// on after it. So no size of the prefix ends the session.
    private func read(_ endpoint: MeshURL) async throws -> (revision: Int64, view: [String: MeshMember], keys: Int64) {
        var view: [String: MeshMember] = [:]
        var keys: Int64 = 0
        var from = Array(options.prefix.utf8)
        let end = Self.rangeEnd(options.prefix)
        var revision: Int64?
        var limit = Self.pageRecords
        while true {
            var body: [String: Any] = ["key": Self.b64(from), "range_end": Self.b64(end), "limit": String(limit)]
            if let revision { body["revision"] = String(revision) }
            do {
                let answer = try await post(endpoint, "/v3/kv/range", body, upTo: Self.maxPageBytes)
                if revision == nil { revision = try Self.revision(answer, endpoint) }
                let kvs = answer["kvs"] as? [[String: Any]] ?? []
                for kv in kvs { apply(kv, deleted: false, to: &view) }
                keys += Int64(kvs.count)
                guard answer["more"] as? Bool == true, let last = kvs.last?["key"] as? String, let key = Data(base64Encoded: last) else { break }
                from = Array(key) + [0]
                limit = min(Self.pageRecords, limit * 2)
            } catch is TooLarge {
                if limit > 1 {
                    limit /= 2
                    continue
                }
                // One record: its key alone, to refuse it by name and read on after it.
                body["keys_only"] = true
                let answer = try await post(endpoint, "/v3/kv/range", body)
                if revision == nil { revision = try Self.revision(answer, endpoint) }
                guard let kv = (answer["kvs"] as? [[String: Any]])?.first, let b64 = kv["key"] as? String, let key = Data(base64Encoded: b64) else {
                    break  // deleted meanwhile (only the first page is read without a revision)
                }
                let name = String(decoding: key, as: UTF8.self)
                keys += 1
                refuse(
                    MemberRecord.Refusal(
                        code: MemberRecord.Refusal.tooLarge,
                        detail: "key \(name.prefix(120)): etcd's answer for this record alone is more than \(Self.maxPageBytes) bytes"))
                from = Array(key) + [0]
            }
        }
        return (revision ?? 0, view, keys)
    }

    /// A range answer's header revision, which the watch starts after.
    private static func revision(_ answer: [String: Any], _ endpoint: MeshURL) throws -> Int64 {
        guard let header = answer["header"] as? [String: Any], let revision = int(header["revision"]) else {
            throw DiscoveryError(.malformed, "etcd \(endpoint) /v3/kv/range: no header revision")
        }
        // The watch starts at the next one.
        guard (0..<Int64.max).contains(revision) else {
            throw DiscoveryError(.malformed, "etcd \(endpoint) /v3/kv/range: header revision \(revision) is out of range")
        }
        return revision
    }

    /// Renews the lease every TTL/3, each renewal given at most TTL/3 (or the request timeout
    /// if shorter): renewals land within two thirds of a TTL of each other, or the session ends
    /// (and the next one registers again) before the lease can expire.
    private func keepAlive(_ endpoint: MeshURL, lease: Int64) async throws {
        let period = Duration.milliseconds(max(500, options.leaseTTLSeconds * 1000 / 3))
        let limit = min(period, options.requestTimeout)
        while await pause(period) {
            let answer = try await post(endpoint, "/v3/lease/keepalive", ["ID": String(lease)], timeout: limit)
            let result = answer["result"] as? [String: Any] ?? [:]
            // etcd answers an unknown lease with its ID and no TTL (TTL 0 is left out of the JSON).
            guard let ttl = Self.int(result["TTL"]), ttl > 0 else {
                throw DiscoveryError(.leaseLost, "etcd \(endpoint): lease \(lease) is gone (expired, revoked or the cluster lost it); registering again")
            }
        }
        throw CancellationError()
    }

    private func watch(
        _ endpoint: MeshURL, from revision: Int64, view start: [String: MeshMember], _ progress: WatchProgress,
        _ report: @escaping @Sendable (Set<MeshMember>) async -> Void
    ) async throws {
        var view = start
        let create: [String: Any] = [
            "create_request": [
                "key": Self.b64(Array(options.prefix.utf8)), "range_end": Self.b64(Self.rangeEnd(options.prefix)),
                "start_revision": String(revision),
            ]
        ]
        var request = HTTPClientRequest(url: "\(endpoint)/v3/watch")
        request.method = .POST
        request.headers.add(name: "content-type", value: "application/json")
        request.body = .bytes(ByteBuffer(bytes: try JSONSerialization.data(withJSONObject: create)))
        let response: HTTPClientResponse
        do { response = try await client.execute(request, deadline: .distantFuture) } catch {
            throw DiscoveryError(.unreachable, "etcd \(endpoint) /v3/watch: \(error)")
        }
        guard response.status == .ok else {
            throw DiscoveryError(.serverError, "etcd \(endpoint) /v3/watch: HTTP \(response.status.code)")
        }
        // The gateway streams one JSON object per line. A line longer than any sane event
        // batch is a broken or hostile server.
        var pending: [UInt8] = []
        let maxLine = 8 << 20
        do {
            for try await chunk in response.body {
                pending.append(contentsOf: chunk.readableBytesView)
                // Lines taken from a moving start, the consumed prefix dropped once a chunk: a
                // chunk of many short lines costs its length, not its length squared.
                var start = pending.startIndex
                while let nl = pending[start...].firstIndex(of: 0x0A) {
                    let line = Array(pending[start..<nl])
                    start = nl + 1
                    if try handle(line, endpoint, &view, progress) { await publish(view, report) }
                }
                pending.removeSubrange(..<start)
                guard pending.count <= maxLine else {
                    throw DiscoveryError(.malformed, "etcd \(endpoint) /v3/watch: a message of more than \(maxLine) bytes")
                }
            }
        } catch let e as DiscoveryError {
            throw e
        } catch {
            if Task.isCancelled { throw CancellationError() }
            throw DiscoveryError(.watchEnded, "etcd \(endpoint) /v3/watch: \(error)")
        }
        throw DiscoveryError(.watchEnded, "etcd \(endpoint) /v3/watch: the stream closed")
    }

    /// Applies one watch message; true when events came.
    private func handle(_ line: [UInt8], _ endpoint: MeshURL, _ view: inout [String: MeshMember], _ progress: WatchProgress) throws -> Bool {
        if line.allSatisfy({ $0 == 0x20 || $0 == 0x0D }) { return false }
        guard let message = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: Any] else {
            throw DiscoveryError(.malformed, "etcd \(endpoint) /v3/watch: a message that is not a JSON object")
        }
        if let error = message["error"] {
            throw DiscoveryError(.serverError, "etcd \(endpoint) /v3/watch: \(error)")
        }
        guard let result = message["result"] as? [String: Any] else {
            throw DiscoveryError(.malformed, "etcd \(endpoint) /v3/watch: a message without \"result\"")
        }
        if result["canceled"] as? Bool == true {
            let why = result["cancel_reason"] as? String ?? (Self.int(result["compact_revision"]).map { "compacted to revision \($0)" } ?? "no reason given")
            throw DiscoveryError(.watchEnded, "etcd \(endpoint): watch cancelled (\(why)); reading the prefix again")
        }
        guard let events = result["events"] as? [[String: Any]] else { return false }
        for event in events {
            guard let kv = event["kv"] as? [String: Any] else {
                throw DiscoveryError(.malformed, "etcd \(endpoint) /v3/watch: an event without \"kv\"")
            }
            let deleted = event["type"] as? String == "DELETE"
            apply(kv, deleted: deleted, to: &view)
            // A put of version 1 created its key; a delete's mod_revision is the deletion's.
            progress.delivered(created: !deleted && Self.int(kv["version"]) == 1, deleted: deleted, at: Self.int(kv["mod_revision"]) ?? 0)
        }
        return true
    }

    /// What a session's watch has delivered: how many keys the prefix holds by it (refused ones
    /// too), and the newest revision of a change it brought.
    private final class WatchProgress: @unchecked Sendable {  // every field behind `lock`
        private let lock = NSLock()
        private var keys: Int64
        private var seen: Int64

        /// As the prefix was read at `revision`, holding `keys` keys.
        init(keys: Int64, revision: Int64) {
            self.keys = keys
            self.seen = revision
        }

        func delivered(created: Bool, deleted: Bool, at revision: Int64) {
            lock.withLock {
                keys += created ? 1 : deleted ? -1 : 0
                seen = max(seen, revision)
            }
        }

        var snapshot: (keys: Int64, seen: Int64) { lock.withLock { (keys, seen) } }
    }

    /// Whether the watch still follows etcd, every three TTLs: a watch connection that a NAT or
    /// a load balancer dropped without a word never ends, and nothing else would notice. One
    /// range, keys only, sorted to give the newest change: the prefix's key count and its
    /// newest write, which a watch that has delivered nothing since must match (one that has
    /// delivered something newer is alive). A watch behind twice in a row, a TTL apart (a change
    /// still on its way is not a dead watch), ends the session; the next reads the prefix again.
    private func checkWatch(_ endpoint: MeshURL, _ progress: WatchProgress) async throws {
        let ttl = Duration.seconds(options.leaseTTLSeconds)
        var behind: String?
        while await pause(behind == nil ? ttl * 3 : ttl) {
            let answer = try await post(
                endpoint, "/v3/kv/range",
                [
                    "key": Self.b64(Array(options.prefix.utf8)), "range_end": Self.b64(Self.rangeEnd(options.prefix)),
                    "keys_only": true, "limit": "1", "sort_order": "DESCEND", "sort_target": "MOD",
                ])
            let at = try Self.revision(answer, endpoint)
            let count = Self.int(answer["count"]) ?? 0
            let newest = (answer["kvs"] as? [[String: Any]])?.first.flatMap { Self.int($0["mod_revision"]) } ?? 0
            let (keys, seen) = progress.snapshot
            let following = seen > at || (count == keys && newest <= seen)
            if !following, let before = behind {
                throw DiscoveryError(
                    .watchEnded,
                    "etcd \(endpoint) /v3/watch: it has fallen behind (\(before); a TTL later, again) and its connection says nothing: reading the prefix again"
                )
            }
            behind =
                following
                ? nil
                : "etcd holds \(count) keys under \(options.prefix), the newest written at revision \(newest); by its watch this node has \(keys), up to revision \(seen)"
        }
        throw CancellationError()
    }

    /// Puts one key's record into the view (or takes it out); a refused record is counted,
    /// logged once, and leaves its key out.
    private func apply(_ kv: [String: Any], deleted: Bool, to view: inout [String: MeshMember]) {
        let keyBytes = (kv["key"] as? String).flatMap { Data(base64Encoded: $0) }.map { Array($0) }
        let prefix = Array(options.prefix.utf8)
        guard let keyBytes, keyBytes.starts(with: prefix) else {
            return refuse(MemberRecord.Refusal(code: MemberRecord.Refusal.badKey, detail: "a key that is not base64 under \(options.prefix)"))
        }
        let key = String(decoding: keyBytes, as: UTF8.self)
        if deleted {
            view.removeValue(forKey: key)
            return
        }
        guard let value = kv["value"].map({ ($0 as? String).flatMap { Data(base64Encoded: $0) } }) ?? Data() else {
            view.removeValue(forKey: key)
            return refuse(MemberRecord.Refusal(code: MemberRecord.Refusal.notJSON, detail: "key \(key.prefix(120)): the value is not base64"))
        }
        switch MemberRecord.decode(name: String(key.dropFirst(options.prefix.count)), value: Array(value)) {
        case .success(let m):
            if view[key] == nil && view.count >= options.maxMembers {
                return refuse(MemberRecord.Refusal(code: "too_many", detail: "more than \(options.maxMembers) members"))
            }
            view[key] = m
        case .failure(let r):
            view.removeValue(forKey: key)
            refuse(r)
        }
    }

    private func refuse(_ r: MemberRecord.Refusal) {
        box.update { $0.refused[r.code, default: 0] += 1 }
        let first = state.lock.withLock { () -> Bool in
            guard state.logged.count < 4096 else { return false }
            return state.logged.insert(r.description).inserted
        }
        if first { logger.warning("mesh discovery (etcd): refused a record under \(options.prefix): \(r)") }
    }

    private func publish(_ view: [String: MeshMember], _ report: @Sendable (Set<MeshMember>) async -> Void) async {
        let set = Set(view.values)
        let changed = state.lock.withLock { () -> Bool in
            guard set != state.last else { return false }
            state.last = set
            return true
        }
        guard changed else { return }
        box.update {
            $0.updates += 1
            $0.members = set.count
        }
        await report(set)
    }

    /// Revokes the lease on the way out, so this node leaves the others' view at once instead
    /// of after the TTL. Best effort, bounded by one request timeout.
    private func withdraw() async {
        guard let (endpoint, id) = state.lock.withLock({ state.lease }) else { return }
        let done = await Task.detached { () -> Bool in
            (try? await self.post(endpoint, "/v3/lease/revoke", ["ID": String(id)])) != nil
        }.value
        logger.info("mesh discovery (etcd): stopped; lease \(id) \(done ? "revoked" : "not revoked (it expires by itself)")")
    }

    /// An answer longer than the caller allows.
    private struct TooLarge: Error, CustomStringConvertible {
        var description: String { "an answer longer than allowed" }
    }

    /// One unary gateway call: JSON in, JSON object out; an HTTP or etcd error throws, an
    /// answer of more than `upTo` bytes throws `TooLarge`.
    private func post(
        _ endpoint: MeshURL, _ path: String, _ body: [String: Any], upTo: Int = 16 << 20, timeout: Duration? = nil
    ) async throws -> [String: Any] {
        var request = HTTPClientRequest(url: "\(endpoint)\(path)")
        request.method = .POST
        request.headers.add(name: "content-type", value: "application/json")
        request.body = .bytes(ByteBuffer(bytes: try JSONSerialization.data(withJSONObject: body)))
        let bytes: ByteBuffer
        let status: UInt
        do {
            let response = try await client.execute(request, timeout: .nanoseconds((timeout ?? options.requestTimeout).nanoseconds))
            status = response.status.code
            bytes = try await response.body.collect(upTo: upTo)
        } catch {
            if Task.isCancelled { throw CancellationError() }
            if error is NIOTooManyBytesError { throw TooLarge() }
            throw DiscoveryError(.unreachable, "etcd \(endpoint) \(path): \(error)")
        }
        guard let object = try? JSONSerialization.jsonObject(with: Data(bytes.readableBytesView)) as? [String: Any] else {
            throw DiscoveryError(.malformed, "etcd \(endpoint) \(path): HTTP \(status), the body is not a JSON object")
        }
        if let message = object["error"] ?? object["message"], status != 200 || object["error"] != nil {
            throw DiscoveryError(.serverError, "etcd \(endpoint) \(path): HTTP \(status): \(message)")
        }
        guard status == 200 else { throw DiscoveryError(.serverError, "etcd \(endpoint) \(path): HTTP \(status)") }
        return object
    }

    /// etcd's int64 fields arrive as JSON strings.
    static func int(_ v: Any?) -> Int64? {
        if let s = v as? String { return Int64(s) }
        if let n = v as? NSNumber { return n.int64Value }
        return nil
    }

    static func b64(_ bytes: [UInt8]) -> String { Data(bytes).base64EncodedString() }

    /// The end of the key range that is exactly the keys starting with `prefix`.
    static func rangeEnd(_ prefix: String) -> [UInt8] {
        var b = Array(prefix.utf8)
        while let last = b.last {
            if last < 0xFF {
                b[b.count - 1] = last + 1
                return b
            }
            b.removeLast()
        }
        return [0]
    }
}
