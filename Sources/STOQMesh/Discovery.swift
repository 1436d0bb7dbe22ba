import Foundation
import Logging
import STOQConfig

/// One member of the mesh as discovery sees it: where it listens, and its node id when the
/// backend knows it (etcd registrations carry it; DNS and the static list do not — the QUIC
/// handshake's certificate gives it then).
public struct MeshMember: Hashable, Sendable, CustomStringConvertible {
    /// `https://[ipv6]:port`.
    public var url: MeshURL
    /// SHA-256 of the member's node key, if the backend says.
    public var nodeID: NodeIdentity?

    /// A member at `url`.
    public init(url: MeshURL, nodeID: NodeIdentity? = nil) {
        self.url = url
        self.nodeID = nodeID
    }

    public var description: String { nodeID.map { "\(url) (\($0))" } ?? "\(url)" }
}

/// What a discovery backend has done, for logs, `/metrics` and tests. Every failure is counted
/// here and retried; none stops the backend.
public struct DiscoveryCounters: Sendable, Equatable {
    /// Member sets reported (the first, and every change after it).
    public var updates: UInt64 = 0
    /// Members in the last set reported.
    public var members = 0
    /// Failed attempts: a resolution, an etcd request, a lost watch or lease.
    public var failures: UInt64 = 0
    /// Times the backend worked again after failing.
    public var recoveries: UInt64 = 0
    /// Times this node registered itself (etcd: a lease granted and the record put).
    public var registrations: UInt64 = 0
    /// Records refused, by reason (DNS: `bad_address`, `bad_port`, `target_unresolved`,
    /// `too_many`, counted every round the record is still served; etcd: the
    /// `MemberRecord.Refusal` codes, counted each time the record is read). The rest of the
    /// answer is still used.
    public var refused: [String: UInt64] = [:]
    /// The last failure, for `/status` and logs.
    public var lastError: String?

    public init() {}
}

/// Why a discovery attempt failed. The backend logs it (once per run of failures), counts it
/// and retries with backoff.
public struct DiscoveryError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of failure.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        let name: String
        /// No DNS server or etcd endpoint could be reached.
        public static let unreachable = Code(name: "unreachable")
        /// No answer in time.
        public static let timeout = Code(name: "timeout")
        /// The answer broke the protocol (bad DNS message, unexpected etcd JSON).
        public static let malformed = Code(name: "malformed")
        /// The server answered with an error (DNS SERVFAIL/REFUSED, an etcd error).
        public static let serverError = Code(name: "server_error")
        /// etcd no longer knows this node's lease: it registers again.
        public static let leaseLost = Code(name: "lease_lost")
        /// The etcd watch ended (server gone, compaction, cancel): the view is read again.
        public static let watchEnded = Code(name: "watch_ended")
        public var description: String { name }
    }
    /// What kind of failure.
    public var code: Code
    /// What exactly, naming the server, the request or the field.
    public var detail: String

    /// A failure.
    public init(_ code: Code, _ detail: String) {
        self.code = code
        self.detail = detail
    }

    public var description: String { "\(code): \(detail)" }
}

/// A source of mesh members. One file per backend (`StaticDiscovery`, `DNSDiscovery`,
/// `EtcdDiscovery`); `DiscoverySelection` is the only place that names them.
///
/// A backend reports the whole member set — never a diff — first once it knows it, then each
/// time it changes. The set may include this node itself (DNS and etcd list every member); the
/// caller drops its own node id or address. A backend never gives up: a failure is logged once
/// per run of failures, counted (`counters`) and retried with backoff, and the last set
/// reported stays valid meanwhile (a DNS or etcd outage does not empty the mesh).
public protocol DiscoveryBackend: AnyObject, Sendable {
    /// "static", "dns" or "etcd", for logs and metrics.
    var backendName: String { get }
    /// A snapshot of what the backend has done so far. Any thread.
    var counters: DiscoveryCounters { get }
    /// Runs until the calling task is cancelled: registers this node where the backend has
    /// registration, then calls `report` with the member set whenever it changes (never twice
    /// with the same set). Returns after cancellation, having withdrawn this node's
    /// registration if it can.
    func run(_ report: @escaping @Sendable (Set<MeshMember>) async -> Void) async
}

extension DiscoveryBackend {
    /// The member sets as an async sequence: iterating runs the backend, and ending the
    /// iteration (or cancelling the task) stops it.
    public func memberSets() -> AsyncStream<Set<MeshMember>> {
        AsyncStream(bufferingPolicy: .bufferingNewest(1)) { continuation in
            let task = Task {
                await self.run { continuation.yield($0) }
                continuation.finish()
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }
}

/// The counters, shared between the backend's task and readers on other threads.
final class CounterBox: @unchecked Sendable {
    private let lock = NSLock()
    private var value = DiscoveryCounters()

    var snapshot: DiscoveryCounters { lock.withLock { value } }

    func update(_ body: (inout DiscoveryCounters) -> Void) { lock.withLock { body(&value) } }
}

/// Logs the first failure of a run and the recovery that ends it, so a long outage is two log
/// lines and a counter, not a line per retry.
struct FailureLog {
    let logger: Logger
    let what: String
    private(set) var streak: UInt64 = 0

    init(logger: Logger, what: String) {
        self.logger = logger
        self.what = what
    }

    mutating func failed(_ error: DiscoveryError, counters: CounterBox, retryIn: Duration) {
        counters.update {
            $0.failures += 1
            $0.lastError = error.description
        }
        if streak == 0 {
            logger.warning("\(what): \(error); retrying with backoff (first retry in \(retryIn)), logged once until it recovers")
        }
        streak += 1
    }

    mutating func succeeded(counters: CounterBox) {
        guard streak > 0 else { return }
        logger.notice("\(what): working again after \(streak) failed attempt(s)")
        counters.update { $0.recoveries += 1 }
        streak = 0
    }
}

/// Exponential backoff with jitter: from `initial`, doubling to `maximum`, each wait drawn
/// from [d/2, d] so that nodes that failed together do not retry together.
struct Backoff {
    let initial: Duration
    let maximum: Duration
    private var current: Duration

    init(initial: Duration, maximum: Duration) {
        self.initial = initial
        self.maximum = max(initial, maximum)
        current = initial
    }

    mutating func next() -> Duration {
        let d = current
        current = min(current * 2, maximum)
        let ns = d.nanoseconds
        return .nanoseconds(ns / 2 + Int64.random(in: 0...max(0, ns / 2)))
    }

    mutating func reset() { current = initial }
}

extension Duration {
    var nanoseconds: Int64 {
        let (s, a) = components
        return s * 1_000_000_000 + a / 1_000_000_000
    }

    init(nanoseconds ns: UInt64) { self = .nanoseconds(Int64(min(ns, UInt64(Int64.max)))) }
}

/// Sleeps, returning false if the task was cancelled.
func pause(_ d: Duration) async -> Bool {
    do { try await Task.sleep(for: d) } catch { return false }
    return !Task.isCancelled
}
