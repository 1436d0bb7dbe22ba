/// Parses the sizes and durations config files use.
public enum Units {
    /// `512`, `512B`, `64KB`, `1MB`, `10GB`, `1TB` (powers of 1024; `KiB`, `MiB`, `GiB` too).
    public static func size(_ text: String) -> UInt64? {
        let t = text.trimmingCharacters(in: .whitespaces)
        let digits = t.prefix { $0.isASCII && $0.isNumber }
        guard !digits.isEmpty, let n = UInt64(digits) else { return nil }
        let unit = t.dropFirst(digits.count).trimmingCharacters(in: .whitespaces).uppercased()
        let shift: UInt64
        switch unit {
        case "", "B": shift = 0
        case "KB", "KIB", "K": shift = 10
        case "MB", "MIB", "M": shift = 20
        case "GB", "GIB", "G": shift = 30
        case "TB", "TIB", "T": shift = 40
        default: return nil
        }
        let (v, overflow) = n.multipliedReportingOverflow(by: 1 << shift)
        return overflow ? nil : v
    }

    /// `250ms`, `1s`, `5m`, `1h`, `24h`, `7d`, `0s`, in nanoseconds.
    public static func duration(_ text: String) -> UInt64? {
        let t = text.trimmingCharacters(in: .whitespaces)
        let digits = t.prefix { $0.isASCII && $0.isNumber }
        guard !digits.isEmpty, let n = UInt64(digits) else { return nil }
        let unit = t.dropFirst(digits.count)
        let scale: UInt64
        switch unit {
        case "ns": scale = 1
        case "us": scale = 1_000
        case "ms": scale = 1_000_000
        case "s": scale = 1_000_000_000
        case "m": scale = 60_000_000_000
        case "h": scale = 3_600_000_000_000
        case "d": scale = 86_400_000_000_000
        default: return nil
        }
        let (v, overflow) = n.multipliedReportingOverflow(by: scale)
        return overflow ? nil : v
    }
}

extension String {
    func trimmingCharacters(in set: CharacterSetLite) -> String {
        var s = Substring(self)
        while let f = s.first, f == " " || f == "\t" { s = s.dropFirst() }
        while let l = s.last, l == " " || l == "\t" { s = s.dropLast() }
        return String(s)
    }
}

extension Substring {
    func trimmingCharacters(in set: CharacterSetLite) -> String { String(self).trimmingCharacters(in: set) }
}

/// Only whitespace is ever trimmed here; avoids pulling Foundation into the parser.
enum CharacterSetLite { case whitespaces }
