// No imports: this file is also compiled into the manifest fuzz target (scripts/fuzz manifest).

/// How an object is cut into chunks.
public enum ChunkingAlgorithm: UInt8, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    /// Fixed-size chunks of `avg` bytes; the last one may be shorter. Cheap, but an insertion
    /// shifts every later boundary, so it deduplicates little across edited versions.
    case fixed = 0
    /// FastCDC-style content-defined chunking (gear rolling hash, normalized chunking): a
    /// boundary depends only on the 64 bytes before it, so edits move few boundaries.
    case contentAware = 1

    /// The name used in configuration (`[chunking] algorithm`) and on the command line.
    public var description: String {
        switch self {
        case .fixed: return "fixed"
        case .contentAware: return "content_aware"
        }
    }

    /// Parses `fixed` or `content_aware`.
    public init?(name: String) {
        switch name {
        case "fixed": self = .fixed
        case "content_aware": self = .contentAware
        default: return nil
        }
    }
}

/// The algorithm and its sizes. Together with the bytes, these determine every cut point:
/// the same object chunks identically on every machine (see the Chunking article).
///
/// Read-only once made: the cut loop relies on the checked bounds (it reads from `min - 64`).
public struct ChunkingParameters: Sendable, Hashable, CustomStringConvertible {
    /// Content-defined or fixed.
    public private(set) var algorithm: ChunkingAlgorithm
    /// No chunk but the last is shorter than this (content-aware: every non-final chunk is longer).
    public private(set) var minSize: Int
    /// Target average; a power of two, because the hash masks are derived from its log2.
    /// Fixed chunking uses it as the chunk size.
    public private(set) var avgSize: Int
    /// No chunk is longer than this.
    public private(set) var maxSize: Int

    /// Smallest allowed `minSize`: the rolling-hash window is 64 bytes, and the window of the
    /// first tested position must lie inside the chunk.
    public static let smallestMinSize = 64
    /// Largest allowed `maxSize` (1 GiB): chunk lengths travel as 32-bit integers in manifests,
    /// and the streaming chunker holds one maximal chunk in memory.
    public static let largestMaxSize = 1 << 30
    /// Smallest allowed `avgSize`: `avg/4` must still leave a mask of at least six bits.
    public static let smallestAvgSize = 256

    /// The project defaults: content-aware, 64 KiB / 256 KiB / 1 MiB.
    public static let `default` = ChunkingParameters(
        uncheckedAlgorithm: .contentAware, minSize: 64 << 10, avgSize: 256 << 10, maxSize: 1 << 20)

    /// Validates `min < avg < max`, `avg` a power of two and the bounds above.
    public init(algorithm: ChunkingAlgorithm = .contentAware, minSize: Int, avgSize: Int, maxSize: Int) throws(ChunkingParameterError) {
        if let error = Self.check(minSize: minSize, avgSize: avgSize, maxSize: maxSize) { throw error }
        self.init(uncheckedAlgorithm: algorithm, minSize: minSize, avgSize: avgSize, maxSize: maxSize)
    }

    init(uncheckedAlgorithm: ChunkingAlgorithm, minSize: Int, avgSize: Int, maxSize: Int) {
        self.algorithm = uncheckedAlgorithm
        self.minSize = minSize
        self.avgSize = avgSize
        self.maxSize = maxSize
    }

    /// What is wrong with these sizes (nil: they make valid parameters); config validation
    /// asks the same question before a node starts.
    public static func problem(minSize: Int, avgSize: Int, maxSize: Int) -> String? {
        check(minSize: minSize, avgSize: avgSize, maxSize: maxSize)?.message
    }

    /// The first rule these sizes break, or nil.
    static func check(minSize: Int, avgSize: Int, maxSize: Int) -> ChunkingParameterError? {
        typealias E = ChunkingParameterError
        if minSize < smallestMinSize { return E(.minTooSmall, "min \(minSize) is below \(smallestMinSize) bytes (the rolling-hash window)") }
        if avgSize < smallestAvgSize { return E(.avgTooSmall, "avg \(avgSize) is below \(smallestAvgSize) bytes") }
        if avgSize & (avgSize - 1) != 0 { return E(.avgNotPowerOfTwo, "avg \(avgSize) is not a power of two") }
        if maxSize > largestMaxSize { return E(.maxTooLarge, "max \(maxSize) is above \(largestMaxSize) bytes (1 GiB)") }
        if !(minSize < avgSize && avgSize < maxSize) { return E(.notOrdered, "expected min < avg < max, got \(minSize) / \(avgSize) / \(maxSize)") }
        return nil
    }

    /// log2(avg).
    var avgBits: Int { Int.bitWidth - 1 - avgSize.leadingZeroBitCount }

    /// Tested while the chunk is at most `avg` long: the top log2(avg)+2 bits of the hash must
    /// be zero, so a cut is 4× less likely than 1/avg (normalized chunking, level 2).
    var maskBeforeAvg: UInt64 { ~UInt64(0) << UInt64(64 - (avgBits + 2)) }
    /// Tested once the chunk is longer than `avg`: the top log2(avg)-2 bits, 4× more likely.
    var maskAfterAvg: UInt64 { ~UInt64(0) << UInt64(64 - (avgBits - 2)) }

    /// `content_aware 65536/262144/1048576`.
    public var description: String { "\(algorithm) \(minSize)/\(avgSize)/\(maxSize)" }
}

/// Sizes that `ChunkingParameters` refuses; the message names the value and the rule.
///
/// A struct with a nested `Code` (static members) so codes can be added without breaking
/// callers that switch on them.
public struct ChunkingParameterError: Error, Hashable, Sendable, CustomStringConvertible {
    /// Which rule the sizes break.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// Stable name, e.g. `avg_not_power_of_two`.
        public let name: String
        /// Creates a code; STOQ's own are the static members.
        public init(name: String) { self.name = name }
        /// `min` is below `ChunkingParameters.smallestMinSize`.
        public static let minTooSmall = Code(name: "min_too_small")
        /// `avg` is below `ChunkingParameters.smallestAvgSize`.
        public static let avgTooSmall = Code(name: "avg_too_small")
        /// `avg` is not a power of two.
        public static let avgNotPowerOfTwo = Code(name: "avg_not_power_of_two")
        /// `max` is above `ChunkingParameters.largestMaxSize`.
        public static let maxTooLarge = Code(name: "max_too_large")
        /// Not `min < avg < max`.
        public static let notOrdered = Code(name: "not_ordered")
        public var description: String { name }
    }

    /// The rule broken.
    public let code: Code
    /// What was wrong, e.g. `avg 300000 is not a power of two`.
    public let message: String
    /// Creates an error.
    public init(_ code: Code, _ message: String) { self.code = code; self.message = message }
    /// The message.
    public var description: String { message }
}
