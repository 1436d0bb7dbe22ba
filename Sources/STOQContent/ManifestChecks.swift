import Foundation

/// The manifest PUTs whose chunks the store threads are reading back and hashing, all workers
/// together, and the one bound on them.
///
/// Verifying a manifest is a pass over its whole object (`ContentService.digestRefusal`): up
/// to `storage.max_object_size` read and hashed on one of the store threads, which every
/// worker's chunk PUTs are written on too. Unbounded, many manifest PUTs at once naming large
/// objects whose chunks are stored (any client can name chunks it did not send) would take all
/// of those threads and hold every upload's chunk writes behind them. So at most `limit` are
/// queued or running at once, and one past that is answered 503 with `Retry-After` before
/// anything of it is read (`ContentService` counts those in `Counters.manifestChecksBusy`).
///
/// One per node, shared by its workers; taken and given back once a manifest PUT.
public final class ManifestChecks: @unchecked Sendable {
    /// Verifications queued or running at once, at most.
    public let limit: Int
    private let lock = NSLock()
    private var taken = 0

    /// The bound for store threads numbering `storeThreads`: half of them, at least one, so
    /// that chunk writes keep the other half (and on a node with one store thread, wait behind
    /// at most one manifest).
    public static func limit(storeThreads: Int) -> Int { max(1, storeThreads / 2) }

    /// Seconds a refused client is asked to wait (`Retry-After`): about what verifying a
    /// manifest of a gigabyte takes on one thread.
    public static let retryAfter = 1

    /// At most `limit` (at least one) verifications at once.
    public init(limit: Int) { self.limit = max(1, limit) }

    /// Verifications queued or running now.
    public var inFlight: Int { lock.withLock { taken } }

    /// Takes a place for one verification: false (nothing taken) when `limit` are under way.
    public func begin() -> Bool {
        lock.withLock {
            guard taken < limit else { return false }
            taken += 1
            return true
        }
    }

    /// Gives back the place `begin` took, once the verification (and the commit) ended.
    public func end() { lock.withLock { taken -= min(taken, 1) } }
}
