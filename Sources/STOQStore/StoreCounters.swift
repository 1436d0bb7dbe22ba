/// What a chunk store counted since it was opened. A snapshot: read it with
/// `ChunkStore.counters`.
public struct StoreCounters: Sendable, Equatable {
    /// Chunks written to disk (new ones, and every put when dedup is off).
    public var chunksWritten: UInt64 = 0
    /// Bytes of those chunks.
    public var bytesWritten: UInt64 = 0
    /// Puts of a chunk the store already had, verified, so nothing was written.
    public var dedupHits: UInt64 = 0
    /// Chunks read and verified.
    public var chunksRead: UInt64 = 0
    /// Bytes of those chunks.
    public var bytesRead: UInt64 = 0
    /// Stored chunks whose bytes no longer matched their id, moved to `quarantine/`.
    public var corruptQuarantined: UInt64 = 0
    /// Chunks the `ChunkSource` supplied (after a miss or a corrupt copy) and that verified.
    public var refetched: UInt64 = 0
    /// Refetches that failed: the source did not have the chunk, threw, or sent wrong bytes.
    public var refetchFailed: UInt64 = 0
    /// Temp files of interrupted writes removed when the store was opened.
    public var staleTempFilesRemoved: UInt64 = 0
    /// Chunks garbage collection removed.
    public var chunksCollected: UInt64 = 0
    /// Bytes garbage collection freed.
    public var bytesCollected: UInt64 = 0

    /// All zero.
    public init() {}
}
