import STOQCore

/// How fast one neighbour delivers: the chunk bytes fetched through it over the time at least
/// one chunk fetch through it was in flight. Not the sum of each fetch's own time: sixteen
/// chunks of 1 MB fetched at once in one second are 16 MB/s, not 1 MB/s. A fetch that fails or
/// is cancelled (its hedge won) adds its time and no bytes.
///
/// Sans-IO like `NeighbourLink`: the caller passes `now`. `MeshService` keeps one per
/// neighbour (any thread, under its lock); the mesh thread takes a sample about every pass and
/// feeds it to the neighbour's `NeighbourLink.delivered`.
struct DeliveryMeter: Sendable {
    /// Fetches through the neighbour in flight now.
    private(set) var inFlight = 0
    private var busySince: UInt64 = 0
    /// Busy time not yet in a sample, and the bytes delivered in it.
    private var busy: UInt64 = 0
    private var bytes = 0

    /// Busy time with nothing delivered is kept for the next sample up to this much: one
    /// delivery after a long run of failures is not charged for all of them.
    static let carriedAtMost = 10 * Nanos.second

    /// A fetch through the neighbour went out.
    mutating func started(now: UInt64) {
        if inFlight == 0 { busySince = now }
        inFlight += 1
    }

    /// A fetch through the neighbour ended, having delivered `bytes` (0: failed or cancelled).
    mutating func ended(bytes: Int, now: UInt64) {
        guard inFlight > 0 else { return }
        inFlight -= 1
        self.bytes += bytes
        if inFlight == 0 { busy += now &- busySince }
    }

    /// The bytes delivered since the last sample and the busy time they took (the fetches still
    /// in flight counting up to `now`), or nil when nothing was delivered: its busy time then
    /// goes into the next sample.
    mutating func sample(now: UInt64) -> (bytes: Int, nanos: UInt64)? {
        var total = busy
        if inFlight > 0 {
            total += now &- busySince
            busySince = now
        }
        guard bytes > 0, total > 0 else {
            busy = min(total, Self.carriedAtMost)
            return nil
        }
        defer { (busy, bytes) = (0, 0) }
        return (bytes, total)
    }

    /// Nothing in flight or waiting for a sample: the meter may go.
    var idle: Bool { inFlight == 0 && bytes == 0 && busy == 0 }
}
