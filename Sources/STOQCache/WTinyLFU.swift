/// W-TinyLFU (Einziger, Friedman, Manes, "TinyLFU: A Highly Efficient Cache Admission
/// Policy", 2017; Caffeine's policy): a small LRU window admits every new key; what leaves
/// the window enters the main segmented LRU only if a frequency sketch says it is asked for
/// more often than the entry main would evict for it.
///
/// Sizes are bytes. The window is `windowFraction` of `capacity`; main is split into a
/// probation and a protected segment (80% of main). The sketch is a count-min sketch of
/// 4-bit-range counters (4 rows) that halves itself every `10 × width` increments, so old
/// popularity fades. Everything lives in arrays sized at first use: no allocation per request.
public struct WTinyLFU<Key: Hashable>: CachePolicy {
    enum Segment: UInt8 { case window, probation, protected }
    struct Slot { var key: Key?; var size: UInt64; var prev: Int32; var next: Int32; var segment: Segment }
    struct List { var head: Int32 = -1; var tail: Int32 = -1; var bytes: UInt64 = 0 }

    public let capacity: UInt64
    let windowTarget: UInt64
    let protectedTarget: UInt64
    var slots: [Slot] = []
    var free: [Int32] = []
    var index: [Key: Int32] = [:]
    var lists = [List(), List(), List()]
    var sketch: [UInt8]
    let mask: Int
    var increments = 0
    let resetAfter: Int

    /// `expectedEntries` sizes the sketch (capacity / a typical entry size).
    public init(capacity: UInt64, expectedEntries: Int, windowFraction: Double = 0.01) {
        self.capacity = capacity
        self.windowTarget = max(1, UInt64(Double(capacity) * windowFraction))
        self.protectedTarget = (capacity - min(capacity, windowTarget)) * 8 / 10
        var width = 16
        while width < expectedEntries { width <<= 1 }
        sketch = [UInt8](repeating: 0, count: width * 4)
        mask = width - 1
        resetAfter = width * 10
    }

    public var usedBytes: UInt64 { lists[0].bytes + lists[1].bytes + lists[2].bytes }
    public var count: Int { index.count }
    public func contains(_ key: Key) -> Bool { index[key] != nil }

    // MARK: - sketch

    func rows(_ key: Key) -> (Int, Int, Int, Int) {
        var h = UInt64(bitPattern: Int64(key.hashValue))
        h = (h ^ (h >> 33)) &* 0xff51_afd7_ed55_8ccd
        h = (h ^ (h >> 33)) &* 0xc4ce_b9fe_1a85_ec53
        let a = Int(truncatingIfNeeded: h), b = Int(truncatingIfNeeded: h >> 16), c = Int(truncatingIfNeeded: h >> 32),
            d = Int(truncatingIfNeeded: h >> 48) ^ Int(truncatingIfNeeded: h)
        let w = mask + 1
        return (a & mask, w + (b & mask), 2 * w + (c & mask), 3 * w + (d & mask))
    }

    func frequency(_ key: Key) -> UInt8 {
        let (a, b, c, d) = rows(key)
        return min(sketch[a], sketch[b], sketch[c], sketch[d])
    }

    mutating func record(_ key: Key) {
        let (a, b, c, d) = rows(key)
        if sketch[a] < 15 { sketch[a] += 1 }
        if sketch[b] < 15 { sketch[b] += 1 }
        if sketch[c] < 15 { sketch[c] += 1 }
        if sketch[d] < 15 { sketch[d] += 1 }
        increments += 1
        if increments >= resetAfter {
            for i in sketch.indices { sketch[i] >>= 1 }
            increments /= 2
        }
    }

    // MARK: - lists

    mutating func unlink(_ s: Int32) {
        let seg = Int(slots[Int(s)].segment.rawValue)
        let p = slots[Int(s)].prev, n = slots[Int(s)].next
        if p >= 0 { slots[Int(p)].next = n } else { lists[seg].head = n }
        if n >= 0 { slots[Int(n)].prev = p } else { lists[seg].tail = p }
        lists[seg].bytes -= slots[Int(s)].size
    }

    mutating func pushFront(_ s: Int32, _ segment: Segment) {
        let seg = Int(segment.rawValue)
        slots[Int(s)].segment = segment
        slots[Int(s)].prev = -1
        slots[Int(s)].next = lists[seg].head
        if lists[seg].head >= 0 { slots[Int(lists[seg].head)].prev = s }
        lists[seg].head = s
        if lists[seg].tail < 0 { lists[seg].tail = s }
        lists[seg].bytes += slots[Int(s)].size
    }

    mutating func drop(_ s: Int32) {
        unlink(s)
        index[slots[Int(s)].key!] = nil
        slots[Int(s)].key = nil
        free.append(s)
    }

    // MARK: - policy

    @discardableResult
    public mutating func touch(_ key: Key) -> Bool {
        guard let s = index[key] else { return false }
        record(key)
        switch slots[Int(s)].segment {
        case .window:
            unlink(s); pushFront(s, .window)
        case .probation:
            unlink(s); pushFront(s, .protected)
            // Protected over its share: its least recent entries go back to probation.
            while lists[2].bytes > protectedTarget, lists[2].tail >= 0, lists[2].tail != s {
                let t = lists[2].tail
                unlink(t); pushFront(t, .probation)
            }
        case .protected:
            unlink(s); pushFront(s, .protected)
        }
        return true
    }

    @discardableResult
    public mutating func insert(_ key: Key, size: UInt64, evicted: (Key) -> Void) -> Bool {
        guard index[key] == nil else { return true }
        guard size <= capacity else { return false }
        record(key)
        let s: Int32
        if let f = free.popLast() {
            s = f
            slots[Int(s)] = Slot(key: key, size: size, prev: -1, next: -1, segment: .window)
        } else {
            s = Int32(slots.count)
            slots.append(Slot(key: key, size: size, prev: -1, next: -1, segment: .window))
        }
        index[key] = s
        pushFront(s, .window)
        // Window over its share: its least recent entries are candidates for main.
        while lists[0].bytes > windowTarget, lists[0].tail >= 0 {
            let cand = lists[0].tail
            unlink(cand)
            admit(cand, evicted)
        }
        // Keep the whole bound (a large entry can overflow the window alone).
        while usedBytes > capacity {
            let victim = lists[1].tail >= 0 ? lists[1].tail : lists[2].tail >= 0 ? lists[2].tail : lists[0].tail
            let k = slots[Int(victim)].key!
            drop(victim)
            evicted(k)
        }
        return true
    }

    /// A candidate out of the window: into probation if main has room, else against main's
    /// victims by frequency; the loser leaves.
    mutating func admit(_ cand: Int32, _ evicted: (Key) -> Void) {
        let mainTarget = capacity - min(capacity, windowTarget)
        let size = slots[Int(cand)].size
        let candKey = slots[Int(cand)].key!
        let candFreq = frequency(candKey)
        while lists[1].bytes + lists[2].bytes + size > mainTarget {
            let victim = lists[1].tail >= 0 ? lists[1].tail : lists[2].tail
            guard victim >= 0 else { break }
            let vk = slots[Int(victim)].key!
            if candFreq > frequency(vk) {
                drop(victim)
                evicted(vk)
            } else {
                // The candidate loses: it is already unlinked from the window.
                index[candKey] = nil
                slots[Int(cand)].key = nil
                free.append(cand)
                evicted(candKey)
                return
            }
        }
        pushFront(cand, .probation)
    }

    public mutating func remove(_ key: Key) {
        guard let s = index[key] else { return }
        drop(s)
    }
}
