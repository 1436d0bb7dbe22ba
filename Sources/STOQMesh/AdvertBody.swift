// No imports: this file is also compiled into the advert fuzz target (scripts/fuzz advert).

/// What one node tells the mesh about itself: its links to its neighbours with their live
/// metrics, and its load. Every node floods its own adverts; every node keeps the newest advert
/// of every origin, and their union is the graph routes are computed on.
///
/// The wire format (version 1) is specified in docs/mesh.md ("Link-state adverts"); all integers
/// are big-endian. An advert is signed by its origin's node key (`SignedAdvert`), and its origin
/// id is the SHA-256 of that key (`NodeIdentity(publicKey:)`), so an advert names who sent it and can
/// be checked by any node that trusts the origin's certificate authority.
///
/// An advert is always valid: the initializer and the decoder check the same rules
/// (`validate`), so `encodeBody()` never writes something `init(decodingBody:)` would refuse.
public struct AdvertBody: Hashable, Sendable {
    /// One directed link from the origin to a neighbour, as the origin measures it.
    public struct Link: Hashable, Sendable {
        /// The neighbour's node id.
        public var neighbour: NodeIdentity
        /// Smoothed round-trip time, microseconds.
        public var rttMicros: UInt32
        /// Round-trip time variance (mean deviation), microseconds.
        public var rttVarMicros: UInt32
        /// Share of datagrams lost, in parts per million.
        public var lossPPM: UInt32
        /// Delivery rate, kilobits per second (0: not measured yet).
        public var deliveryKbps: UInt32
        /// The neighbour's load as it last told the origin, parts per million.
        public var peerLoadPPM: UInt32

        /// A link.
        public init(
            neighbour: NodeIdentity, rttMicros: UInt32, rttVarMicros: UInt32, lossPPM: UInt32, deliveryKbps: UInt32,
            peerLoadPPM: UInt32 = 0
        ) {
            self.neighbour = neighbour
            self.rttMicros = rttMicros
            self.rttVarMicros = rttVarMicros
            self.lossPPM = lossPPM
            self.deliveryKbps = deliveryKbps
            self.peerLoadPPM = peerLoadPPM
        }
    }

    /// The format version this build writes and the only one it reads.
    public static let currentVersion: UInt8 = 1
    /// "SQLA".
    public static let magic: UInt32 = 0x5351_4C41
    /// Bytes before the first link: magic, version, reserved, origin, sequence, issued, lifetime,
    /// load, link count.
    public static let headerSize = 4 + 1 + 1 + 32 + 8 + 8 + 4 + 4 + 2
    /// Bytes per link.
    public static let linkSize = 32 + 5 * 4
    /// No node advertises more neighbours than this.
    public static let maxLinks = 255
    /// Lifetimes a node may give its advert: from one second to one hour
    /// (`LinkStateAdvert.maxLifetimeMillis`, which this fuzzed file cannot import; a test
    /// holds the two equal).
    public static let lifetimeRange: ClosedRange<UInt32> = 1_000...3_600_000

    /// The origin: SHA-256 of its node key (`NodeIdentity(publicKey:)`).
    public let origin: NodeIdentity
    /// Increases with every advert the origin issues; a receiver keeps only the highest.
    public let sequence: UInt64
    /// When the origin issued it, Unix milliseconds.
    public let issuedMillis: UInt64
    /// How long after `issuedMillis` it stays valid, milliseconds. An origin re-advertises well
    /// before that; an advert not renewed in time takes the origin's links out of every graph.
    public let lifetimeMillis: UInt32
    /// The origin's load, parts per million of its capacity.
    public let loadPPM: UInt32
    /// The origin's links, at most one per neighbour.
    public let links: [Link]

    /// An advert, checked like a decoded one.
    public init(
        origin: NodeIdentity, sequence: UInt64, issuedMillis: UInt64, lifetimeMillis: UInt32, loadPPM: UInt32,
        links: [Link]
    ) throws(AdvertError) {
        self.origin = origin
        self.sequence = sequence
        self.issuedMillis = issuedMillis
        self.lifetimeMillis = lifetimeMillis
        self.loadPPM = loadPPM
        self.links = links
        try Self.validate(origin: origin, lifetimeMillis: lifetimeMillis, loadPPM: loadPPM, links: links)
    }

    /// The signed part of the wire form: header and links.
    public func encodeBody() -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(Self.headerSize + links.count * Self.linkSize)
        func put<T: FixedWidthInteger>(_ v: T) {
            withUnsafeBytes(of: v.bigEndian) { out.append(contentsOf: $0) }
        }
        put(Self.magic)
        put(Self.currentVersion)
        put(UInt8(0))
        out.append(contentsOf: origin.bytes)
        put(sequence)
        put(issuedMillis)
        put(lifetimeMillis)
        put(loadPPM)
        put(UInt16(links.count))
        for l in links {
            out.append(contentsOf: l.neighbour.bytes)
            put(l.rttMicros)
            put(l.rttVarMicros)
            put(l.lossPPM)
            put(l.deliveryKbps)
            put(l.peerLoadPPM)
        }
        return out
    }

    /// Decodes the body at the start of `bytes`; returns the advert and the bytes it took.
    /// Refuses, with the rule it broke, anything `encodeBody()` would not write.
    public static func decodeBody(_ bytes: ArraySlice<UInt8>) throws(AdvertError) -> (AdvertBody, Int) {
        var r = Reader(bytes)
        guard try r.u32("magic") == magic else { throw AdvertError(.badMagic, "the advert does not start with SQLA") }
        let version = try r.u8("version")
        guard version == currentVersion else {
            throw AdvertError(.unsupportedVersion, "version \(version); this node reads version \(currentVersion)")
        }
        guard try r.u8("reserved") == 0 else { throw AdvertError(.malformed, "the reserved byte is not zero") }
        let origin = NodeIdentity(try r.bytes(32, "origin"))
        let sequence = try r.u64("sequence")
        let issued = try r.u64("issued")
        let lifetime = try r.u32("lifetime")
        let load = try r.u32("load")
        let count = Int(try r.u16("link count"))
        guard count <= maxLinks else { throw AdvertError(.tooManyLinks, "\(count) links; at most \(maxLinks)") }
        var links = [Link]()
        links.reserveCapacity(count)
        for i in 0..<count {
            let n = NodeIdentity(try r.bytes(32, "link \(i) neighbour"))
            links.append(
                Link(
                    neighbour: n, rttMicros: try r.u32("link \(i) rtt"), rttVarMicros: try r.u32("link \(i) rtt variance"),
                    lossPPM: try r.u32("link \(i) loss"), deliveryKbps: try r.u32("link \(i) delivery rate"),
                    peerLoadPPM: try r.u32("link \(i) peer load")))
        }
        let advert = try AdvertBody(
            origin: origin, sequence: sequence, issuedMillis: issued, lifetimeMillis: lifetime,
            loadPPM: load, links: links)
        return (advert, r.offset)
    }

    static func validate(origin: NodeIdentity, lifetimeMillis: UInt32, loadPPM: UInt32, links: [Link]) throws(AdvertError) {
        guard lifetimeRange.contains(lifetimeMillis) else {
            throw AdvertError(.badValue, "lifetime \(lifetimeMillis) ms; allowed \(lifetimeRange.lowerBound) to \(lifetimeRange.upperBound) ms")
        }
        guard loadPPM <= PPM.whole else { throw AdvertError(.badValue, "load \(loadPPM) ppm; at most \(PPM.whole)") }
        guard links.count <= maxLinks else { throw AdvertError(.tooManyLinks, "\(links.count) links; at most \(maxLinks)") }
        var seen = Set<NodeIdentity>()
        for (i, l) in links.enumerated() {
            guard l.neighbour != origin else { throw AdvertError(.badValue, "link \(i) leads back to the origin") }
            guard seen.insert(l.neighbour).inserted else {
                throw AdvertError(.badValue, "link \(i) repeats neighbour \(l.neighbour)")
            }
            guard l.lossPPM < PPM.whole else { throw AdvertError(.badValue, "link \(i) loss \(l.lossPPM) ppm; below \(PPM.whole)") }
            guard l.peerLoadPPM <= PPM.whole else {
                throw AdvertError(.badValue, "link \(i) peer load \(l.peerLoadPPM) ppm; at most \(PPM.whole)")
            }
        }
    }
}

/// Parts per million: how adverts and probe answers carry a share (a loss, a load) as an integer.
public enum PPM {
    /// A share of 1.
    public static let whole: UInt32 = 1_000_000
    /// `share`, clamped to 0...1 (NaN: 0), in parts per million.
    public static func from(_ share: Double) -> UInt32 { UInt32((share.isNaN ? 0 : min(max(share, 0), 1)) * Double(whole)) }
    /// Parts per million back to a share.
    public static func share(_ ppm: UInt32) -> Double { Double(ppm) / Double(whole) }
}

/// A node's name in the mesh: SHA-256 of its node key (`NodeIdentity(publicKey:)`), so a node's name
/// cannot be claimed without its key.
public struct NodeIdentity: Hashable, Sendable, Comparable, CustomStringConvertible {
    /// The 32 bytes.
    public let bytes: [UInt8]

    /// A node id from exactly 32 bytes.
    public init(_ bytes: some Collection<UInt8>) {
        precondition(bytes.count == 32, "a NodeIdentity is 32 bytes")
        self.bytes = Array(bytes)
    }

    /// Lowercase hex of the first 8 bytes: enough to tell nodes apart in logs and tables.
    public var description: String { String(hex: bytes.prefix(8)) }
    /// Lowercase hex of all 32 bytes.
    public var hex: String { String(hex: bytes) }

    public static func < (a: NodeIdentity, b: NodeIdentity) -> Bool { a.bytes.lexicographicallyPrecedes(b.bytes) }
}

/// Why an advert was refused. Every refusal is counted by its code and logged with its detail.
public struct AdvertError: Error, Hashable, Sendable, CustomStringConvertible {
    /// Which rule was broken; a struct so codes can be added without breaking callers' switches.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// The name counters and logs use.
        public let name: String
        /// Shorter than a field says, or bytes after the signature.
        public static let malformed = Code(name: "malformed")
        /// Larger than `SignedAdvert.maxSize`.
        public static let oversized = Code(name: "oversized")
        /// Not an advert at all.
        public static let badMagic = Code(name: "bad_magic")
        /// A version this node does not read.
        public static let unsupportedVersion = Code(name: "unsupported_version")
        /// More links than `AdvertBody.maxLinks`.
        public static let tooManyLinks = Code(name: "too_many_links")
        /// A field out of its range (lifetime, load, loss, a repeated or self link).
        public static let badValue = Code(name: "bad_value")
        /// The certificate chain is empty, too long, or a certificate too large or unparsable.
        public static let badChain = Code(name: "bad_chain")
        /// The signer's chain does not chain to this node's trust.
        public static let untrustedSigner = Code(name: "untrusted_signer")
        /// The origin id is not the hash of the signer's key.
        public static let originMismatch = Code(name: "origin_mismatch")
        /// The signature does not verify: forged or altered.
        public static let badSignature = Code(name: "bad_signature")
        /// Issued more than `lifetime` ago.
        public static let expired = Code(name: "expired")
        /// Issued further in the future than clocks may disagree.
        public static let fromTheFuture = Code(name: "from_the_future")
        /// Not newer than the advert already held for that origin.
        public static let stale = Code(name: "stale")
        /// Every code, for counters.
        public static let all: [Code] = [
            .malformed, .oversized, .badMagic, .unsupportedVersion, .tooManyLinks, .badValue,
            .badChain, .untrustedSigner, .originMismatch, .badSignature, .expired,
            .fromTheFuture, .stale,
        ]
        public var description: String { name }
    }

    /// The rule.
    public let code: Code
    /// What exactly was wrong.
    public let detail: String

    /// An error.
    public init(_ code: Code, _ detail: String) {
        self.code = code
        self.detail = detail
    }

    public var description: String { "advert refused (\(code)): \(detail)" }
}

/// A bounds-checked big-endian reader that names the field it could not read.
struct Reader {
    let bytes: ArraySlice<UInt8>
    private(set) var offset = 0

    init(_ bytes: ArraySlice<UInt8>) { self.bytes = bytes }

    var remaining: Int { bytes.count - offset }

    mutating func bytes(_ n: Int, _ field: String) throws(AdvertError) -> ArraySlice<UInt8> {
        guard remaining >= n else {
            throw AdvertError(.malformed, "truncated at \(field) (byte \(offset), \(n) needed, \(remaining) left)")
        }
        let start = bytes.startIndex + offset
        offset += n
        return bytes[start..<(start + n)]
    }

    mutating func u8(_ field: String) throws(AdvertError) -> UInt8 { try bytes(1, field).first! }
    mutating func u16(_ field: String) throws(AdvertError) -> UInt16 { UInt16(try int(2, field)) }
    mutating func u32(_ field: String) throws(AdvertError) -> UInt32 { UInt32(try int(4, field)) }
    mutating func u64(_ field: String) throws(AdvertError) -> UInt64 { try int(8, field) }

    private mutating func int(_ n: Int, _ field: String) throws(AdvertError) -> UInt64 {
        try bytes(n, field).reduce(0) { $0 << 8 | UInt64($1) }
    }
}

extension String {
    init(hex bytes: some Sequence<UInt8>) {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        for b in bytes {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 15)])
        }
        self = String(decoding: out, as: UTF8.self)
    }
}
