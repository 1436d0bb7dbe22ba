/// An eviction policy over keys with sizes in bytes: which keys a bounded cache keeps.
/// Policies hold only keys and sizes, never the cached bytes; the cache that uses one
/// stores and deletes the data as the policy decides.
public protocol CachePolicy<Key> {
    associatedtype Key: Hashable
    /// Bound on the sum of resident sizes.
    var capacity: UInt64 { get }
    var usedBytes: UInt64 { get }
    var count: Int { get }
    func contains(_ key: Key) -> Bool
    /// Counts a hit on a resident key; false when the key is not resident.
    @discardableResult mutating func touch(_ key: Key) -> Bool
    /// Admits a key that is not resident, reporting each key it evicts to make room.
    /// Returns false when the policy declines it (larger than the cache).
    @discardableResult mutating func insert(_ key: Key, size: UInt64, evicted: (Key) -> Void) -> Bool
    /// Forgets a key without counting it as evicted.
    mutating func remove(_ key: Key)
}

extension CachePolicy {
    /// One request of a trace: a hit counts, a miss admits. Returns whether it hit.
    public mutating func request(_ key: Key, size: UInt64, evicted: (Key) -> Void = { _ in }) -> Bool {
        if touch(key) { return true }
        insert(key, size: size, evicted: evicted)
        return false
    }
}

/// Least recently used: the baseline. A doubly linked list threaded through a slab of
/// slots (indices, not references), so a hit is two index swaps and no allocation.
public struct LRU<Key: Hashable>: CachePolicy {
    struct Slot { var key: Key?; var size: UInt64; var prev: Int32; var next: Int32 }
    public let capacity: UInt64
    public private(set) var usedBytes: UInt64 = 0
    var slots: [Slot] = []
    var free: [Int32] = []
    var index: [Key: Int32] = [:]
    var head: Int32 = -1  // most recent
    var tail: Int32 = -1  // next to leave

    public init(capacity: UInt64) { self.capacity = capacity }
    public var count: Int { index.count }
    public func contains(_ key: Key) -> Bool { index[key] != nil }

    @discardableResult
    public mutating func touch(_ key: Key) -> Bool {
        guard let s = index[key] else { return false }
        unlink(s)
        pushFront(s)
        return true
    }

    @discardableResult
    public mutating func insert(_ key: Key, size: UInt64, evicted: (Key) -> Void) -> Bool {
        guard index[key] == nil else { return true }
        guard size <= capacity else { return false }
        while usedBytes + size > capacity, tail >= 0 {
            let t = tail
            let k = slots[Int(t)].key!
            index[k] = nil
            drop(t)
            evicted(k)
        }
        let s: Int32
        if let f = free.popLast() {
            s = f; slots[Int(s)] = Slot(key: key, size: size, prev: -1, next: -1)
        } else {
            s = Int32(slots.count)
            slots.append(Slot(key: key, size: size, prev: -1, next: -1))
        }
        index[key] = s
        usedBytes += size
        pushFront(s)
        return true
    }

    public mutating func remove(_ key: Key) {
        guard let s = index.removeValue(forKey: key) else { return }
        drop(s)
    }

    mutating func drop(_ s: Int32) {
        unlink(s)
        usedBytes -= slots[Int(s)].size
        slots[Int(s)].key = nil
        free.append(s)
    }

    mutating func unlink(_ s: Int32) {
        let p = slots[Int(s)].prev, n = slots[Int(s)].next
        if p >= 0 { slots[Int(p)].next = n } else { head = n }
        if n >= 0 { slots[Int(n)].prev = p } else { tail = p }
        slots[Int(s)].prev = -1
        slots[Int(s)].next = -1
    }

    mutating func pushFront(_ s: Int32) {
        slots[Int(s)].next = head
        slots[Int(s)].prev = -1
        if head >= 0 { slots[Int(head)].prev = s }
        head = s
        if tail < 0 { tail = s }
    }
}
