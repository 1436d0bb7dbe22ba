import Foundation
import STOQCore
import STOQQUIC

/// Per-client request and upload-byte rate limits (`[limits] requests_per_second`,
/// `request_burst`, `bytes_per_second`), keyed by the client's identity
/// (`clientIdentity(_:peer:)`): the authenticated subject, or the /64 an anonymous client
/// sends from.
///
/// One table for the whole node, behind a lock taken once per request head (and once more
/// at the end of an upload), never per packet: the workers'
/// per-packet path does not see it.
///
/// Bytes: an upload is charged what arrived, at its end (the router's `meterEnded`), never
/// the `Content-Length` it announced: a request refused at its head sends no body, so it
/// owes nothing for one. The byte bucket holds one second's worth and may go
/// into debt: a large upload is let through and the client's next requests wait until the
/// debt is paid. Response bytes are not charged.
///
/// Bounded: at most `maxClients` buckets. When the table is full, buckets that have refilled
/// (the same as new ones) are dropped first, then the least recently used, down to three
/// quarters of the bound, so a flood of identities costs a sort now and then, not memory.
/// Thread-safe.
public final class RateLimiter: @unchecked Sendable {
    /// The limits; a zero rate turns that limit off.
    public struct Settings: Sendable, Equatable {
        /// Requests a second per client (0 = no request limit).
        public var requestsPerSecond: Double
        /// Requests a client may make at once.
        public var requestBurst: Double
        /// Upload bytes a second per client (0 = no byte limit).
        public var bytesPerSecond: Double
        /// Clients tracked at once.
        public var maxClients: Int

        /// Settings with these values.
        public init(requestsPerSecond: Double, requestBurst: Double, bytesPerSecond: Double, maxClients: Int = 65_536) {
            (self.requestsPerSecond, self.requestBurst, self.bytesPerSecond) = (requestsPerSecond, requestBurst, bytesPerSecond)
            self.maxClients = max(4, maxClients)
        }

        /// Whether any limit is on.
        public var enabled: Bool { requestsPerSecond > 0 || bytesPerSecond > 0 }
    }

    /// A request the limiter refused: when to come back and why (the 429's body).
    public struct Refusal: Sendable, Equatable {
        /// Whole seconds, at least 1 (`Retry-After`).
        public var retryAfter: UInt64
        public var reason: String
    }

    struct Entry {
        var requests: TokenBucket?
        var bytes: TokenBucket?
        var used: UInt64
    }

    /// The limits.
    public let settings: Settings
    private let lock = NSLock()
    private var table: [String: Entry] = [:]
    private var limitedCount: UInt64 = 0
    private var evictedCount: UInt64 = 0

    /// A limiter with `settings`.
    public init(settings: Settings) { self.settings = settings }

    /// Requests refused with 429 so far.
    public var limited: UInt64 { lock.withLock { limitedCount } }
    /// Buckets dropped to keep the table bounded.
    public var evicted: UInt64 { lock.withLock { evictedCount } }
    /// Clients tracked now.
    public var clients: Int { lock.withLock { table.count } }

    /// Admits a request from `client` announcing `bodyBytes` (nil: unknown or none), or says
    /// why not. An admitted request is charged one request and its announced bytes, which
    /// `settle` squares with what arrived.
    public func admit(_ client: String, bodyBytes: UInt64?, now: UInt64) -> Refusal? {
        lock.withLock {
            var e = entry(client, now)
            defer { table[client] = e }
            if var b = e.bytes {
                let wait = b.debt(now: now)
                e.bytes = b
                if wait > 0 {
                    limitedCount += 1
                    return Refusal(
                        retryAfter: Self.seconds(wait),
                        reason: "rate limit for \(client): uploads over \(Self.amount(settings.bytesPerSecond))B/s "
                            + "(limits.bytes_per_second); \(Self.amount(-b.tokens))B over, retry in \(Self.seconds(wait)) s")
                }
            }
            if var r = e.requests {
                let wait = r.take(1, now: now)
                e.requests = r
                if wait > 0 {
                    limitedCount += 1
                    return Refusal(
                        retryAfter: Self.seconds(wait),
                        reason: "rate limit for \(client): more than \(Self.amount(settings.requestsPerSecond)) requests/s "
                            + "with a burst of \(Self.amount(settings.requestBurst)) (limits.requests_per_second, "
                            + "limits.request_burst), retry in \(Self.seconds(wait)) s")
                }
            }
            if let n = bodyBytes, n > 0 { e.bytes?.charge(Double(n), now: now) }
            return nil
        }
    }

    /// Settles an upload at its end: it was charged `charged` bytes at its head (its announced
    /// length, 0 without one) and `received` came. The difference is charged, or given back
    /// (a PUT refused at its head sent none of what it announced), never past a full bucket.
    public func settle(_ client: String, charged: UInt64, received: UInt64, now: UInt64) {
        guard settings.bytesPerSecond > 0, charged != received else { return }
        lock.withLock {
            var e = entry(client, now)
            if received > charged {
                e.bytes?.charge(Double(received - charged), now: now)
            } else {
                e.bytes?.refund(Double(charged - received), now: now)
            }
            table[client] = e
        }
    }

    /// The client's entry (a new one, making room if the table is full). Under `lock`.
    private func entry(_ client: String, _ now: UInt64) -> Entry {
        if var e = table[client] {
            e.used = now
            return e
        }
        if table.count >= settings.maxClients { shrink(now) }
        let s = settings
        return Entry(
            requests: s.requestsPerSecond > 0 ? TokenBucket(rate: s.requestsPerSecond, burst: max(1, s.requestBurst), now: now) : nil,
            bytes: s.bytesPerSecond > 0 ? TokenBucket(rate: s.bytesPerSecond, burst: s.bytesPerSecond, now: now) : nil,
            used: now)
    }

    private func shrink(_ now: UInt64) {
        let before = table.count
        table = table.filter { !($0.value.requests?.isFull(now: now) ?? true && $0.value.bytes?.isFull(now: now) ?? true) }
        let target = settings.maxClients * 3 / 4
        if table.count > target {
            let oldest = table.sorted { $0.value.used < $1.value.used }.prefix(table.count - target)
            for (k, _) in oldest { table[k] = nil }
        }
        evictedCount += UInt64(before - table.count)
    }

    static func seconds(_ ns: UInt64) -> UInt64 { max(1, (ns + 999_999_999) / 1_000_000_000) }

    /// `1.5M`, `200K`, `12`: a rate or a size for a message.
    static func amount(_ v: Double) -> String {
        let units: [(Double, String)] = [(1_073_741_824, "G"), (1_048_576, "M"), (1024, "K")]
        for (size, unit) in units where v >= size {
            let x = v / size
            return (x == x.rounded() ? String(Int(x)) : String(format: "%.1f", x)) + unit
        }
        return v == v.rounded() ? String(Int(v)) : String(format: "%.1f", v)
    }
}

/// The key a request's limits and ownership go by: `request.identity` when the access
/// policy set one (`token:…`, `cert:…`, `addr:…/64`), else the /64 prefix of the address the
/// client sends from, `addr:<prefix>/64` (one subscriber's /64 is one client; addresses
/// inside it are free for the taking).
public func clientIdentity(_ request: HTTPRequest, peer: IPv6Endpoint) -> String {
    clientIdentity(request.identity, peer: peer)
}

/// `identity` when it is set, else `addr:<the /64 of peer>/64`.
package func clientIdentity(_ identity: String, peer: IPv6Endpoint) -> String {
    if !identity.isEmpty { return identity }
    return "addr:\(peer.address.slash64)/64"
}
