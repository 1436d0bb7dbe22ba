import DequeModule

/// S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction", SOSP 2023):
/// a small FIFO that filters one-hit wonders, a main FIFO with lazy reinsertion (a
/// two-bit frequency instead of LRU's move-to-front), and a ghost FIFO of recently
/// filtered keys that admits a key straight to main when it comes back.
///
/// Sizes are bytes: each entry carries its own size and `capacity` bounds their sum.
/// A hit only bumps a counter (no queue movement), so hits are O(1) with no writes to
/// shared structure; queues are ring buffers of slab indices and slots are recycled, so
/// steady state allocates nothing beyond the key dictionary's own storage.
///
/// Pure and single-threaded: the caller serializes access (the edge cache holds a lock).
public struct S3FIFO<Key: Hashable>: CachePolicy {
    /// Which queue an entry is in. `ghost` only appears in a `snapshot()`: a key that left
    /// the small queue recently, remembered without its bytes.
    public enum Queue: UInt8, Sendable { case small = 0, main = 1, ghost = 2 }

    /// One entry, as `entries()` and `snapshot()` list them and `restore` takes them back.
    public struct Entry {
        public var key: Key
        public var size: UInt64
        public var frequency: UInt8
        public var queue: Queue
        public init(key: Key, size: UInt64, frequency: UInt8, queue: Queue) {
            self.key = key; self.size = size; self.frequency = frequency; self.queue = queue
        }
    }

    struct Slot {
        var key: Key?
        var size: UInt64
        var generation: UInt32
        var frequency: UInt8
        var queue: Queue
    }

    /// Bound on the sum of resident sizes.
    public let capacity: UInt64
    /// The small queue's share of `capacity` (the paper's 10%).
    public let smallTarget: UInt64
    /// The ghost queue remembers at most this many bytes of filtered keys (main's size).
    public let ghostTarget: UInt64
    /// Hits an entry needs in the small queue to be promoted to main when it leaves it.
    public let promoteAfter: UInt8
    static var maxFrequency: UInt8 { 3 }

    var slots: [Slot] = []
    var free: [Int32] = []
    var index: [Key: Int32] = [:]
    /// Queue items pack (slot, generation): a removed entry leaves a stale item behind
    /// that is skipped when it reaches the tail.
    var small = Deque<UInt64>()
    var main = Deque<UInt64>()
    var ghost = Deque<(key: Key, stamp: UInt64, size: UInt64)>()
    var ghostIndex: [Key: UInt64] = [:]
    var ghostStamp: UInt64 = 0
    public private(set) var smallBytes: UInt64 = 0
    public private(set) var mainBytes: UInt64 = 0
    var ghostBytes: UInt64 = 0

    /// A policy bounded by `capacity` bytes. `smallFraction` of it is the small queue.
    public init(capacity: UInt64, smallFraction: Double = 0.1, promoteAfter: UInt8 = 1) {
        precondition(capacity > 0 && smallFraction > 0 && smallFraction < 1)
        self.capacity = capacity
        self.smallTarget = max(1, UInt64(Double(capacity) * smallFraction))
        self.ghostTarget = capacity - smallTarget
        self.promoteAfter = promoteAfter
    }

    public var usedBytes: UInt64 { smallBytes + mainBytes }
    public var count: Int { index.count }

    public func contains(_ key: Key) -> Bool { index[key] != nil }

    /// The size recorded for a resident key.
    public func size(of key: Key) -> UInt64? { index[key].map { slots[Int($0)].size } }

    /// A request for a resident key: counts the hit. Returns false when it is not resident.
    @discardableResult
    public mutating func touch(_ key: Key) -> Bool {
        guard let s = index[key] else { return false }
        let f = slots[Int(s)].frequency
        if f < Self.maxFrequency { slots[Int(s)].frequency = f + 1 }
        return true
    }

    /// Admits `key` (not resident) of `size` bytes, evicting as needed; every key evicted
    /// is passed to `evicted`. An entry larger than the whole cache is not admitted
    /// (returns false). A key the ghost queue remembers goes straight to main.
    @discardableResult
    public mutating func insert(_ key: Key, size: UInt64, evicted: (Key) -> Void) -> Bool {
        guard index[key] == nil else { return true }
        guard size <= capacity else { return false }
        while usedBytes + size > capacity { evictOne(evicted) }
        let toMain = ghostIndex.removeValue(forKey: key) != nil
        place(key, size: size, frequency: 0, queue: toMain ? .main : .small)
        return true
    }

    /// Forgets a resident key (it was deleted or found corrupt), without reporting it evicted.
    public mutating func remove(_ key: Key) {
        guard let s = index.removeValue(forKey: key) else { return }
        release(Int(s))
    }

    /// Resident entries, tail (next to leave) first: small, then main.
    public func entries() -> [Entry] {
        var out: [Entry] = []
        out.reserveCapacity(index.count)
        for q in [small, main] {
            for item in q {
                let (s, g) = Self.unpack(item)
                let slot = slots[s]
                guard slot.generation == g, let key = slot.key else { continue }
                out.append(Entry(key: key, size: slot.size, frequency: slot.frequency, queue: slot.queue))
            }
        }
        return out
    }

    /// Resident entries as `entries()` lists them, then the ghost queue's keys, oldest first
    /// (queue `.ghost`): what a restart needs to carry on as if it had not happened.
    public func snapshot() -> [Entry] {
        var out = entries()
        for g in ghost where ghostIndex[g.key] == g.stamp {
            out.append(Entry(key: g.key, size: g.size, frequency: 0, queue: .ghost))
        }
        return out
    }

    /// Puts entries back as `entries()` or `snapshot()` listed them (a restart). Entries
    /// that no longer fit in `capacity` are passed to `evicted` like any eviction; ghost
    /// entries are remembered again (unless resident), within the ghost queue's bound.
    public mutating func restore(_ list: [Entry], evicted: (Key) -> Void) {
        for e in list where e.queue != .ghost && index[e.key] == nil && e.size <= capacity {
            while usedBytes + e.size > capacity { evictOne(evicted) }
            place(e.key, size: e.size, frequency: min(e.frequency, Self.maxFrequency), queue: e.queue)
        }
        for e in list where e.queue == .ghost && index[e.key] == nil {
            remember(e.key, size: e.size)
        }
    }

    // MARK: - internals

    static func pack(_ slot: Int, _ generation: UInt32) -> UInt64 { UInt64(slot) << 32 | UInt64(generation) }
    static func unpack(_ item: UInt64) -> (Int, UInt32) { (Int(item >> 32), UInt32(truncatingIfNeeded: item)) }

    mutating func place(_ key: Key, size: UInt64, frequency: UInt8, queue: Queue) {
        let s: Int
        if let f = free.popLast() {
            s = Int(f)
            slots[s].key = key
            slots[s].size = size
            slots[s].frequency = frequency
            slots[s].queue = queue
        } else {
            s = slots.count
            slots.append(Slot(key: key, size: size, generation: 0, frequency: frequency, queue: queue))
        }
        index[key] = Int32(s)
        let item = Self.pack(s, slots[s].generation)
        if queue == .small { small.append(item); smallBytes += size } else { main.append(item); mainBytes += size }
    }

    mutating func release(_ s: Int) {
        if slots[s].queue == .small { smallBytes -= slots[s].size } else { mainBytes -= slots[s].size }
        slots[s].key = nil
        slots[s].generation &+= 1
        free.append(Int32(s))
    }

    mutating func evictOne(_ evicted: (Key) -> Void) {
        if smallBytes >= smallTarget || mainBytes == 0 {
            if evictSmall(evicted) { return }
        }
        evictMain(evicted)
    }

    /// Pops small's tail until one entry leaves the cache: entries hit often enough move
    /// to main instead. Returns false if small ran out first.
    mutating func evictSmall(_ evicted: (Key) -> Void) -> Bool {
        while let item = small.popFirst() {
            let (s, g) = Self.unpack(item)
            guard slots[s].generation == g, let key = slots[s].key else { continue }
            if slots[s].frequency >= promoteAfter {
                smallBytes -= slots[s].size
                mainBytes += slots[s].size
                slots[s].queue = .main
                slots[s].frequency = 0
                main.append(item)
                continue
            }
            let size = slots[s].size
            index[key] = nil
            release(s)
            remember(key, size: size)
            evicted(key)
            return true
        }
        return false
    }

    /// Pops main's tail: an entry hit since it was last here goes back to the head with one
    /// hit fewer (lazy promotion); the first one with none leaves.
    mutating func evictMain(_ evicted: (Key) -> Void) {
        while let item = main.popFirst() {
            let (s, g) = Self.unpack(item)
            guard slots[s].generation == g, let key = slots[s].key else { continue }
            if slots[s].frequency > 0 {
                slots[s].frequency -= 1
                main.append(item)
                continue
            }
            index[key] = nil
            release(s)
            evicted(key)
            return
        }
        // Main empty: fall back to small (only reachable when small held everything).
        _ = evictSmall(evicted)
    }

    mutating func remember(_ key: Key, size: UInt64) {
        ghostStamp &+= 1
        ghostIndex[key] = ghostStamp
        ghost.append((key, ghostStamp, size))
        ghostBytes += size
        while ghostBytes > ghostTarget, let g = ghost.popFirst() {
            ghostBytes -= g.size
            if ghostIndex[g.key] == g.stamp { ghostIndex[g.key] = nil }
        }
    }
}
