#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

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
    func replace(_ name: String, tempName: String, with bytes: UnsafeRawBufferPointer, durable: Bool = true) throws {
        let tfd = openat(fd, tempName, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard tfd >= 0 else { throw StoreError.io("create", path + "/" + tempName) }
        var open = true
        do {
            try Self.writeAll(tfd, bytes, path: path + "/" + tempName)
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
        if durable { try sync() }
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

    static func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, path: String) throws {
        var done = 0
        while done < bytes.count {
            let n = write(fd, bytes.baseAddress! + done, bytes.count - done)
            if n > 0 { done += n; continue }
            if n < 0, errno == EINTR { continue }
            throw StoreError.io("write", path)
        }
    }

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
