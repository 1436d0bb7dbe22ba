import ArgumentParser
import Foundation

/// Where a download is written before it is whole: a new file beside the target, named
/// `TARGET.XXXXXX.part` (unique, made with O_EXCL, never through a link), renamed over the
/// target once the body is complete. Two runs writing one target never share it, and a
/// plain download never touches `TARGET.part`, where an interrupted `--chunked` one keeps
/// the chunks it will resume from. The file takes the mode the target has if it exists
/// (0666 less the umask if not), so replacing a 0600 file does not widen it.
///
/// A run interrupted by SIGINT, SIGTERM or SIGHUP removes the part files it has not placed
/// yet before it dies, as a failed one does.
struct PartFile {
    let fd: Int32
    let path: String
    /// Where `path` is kept (a C string) for the signal handler, until placed or dropped.
    private let slot: Int

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
        return PartFile(fd: fd, path: path, slot: Unplaced.keep(path))
    }

    /// Puts the whole body in place: the part file becomes `target`.
    func place(at target: String) throws(ExitCode) {
        if let e = rename(to: target) {
            discard()
            throw fail("-o \(target): cannot put the body in place (from \(path)): \(e)")
        }
    }

    /// Flushes the part file to its disk, then renames it to `target` (so a crash after the
    /// rename leaves the whole body there, never a short file, as `--chunked` does): nil, or
    /// why not (the part file is still there).
    func rename(to target: String) -> String? {
        guard fsync(fd) == 0 else { return "fsync: \(String(cString: strerror(errno)))" }
        guard Glibc.rename(path, target) == 0 else { return String(cString: strerror(errno)) }
        Unplaced.forget(slot)
        return nil
    }

    /// Drops the part file (the download failed).
    func discard() {
        unlink(path)
        Unplaced.forget(slot)
    }

    /// `path` with its links followed, also to a file not made yet (a link naming nothing);
    /// `path` itself when it is no link, or the links go round.
    static func resolvingLinks(_ path: String) -> String {
        if let real = realpath(path, nil) {
            defer { free(real) }
            return String(cString: real)
        }
        var at = path
        for _ in 0..<40 {
            var buffer = [CChar](repeating: 0, count: Int(PATH_MAX))
            let n = buffer.withUnsafeMutableBufferPointer { readlink(at, $0.baseAddress!, $0.count) }
            guard n > 0 else { return at }
            let named = String(decoding: buffer.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
            let directory = (at as NSString).deletingLastPathComponent
            at = named.hasPrefix("/") || directory.isEmpty ? named : directory + "/" + named
        }
        return path
    }
}

/// The part files not placed yet, as C strings a signal handler can unlink (it may call
/// nothing else): a fixed table, filled on the one thread that makes and places them.
private enum Unplaced {
    static let capacity = 4096
    nonisolated(unsafe) static let paths = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(capacity: capacity)
    nonisolated(unsafe) static var used = 0
    nonisolated(unsafe) static var armed = false

    /// Keeps `path` for the handler; its slot (-1: the table is full, it is not kept).
    static func keep(_ path: String) -> Int {
        if !armed {
            armed = true
            paths.initialize(repeating: nil, count: capacity)
            // Not over a signal ignored (nohup, a background job of a script): it stays ignored.
            for sig in [SIGINT, SIGTERM, SIGHUP] {
                var now = sigaction()
                guard sigaction(sig, nil, &now) == 0 else { continue }
                let ignored = now.__sigaction_handler.sa_handler.map { unsafeBitCast($0, to: Int.self) == unsafeBitCast(SIG_IGN, to: Int.self) }
                if ignored != true { signal(sig, onSignal) }
            }
        }
        guard let slot = (0..<capacity).first(where: { paths[$0] == nil }) else { return -1 }
        paths[slot] = strdup(path)
        used = max(used, slot + 1)
        return slot
    }

    static func forget(_ slot: Int) {
        guard slot >= 0, let p = paths[slot] else { return }
        paths[slot] = nil
        free(p)
    }
}

/// Unlinks every part file not placed yet, then dies of the signal as it would have.
private func onSignal(_ sig: Int32) {
    for i in 0..<Unplaced.used { if let p = Unplaced.paths[i] { unlink(p) } }
    signal(sig, SIG_DFL)
    raise(sig)
}
