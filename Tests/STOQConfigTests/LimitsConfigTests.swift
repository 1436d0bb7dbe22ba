import Testing
@testable import STOQConfig

/// `[limits]` and `access.overwrite`: off and "owner" by default, every key validated with an
/// error naming key, value and what is allowed.
@Suite struct LimitsConfigTests {
    func errors(_ text: String) -> [ConfigError] { configErrors(text) }

    @Test func offByDefault() {
        let l = NodeConfig.default.limits
        #expect(l.storageCap == 0 && l.writerQuota == 0 && l.requestsPerSecond == 0 && l.requestBurst == 0 && l.bytesPerSecond == 0)
        #expect(NodeConfig.default.overwrite == .owner)
        // The two timeouts for stalled streams are on: nginx's defaults.
        #expect(l.bodyTimeout == 60_000_000_000 && l.sendTimeout == 60_000_000_000)
        // And so are the bounds on request bodies held in memory, node-wide and per client.
        #expect(l.bodyMemory == 1 << 30 && l.bodyMemoryPerClient == 256 << 20)
    }

    @Test func bodyMemoryIsASizeAndZeroTurnsItOff() throws {
        #expect(try ConfigLoader.parse("[limits]\nbody_memory = \"64MB\"").limits.bodyMemory == 64 << 20)
        #expect(try ConfigLoader.parse("[limits]\nbody_memory = \"0\"").limits.bodyMemory == 0)
        let bad = errors("[limits]\nbody_memory = \"plenty\"")
        #expect(bad.map(\.key) == ["limits.body_memory"] && bad.first?.code == .badValue)
        #expect(try ConfigLoader.parse("[limits]\nbody_memory_per_client = \"8MB\"").limits.bodyMemoryPerClient == 8 << 20)
        #expect(try ConfigLoader.parse("[limits]\nbody_memory_per_client = \"0\"").limits.bodyMemoryPerClient == 0)
        let negative = errors("[limits]\nbody_memory_per_client = -1")
        #expect(negative.map(\.key) == ["limits.body_memory_per_client"] && negative.first?.code == .badValue)
    }

    @Test func stallTimeoutsAreDurationsAndZeroTurnsThemOff() throws {
        let c = try ConfigLoader.parse("[limits]\nbody_timeout = \"1s\"\nsend_timeout = \"0s\"")
        #expect(c.limits.bodyTimeout == 1_000_000_000 && c.limits.sendTimeout == 0)
        let bare = errors("[limits]\nbody_timeout = 30")
        #expect(bare.map(\.key) == ["limits.body_timeout"] && bare.first?.code == .badType)
        let long = errors("[limits]\nsend_timeout = \"2h\"")
        #expect(long.map(\.key) == ["limits.send_timeout"] && long.first?.code == .outOfRange)
        #expect(long.first?.allowed == "a duration such as 250ms, 1s, 5m, 1h, 24h (from 0ms to 3600s)")
    }

    /// `min_send_rate` is a size a second, on (1000) by default; "0" turns it off.
    @Test func minSendRateIsASizeAndZeroTurnsItOff() throws {
        #expect(NodeConfig.default.limits.minSendRate == 1000)
        #expect(try ConfigLoader.parse("[limits]\nmin_send_rate = \"64KB\"").limits.minSendRate == 64 << 10)
        #expect(try ConfigLoader.parse("[limits]\nmin_send_rate = \"0\"").limits.minSendRate == 0)
        let bad = errors("[limits]\nmin_send_rate = \"slow\"")
        #expect(bad.map(\.key) == ["limits.min_send_rate"] && bad.first?.code == .badValue)
    }

    @Test func readsEveryKey() throws {
        let c = try ConfigLoader.parse(
            """
            [access]
            overwrite = "never"
            [limits]
            storage_cap = "500GB"
            writer_quota = "10MB"
            requests_per_second = 2.5
            request_burst = 10
            bytes_per_second = "1MB"
            """)
        #expect(c.overwrite == .never)
        #expect(c.limits.storageCap == 500 << 30 && c.limits.writerQuota == 10 << 20)
        #expect(c.limits.requestsPerSecond == 2.5 && c.limits.requestBurst == 10 && c.limits.bytesPerSecond == 1 << 20)
        #expect(c.limits.effectiveBurst == 10)
        // Without a burst, one second's worth (at least one request).
        #expect(try ConfigLoader.parse("[limits]\nrequests_per_second = 20").limits.effectiveBurst == 20)
        #expect(try ConfigLoader.parse("[limits]\nrequests_per_second = 0.5").limits.effectiveBurst == 1)
    }

    @Test func badValuesNameKeyValueAndWhatIsAllowed() {
        let policy = errors("[access]\noverwrite = \"sometimes\"")
        #expect(policy.map(\.key) == ["access.overwrite"])
        #expect(policy.first?.code == .badValue && policy.first?.allowed == "one of \"owner\", \"writers\", \"never\"")
        let cap = errors("[limits]\nstorage_cap = \"lots\"")
        #expect(cap.map(\.key) == ["limits.storage_cap"] && cap.first?.code == .badValue)
        let rate = errors("[limits]\nrequests_per_second = -1")
        #expect(rate.map(\.key) == ["limits.requests_per_second"] && rate.first?.code == .outOfRange)
        #expect(rate.first?.allowed == "a number from 0 to 1000000, requests a second per client (0 = no limit)")
        #expect(errors("[limits]\nrequests_per_second = \"fast\"").first?.code == .badType)
        let burst = errors("[limits]\nrequest_burst = 5")
        #expect(burst.map(\.key) == ["limits.request_burst"])
        #expect(burst.first?.allowed == "0 while limits.requests_per_second is 0 (a burst of a rate that is off limits nothing)")
        let unknown = errors("[limits]\nquota = 1")
        #expect(unknown.map(\.key) == ["limits.quota"] && unknown.first?.code == .unknownKey)
    }
}
