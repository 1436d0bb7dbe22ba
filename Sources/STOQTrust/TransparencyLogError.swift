/// Why a transparency log or Merkle tree operation failed, or what a reload had to repair.
public struct TransparencyLogError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The kind of failure; `message` says what exactly.
    public enum Code: String, Sendable, Equatable {
        /// A tree size beyond the log, or an old size larger than the new one.
        case invalidTreeSize
        /// A leaf index outside the tree.
        case invalidLeafIndex
        /// The last record of the log file was incomplete (a crash mid-append); the log
        /// truncated it and carried on. Reported, not thrown.
        case tornRecordTruncated
        /// A record before the end of the file is damaged: history cannot be trusted, so the
        /// log refuses to open rather than silently dropping entries.
        case corruptRecord
        /// The file does not start with the log's magic bytes.
        case badHeader
        /// An entry is larger than a record can hold.
        case entryTooLarge
        /// A read, write, fsync or truncate failed.
        case io
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
