import ArgumentParser
import Foundation

/// Where a download is written before it is whole: a new file beside the target, named
/// `TARGET.XXXXXX.part` (unique, made with O_EXCL, never through a link), renamed over the
/// target once the body is complete. Two runs writing one target never share it, and a
/// plain download never touches `TARGET.part`, where an interrupted `--chunked` one keeps
/// the chunks it will resume from. The file takes the mode the target has if it exists
/// (0666 less the umask if not), so replacing a 0600 file does not widen it.
struct PartFile {
    let fd: Int32
    let path: String

    /// Makes the part file for `target`; the error names what failed and why.
    static func create(for target: String) throws(ExitCode) -> PartFile {
        var template = Array((target + ".XXXXXX.part").utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemps($0.baseAddress!, 5) }
        let path = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        guard fd >= 0 else { throw fail("-o \(target): cannot make \(path): \(String(cString: strerror(errno)))") }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        var st = stat()
        let mode: mode_t
        if stat(target, &st) == 0 {
            mode = st.st_mode & 0o7777
        } else {
            let mask = umask(0)
            umask(mask)
            mode = 0o666 & ~mask
        }
        fchmod(fd, mode)
        return PartFile(fd: fd, path: path)
    }

    /// Puts the whole body in place: the part file becomes `target`.
    func place(at target: String) throws(ExitCode) {
        guard rename(path, target) == 0 else {
            let e = String(cString: strerror(errno))
            unlink(path)
            throw fail("-o \(target): cannot put the body in place (from \(path)): \(e)")
        }
    }

    /// Drops the part file (the download failed).
    func discard() { unlink(path) }
}
