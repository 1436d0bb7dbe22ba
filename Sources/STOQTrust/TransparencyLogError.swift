/// Why a transparency log or Merkle tree operation failed, or what a reload had to repair.
public struct TransparencyLogError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The kind of failure; `message` says what exactly.
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        /// The stable name (what logs and JSON print).
        public let rawValue: String
        /// Wraps a name; STOQ's own codes are the static members.
        public init(rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }
        /// A tree size beyond the log, or an old size larger than the new one.
        public static let invalidTreeSize = Code(rawValue: "invalidTreeSize")
        /// A leaf index outside the tree.
        public static let invalidLeafIndex = Code(rawValue: "invalidLeafIndex")
        /// The last record of the log file was incomplete (a crash mid-append); the log
        /// truncated it and carried on. Reported, not thrown.
        public static let tornRecordTruncated = Code(rawValue: "tornRecordTruncated")
        /// A complete record fails its hash (or claims an impossible length), wherever it is
        /// in the file: history cannot be trusted, so the log refuses to open rather than
        /// silently drop the entry and reuse its index.
        public static let corruptRecord = Code(rawValue: "corruptRecord")
        /// The file does not start with the log's magic bytes.
        public static let badHeader = Code(rawValue: "badHeader")
        /// An entry is larger than a record can hold.
        public static let entryTooLarge = Code(rawValue: "entryTooLarge")
        /// A read, write, fsync or truncate failed.
        public static let io = Code(rawValue: "io")
    }

    /// The kind of failure.
    public var code: Code
    /// A sentence naming the file, offset or size involved.
    public var message: String

    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }
}
