import Foundation

/// The node's limit on open files. Every upload held in memory is a memory file, every GET of a
/// plain object opens it, every upload to disk a temp file: a busy node needs thousands of
/// descriptors, and systemd starts a service with a soft limit of 1024 (its hard one is far
/// higher, 524,288 on Debian 12). As Go's runtime and nginx's `worker_rlimit_nofile` do, the node
/// takes the hard limit for itself at start.
public enum OpenFiles {
    /// `RLIMIT_NOFILE`, as glibc's prototypes take it.
    package static let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)

    /// Raises the soft limit on open files to the hard one: the limits before and after, or nil
    /// when it was already there (or cannot be read or set).
    public static func raiseSoftLimit() -> (from: UInt64, to: UInt64)? {
        var l = rlimit()
        guard getrlimit(resource, &l) == 0, l.rlim_cur < l.rlim_max else { return nil }
        let from = UInt64(l.rlim_cur)
        l.rlim_cur = l.rlim_max
        guard setrlimit(resource, &l) == 0 else { return nil }
        return (from, UInt64(l.rlim_max))
    }
}
