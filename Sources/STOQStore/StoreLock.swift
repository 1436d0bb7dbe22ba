#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import STOQCore

/// The store's two locks.
///
/// Across processes: one process owns a store directory, by its `OwnerLock` on `<root>/lock`
/// held while the store is open.
///
/// Within that process: writes (chunk puts, object puts) take a shared lock and garbage
/// collection an exclusive one for each short turn of its sweep, so no put refreshes or names a
/// chunk between the turn's last look at it and its removal (`ObjectIndex.collect`).
/// Writer-preferring, so a steady stream of puts cannot starve GC.
/// Not reentrant: never call a store method that locks from inside a locked section.
final class StoreLock: @unchecked Sendable {
    private let rw: UnsafeMutablePointer<pthread_rwlock_t>
    private let lockFD: Int32

    init(root: Directory) throws {
        do { lockFD = try OwnerLock.take("lock", relativeTo: root.fd) } catch {
            guard case .failed(let step, let e) = error else {
                throw StoreError(
                    .locked, "store \(root.path) is already open (by another process, or by another ChunkStore in this one): \(root.path)/lock is locked")
            }
            throw StoreError.io(step, root.path + "/lock", errno: e)
        }
        rw = .allocate(capacity: 1)
        var attr = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(&attr, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        pthread_rwlock_init(rw, &attr)
        pthread_rwlockattr_destroy(&attr)
    }

    deinit {
        pthread_rwlock_destroy(rw)
        rw.deallocate()
        close(lockFD)
    }

    func shared<T>(_ body: () throws -> T) rethrows -> T {
        pthread_rwlock_rdlock(rw)
        defer { pthread_rwlock_unlock(rw) }
        return try body()
    }

    func exclusive<T>(_ body: () throws -> T) rethrows -> T {
        pthread_rwlock_wrlock(rw)
        defer { pthread_rwlock_unlock(rw) }
        return try body()
    }
}
