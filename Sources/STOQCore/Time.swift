#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Nanoseconds on the monotonic clock. The QUIC core never reads a clock: callers pass `now`.
public typealias Timestamp = UInt64

/// Reads the monotonic clock. Only the datapath workers and the node call this.
@inline(__always)
public func monotonicNow() -> Timestamp {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// Durations in nanoseconds, for readability at call sites.
public enum Nanos {
    public static let millisecond: UInt64 = 1_000_000
    public static let second: UInt64 = 1_000_000_000
}

extension String {
    /// Decodes a NUL-terminated C character buffer (the error text the C shims fill in).
    public init(cBuffer: [CChar]) {
        self = String(decoding: cBuffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
