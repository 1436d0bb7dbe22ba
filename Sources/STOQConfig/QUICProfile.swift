import STOQQUIC

/// Named presets for `network.quic_config`: `quic_config = "high_performance"`, or
/// `profile = "high_performance"` inside the table, whose keys then override it. A profile
/// sets only the keys listed in config/node.toml next to its name (a test holds the two
/// together); every other setting keeps `QUICSettings`' default.
public enum QUICProfile: String, Sendable, CaseIterable {
    /// `QUICSettings`' defaults: 16 MB / 8 MB initial windows growing to 64 MB / 32 MB.
    case standard = "default"
    /// Long fat paths and many parallel requests: windows four times the default, so one
    /// connection fills 10 Gb/s at about 200 ms RTT; a connection may buffer up to 256 MB.
    case highPerformance = "high_performance"
    /// Many connections on a small host: small windows (at most 4 MB buffered per
    /// connection), fewer streams, idle connections closed sooner.
    case lowMemory = "low_memory"

    /// Sets this profile's keys in `settings` (the loader starts from the defaults, so
    /// `.standard` has nothing to set); the rest is left as it is.
    public func apply(to settings: inout QUICSettings) {
        switch self {
        case .standard:
            break
        case .highPerformance:
            settings.initialMaxData = 64 << 20
            settings.initialMaxStreamData = 32 << 20
            settings.maxWindow = 256 << 20
            settings.maxStreamWindow = 128 << 20
            settings.maxStreamsBidi = 1024
        case .lowMemory:
            settings.initialMaxData = 1 << 20
            settings.initialMaxStreamData = 256 << 10
            settings.maxWindow = 4 << 20
            settings.maxStreamWindow = 2 << 20
            settings.maxStreamsBidi = 32
            settings.idleTimeout = 15_000_000_000
        }
    }
}
