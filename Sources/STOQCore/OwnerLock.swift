#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One process's claim on a directory: an exclusive `flock` on a file in it, taken without
/// waiting and held while the descriptor stays open (the kernel lets go when the process
/// dies). The node's data directory (`node.lock`) and each chunk store (`lock`) have one.
public enum OwnerLock {
    /// Why the lock was not taken.
    public enum Failure: Error, Equatable {
        /// Another descriptor holds it: another process, or another owner in this one.
        case held
        /// `step` (`open`, `flock`) failed with `errno`.
        case failed(step: String, errno: Int32)

        /// `strerror` of a failed step ("held" for `held`).
        public var reason: String {
            switch self {
            case .held: return "held"
            case .failed(let step, let e): return "\(step): \(String(cString: strerror(e)))"
            }
        }
    }

    /// Opens (creating it, mode 0644) and locks `path`, relative to the directory `dirFD` when
    /// it is not absolute: the descriptor to keep open for as long as the claim lasts.
    public static func take(_ path: String, relativeTo dirFD: Int32 = AT_FDCWD) throws(Failure) -> Int32 {
        let fd = openat(dirFD, path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw .failed(step: "open", errno: errno) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let e = errno
            close(fd)
            throw e == EWOULDBLOCK ? .held : .failed(step: "flock", errno: e)
        }
        return fd
    }
}
