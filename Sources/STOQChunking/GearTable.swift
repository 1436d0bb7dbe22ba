/// The 256 64-bit values the gear rolling hash adds per byte.
///
/// They are not a pasted table but the output of a fixed procedure, so anyone can regenerate
/// and check them: splitmix64 (Steele, Lea, Flood 2014) seeded with the ASCII bytes
/// `STOQCDC1` read big-endian (0x53544F5143444331); entry `i` is the `(i+1)`-th output.
/// A known-answer test pins entries 0, 1 and 255. Changing the seed changes every cut
/// point and therefore every chunk id: it is part of the format.
public enum GearTable {
    /// The seed: "STOQCDC1".
    public static let seed: UInt64 = 0x5354_4F51_4344_4331

    /// The table, generated on first use.
    public static let values: [UInt64] = {
        var state = seed
        return (0..<256).map { _ in splitmix64(&state) }
    }()

    /// One splitmix64 step: advance the state by the golden-ratio increment, then mix.
    @inline(__always)
    static func splitmix64(_ state: inout UInt64) -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// A stable copy the hot loop reads through a raw pointer (never freed: the table lives as
    /// long as the process, and a pointer avoids array bounds checks and retain/release).
    nonisolated(unsafe) static let pointer: UnsafePointer<UInt64> = {
        let p = UnsafeMutablePointer<UInt64>.allocate(capacity: 256)
        p.initialize(from: values, count: 256)
        return UnsafePointer(p)
    }()
}
