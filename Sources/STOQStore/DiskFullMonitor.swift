import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Writes refused because the filesystem under the node's data was full, for the whole node:
/// every writer (the chunk store, the object index, plain uploads, the edge cache) reports to
/// one instance.
///
/// Every refusal is counted (`stoq_store_disk_full_total`). The log gets one warning when an
/// episode starts (the first refusal after a write that succeeded) and one notice when it ends
/// (the first write that succeeds after it), not a line per request. Nothing here refuses or
/// delays a write: each one is tried, so the node stores again as soon as space returns, and
/// the episode state only decides what to log.
///
/// Thread-safe and lock-free (workers report from their own threads).
public final class DiskFullMonitor: Sendable {
    private let refusalCount = Atomic<UInt64>(0)
    private let episodeCount = Atomic<UInt64>(0)
    private let inEpisode = Atomic<Bool>(false)
    private let logger: Logger

    /// A monitor logging to `logger`.
    public init(logger: Logger = Logger(label: "stoq.store")) { self.logger = logger }

    /// Writes refused for want of space since the start.
    public var refusals: UInt64 { refusalCount.load(ordering: .relaxed) }
    /// Episodes: runs of refusals with no successful write between them.
    public var episodes: UInt64 { episodeCount.load(ordering: .relaxed) }
    /// Whether the last write reported was refused (the disk is full as far as the node knows).
    public var full: Bool { inEpisode.load(ordering: .relaxed) }

    /// A write refused for want of space; `message` says what was being stored (logged only
    /// when it starts an episode).
    public func refused(_ message: String) {
        refusalCount.add(1, ordering: .relaxed)
        if inEpisode.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged {
            episodeCount.add(1, ordering: .relaxed)
            logger.warning(
                "disk full: writes are refused with 507 until space returns (logged once per episode; stoq_store_disk_full_total counts them)",
                metadata: ["first": "\(message)"])
        }
    }

    /// A write that succeeded: ends an episode if one is on. One relaxed load when none is.
    public func stored() {
        guard inEpisode.load(ordering: .relaxed) else { return }
        if inEpisode.compareExchange(expected: true, desired: false, ordering: .relaxed).exchanged {
            logger.notice("disk space is back: writes succeed again", metadata: ["refused_so_far": "\(refusals)"])
        }
    }

    /// Reports `error` if it is a write refused for want of space (a `.noSpace` `StoreError`,
    /// or any error whose text carries the ENOSPC/EDQUOT message, as the cache's index files
    /// report it). Returns whether it was.
    @discardableResult
    public func refusedIfNoSpace(_ error: any Error) -> Bool {
        if let e = error as? StoreError {
            guard e.code == .noSpace else { return false }
            refused(e.message)
            return true
        }
        let text = "\(error)"
        guard Self.noSpaceTexts.contains(where: { text.contains($0) }) else { return false }
        refused(text)
        return true
    }

    private static let noSpaceTexts = [ENOSPC, EDQUOT].map { String(cString: strerror($0)) }
}
