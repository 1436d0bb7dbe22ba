import Glibc

/// A file read whole, or why not in the system's words: a missing token file and an
/// unreadable one are different repairs, and "cannot be read" names neither.
public enum FileContents {
    /// The bytes of the file at `path`; the error is `strerror` of what failed
    /// ("No such file or directory", "Permission denied", "Is a directory").
    public static func read(_ path: String) -> Result<[UInt8], FileReadError> {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return .failure(FileReadError(errno: errno)) }
        defer { close(fd) }
        var bytes = [UInt8](), chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n == 0 { return .success(bytes) }
            if n < 0 {
                if errno == EINTR { continue }
                return .failure(FileReadError(errno: errno))
            }
            bytes += chunk[..<n]
        }
    }
}

/// Why `FileContents.read` failed: the errno, shown as `strerror` says it.
public struct FileReadError: Error, Sendable, Equatable, CustomStringConvertible {
    public let errno: Int32
    public init(errno: Int32) { self.errno = errno }
    public var description: String { String(cString: strerror(errno)) }
}
