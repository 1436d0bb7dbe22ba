import Crypto
import Foundation

/// An RFC 6962 §3.2 signed certificate timestamp (v1): a log's promise that it has logged a
/// (pre)certificate, signed with the log's ECDSA P-256 key.
///
/// Wire form (TLS presentation language):
/// `version(1) || log_id(32) || timestamp(8) || extensions<0..2^16-1> || hash_alg(1) ||
/// sig_alg(1) || signature<0..2^16-1>`, with SHA-256 (4) and ECDSA (3).
public struct SignedCertificateTimestamp: Sendable, Equatable, Codable {
    /// `v1` is 0; the only version this code signs or accepts.
    public var version: UInt8
    /// SHA-256 of the log's public key (DER SubjectPublicKeyInfo).
    public var logID: [UInt8]
    /// Milliseconds since the Unix epoch at which the log accepted the entry.
    public var timestamp: UInt64
    /// CtExtensions (none are defined; kept opaque, and covered by the signature).
    public var extensions: [UInt8]
    /// TLS HashAlgorithm (4 = SHA-256).
    public var hashAlgorithm: UInt8
    /// TLS SignatureAlgorithm (3 = ECDSA).
    public var signatureAlgorithm: UInt8
    /// DER ECDSA signature over `CertificateTransparency.signedBytes(…)`.
    public var signature: [UInt8]

    /// Creates a timestamp from its parts.
    public init(
        version: UInt8 = 0, logID: [UInt8], timestamp: UInt64, extensions: [UInt8] = [],
        hashAlgorithm: UInt8 = 4, signatureAlgorithm: UInt8 = 3, signature: [UInt8]
    ) {
        self.version = version
        self.logID = logID
        self.timestamp = timestamp
        self.extensions = extensions
        self.hashAlgorithm = hashAlgorithm
        self.signatureAlgorithm = signatureAlgorithm
        self.signature = signature
    }

    /// Signs a timestamp for a precertificate entry with the log's key.
    public static func sign(entry: PrecertificateEntry, timestamp: UInt64, key: P256.Signing.PrivateKey) throws -> SignedCertificateTimestamp {
        let tbs = CertificateTransparency.signedBytes(timestamp: timestamp, entry: entry, extensions: [])
        let sig = try key.signature(for: tbs)
        return SignedCertificateTimestamp(
            logID: CertificateTransparency.logID(of: key.publicKey), timestamp: timestamp,
            signature: Array(sig.derRepresentation))
    }

    /// True when this is a v1 ECDSA/SHA-256 timestamp whose signature is `key`'s over `entry`.
    public func verify(entry: PrecertificateEntry, key: P256.Signing.PublicKey) -> Bool {
        guard version == 0, hashAlgorithm == 4, signatureAlgorithm == 3,
            let sig = try? P256.Signing.ECDSASignature(derRepresentation: signature)
        else { return false }
        return key.isValidSignature(
            sig,
            for: CertificateTransparency.signedBytes(
                timestamp: timestamp, entry: entry,
                extensions: extensions))
    }

    /// The TLS encoding of this timestamp (one `SerializedSCT`, without its length prefix).
    public var encoded: [UInt8] {
        var b: [UInt8] = [version]
        b += logID
        TLSWriter.u64(timestamp, into: &b)
        TLSWriter.opaque16(extensions, into: &b)
        b += [hashAlgorithm, signatureAlgorithm]
        TLSWriter.opaque16(signature, into: &b)
        return b
    }

    /// Parses one TLS-encoded timestamp; refuses trailing bytes and versions other than v1.
    public init(encoded bytes: some Collection<UInt8>) throws {
        var r = TLSReader(Array(bytes))
        version = try r.u8()
        guard version == 0 else { throw TransparencyError(.malformedSCT, "SCT version \(version); only v1 (0) is known") }
        logID = try r.bytes(32)
        timestamp = try r.u64()
        extensions = try r.opaque16()
        hashAlgorithm = try r.u8()
        signatureAlgorithm = try r.u8()
        signature = try r.opaque16()
        guard r.atEnd else { throw TransparencyError(.malformedSCT, "\(r.remaining) bytes after the SCT") }
    }

    /// A `SignedCertificateTimestampList`: `u16 total || (u16 length || SCT)*`.
    public static func encodeList(_ list: [SignedCertificateTimestamp]) -> [UInt8] {
        var inner: [UInt8] = []
        for s in list { TLSWriter.opaque16(s.encoded, into: &inner) }
        var b: [UInt8] = []
        TLSWriter.opaque16(inner, into: &b)
        return b
    }

    /// Parses a `SignedCertificateTimestampList`.
    public static func decodeList(_ bytes: some Collection<UInt8>) throws -> [SignedCertificateTimestamp] {
        var outer = TLSReader(Array(bytes))
        var r = TLSReader(try outer.opaque16())
        guard outer.atEnd else { throw TransparencyError(.malformedSCT, "\(outer.remaining) bytes after the SCT list") }
        var out: [SignedCertificateTimestamp] = []
        while !r.atEnd { out.append(try SignedCertificateTimestamp(encoded: try r.opaque16())) }
        guard !out.isEmpty else { throw TransparencyError(.malformedSCT, "the SCT list is empty") }
        return out
    }
}

/// RFC 6962 `PreCert`: what a log records for a precertificate — the issuer's key hash and the
/// TBSCertificate without the poison (equivalently: the final certificate's TBS without its
/// SCT list).
public struct PrecertificateEntry: Sendable, Equatable {
    /// SHA-256 of the issuer's DER SubjectPublicKeyInfo.
    public var issuerKeyHash: [UInt8]
    /// DER TBSCertificate.
    public var tbsCertificate: [UInt8]

    /// Creates an entry from its parts.
    public init(issuerKeyHash: [UInt8], tbsCertificate: [UInt8]) {
        self.issuerKeyHash = issuerKeyHash
        self.tbsCertificate = tbsCertificate
    }

    /// `issuer_key_hash[32] || tbs_certificate<1..2^24-1>`.
    var encoded: [UInt8] {
        var b = issuerKeyHash
        TLSWriter.opaque24(tbsCertificate, into: &b)
        return b
    }
}

/// Why certificate-transparency data was refused.
public struct TransparencyError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The reason.
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        /// The stable name (what logs and JSON print).
        public let rawValue: String
        /// Wraps a name; STOQ's own codes are the static members.
        public init(rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }
        /// An SCT, SCT list or Merkle tree leaf does not parse.
        public static let malformedSCT = Code(rawValue: "malformedSCT")
        /// A precertificate lacks the critical poison extension or its issuer's signature.
        public static let invalidPrecertificate = Code(rawValue: "invalidPrecertificate")
        /// A certificate's TBS does not parse far enough to find its extensions.
        public static let malformedCertificate = Code(rawValue: "malformedCertificate")
    }
    /// The reason.
    public var code: Code
    /// What was wrong.
    public var message: String
    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }
    public var description: String { "\(code.rawValue): \(message)" }
}

// MARK: TLS presentation-language encoding

enum TLSWriter {
    static func u64(_ v: UInt64, into b: inout [UInt8]) {
        for shift in stride(from: 56, through: 0, by: -8) { b.append(UInt8(truncatingIfNeeded: v >> UInt64(shift))) }
    }
    static func u16(_ v: Int, into b: inout [UInt8]) {
        b += [UInt8(truncatingIfNeeded: v >> 8), UInt8(truncatingIfNeeded: v)]
    }
    static func opaque16(_ v: [UInt8], into b: inout [UInt8]) {
        precondition(v.count < 1 << 16, "opaque<0..2^16-1> overflow")
        u16(v.count, into: &b)
        b += v
    }
    static func opaque24(_ v: [UInt8], into b: inout [UInt8]) {
        precondition(v.count < 1 << 24, "opaque<0..2^24-1> overflow")
        b += [UInt8(truncatingIfNeeded: v.count >> 16), UInt8(truncatingIfNeeded: v.count >> 8), UInt8(truncatingIfNeeded: v.count)]
        b += v
    }
}

struct TLSReader {
    let b: [UInt8]
    var off = 0
    init(_ b: [UInt8]) { self.b = b }
    var atEnd: Bool { off == b.count }
    var remaining: Int { b.count - off }
    mutating func bytes(_ n: Int) throws -> [UInt8] {
        guard n >= 0, n <= remaining else {
            throw TransparencyError(.malformedSCT, "truncated: wanted \(n) bytes at offset \(off), \(remaining) left")
        }
        defer { off += n }
        return Array(b[off..<(off + n)])
    }
    mutating func u8() throws -> UInt8 { try bytes(1)[0] }
    mutating func uint(_ width: Int) throws -> UInt64 { try bytes(width).reduce(0) { $0 << 8 | UInt64($1) } }
    mutating func u64() throws -> UInt64 { try uint(8) }
    mutating func opaque16() throws -> [UInt8] { try bytes(Int(try uint(2))) }
    mutating func opaque24() throws -> [UInt8] { try bytes(Int(try uint(3))) }
}
