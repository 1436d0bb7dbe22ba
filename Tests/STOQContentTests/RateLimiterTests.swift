import STOQCore
import Testing

@testable import STOQContent

/// Token buckets and the per-client table, on a manual clock (nanoseconds).
@Suite struct RateLimiterTests {
    static let second: UInt64 = 1_000_000_000

    @Test func aBucketSpendsItsBurstThenRefillsAtItsRate() {
        var b = TokenBucket(rate: 10, burst: 3, now: 0)
        #expect(b.take(1, now: 0) == 0 && b.take(1, now: 0) == 0 && b.take(1, now: 0) == 0)
        // Empty: one token comes in a tenth of a second.
        #expect(b.take(1, now: 0) == 100_000_000)
        #expect(b.take(1, now: 50_000_000) == 50_000_000)
        #expect(b.take(1, now: 100_000_000) == 0)
        // Never more than the burst, however long it rested.
        #expect(b.isFull(now: 100 * Self.second))
        #expect(b.take(3, now: 100 * Self.second) == 0 && b.take(1, now: 100 * Self.second) > 0)
    }

    @Test func chargingGoesIntoDebtAndTheDebtIsWaitedOut() {
        var b = TokenBucket(rate: 1000, burst: 1000, now: 0)
        b.charge(3500, now: 0)
        #expect(b.tokens == -2500)
        #expect(b.debt(now: 0) == 2_500_000_000)
        #expect(b.debt(now: 2 * Self.second) == 500_000_000)
        #expect(b.debt(now: 3 * Self.second) == 0)
    }

    @Test func aBurstOverTheLimitIs429WithRetryAfterAndCounted() {
        let r = RateLimiter(settings: .init(requestsPerSecond: 2, requestBurst: 4, bytesPerSecond: 0))
        for _ in 0..<4 { #expect(r.admit("addr:2001:db8::/64", bodyBytes: nil, now: 0) == nil) }
        let refused = r.admit("addr:2001:db8::/64", bodyBytes: nil, now: 0)
        #expect(refused?.retryAfter == 1)
        #expect(
            refused?.reason
                == "rate limit for addr:2001:db8::/64: more than 2 requests/s with a burst of 4 (limits.requests_per_second, limits.request_burst), retry in 1 s"
        )
        #expect(r.limited == 1)
        // Another client has its own bucket; the first gets one more after half a second.
        #expect(r.admit("token:bob", bodyBytes: nil, now: 0) == nil)
        #expect(r.admit("addr:2001:db8::/64", bodyBytes: nil, now: Self.second / 2) == nil)
    }

    @Test func uploadBytesAreChargedAndTheNextRequestWaits() {
        let r = RateLimiter(settings: .init(requestsPerSecond: 0, requestBurst: 0, bytesPerSecond: 1_048_576))
        // The first upload goes through whatever its size; it leaves 3 MB of debt.
        #expect(r.admit("c", bodyBytes: 4 << 20, now: 0) == nil)
        let refused: RateLimiter.Refusal? = r.admit("c", bodyBytes: 1, now: Self.second)
        #expect(refused?.retryAfter == 2)
        #expect(refused?.reason == "rate limit for c: uploads over 1MB/s (limits.bytes_per_second); 2MB over, retry in 2 s")
        #expect(r.admit("c", bodyBytes: nil, now: 3 * Self.second) == nil)
        // A body of unknown length is charged when it ends.
        r.settle("c", charged: 0, received: 2 << 20, now: 3 * Self.second)
        #expect(r.admit("c", bodyBytes: nil, now: 3 * Self.second)?.retryAfter == 2)
    }

    /// An upload is charged its announced length at its head, so uploads started side by side
    /// see each other's debt; what it never sent (refused at its head) is given back at its
    /// end, never past a full bucket.
    @Test func anAnnouncedLengthIsSettledAgainstWhatArrived() {
        let r = RateLimiter(settings: .init(requestsPerSecond: 0, requestBurst: 0, bytesPerSecond: 1_048_576))
        #expect(r.admit("c", bodyBytes: 100 << 30, now: 0) == nil)
        // A second upload beside it waits for the first's announced length.
        #expect(r.admit("c", bodyBytes: 1, now: Self.second) != nil)
        // The first was refused at its head and sent nothing: its charge comes back.
        r.settle("c", charged: 100 << 30, received: 0, now: Self.second)
        #expect(r.admit("c", bodyBytes: 1, now: Self.second) == nil)
        // A body longer than it said pays the rest.
        #expect(r.admit("d", bodyBytes: 1 << 20, now: 0) == nil)
        r.settle("d", charged: 1 << 20, received: 4 << 20, now: 0)
        #expect(r.admit("d", bodyBytes: nil, now: Self.second)?.retryAfter == 2)  // 3 MiB over, 1 s refilled
    }

    /// The mesh's paths are exempt only for a node's certificate: verified (an identity at
    /// all), with the key the identity carries only for a node's (`NodeCertificate`). A node is
    /// known by its key (its mesh id), not by its certificate's name.
    @Test func onlyANodesCertificateExemptsTheMeshsPaths() {
        let key = String(repeating: "ab", count: 32)
        #expect(NodeRouter.isNode("|\(key)|node-b.mesh") && NodeRouter.node("|\(key)|node-b.mesh") == key)
        #expect(!NodeRouter.isNode("reader||alice"))  // a user's certificate gives no key (NodeCertificate)
        #expect(!NodeRouter.isNode("reader|\(key)|alice"))  // nor would a key with a role count
        #expect(!NodeRouter.isNode("||node-b.mesh"))  // no key
        #expect(!NodeRouter.isNode("|node-b.mesh") && !NodeRouter.isNode(""))  // not the form
    }

    /// Any client may announce a length near 2^63: the debt it leaves converts to a wait (the
    /// longest there is) instead of trapping the node on its next request.
    @Test func aHugeAnnouncedLengthIsALongWaitNotATrap() {
        let r = RateLimiter(settings: .init(requestsPerSecond: 0, requestBurst: 0, bytesPerSecond: 1_048_576))
        #expect(r.admit("c", bodyBytes: UInt64(Int64.max), now: 0) == nil)
        let refused = r.admit("c", bodyBytes: nil, now: Self.second)
        #expect(refused?.retryAfter == (TokenBucket.maxWait + 999_999_999) / 1_000_000_000)
        #expect(r.admit("other", bodyBytes: nil, now: Self.second) == nil)
    }

    @Test func theTableStaysBoundedUnderAFloodOfClients() {
        let r = RateLimiter(settings: .init(requestsPerSecond: 1, requestBurst: 1, bytesPerSecond: 0, maxClients: 100))
        for i in 0..<10_000 { _ = r.admit("addr:\(i)", bodyBytes: nil, now: UInt64(i)) }
        #expect(r.clients <= 100)
        #expect(r.evicted >= 9_900)
        // The most recent clients are still known (and limited).
        #expect(r.admit("addr:9999", bodyBytes: nil, now: 10_000) != nil)
    }

    @Test func anonymousClientsAreKeyedByTheirSlash64() {
        let a = IPv6Endpoint(address: IPv6Address("2001:db8:1:2:aaaa:bbbb:cccc:dddd")!, port: 5000)
        let b = IPv6Endpoint(address: IPv6Address("2001:db8:1:2::9")!, port: 6000)
        let c = IPv6Endpoint(address: IPv6Address("2001:db8:1:3::9")!, port: 6000)
        #expect(clientIdentity("", peer: a) == "addr:2001:db8:1:2::/64")
        #expect(clientIdentity("", peer: b) == clientIdentity("", peer: a))
        #expect(clientIdentity("", peer: c) == "addr:2001:db8:1:3::/64")
        #expect(clientIdentity("token:alice", peer: a) == "token:alice")
    }
}
