import Foundation

/// A byte count for people: `1.5 MiB`.
func human(_ n: Double) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var v = n, i = 0
    while v >= 1024 && i < units.count - 1 { v /= 1024; i += 1 }
    return String(format: "%.1f %@", v, units[i])
}

/// The progress line `stoq get` keeps on a terminal: bytes so far, and with a known `total` a
/// bar, the share and the time left at the rate so far. Whatever the server announced (a
/// content-length of 2^63 with a byte a second is a time left no `Int` holds), the line is
/// drawn: a time left past a year reads `ETA ?`.
func progressLine(got: UInt64, total: UInt64?, seconds: Double) -> String {
    let rate = Double(got) / max(seconds, 0.001)
    var line = "\r\(human(Double(got)))"
    if let total, total > 0 {
        let share = min(max(Double(got) / Double(total), 0), 1)
        let bar = String(repeating: "█", count: Int(share * 30)).padding(toLength: 30, withPad: " ", startingAt: 0)
        let eta = rate > 0 ? Double(total - min(got, total)) / rate : .infinity
        let left = eta.isFinite && eta < 365 * 86_400 ? "\(Int(eta))s" : "?"
        line += " / \(human(Double(total))) [\(bar)] \(Int(share * 100))%  ETA \(left)"
    }
    return line + "  \(human(rate))/s   "
}
