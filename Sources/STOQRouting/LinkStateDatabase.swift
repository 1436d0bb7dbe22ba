import STOQCore

/// Every node's latest accepted advert: the mesh's graph as this node knows it.
///
/// Sans-IO: callers pass `now` (monotonic nanoseconds); the database never reads a clock.
/// Versioned per origin: an advert replaces the origin's links only if its sequence is newer.
/// Adverts age out: an origin not heard from for its advert's lifetime (`maxAge` when it names
/// none) loses its links (its peers keep theirs, so a silent node stays reachable only through
/// links others still advertise towards it).
public struct LinkStateDatabase: Sendable {
    /// One origin's accepted state.
    public struct Origin: Sendable, Equatable {
        /// Sequence of the accepted advert.
        public var sequence: UInt64
        /// When it was accepted (`now` of `apply`).
        public var receivedAt: Timestamp
        /// How long it stays valid from then: its own lifetime, or the database's `maxAge`.
        public var lifetime: UInt64
        /// Its links, sorted by peer (a deterministic order makes route ties deterministic).
        public var links: [AdvertisedLink]
        /// False once expired: the links are gone but the sequence is remembered, so a delayed
        /// copy of the expired advert is still refused as stale (until `forgetAfter`).
        public var live: Bool
    }

    /// How long an advert that names no lifetime stays valid without a newer one, nanoseconds.
    public var maxAge: UInt64
    /// Adverts with more links are refused as `oversized`.
    public var maxLinksPerAdvert: Int
    /// How long after its last advert arrived an expired origin is forgotten, sequence and all
    /// (nil: never). Set past the longest time any earlier advert of it can pass the caller's
    /// checks (its lifetime and clock skew): forgetting then readmits no replay, lets an origin
    /// whose clock went back (its sequences with it) in again, and keeps a mesh whose nodes
    /// come and go (new keys, new ids) from growing without end.
    public var forgetAfter: UInt64?
    /// Origins seen, live or expired (and not yet forgotten).
    public private(set) var origins: [NodeID: Origin] = [:]
    /// Adverts accepted since creation.
    public private(set) var accepted: UInt64 = 0
    /// Adverts refused since creation, by reason.
    public private(set) var refused: [LinkStateError.Code: UInt64] = [:]
    /// Bumped by every accepted advert and every expiry that removed links.
    public private(set) var version: UInt64 = 0

    /// Creates an empty database.
    public init(maxAge: UInt64 = 60 * Nanos.second, maxLinksPerAdvert: Int = 1024, forgetAfter: UInt64? = nil) {
        self.maxAge = maxAge
        self.maxLinksPerAdvert = maxLinksPerAdvert
        self.forgetAfter = forgetAfter
    }

    /// Validates and applies `advert`, replacing its origin's links. Returns what changed per
    /// link (empty when the advert repeats the same links under a new sequence). Throws, and
    /// counts, when the advert is stale, a duplicate, malformed or oversized.
    @discardableResult
    public mutating func apply(_ advert: LinkStateAdvert, now: Timestamp) throws(LinkStateError) -> [LinkChange] {
        do {
            return try applyChecked(advert, now: now)
        } catch {
            refused[error.code, default: 0] += 1
            throw error
        }
    }

    private mutating func applyChecked(_ advert: LinkStateAdvert, now: Timestamp) throws(LinkStateError) -> [LinkChange] {
        if let held = origins[advert.origin] {
            if advert.sequence < held.sequence {
                throw LinkStateError(.stale, "advert from \(advert.origin) has sequence \(advert.sequence), older than the \(held.sequence) held")
            }
            if advert.sequence == held.sequence {
                throw LinkStateError(.duplicate, "advert from \(advert.origin) with sequence \(advert.sequence) is already held")
            }
        }
        if advert.links.count > maxLinksPerAdvert {
            throw LinkStateError(.oversized, "advert from \(advert.origin) has \(advert.links.count) links, more than the \(maxLinksPerAdvert) allowed")
        }
        let links = advert.links.sorted { $0.peer < $1.peer }
        for (i, l) in links.enumerated() {
            if l.peer == advert.origin {
                throw LinkStateError(.malformed, "advert from \(advert.origin) lists a link to itself")
            }
            if i > 0 && links[i - 1].peer == l.peer {
                throw LinkStateError(.malformed, "advert from \(advert.origin) lists peer \(l.peer) twice")
            }
            if let why = l.metrics.malformation {
                throw LinkStateError(.malformed, "advert from \(advert.origin), link to \(l.peer): \(why)")
            }
        }
        let old = origins[advert.origin].flatMap { $0.live ? $0.links : nil } ?? []
        // The origin's own lifetime: it refreshes on its own update interval, not this node's.
        origins[advert.origin] = Origin(
            sequence: advert.sequence, receivedAt: now, lifetime: advert.lifetime ?? maxAge, links: links, live: true)
        accepted += 1
        let changes = Self.diff(origin: advert.origin, old: old, new: links)
        if !changes.isEmpty { version += 1 }
        return changes
    }

    /// Removes the links of every origin whose advert is older than its lifetime at `now`, and
    /// forgets the expired origins received more than `forgetAfter` ago. Returns the expired
    /// origins (sorted), the links that went with them, and the forgotten origins (sorted).
    public mutating func expire(now: Timestamp) -> (origins: [NodeID], changes: [LinkChange], forgotten: [NodeID]) {
        var gone: [NodeID] = []
        var forgotten: [NodeID] = []
        var changes: [LinkChange] = []
        for (id, o) in origins where now >= o.receivedAt {
            if o.live && now - o.receivedAt > o.lifetime { gone.append(id) }
            if let f = forgetAfter, now - o.receivedAt > max(f, o.lifetime) { forgotten.append(id) }
        }
        gone.sort()
        forgotten.sort()
        for id in gone {
            let o = origins[id]!
            changes += Self.diff(origin: id, old: o.links, new: [])
            origins[id] = Origin(sequence: o.sequence, receivedAt: o.receivedAt, lifetime: o.lifetime, links: [], live: false)
        }
        for id in forgotten { origins[id] = nil }
        if !changes.isEmpty { version += 1 }
        return (gone, changes, forgotten)
    }

    /// The live links of `origin`, sorted by peer.
    public func links(from origin: NodeID) -> [AdvertisedLink] {
        guard let o = origins[origin], o.live else { return [] }
        return o.links
    }

    /// Whether `origin`'s live advert lists a link to `peer`.
    public func lists(_ origin: NodeID, _ peer: NodeID) -> Bool {
        guard let o = origins[origin], o.live else { return false }
        var lo = 0, hi = o.links.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if o.links[mid].peer < peer { lo = mid + 1 } else { hi = mid }
        }
        return lo < o.links.count && o.links[lo].peer == peer
    }

    /// Number of live directed links.
    public var linkCount: Int { origins.values.reduce(0) { $0 + ($1.live ? $1.links.count : 0) } }

    // Both lists sorted by peer: one merge pass.
    static func diff(origin: NodeID, old: [AdvertisedLink], new: [AdvertisedLink]) -> [LinkChange] {
        var out: [LinkChange] = []
        var i = 0, j = 0
        while i < old.count || j < new.count {
            if j == new.count || (i < old.count && old[i].peer < new[j].peer) {
                out.append(LinkChange(from: origin, to: old[i].peer, old: old[i].metrics, new: nil)); i += 1
            } else if i == old.count || new[j].peer < old[i].peer {
                out.append(LinkChange(from: origin, to: new[j].peer, old: nil, new: new[j].metrics)); j += 1
            } else {
                if old[i].metrics != new[j].metrics {
                    out.append(LinkChange(from: origin, to: new[j].peer, old: old[i].metrics, new: new[j].metrics))
                }
                i += 1; j += 1
            }
        }
        return out
    }
}
