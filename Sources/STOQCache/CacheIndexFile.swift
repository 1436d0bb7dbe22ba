#if canImport(Glibc)
import Glibc
#endif

/// The on-disk form of a policy's entries (resident, and ghost keys), so that a cache's index survives a
/// restart: written whole to a temp file, fsynced, renamed over the old one and the
/// directory fsynced, so a crash leaves either the previous snapshot or the new one.
///
/// Format: `STOQCIX1`, entry count (UInt64 LE), key length (UInt32 LE), then per entry
/// key bytes, size (UInt64 LE), frequency (UInt8), queue (UInt8: 0 small, 1 main, 2 ghost); last an FNV-1a 64 of
/// everything before it (UInt64 LE), which catches a torn or edited file.
public enum CacheIndexFile {
    static let magic = Array("STOQCIX1".utf8)

    /// Why an index file could not be read, decoded or written.
    ///
    /// A struct with a nested `Code` (static members) so codes can be added without breaking
    /// callers that switch on them.
    public struct Error: Swift.Error, Sendable, Equatable, CustomStringConvertible {
        /// The kind of failure; `message` says what exactly.
        public struct Code: Hashable, Sendable, CustomStringConvertible {
            /// Stable name.
            public let name: String
            /// Creates a code; STOQ's own are the static members.
            public init(name: String) { self.name = name }
            /// Not an index file, torn, edited, or with a key the caller refuses.
            public static let corrupt = Code(name: "corrupt")
            /// Opening, writing, renaming or reading the file failed.
            public static let io = Code(name: "io")
            public var description: String { name }
        }

        /// The kind of failure.
        public var code: Code
        /// The file or byte offset and what was wrong there.
        public var message: String
        /// Creates an error.
        public init(_ code: Code, _ message: String) { self.code = code; self.message = message }
        public var description: String { message }
    }

    public static func encode<K>(_ entries: [S3FIFO<K>.Entry], keyLength: Int, keyBytes: (K) -> [UInt8]) -> [UInt8] {
        var out = magic
        out.reserveCapacity(24 + entries.count * (keyLength + 10))
        append(&out, UInt64(entries.count))
        append(&out, UInt32(keyLength))
        for e in entries {
            let k = keyBytes(e.key)
            precondition(k.count == keyLength)
            out += k
            append(&out, e.size)
            out.append(e.frequency)
            out.append(e.queue.rawValue)
        }
        append(&out, fnv1a(out[...]))
        return out
    }

    public static func decode<K>(_ bytes: [UInt8], key: (ArraySlice<UInt8>) -> K?) throws(Error) -> [S3FIFO<K>.Entry] {
        guard bytes.count >= 28, Array(bytes[0..<8]) == magic else { throw Error(.corrupt, "not a cache index (bad magic)") }
        let body = bytes[0..<bytes.count - 8]
        guard read64(bytes, bytes.count - 8) == fnv1a(body) else { throw Error(.corrupt, "cache index checksum mismatch") }
        let n = read64(bytes, 8), klen = Int(read32(bytes, 16))
        let per = klen + 10
        guard klen > 0, klen <= 1024, n <= UInt64((bytes.count - 28) / per), 20 + Int(n) * per == body.count else {
            throw Error(.corrupt, "cache index length does not match its entry count \(n)")
        }
        var out: [S3FIFO<K>.Entry] = []
        out.reserveCapacity(Int(n))
        var at = 20
        for _ in 0..<Int(n) {
            guard let k = key(bytes[at..<at + klen]) else { throw Error(.corrupt, "cache index: bad key at byte \(at)") }
            let size = read64(bytes, at + klen)
            guard let q = S3FIFO<K>.Queue(rawValue: bytes[at + klen + 9]) else {
                throw Error(.corrupt, "cache index: bad queue \(bytes[at + klen + 9]) at byte \(at + klen + 9)")
            }
            out.append(.init(key: k, size: size, frequency: bytes[at + klen + 8], queue: q))
            at += per
        }
        return out
    }

    /// Writes `bytes` to `path` crash-safely (temp, fsync, rename, directory fsync).
    public static func write(_ bytes: [UInt8], to path: String) throws(Error) {
        try stage(bytes, for: path).commit()
        syncDirectory(of: path)
    }

    /// How the name of a temp file beside a file of this kind starts: with a dot, as no object
    /// name may (`ObjectIndex.validateName`), so that it never names another file of a
    /// directory named by objects, whose loader removes leftovers by it.
    public static let tempPrefix = ".tmp-"

    /// `bytes` written and fsynced beside the file they are for, under a temp name of their
    /// own; `commit` renames them over it, `discard` removes them. A caller that mirrors the
    /// file in memory commits or discards in the same critical section as it changes the
    /// memory, so that two writers (or a writer and a remover) leave the file as they leave
    /// the memory.
    public struct Staged: Sendable {
        /// The file the bytes are for.
        public let path: String
        let temp: String

        /// Puts the bytes in place (a rename); throws, after removing the temp file, if it fails.
        public func commit() throws(Error) {
            guard rename(temp, path) == 0 else {
                let e = String(cString: strerror(errno))
                unlink(temp)
                throw Error(.io, "\(path): \(e)")
            }
        }

        /// Removes the temp file, leaving the file as it was.
        public func discard() { unlink(temp) }
    }

    /// Writes and fsyncs `bytes` to a temp file beside `path` (see `Staged`).
    public static func stage(_ bytes: [UInt8], for path: String) throws(Error) -> Staged {
        let slash = path.lastIndex(of: "/").map { path.index(after: $0) } ?? path.startIndex
        let temp = path[..<slash] + tempStem(String(path[slash...])) + String(UInt64.random(in: 0...UInt64.max), radix: 16)
        let fd = open(temp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw Error(.io, "\(temp): \(String(cString: strerror(errno)))") }
        var ok = bytes.withUnsafeBytes { b in
            var off = 0
            while off < b.count {
                let n = Glibc.write(fd, b.baseAddress! + off, b.count - off)
                if n < 0 { if errno == EINTR { continue }; return false }
                off += n
            }
            return true
        }
        ok = ok && fsync(fd) == 0
        let e = String(cString: strerror(errno))
        close(fd)
        guard ok else {
            unlink(temp)
            throw Error(.io, "\(path): \(e)")
        }
        return Staged(path: path, temp: temp)
    }

    /// How the temp files of the file named `base` start: the name cut to 200 bytes (an object
    /// name may have 255, the most a file name may), so that the temp's name fits too.
    static func tempStem(_ base: String) -> String { tempPrefix + String(decoding: base.utf8.prefix(200), as: UTF8.self) + "-" }

    /// Removes the temp files a crash left beside `path` (staged, never committed or discarded).
    public static func removeTemps(of path: String) {
        let slash = path.lastIndex(of: "/")
        let dir = slash.map { String(path[..<$0]) } ?? "."
        let prefix = tempStem(slash.map { String(path[path.index(after: $0)...]) } ?? path)
        guard let d = opendir(dir.isEmpty ? "/" : dir) else { return }
        defer { closedir(d) }
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            if name.hasPrefix(prefix) { unlink(dir + "/" + name) }
        }
    }

    /// Fsyncs the directory of `path`, so that a rename or unlink in it survives a crash.
    public static func syncDirectory(of path: String) {
        let dir = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        let dfd = open(dir.isEmpty ? "/" : dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0 { fsync(dfd); close(dfd) }
    }

    /// The file's bytes, or nil when there is none.
    public static func read(_ path: String) throws(Error) -> [UInt8]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 {
            if errno == ENOENT { return nil }
            throw Error(.io, "\(path): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        var st = stat()
        fstat(fd, &st)
        var out = [UInt8](repeating: 0, count: Int(st.st_size))
        let n = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        guard n == out.count else { throw Error(.io, "\(path): short read") }
        return out
    }

    static func append(_ out: inout [UInt8], _ v: UInt64) { for i in 0..<8 { out.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    static func append(_ out: inout [UInt8], _ v: UInt32) { for i in 0..<4 { out.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    static func read64(_ b: [UInt8], _ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(b[at + $1]) << (8 * $1) } }
    static func read32(_ b: [UInt8], _ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[at + $1]) << (8 * $1) } }
    static func fnv1a(_ b: ArraySlice<UInt8>) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for x in b { h = (h ^ UInt64(x)) &* 0x100_0000_01b3 }
        return h
    }
}
