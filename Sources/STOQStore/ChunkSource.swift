/// Somewhere a chunk store can get a chunk it lacks or holds only a corrupt copy of:
/// a peer or the origin. The store verifies whatever comes back against the id before
/// storing or returning it, so a source need not be trusted.
///
/// Called synchronously from `ChunkStore.read`, on the reading thread, without any store
/// lock held (the store's API is blocking file I/O; callers in async code run it off the
/// cooperative pool).
public protocol ChunkSource: Sendable {
    /// The bytes of chunk `id`, or nil when this source does not have it.
    func fetchChunk(_ id: ChunkID) throws -> [UInt8]?
}

/// A `ChunkSource` made from a closure.
public struct ClosureChunkSource: ChunkSource {
    private let fetch: @Sendable (ChunkID) throws -> [UInt8]?

    /// A source that calls `fetch`.
    public init(_ fetch: @escaping @Sendable (ChunkID) throws -> [UInt8]?) { self.fetch = fetch }

    public func fetchChunk(_ id: ChunkID) throws -> [UInt8]? { try fetch(id) }
}
