#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Why a chunk store or object index operation failed.
public struct StoreError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The kind of failure; `message` says what exactly.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// The code's name, as it appears in logs.
        public let name: String
        private init(_ name: String) { self.name = name }
        public var description: String { name }

        /// Bytes given for a chunk do not hash to the id they were given under.
        public static let digestMismatch = Code("digestMismatch")
        /// A stored chunk's bytes no longer match its id. The copy was quarantined, never returned.
        public static let corrupt = Code("corrupt")
        /// The store does not have the chunk (and no `ChunkSource` could supply it).
        public static let chunkNotFound = Code("chunkNotFound")
        /// A chunk larger than the store's `maxChunkSize`.
        public static let chunkTooLarge = Code("chunkTooLarge")
        /// An object name that is not one path segment of `[A-Za-z0-9._-]` not starting with a dot.
        public static let invalidObjectName = Code("invalidObjectName")
        /// An object refers to chunks the store does not have; the message lists them.
        public static let missingChunks = Code("missingChunks")
        /// No object of that name.
        public static let objectNotFound = Code("objectNotFound")
        /// An object record on disk is damaged (bad magic, length or checksum).
        public static let corruptRecord = Code("corruptRecord")
        /// Another process has the store directory open.
        public static let locked = Code("locked")
        /// A system call failed; the message names the call, the path and errno.
        public static let io = Code("io")
        /// The filesystem is full (ENOSPC), or the process's disk quota is used up (EDQUOT).
        /// Nothing was stored and no temp file is left; the same write can succeed once space
        /// returns. The message says what was being stored and how far it got; a server
        /// answers `507 Insufficient Storage` with it.
        public static let noSpace = Code("noSpace")
    }

    /// The kind of failure.
    public var code: Code
    /// A sentence naming the chunk, object, file or digest involved.
    public var message: String

    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }

    /// An `.io` error for the call that just failed, naming the path and `errno` (`.noSpace`
    /// when the errno says the filesystem or the quota is full).
    static func io(_ call: String, _ path: String, errno e: Int32 = errno) -> StoreError {
        StoreError(isNoSpace(e) ? .noSpace : .io, "\(call) \(path): \(String(cString: strerror(e))) (errno \(e))")
    }

    /// Whether `errno` means "no room to write": ENOSPC, or EDQUOT (a quota, same remedy).
    public static func isNoSpace(_ e: Int32) -> Bool { e == ENOSPC || e == EDQUOT }

    /// What a file of `mode` (`st_mode`) is, for a message about a file that should be a regular
    /// one: "a FIFO", "a directory", …
    public static func fileKind(_ mode: mode_t) -> String {
        switch mode & S_IFMT {
        case S_IFREG: return "a regular file"
        case S_IFDIR: return "a directory"
        case S_IFIFO: return "a FIFO"
        case S_IFSOCK: return "a socket"
        case S_IFCHR: return "a character device"
        case S_IFBLK: return "a block device"
        case S_IFLNK: return "a symbolic link"
        default: return "a file of type \(String(mode & S_IFMT, radix: 8))"
        }
    }

    /// The `.noSpace` error a server sends back: "no space left on device while storing
    /// `what` (`written` bytes written)", with the quota named when that is what ran out.
    public static func noSpace(storing what: String, written: Int, errno e: Int32 = ENOSPC) -> StoreError {
        let cause = e == EDQUOT ? "disk quota exceeded" : "no space left on device"
        return StoreError(.noSpace, "\(cause) while storing \(what) (\(written) bytes written)")
    }
}
