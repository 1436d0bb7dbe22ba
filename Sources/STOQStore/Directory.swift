#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// How a node opens a stored name to read it (an object's file or record, a chunk): never
/// through a symbolic link, and without blocking — O_NONBLOCK, because a FIFO left under that
/// name would otherwise hold the opening thread (a worker serving a GET, a store thread holding
/// the shared lock, the collector) in open(2) until something opened it for writing. It changes
/// nothing for a regular file; each caller refuses any other kind after its fstat.
public enum StoredFile {
    public static let readFlags = O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK
}

/// An open directory and the few things the store does inside one: atomic replace of a
/// file, reading a file whole, listing names. Everything is relative to the descriptor so
/// a path is built once per directory, not once per file.
final class Directory {
    let fd: Int32
    /// For messages only.
    let path: String

    /// Opens `name` inside `parent` (or the absolute `name` when `parent` is nil),
    /// creating it first when `create` is set.
    init(_ name: String, in parent: Directory? = nil, create: Bool = false) throws {
        let base = parent?.fd ?? AT_FDCWD
        path = parent.map { $0.path + "/" + name } ?? name
        if create, mkdirat(base, name, 0o755) != 0, errno != EEXIST {
            throw StoreError.io("mkdir", path)
        }
        fd = openat(base, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw StoreError.io("open", path) }
    }

    deinit { close(fd) }

    /// Makes the directory's entries (creations, renames, removals) durable.
    func sync() throws {
        guard fsync(fd) == 0 else { throw StoreError.io("fsync", path) }
    }

    /// Replaces `name` with `bytes` so that a crash at any moment leaves either the old
    /// file or the complete new one: write a temp file in this directory, fsync it,
    /// rename it over `name`, fsync the directory. `tempName` must be a name the store
    /// recognises as a temp file, so recovery can remove it.
    /// Without `durable` (a cache, whose reads verify every byte anyway) nothing is fsynced:
    /// the rename still makes the file appear whole or not at all while the system runs.
    ///
    /// Any step may find the filesystem full (the create, a write, fsync or close on
    /// filesystems that allocate late, the rename when the directory must grow): that throws
    /// `.noSpace` naming `what` and the bytes written, after removing the temp file, so a full
    /// disk leaves nothing behind. A directory fsync that fails after the rename throws too,
    /// but the new file is then already in place.
    /// `write` is `write(2)` unless a test makes the disk fill at a chosen byte.
    func replace(
        _ name: String, tempName: String, with bytes: UnsafeRawBufferPointer, durable: Bool = true, what: String? = nil,
        write: (Int32, UnsafeRawPointer, Int) -> Int = systemWrite
    ) throws {
        var written = 0
        do {
            try replaceSteps(name, tempName: tempName, with: bytes, durable: durable, written: &written, write: write)
        } catch let e as StoreError where e.code == .noSpace {
            throw StoreError.noSpace(storing: what ?? name, written: written, errno: e.message.contains("(errno \(EDQUOT))") ? EDQUOT : ENOSPC)
        }
        if durable { try sync() }
    }

    private func replaceSteps(
        _ name: String, tempName: String, with bytes: UnsafeRawBufferPointer, durable: Bool, written: inout Int,
        write: (Int32, UnsafeRawPointer, Int) -> Int
    ) throws {
        let tfd = openat(fd, tempName, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard tfd >= 0 else { throw StoreError.io("create", path + "/" + tempName) }
        var open = true
        do {
            try Self.writeAll(tfd, bytes, path: path + "/" + tempName, written: &written, using: write)
            // Data durable before the name points at it.
            guard !durable || fsync(tfd) == 0 else { throw StoreError.io("fsync", path + "/" + tempName) }
            open = false
            guard close(tfd) == 0 else { throw StoreError.io("close", path + "/" + tempName) }
            guard renameat(fd, tempName, fd, name) == 0 else { throw StoreError.io("rename", path + "/" + name) }
        } catch {
            if open { close(tfd) }
            unlinkat(fd, tempName, 0)
            throw error
        }
    }

    /// Reads the regular file `fd` refers to whole, with one buffer of its size and as few
    /// `pread`s as the kernel needs (one, for files in the page cache). A file that ends
    /// early yields fewer bytes, which the caller's digest check turns into "corrupt".
    static func readWhole(_ fd: Int32, size: Int, path: String) throws -> [UInt8] {
        var failure: StoreError?
        let bytes = [UInt8](unsafeUninitializedCapacity: size) { buf, count in
            var done = 0
            while done < size {
                let n = pread(fd, buf.baseAddress! + done, size - done, off_t(done))
                if n > 0 { done += n; continue }
                if n == 0 { break }
                if errno == EINTR { continue }
                failure = StoreError.io("read", path)
                break
            }
            count = done
        }
        if let failure { throw failure }
        return bytes
    }

    /// Writes all of `bytes`; `written` counts what the kernel took, also when it throws.
    static func writeAll(
        _ fd: Int32, _ bytes: UnsafeRawBufferPointer, path: String, written done: inout Int,
        using write: (Int32, UnsafeRawPointer, Int) -> Int = systemWrite
    ) throws {
        done = 0
        while done < bytes.count {
            let n = write(fd, bytes.baseAddress! + done, bytes.count - done)
            if n > 0 { done += n; continue }
            if n < 0, errno == EINTR { continue }
            // A write of 0 bytes to a regular file is a full disk by another name.
            throw StoreError.io("write", path, errno: n == 0 ? ENOSPC : errno)
        }
    }

    /// `write(2)`: what a store writes with unless its options name another.
    static let systemWrite: @Sendable (Int32, UnsafeRawPointer, Int) -> Int = { Glibc.write($0, $1, $2) }

    /// The names in the directory, without `.` and `..`.
    func names() throws -> [String] {
        // fdopendir takes ownership of the descriptor it is given, so give it a copy.
        let dfd = dup(fd)
        guard dfd >= 0, let dir = fdopendir(dfd) else {
            let e = errno
            throw StoreError.io("opendir", path, errno: e)
        }
        defer { closedir(dir) }
        rewinddir(dir)
        var out: [String] = []
        while let ent = readdir(dir) {
            let name = withUnsafePointer(to: &ent.pointee.d_name) {
                String(cString: UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self))
            }
            if name != ".", name != ".." { out.append(name) }
        }
        return out
    }

    /// `fstatat` of `name` without following symlinks; nil when it does not exist.
    func stat(_ name: String) throws -> Glibc.stat? {
        var st = Glibc.stat()
        if fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 { return st }
        if errno == ENOENT || errno == ENOTDIR { return nil }
        throw StoreError.io("stat", path + "/" + name)
    }
}
