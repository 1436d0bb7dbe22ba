import TOMLKit

extension NodeConfig {
    /// `[limits]`: how much the node stores, how fast each client may ask, and how long a
    /// stalled request or response may hold what it holds. Every limit but the two timeouts and
    /// the two `body_memory` bounds is off (0) by default. Writer quotas and the cap answer 507 with the numbers; rate limits
    /// 429 with `Retry-After` (docs/configuration.md `[limits]`).
    public struct Limits: Sendable, Equatable {
        /// `storage_cap`: bytes the node stores at most (plain objects and chunks, each chunk
        /// once); 0 = unlimited.
        public var storageCap: UInt64 = 0
        /// `writer_quota`: bytes each writer's objects may total (an object's length, however
        /// much of it deduplicates); 0 = unlimited.
        public var writerQuota: UInt64 = 0
        /// `requests_per_second`: requests a second per client; 0 = no limit.
        public var requestsPerSecond = 0.0
        /// `request_burst`: requests a client may make at once; 0 = one second's worth.
        public var requestBurst = 0
        /// `bytes_per_second`: upload bytes a second per client; 0 = no limit.
        public var bytesPerSecond: UInt64 = 0
        /// `body_timeout`, ns: a request whose body has received no byte for this long is
        /// answered 408 and its body dropped (what it held, a memfd or a temp file, is freed);
        /// 0 = never. nginx's `client_body_timeout`.
        public var bodyTimeout: UInt64 = 60 * 1_000_000_000
        /// `send_timeout`, ns: a response of which the client has acknowledged no body byte for
        /// this long (it stopped granting flow control, or acknowledging) is reset and its
        /// mapping released; 0 = never. nginx's `send_timeout`.
        public var sendTimeout: UInt64 = 60 * 1_000_000_000
        /// `min_send_rate`, bytes a second: a response the client holds (as for `send_timeout`)
        /// while acknowledging it slower than this over a window of `send_timeout` is reset, so
        /// that credit granted a few bytes at a time holds it no longer; 0 = never. Apache's
        /// `mod_reqtimeout` MinRate, for responses.
        public var minSendRate: UInt64 = 1000
        /// `body_memory`: bytes of request bodies (chunks, manifests, have/want queries) the
        /// node holds in memory at once, each its announced length or the most its kind may
        /// be; one past it is answered 503 with `Retry-After` before it is read. 0 = no limit.
        public var bodyMemory: UInt64 = 1 << 30
        /// `body_memory_per_client`: the most of `body_memory` one client (keyed as the rate
        /// limits key it) holds at once, so that one client cannot take it all from the others;
        /// past it, 503 with `Retry-After`. 0 = no share, only `body_memory`.
        public var bodyMemoryPerClient: UInt64 = 256 << 20

        public init() {}

        /// The burst in effect: `request_burst`, or one second of `requests_per_second`.
        public var effectiveBurst: Double { requestBurst > 0 ? Double(requestBurst) : max(1, requestsPerSecond.rounded(.up)) }
    }

    /// `access.overwrite`: who may replace or delete an object that exists.
    public enum Overwrite: String, Sendable, CaseIterable {
        /// The identity that wrote it, or an admin (default).
        case owner
        /// Any writer the node authorizes.
        case writers
        /// No one: objects are immutable once written, and deletes are refused.
        case never
    }
}

extension Reader {
    /// Reads `[limits]`.
    mutating func limits(_ l: inout NodeConfig.Limits) {
        section("limits") { s in
            s.size("storage_cap", &l.storageCap, 0...(1 << 60))
            s.size("writer_quota", &l.writerQuota, 0...(1 << 60))
            s.number(
                "requests_per_second", &l.requestsPerSecond, 0...1_000_000,
                allowed: "a number from 0 to 1000000, requests a second per client (0 = no limit)")
            s.int("request_burst", &l.requestBurst, 0...10_000_000)
            s.size("bytes_per_second", &l.bytesPerSecond, 0...(1 << 40))
            s.duration("body_timeout", &l.bodyTimeout, 0...3_600_000_000_000)
            s.duration("send_timeout", &l.sendTimeout, 0...3_600_000_000_000)
            s.size("min_send_rate", &l.minSendRate, 0...(1 << 40))
            s.size("body_memory", &l.bodyMemory, 0...(1 << 50))
            s.size("body_memory_per_client", &l.bodyMemoryPerClient, 0...(1 << 50))
        }
        if l.requestBurst > 0 && l.requestsPerSecond == 0 {
            errors.append(
                ConfigError(
                    code: .badValue, key: "limits.request_burst", value: "\(l.requestBurst)",
                    allowed: "0 while limits.requests_per_second is 0 (a burst of a rate that is off limits nothing)"))
        }
    }
}
