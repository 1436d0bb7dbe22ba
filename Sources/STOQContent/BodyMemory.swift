import Foundation

/// The request bodies the node holds in memory, all workers together (`limits.body_memory`),
/// and each client's share of it (`limits.body_memory_per_client`). Chunk, manifest and
/// `/_stoq/missing` bodies are collected in memory files (memfd) until they end; each holds its
/// announced length, or the most its kind may carry, from its first byte to its end. A body
/// that would take the node, or its client, past its limit is refused before it is read (503
/// with `Retry-After`): many clients each sending part of many bodies cannot take the node's
/// memory, one client cannot take all of it from the others, and a client whose bodies end
/// gets its room back at once.
///
/// One per node, shared by its workers; taken and given back once a request, not per packet.
/// Clients are keyed as the rate limits key them (`clientIdentity`); only clients holding
/// something are tracked, so the table is as large as the bodies in flight.
public final class BodyMemory: @unchecked Sendable {
    /// Bytes the node may hold (0: no limit).
    public let limit: UInt64
    /// Bytes one client may hold (0: no share, only `limit`).
    public let perClient: UInt64
    private let lock = NSLock()
    private var heldBytes: UInt64 = 0
    private var byClient: [String: UInt64] = [:]

    /// What one body holds, given back with `give` when it ends.
    public struct Hold: Sendable, Equatable {
        /// Bytes taken.
        public let bytes: UInt64
        let client: String
        /// Nothing held (a body without a bound, or one whose hold passed on).
        public static let nothing = Hold(bytes: 0, client: "")
    }

    /// Why a body was refused: the 503's text.
    public struct Refusal: Error, Equatable {
        public let reason: String
    }

    public init(limit: UInt64, perClient: UInt64 = 0) { (self.limit, self.perClient) = (limit, perClient) }

    /// Bytes held now.
    public var held: UInt64 { lock.withLock { heldBytes } }

    /// Bytes `client` holds now.
    public func held(by client: String) -> UInt64 { lock.withLock { byClient[client] ?? 0 } }

    /// Takes room for a body of at most `bytes` from `client`: what was taken (at most the
    /// whole limit and the client's whole share, so a body larger than them may still go while
    /// nothing else is held), or why not (nothing taken) when that would pass either.
    public func take(_ bytes: UInt64, client: String) -> Result<Hold, Refusal> {
        lock.withLock {
            var bytes = limit == 0 ? bytes : min(bytes, limit)
            bytes = perClient == 0 ? bytes : min(bytes, perClient)
            let mine = byClient[client] ?? 0
            if perClient > 0 && bytes > perClient - min(perClient, mine) {
                return .failure(
                    Refusal(
                        reason: "request bodies held in memory for \(client): \(mine) bytes of \(perClient) "
                            + "(limits.body_memory_per_client); this one may need \(bytes); try again once its others end"))
            }
            if limit > 0 && bytes > limit - min(limit, heldBytes) {
                return .failure(
                    Refusal(
                        reason: "request bodies held in memory: \(heldBytes) bytes of \(limit) (limits.body_memory); "
                            + "this one may need \(bytes); try again once others end"))
            }
            guard bytes > 0 else { return .success(.nothing) }
            heldBytes += bytes
            byClient[client] = mine + bytes
            return .success(Hold(bytes: bytes, client: client))
        }
    }

    /// Gives back what `take` took for a body that ended (however it ended).
    public func give(_ hold: Hold) {
        guard hold.bytes > 0 else { return }
        lock.withLock {
            heldBytes -= min(heldBytes, hold.bytes)
            let left = (byClient[hold.client] ?? 0) - min(byClient[hold.client] ?? 0, hold.bytes)
            byClient[hold.client] = left == 0 ? nil : left
            // A dictionary keeps the room it grew to: after a wave of clients, give it back.
            if byClient.isEmpty && byClient.capacity > 1024 { byClient = [:] }
        }
    }
}
