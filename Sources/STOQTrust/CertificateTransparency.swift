import Crypto
import Foundation
import SwiftASN1
import X509

/// RFC 6962 certificate transparency for TrustChain: the precertificate flow, the signed
/// structures, and the check a peer runs on an embedded SCT.
///
/// The flow (RFC 6962 §3.1): the CA signs a *precertificate* — the final certificate's fields
/// plus the critical poison extension, so no TLS stack accepts it — and submits it to the log.
/// The log records `PreCert { issuer_key_hash, TBS without the poison }` and returns an SCT.
/// The CA then signs the final certificate with the same fields and the SCT list as its last
/// extension. Removing that extension from the final TBS gives back, byte for byte, the TBS
/// the log recorded, which is how anyone recomputes the signed entry from the certificate.
public enum CertificateTransparency {
    /// `1.3.6.1.4.1.11129.2.4.2`: the embedded SignedCertificateTimestampList extension.
    public static let sctListOID: ASN1ObjectIdentifier = [1, 3, 6, 1, 4, 1, 11129, 2, 4, 2]
    /// `1.3.6.1.4.1.11129.2.4.3`: the precertificate poison (critical, value NULL).
    public static let poisonOID: ASN1ObjectIdentifier = [1, 3, 6, 1, 4, 1, 11129, 2, 4, 3]

    /// The poison extension a precertificate carries.
    public static var poison: Certificate.Extension {
        Certificate.Extension(oid: poisonOID, critical: true, value: [0x05, 0x00])
    }

    /// The extension carrying `scts`: extnValue is an OCTET STRING wrapping the TLS list.
    public static func sctListExtension(_ scts: [SignedCertificateTimestamp]) -> Certificate.Extension {
        Certificate.Extension(
            oid: sctListOID, critical: false,
            value: ArraySlice(DERWalk.wrap(0x04, SignedCertificateTimestamp.encodeList(scts))))
    }

    /// A log's id: SHA-256 of its public key's DER SubjectPublicKeyInfo.
    public static func logID(of key: P256.Signing.PublicKey) -> [UInt8] {
        Array(SHA256.hash(data: key.derRepresentation))
    }

    /// SHA-256 of the issuer's DER SubjectPublicKeyInfo.
    /// (swift-certificates' `subjectPublicKeyInfoBytes` is only the BIT STRING's contents; the
    /// DER serialization of `Certificate.PublicKey` is the whole SubjectPublicKeyInfo.)
    public static func issuerKeyHash(_ issuer: Certificate) -> [UInt8] {
        var der = DER.Serializer()
        // Serializing an already parsed key cannot fail.
        try! der.serialize(issuer.publicKey)
        return Array(SHA256.hash(data: der.serializedBytes))
    }

    /// RFC 6962 §3.2, the bytes an SCT signs for a precert entry:
    /// `version v1(0) || signature_type certificate_timestamp(0) || timestamp(8) ||
    /// entry_type precert_entry(1, u16) || issuer_key_hash(32) || tbs<u24> || extensions<u16>`.
    public static func signedBytes(timestamp: UInt64, entry: PrecertificateEntry, extensions: [UInt8]) -> [UInt8] {
        var b: [UInt8] = [0, 0]
        TLSWriter.u64(timestamp, into: &b)
        TLSWriter.u16(1, into: &b)
        b += entry.encoded
        TLSWriter.opaque16(extensions, into: &b)
        return b
    }

    /// RFC 6962 §3.4 `MerkleTreeLeaf` for a precert entry: `version v1(0) || leaf_type
    /// timestamped_entry(0) || timestamp(8) || entry_type precert_entry(1, u16) || PreCert ||
    /// extensions<u16>`. Its leaf hash is `SHA-256(0x00 || leaf)`.
    /// For v1 these are the very bytes an SCT signs (both start with two zero bytes).
    public static func merkleTreeLeaf(timestamp: UInt64, entry: PrecertificateEntry, extensions: [UInt8] = []) -> [UInt8] {
        signedBytes(timestamp: timestamp, entry: entry, extensions: extensions)
    }

    /// Parses a precert `MerkleTreeLeaf` written by `merkleTreeLeaf`; nil for anything else
    /// (logs written before SCTs hold plain DER certificates, which start with 0x30).
    public static func parseMerkleTreeLeaf(_ leaf: [UInt8]) -> (timestamp: UInt64, entry: PrecertificateEntry)? {
        var r = TLSReader(leaf)
        guard (try? r.u8()) == 0, (try? r.u8()) == 0, let ts = try? r.u64(), (try? r.uint(2)) == 1,
            let ikh = try? r.bytes(32), let tbs = try? r.opaque24(), (try? r.opaque16()) != nil, r.atEnd
        else { return nil }
        return (ts, PrecertificateEntry(issuerKeyHash: ikh, tbsCertificate: tbs))
    }

    /// The entry a log recorded for a precertificate: its TBS without the poison, which must
    /// be there and critical.
    public static func entry(forPrecertificate precert: Certificate, issuer: Certificate) throws -> PrecertificateEntry {
        guard let p = precert.extensions.first(where: { $0.oid == poisonOID }), p.critical, Array(p.value) == [0x05, 0x00] else {
            throw TransparencyError(.invalidPrecertificate, "\(precert.subject): not a precertificate (no critical poison extension)")
        }
        let (tbs, _) = try DERWalk.removingExtension(poisonOID, fromTBS: Array(precert.tbsCertificateBytes))
        return PrecertificateEntry(issuerKeyHash: issuerKeyHash(issuer), tbsCertificate: tbs)
    }

    /// The precert entry a certificate with an embedded SCT list was logged as: its TBS
    /// without that extension. Nil when the certificate carries no SCT list.
    public static func entry(forFinalCertificate cert: Certificate, issuer: Certificate) throws -> PrecertificateEntry? {
        try entry(forFinalTBS: Array(cert.tbsCertificateBytes), issuerKeyHash: issuerKeyHash(issuer))
    }

    /// As `entry(forFinalCertificate:issuer:)`, from raw TBS bytes.
    static func entry(forFinalTBS tbs: [UInt8], issuerKeyHash: [UInt8]) throws -> PrecertificateEntry? {
        let (stripped, removed) = try DERWalk.removingExtension(sctListOID, fromTBS: tbs)
        guard removed != nil else { return nil }
        return PrecertificateEntry(issuerKeyHash: issuerKeyHash, tbsCertificate: stripped)
    }

    /// The SCTs embedded in `cert`; empty when it has no SCT list extension.
    public static func embeddedSCTs(_ cert: Certificate) throws -> [SignedCertificateTimestamp] {
        guard let ext = cert.extensions.first(where: { $0.oid == sctListOID }) else { return [] }
        let octets = try DERWalk.read(Array(ext.value), at: 0)
        guard octets.tag == 0x04, octets.end == ext.value.count else {
            throw TransparencyError(.malformedSCT, "the SCT list extension is not an OCTET STRING")
        }
        return try SignedCertificateTimestamp.decodeList(Array(ext.value)[octets.contentStart..<octets.end])
    }

    /// The outcome of checking a certificate's embedded SCTs against trusted logs.
    public enum Verdict: Sendable, Equatable {
        /// An SCT from a trusted log (this one) verifies.
        case valid(logID: [UInt8], timestamp: UInt64)
        /// The certificate carries no SCT list.
        case missing
        /// An SCT names a trusted log but its signature does not verify over this certificate
        /// (or the list does not parse): the certificate is not what the log signed.
        case forged(String)
        /// Every SCT is from a log not in the trusted set.
        case unknownLog([[UInt8]])

        /// The reason a node logs when it refuses for this verdict (nil when valid).
        public var refusal: String? {
            switch self {
            case .valid: nil
            case .missing: "SCT missing"
            case .forged(let why): "SCT signature invalid (forged): \(why)"
            case .unknownLog(let ids): "SCT from an unknown log (log id \(ids.map { Data($0).base64EncodedString() }.joined(separator: ", ")))"
            }
        }
    }

    /// Checks `cert`'s embedded SCTs: valid when one from a log in `trustedLogs` verifies over
    /// the precert entry recomputed from `cert` and `issuer`.
    public static func verify(_ cert: Certificate, issuer: Certificate, trustedLogs: [P256.Signing.PublicKey]) -> Verdict {
        verify(tbs: Array(cert.tbsCertificateBytes), issuerKeyHash: issuerKeyHash(issuer), trustedLogs: trustedLogs)
    }

    /// As `verify(_:issuer:trustedLogs:)` on DER (what the TLS verify callback has in hand).
    public static func verify(leafDER: [UInt8], issuerDER: [UInt8], trustedLogs: [P256.Signing.PublicKey]) -> Verdict {
        guard let leaf = try? Certificate(derEncoded: leafDER), let issuer = try? Certificate(derEncoded: issuerDER) else {
            return .forged("the certificate or its issuer does not parse")
        }
        return verify(leaf, issuer: issuer, trustedLogs: trustedLogs)
    }

    static func verify(tbs: [UInt8], issuerKeyHash: [UInt8], trustedLogs: [P256.Signing.PublicKey]) -> Verdict {
        let precert: PrecertificateEntry
        let scts: [SignedCertificateTimestamp]
        do {
            guard let e = try entry(forFinalTBS: tbs, issuerKeyHash: issuerKeyHash) else { return .missing }
            precert = e
            let (_, removed) = try DERWalk.removingExtension(sctListOID, fromTBS: tbs)
            let octets = try DERWalk.read(removed!.value, at: 0)
            guard octets.tag == 0x04, octets.end == removed!.value.count else {
                return .forged("the SCT list extension is not an OCTET STRING")
            }
            scts = try SignedCertificateTimestamp.decodeList(removed!.value[octets.contentStart..<octets.end])
        } catch {
            return .forged("\(error)")
        }
        let logs = Dictionary(trustedLogs.map { (logID(of: $0), $0) }, uniquingKeysWith: { a, _ in a })
        var forged: String?
        for s in scts {
            guard let key = logs[s.logID] else { continue }
            if s.verify(entry: precert, key: key) { return .valid(logID: s.logID, timestamp: s.timestamp) }
            forged = "the SCT of log \(Data(s.logID).base64EncodedString()) does not verify over this certificate"
        }
        if let forged { return .forged(forged) }
        return .unknownLog(scts.map(\.logID))
    }

    /// The serial number in a DER TBSCertificate (a logged precert entry has no other form).
    public static func serialNumber(ofTBS tbs: [UInt8]) throws -> Certificate.SerialNumber {
        let fields = try DERWalk.children(tbs, of: try DERWalk.read(tbs, at: 0))
        guard let serial = fields.first(where: { $0.tag == 0x02 }) else {
            throw TransparencyError(.malformedCertificate, "the TBSCertificate has no serial number")
        }
        return Certificate.SerialNumber(bytes: tbs[serial.contentStart..<serial.end])
    }

    /// Loads trusted log keys from PEM files (public keys, or a log's private key file, from
    /// which only the public half is kept).
    public static func loadLogKeys(_ paths: [String]) throws -> [P256.Signing.PublicKey] {
        try paths.map { path in
            let text = try PEMFiles.readText(path)
            if let k = try? P256.Signing.PublicKey(pemRepresentation: text) { return k }
            if let k = try? PEMFiles.p256PrivateKey(pem: text) { return k.publicKey }
            throw TrustError(.invalidPEM, "\(path): not a P-256 log key (PEM public key expected)")
        }
    }
}

/// Trusted log keys that can cross threads: swift-crypto's public keys are immutable values
/// but are not marked `Sendable`.
public struct TrustedLogKeys: @unchecked Sendable {
    /// The keys.
    public let keys: [P256.Signing.PublicKey]
    /// Wraps `keys`.
    public init(_ keys: [P256.Signing.PublicKey]) { self.keys = keys }
}

/// Submits precertificates to a transparency log and gets SCTs back: what the CA needs of a
/// log. `TransparencyLog` is one; a node wraps it with a lock.
public protocol PrecertificateLog {
    /// Logs `precert` (issued by `issuer`) durably and returns the log's SCT for it.
    func addPrecertificate(_ precert: Certificate, issuer: Certificate) throws -> SignedCertificateTimestamp
}

/// Just enough DER to find and drop one extension of a TBSCertificate without re-encoding
/// anything else: all tags in a certificate are single-byte.
enum DERWalk {
    struct TLV {
        var tag: UInt8
        var start: Int
        var contentStart: Int
        var end: Int
    }

    static func read(_ b: [UInt8], at off: Int) throws -> TLV {
        func bad(_ why: String) -> TransparencyError { TransparencyError(.malformedCertificate, "DER at offset \(off): \(why)") }
        guard off + 2 <= b.count else { throw bad("truncated header") }
        let tag = b[off]
        guard tag & 0x1f != 0x1f else { throw bad("multi-byte tag") }
        var len = Int(b[off + 1])
        var p = off + 2
        if len & 0x80 != 0 {
            let n = len & 0x7f
            guard n >= 1, n <= 3, p + n <= b.count else { throw bad("bad length") }
            len = 0
            for i in 0..<n { len = len << 8 | Int(b[p + i]) }
            p += n
        }
        guard p + len <= b.count else { throw bad("length \(len) past the end") }
        return TLV(tag: tag, start: off, contentStart: p, end: p + len)
    }

    static func children(_ b: [UInt8], of t: TLV) throws -> [TLV] {
        var out: [TLV] = []
        var off = t.contentStart
        while off < t.end {
            let c = try read(b, at: off)
            guard c.end <= t.end else { throw TransparencyError(.malformedCertificate, "DER child overruns its parent") }
            out.append(c)
            off = c.end
        }
        return out
    }

    static func wrap(_ tag: UInt8, _ content: [UInt8]) -> [UInt8] {
        var b: [UInt8] = [tag]
        let n = content.count
        if n < 0x80 {
            b.append(UInt8(n))
        } else if n < 0x100 {
            b += [0x81, UInt8(n)]
        } else if n < 0x10000 {
            b += [0x82, UInt8(n >> 8), UInt8(n & 0xff)]
        } else {
            b += [0x83, UInt8(n >> 16), UInt8((n >> 8) & 0xff), UInt8(n & 0xff)]
        }
        return b + content
    }

    /// `tbs` without the extension `oid`, and that extension's criticality and extnValue
    /// content (nil when it is absent).
    static func removingExtension(_ oid: ASN1ObjectIdentifier, fromTBS tbs: [UInt8]) throws
        -> (tbs: [UInt8], removed: (critical: Bool, value: [UInt8])?)
    {
        var ser = DER.Serializer()
        try ser.serialize(oid)
        let oidDER = ser.serializedBytes
        let top = try read(tbs, at: 0)
        guard top.tag == 0x30, top.end == tbs.count else {
            throw TransparencyError(.malformedCertificate, "the TBSCertificate is not one SEQUENCE")
        }
        let fields = try children(tbs, of: top)
        guard let extIndex = fields.firstIndex(where: { $0.tag == 0xa3 }) else { return (tbs, nil) }
        let wrapper = fields[extIndex]
        let inner = try children(tbs, of: wrapper)
        guard inner.count == 1, inner[0].tag == 0x30 else {
            throw TransparencyError(.malformedCertificate, "[3] extensions is not one SEQUENCE")
        }
        var kept: [UInt8] = []
        var removed: (Bool, [UInt8])?
        for ext in try children(tbs, of: inner[0]) {
            let parts = try children(tbs, of: ext)
            guard let first = parts.first, first.tag == 0x06 else {
                throw TransparencyError(.malformedCertificate, "an extension does not start with its OID")
            }
            if Array(tbs[first.start..<first.end]) == oidDER, removed == nil {
                let critical =
                    parts.count == 3 && parts[1].tag == 0x01 && parts[1].end > parts[1].contentStart
                    && tbs[parts[1].contentStart] != 0
                guard let value = parts.last, value.tag == 0x04 else {
                    throw TransparencyError(.malformedCertificate, "extension \(oid) has no OCTET STRING value")
                }
                removed = (critical, Array(tbs[value.contentStart..<value.end]))
            } else {
                kept += tbs[ext.start..<ext.end]
            }
        }
        guard let removed else { return (tbs, nil) }
        var content = Array(tbs[top.contentStart..<wrapper.start])
        if !kept.isEmpty { content += wrap(0xa3, wrap(0x30, kept)) }
        content += tbs[wrapper.end..<top.end]
        return (wrap(0x30, content), removed)
    }
}
