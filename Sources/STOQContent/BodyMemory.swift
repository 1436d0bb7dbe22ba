import Foundation

/// The request bodies the node holds in memory, all workers together (`limits.body_memory`).
/// Chunk, manifest and `/_stoq/missing` bodies are collected in memory files (memfd) until they
/// end; each holds its announced length, or the most its kind may carry, from its first byte
/// to its end. A body that would take the node past the limit is refused before it is read
/// (503 with `Retry-After`): many clients each sending part of many bodies cannot take the
/// node's memory, and a client whose bodies end gets its room back at once.
///
/// One per node, shared by its workers; taken and given back once a request, not per packet.
public final class BodyMemory: @unchecked Sendable {
    /// Bytes the node may hold (0: no limit).
    public let limit: UInt64
    private let lock = NSLock()
    private var heldBytes: UInt64 = 0

    public init(limit: UInt64) { self.limit = limit }

    /// Bytes held now.
    public var held: UInt64 { lock.withLock { heldBytes } }

    /// Takes room for a body of at most `bytes`: what was taken (at most the whole limit, so a
    /// body larger than it may still go while nothing else is held), or nil (nothing taken)
    /// when that would pass the limit.
    public func take(_ bytes: UInt64) -> UInt64? {
        lock.withLock {
            let bytes = limit == 0 ? bytes : min(bytes, limit)
            guard limit == 0 || bytes <= limit - min(limit, heldBytes) else { return nil }
            heldBytes += bytes
            return bytes
        }
    }

    /// Gives back what `take` took for a body that ended (however it ended).
    public func give(_ bytes: UInt64) { lock.withLock { heldBytes -= min(heldBytes, bytes) } }

    /// A refusal's text: what was asked, what is held, the limit.
    public func refusal(asked: UInt64) -> String {
        "request bodies held in memory: \(held) bytes of \(limit) (limits.body_memory); this one may need \(asked); "
            + "try again once others end"
    }
}
