import STOQCore

/// A deterministic pseudo-random generator (SplitMix64): the same seed gives the same
/// losses and reorderings on every run, so a failing case can be replayed.
public struct SeededRandom: RandomNumberGenerator {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// One direction of an in-memory network path: fixed delay, random loss, random
/// extra delay (which reorders), all driven by a manual clock.
public struct SimulatedLink {
    public struct Packet {
        public var bytes: [UInt8]
        public var from: IPv6Endpoint
        public var to: IPv6Endpoint
        public var ecn: ECN
        public var arrival: Timestamp
    }

    /// One-way delay.
    public var delay: UInt64
    /// Probability that a datagram is lost.
    public var lossRate: Double
    /// Probability that a datagram is held back by up to `reorderDelay` (and so overtaken).
    public var reorderRate: Double
    public var reorderDelay: UInt64
    /// Probability that a datagram arrives just before the one sent before it, together
    /// (overtaken by one within a receive batch: the usual reordering).
    public var swapRate: Double = 0
    /// Drops everything while true (a partition).
    public var down = false

    public private(set) var sent = 0
    public private(set) var lost = 0
    private var inFlight: [Packet] = []
    private var rng: SeededRandom

    public init(
        delay: UInt64 = 5_000_000, lossRate: Double = 0, reorderRate: Double = 0,
        reorderDelay: UInt64 = 3_000_000, seed: UInt64 = 1
    ) {
        self.delay = delay
        self.lossRate = lossRate
        self.reorderRate = reorderRate
        self.reorderDelay = reorderDelay
        self.rng = SeededRandom(seed: seed)
    }

    /// Puts a datagram on the link at `now`.
    public mutating func send(
        _ bytes: UnsafeRawBufferPointer, from: IPv6Endpoint, to: IPv6Endpoint, ecn: ECN,
        now: Timestamp
    ) {
        sent += 1
        if down || Double.random(in: 0..<1, using: &rng) < lossRate {
            lost += 1
            return
        }
        var arrival = now + delay
        if Double.random(in: 0..<1, using: &rng) < reorderRate {
            arrival += UInt64.random(in: 1...reorderDelay, using: &rng)
        }
        let packet = Packet(bytes: Array(bytes), from: from, to: to, ecn: ecn, arrival: arrival)
        if swapRate > 0, let last = inFlight.last, last.arrival == arrival, Double.random(in: 0..<1, using: &rng) < swapRate {
            inFlight.insert(packet, at: inFlight.count - 1)
        } else {
            inFlight.append(packet)
        }
    }

    /// The earliest arrival still on the link.
    public var nextArrival: Timestamp? { inFlight.lazy.map(\.arrival).min() }

    /// Removes and returns every datagram that has arrived by `now`, in arrival order.
    public mutating func deliver(now: Timestamp) -> [Packet] {
        // In order of arrival, then of sending (or of a swap).
        let due = inFlight.enumerated().filter { $0.element.arrival <= now }
            .sorted { ($0.element.arrival, $0.offset) < ($1.element.arrival, $1.offset) }.map(\.element)
        inFlight.removeAll { $0.arrival <= now }
        return due
    }
}
