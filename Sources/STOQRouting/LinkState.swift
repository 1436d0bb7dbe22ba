import STOQCore

/// A mesh node's stable identity. The mesh derives it from the node's key (so it survives
/// restarts and address changes); routing only needs it to be stable and unique.
public struct NodeID: Hashable, Comparable, Sendable, CustomStringConvertible, ExpressibleByIntegerLiteral {
    /// The identity's 64-bit value.
    public var rawValue: UInt64

    /// Wraps a raw identity.
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }

    /// Lets tests and simulators write node ids as integer literals.
    public init(integerLiteral value: UInt64) { self.rawValue = value }

    public static func < (a: NodeID, b: NodeID) -> Bool { a.rawValue < b.rawValue }

    public var description: String { "n\(rawValue)" }
}

/// What the origin of a directed link measured about it (issue #11 item 2), as carried in its
/// advert. Units are fixed so adverts from different nodes compare.
public struct LinkMetrics: Sendable, Equatable {
    /// Smoothed RTT to the peer, milliseconds.
    public var rttMs: Double
    /// RTT variance (mean deviation, as QUIC's `rttvar`), milliseconds.
    public var rttVarMs: Double
    /// Fraction of packets lost on the link, 0 ≤ loss < 1.
    public var lossRate: Double
    /// Delivery rate towards the peer, bytes per second (0 when unknown). Not a route cost
    /// input; carried for the path chooser and the learner.
    public var deliveryRate: Double
    /// The peer's reported load, 0 (idle) … 1 (saturated).
    public var load: Double

    /// Creates metrics; only `rttMs` is required.
    public init(rttMs: Double, rttVarMs: Double = 0, lossRate: Double = 0, deliveryRate: Double = 0, load: Double = 0) {
        self.rttMs = rttMs
        self.rttVarMs = rttVarMs
        self.lossRate = lossRate
        self.deliveryRate = deliveryRate
        self.load = load
    }

    /// Why these metrics are unusable, or nil when they are well-formed.
    var malformation: String? {
        if !(rttMs.isFinite && rttMs >= 0) { return "rtt_ms \(rttMs) is not a finite value >= 0" }
        if !(rttVarMs.isFinite && rttVarMs >= 0) { return "rtt_var_ms \(rttVarMs) is not a finite value >= 0" }
        if !(lossRate >= 0 && lossRate < 1) { return "loss_rate \(lossRate) is not in [0, 1)" }
        if !(deliveryRate.isFinite && deliveryRate >= 0) { return "delivery_rate \(deliveryRate) is not a finite value >= 0" }
        if !(load >= 0 && load <= 1) { return "load \(load) is not in [0, 1]" }
        return nil
    }
}

/// One directed link of an advert: from the advert's origin to `peer`.
public struct AdvertisedLink: Sendable, Equatable {
    /// The neighbour at the far end.
    public var peer: NodeID
    /// What the origin measured on the link.
    public var metrics: LinkMetrics

    /// Creates a link entry.
    public init(peer: NodeID, metrics: LinkMetrics) {
        self.peer = peer
        self.metrics = metrics
    }
}

/// A node's link-state advertisement: all of its outgoing links, replacing whatever the
/// database held for that origin. Signature checking and the wire format belong to the mesh
/// networking; by the time an advert reaches here it is authenticated.
public struct LinkStateAdvert: Sendable, Equatable {
    /// The advertising node.
    public var origin: NodeID
    /// Strictly increasing per origin; an advert whose sequence is not newer than the one held
    /// is refused (`stale` or `duplicate`).
    public var sequence: UInt64
    /// The origin's outgoing links. At most one entry per peer.
    public var links: [AdvertisedLink]
    /// How long the origin says its advert stays valid without a newer one, nanoseconds (the
    /// database counts it from receipt); nil: the database's `maxAge`.
    public var lifetime: UInt64?

    /// The longest an advert may live: an hour, in milliseconds. A node gives its own three
    /// update intervals, so `routing.update_interval` stops at a third of this.
    public static let maxLifetimeMillis: UInt32 = 3_600_000

    /// Creates an advert.
    public init(origin: NodeID, sequence: UInt64, links: [AdvertisedLink], lifetime: UInt64? = nil) {
        self.origin = origin
        self.sequence = sequence
        self.links = links
        self.lifetime = lifetime
    }
}

/// Why an advert was refused.
///
/// A struct with a nested `Code` rather than an enum so codes can be added without breaking
/// callers that switch on them. The database counts every refusal by code.
public struct LinkStateError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The kind of refusal; `message` says what exactly.
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        /// The stable name (what logs and JSON print).
        public let rawValue: String
        /// Wraps a name; STOQ's own codes are the static members.
        public init(rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }
        /// The advert's sequence is older than the one held for its origin.
        public static let stale = Code(rawValue: "stale")
        /// The advert's sequence equals the one held (a flooded copy seen again).
        public static let duplicate = Code(rawValue: "duplicate")
        /// A link to itself, a peer listed twice, or a metric out of range.
        public static let malformed = Code(rawValue: "malformed")
        /// More links than `LinkStateDatabase.maxLinksPerAdvert`.
        public static let oversized = Code(rawValue: "oversized")
        /// Every code STOQ defines, for counters and documentation.
        public static let allCases: [Code] = [.stale, .duplicate, .malformed, .oversized]
    }

    /// The kind of refusal.
    public var code: Code
    /// A sentence naming the offending value.
    public var message: String

    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code.rawValue): \(message)" }
}

/// What one accepted advert or expiry changed, per directed link. `old`/`new` nil means the
/// link was absent before/after. The routing engine uses these to decide how much to recompute.
public struct LinkChange: Sendable, Equatable {
    /// The link's origin.
    public var from: NodeID
    /// The link's peer.
    public var to: NodeID
    /// Metrics before the change, nil if the link is new.
    public var old: LinkMetrics?
    /// Metrics after the change, nil if the link was removed.
    public var new: LinkMetrics?
}
