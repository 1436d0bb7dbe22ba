import Foundation
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
/// Every refusal is counted (`stoq_store_disk_full_total`). The log gets one warning per
/// episode, not a line per request: an episode starts with a refusal and ends with the first
/// write that succeeds once `quietPeriod` has passed without a refusal (then a notice says
/// space is back). The quiet period is there because a nearly full disk still takes small
/// writes (an index snapshot, a 64 KiB chunk) between refused large ones; without it every
/// such success would start a new episode and a new warning.
///
/// Nothing here refuses or delays a write: each one is tried, so the node stores again the
/// moment space returns; the episode only decides what is logged, and `full` only reports
/// whether the last write was refused.
///
/// Thread-safe (workers, the ingest pool and the edge fetcher report from their own threads);
/// a successful write costs one relaxed atomic load while no episode is on.
public final class DiskFullMonitor: @unchecked Sendable {
    /// How long without a refusal before a successful write ends an episode.
    public static let defaultQuietPeriod: Duration = .seconds(30)

    private let refusalCount = Atomic<UInt64>(0)
    private let episodeCount = Atomic<UInt64>(0)
    private let lastRefused = Atomic<Bool>(false)
    private let episodeOpen = Atomic<Bool>(false)
    private let lock = NSLock()
    private var lastRefusalAt: UInt64 = 0
    private let quietNanoseconds: UInt64
    private let now: @Sendable () -> UInt64
    private let logger: Logger

    /// A monitor logging to `logger`. `now` (monotonic nanoseconds) is replaceable for tests.
    public init(
        logger: Logger = Logger(label: "stoq.store"), quietPeriod: Duration = DiskFullMonitor.defaultQuietPeriod,
        now: @escaping @Sendable () -> UInt64 = { DispatchTime.now().uptimeNanoseconds }
    ) {
        self.logger = logger
        self.now = now
        let c = quietPeriod.components
        quietNanoseconds = UInt64(c.seconds) * 1_000_000_000 + UInt64(c.attoseconds / 1_000_000_000)
    }

    /// Writes refused for want of space since the start.
    public var refusals: UInt64 { refusalCount.load(ordering: .relaxed) }
    /// Episodes (each logged once) since the start.
    public var episodes: UInt64 { episodeCount.load(ordering: .relaxed) }
    /// Whether the last write reported was refused: the disk is full as far as the node knows.
    public var full: Bool { lastRefused.load(ordering: .relaxed) }

    /// A write refused for want of space; `message` says what was being stored (logged when
    /// it starts an episode).
    public func refused(_ message: String) {
        refusalCount.add(1, ordering: .relaxed)
        lastRefused.store(true, ordering: .relaxed)
        let t = now()
        let starts = lock.withLock {
            lastRefusalAt = t
            if episodeOpen.load(ordering: .relaxed) { return false }
            episodeOpen.store(true, ordering: .relaxed)
            return true
        }
        guard starts else { return }
        episodeCount.add(1, ordering: .relaxed)
        logger.warning(
            "disk full: writes are refused with 507 until space returns (one warning per episode; stoq_store_disk_full_total counts every refusal)",
            metadata: ["first": "\(message)"])
    }

    /// A write that succeeded.
    public func stored() {
        if lastRefused.load(ordering: .relaxed) { lastRefused.store(false, ordering: .relaxed) }
        guard episodeOpen.load(ordering: .relaxed) else { return }
        let t = now()
        let ends = lock.withLock {
            guard episodeOpen.load(ordering: .relaxed), t &- lastRefusalAt >= quietNanoseconds else { return false }
            episodeOpen.store(false, ordering: .relaxed)
            return true
        }
        if ends { logger.notice("disk space is back: writes succeed again", metadata: ["refused_so_far": "\(refusals)"]) }
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
