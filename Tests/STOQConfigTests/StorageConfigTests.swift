import STOQStore
import Testing

@testable import STOQConfig

/// `[storage]`'s garbage collection keys: on every hour by default, with an hour's grace, each
/// validated with an error naming the key.
@Suite struct StorageConfigTests {
    func errors(_ text: String) -> [ConfigError] { configErrors(text) }

    @Test func collectionRunsHourlyByDefault() {
        let s = NodeConfig.default.storage
        #expect(s.gcInterval == 3_600_000_000_000 && s.gcGracePeriod == 3_600_000_000_000)
    }

    /// One home for the grace period's default: the store's, which a store opened without a
    /// config (the edge cache's, a tool's) gets as well as a node that does not set the key.
    @Test func theGracePeriodDefaultIsTheStores() {
        #expect(ChunkStore.Options.defaultCollectGracePeriod == .seconds(3600))
        #expect(ChunkStore.Options().collectGracePeriod == ChunkStore.Options.defaultCollectGracePeriod)
        #expect(NodeConfig.default.storage.gcGracePeriod == 3_600_000_000_000)
        #expect(NodeConfig.Storage.nanoseconds(.milliseconds(1500)) == 1_500_000_000)
    }

    @Test func collectionKeysAreDurationsWithinBounds() throws {
        let c = try ConfigLoader.parse("[storage]\ngc_interval = \"10m\"\ngc_grace_period = \"6h\"")
        #expect(c.storage.gcInterval == 600_000_000_000 && c.storage.gcGracePeriod == 21_600_000_000_000)
        #expect(try ConfigLoader.parse("[storage]\ngc_interval = \"0s\"").storage.gcInterval == 0, "0s: no scheduled collection")
        let often = errors("[storage]\ngc_interval = \"500ms\"")
        #expect(often.map(\.key) == ["storage.gc_interval"] && often.first?.code == .outOfRange)
        #expect(often.first?.allowed == "\"0s\" (no scheduled collection), or a duration from 1s to 604800s")
        let rare = errors("[storage]\ngc_interval = \"8d\"")
        #expect(rare.map(\.key) == ["storage.gc_interval"] && rare.first?.code == .outOfRange)
        // Shorter than a minute would collect the chunks of chunked uploads still sending them.
        let short = errors("[storage]\ngc_grace_period = \"30s\"")
        #expect(short.map(\.key) == ["storage.gc_grace_period"] && short.first?.code == .outOfRange)
        let bare = errors("[storage]\ngc_grace_period = 3600")
        #expect(bare.map(\.key) == ["storage.gc_grace_period"] && bare.first?.code == .badType)
    }
}
