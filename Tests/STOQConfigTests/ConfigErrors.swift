@testable import STOQConfig

/// The errors `ConfigLoader.parse` reports for `text` read from `source` (none: it parsed): what
/// the suites check each key's validation against, by key and code.
func configErrors(_ text: String, source: String = "t.toml") -> [ConfigError] {
    do {
        _ = try ConfigLoader.parse(text, source: source)
        return []
    } catch { return error.errors }
}
