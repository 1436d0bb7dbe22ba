import _CryptoExtras
import Crypto
import Foundation
import STOQCore
import SwiftASN1
import X509

/// The facts about a certificate an operator asks for (`stoq trust show`), in plain values.
public struct CertificateSummary: Sendable, Equatable, Codable {
    /// Subject distinguished name, RFC 4514 form.
    public var subject: String
    /// Issuer distinguished name.
    public var issuer: String
    /// Serial number, lower-case hex.
    public var serial: String
    /// Start of validity.
    public var notBefore: Date
    /// End of validity.
    public var notAfter: Date
    /// DNS subject alternative names.
    public var dnsNames: [String]
    /// IP subject alternative names (IPv6 in RFC 5952 form; IPv4 shown dotted if present).
    public var ipAddresses: [String]
    /// Extended key usages (`serverAuth`, `clientAuth`, …).
    public var extendedKeyUsage: [String]
    /// Key type, e.g. `ECDSA P-256`, `RSA-2048`, `Ed25519`.
    public var keyType: String
    /// Whether the certificate is a CA.
    public var isCA: Bool
    /// Embedded signed certificate timestamps (RFC 6962), in the certificate's order.
    public var scts: [SCTSummary]

    /// One embedded SCT as `stoq trust show` reports it.
    public struct SCTSummary: Sendable, Equatable, Codable {
        /// The log id, base64 (as CT tools print it).
        public var logID: String
        /// When the log accepted the precertificate.
        public var timestamp: Date
        /// `valid`, `invalid` (a known log's signature does not verify: forged or altered),
        /// `unknown log`, or `unchecked` (no issuer certificate to recompute the entry).
        public var status: String
        enum CodingKeys: String, CodingKey { case logID = "log_id", timestamp, status }
    }

    /// Checks each SCT against `logs` with `issuer` (the certificate's issuer) and records
    /// the outcome in `status`.
    public mutating func checkSCTs(of certificate: Certificate, issuer: Certificate, logs: [P256.Signing.PublicKey]) {
        guard let scts = try? CertificateTransparency.embeddedSCTs(certificate),
            let entry = try? CertificateTransparency.entry(forFinalCertificate: certificate, issuer: issuer)
        else { return }
        let byID = Dictionary(logs.map { (CertificateTransparency.logID(of: $0), $0) }, uniquingKeysWith: { a, _ in a })
        for (i, sct) in scts.enumerated() where i < self.scts.count {
            guard let key = byID[sct.logID] else { self.scts[i].status = "unknown log"; continue }
            self.scts[i].status = sct.verify(entry: entry, key: key) ? "valid" : "invalid"
        }
    }

    /// The id of the key a certificate certifies: SHA-256 of the subjectPublicKey bit string's
    /// bytes (for P-256, the 65-byte uncompressed point), RFC 7093's method 1, untruncated. A
    /// mesh node's id (`NodeIdentity`); it stays across renewals that keep the key.
    public static func keyID(_ publicKey: Certificate.PublicKey) -> [UInt8] {
        Array(SHA256.hash(data: publicKey.subjectPublicKeyInfoBytes))
    }

    /// A client's name, SAN URIs and key id from its leaf certificate, for the access policy:
    /// the subject's common name (else the whole subject), every URI SAN (none when the SANs
    /// do not parse), `keyID`.
    public static func clientIdentity(_ c: Certificate) -> (subject: String, uris: [String], key: [UInt8]) {
        var cn: String?
        for rdn in c.subject { for a in rdn where a.type == .RDNAttributeType.commonName { cn = cn ?? "\(a.value)" } }
        return (cn ?? c.subject.description, (try? uris(c)) ?? [], keyID(c.publicKey))
    }

    /// A certificate's URI SANs, in order; throws when its SAN extension does not parse.
    public static func uris(_ c: Certificate) throws -> [String] {
        var uris: [String] = []
        for case .uniformResourceIdentifier(let u) in try c.extensions.subjectAlternativeNames ?? SubjectAlternativeNames() {
            uris.append(u)
        }
        return uris
    }

    /// Summarizes `certificate`.
    public init(_ certificate: Certificate) {
        subject = certificate.subject.description
        issuer = certificate.issuer.description
        serial = Self.hex(certificate.serialNumber)
        notBefore = certificate.notValidBefore
        notAfter = certificate.notValidAfter
        let (dns, ips) = Self.alternativeNames(certificate)
        dnsNames = dns
        ipAddresses = ips
        if let eku = (try? certificate.extensions.extendedKeyUsage) ?? nil {
            extendedKeyUsage = eku.map { $0.description }
        } else {
            extendedKeyUsage = []
        }
        keyType = Self.keyStrength(certificate.publicKey).name
        if case .isCertificateAuthority = (try? certificate.extensions.basicConstraints) ?? nil { isCA = true } else { isCA = false }
        scts = ((try? CertificateTransparency.embeddedSCTs(certificate)) ?? []).map {
            SCTSummary(
                logID: Data($0.logID).base64EncodedString(),
                timestamp: Date(timeIntervalSince1970: TimeInterval($0.timestamp) / 1000), status: "unchecked")
        }
    }

    /// A serial number as plain lower-case hex: the one form `show` prints, refusals name and
    /// revocation files accept.
    /// A serial number as lowercase hex, two digits a byte (as `openssl x509 -serial` prints it).
    public static func hex(_ serial: Certificate.SerialNumber) -> String {
        serial.bytes.map { String(format: "%02x", $0) }.joined()
    }

    /// The DNS names and IP addresses in the subject alternative name extension.
    static func alternativeNames(_ certificate: Certificate) -> (dns: [String], ips: [String]) {
        var dns: [String] = [], ips: [String] = []
        guard let sans = (try? certificate.extensions.subjectAlternativeNames) ?? nil else { return ([], []) }
        for name in sans {
            switch name {
            case .dnsName(let n): dns.append(n)
            case .ipAddress(let octets):
                let b = Array(octets.bytes)
                if b.count == 16 {
                    let a = IPv6Address(
                        bytes: (
                            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
                            b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
                        ))
                    ips.append(a.description)
                } else {
                    ips.append(b.map(String.init).joined(separator: "."))
                }
            default: continue
            }
        }
        return (dns, ips)
    }

    /// A key's name and whether STOQ accepts it: ECDSA P-256/P-384/P-521, Ed25519, RSA ≥ 2048.
    /// P-521 is accepted: a NIST curve that GnuTLS (the handshake) and swift-crypto both
    /// implement, at least as strong as P-384; refusing it would only turn away valid peers.
    static func keyStrength(_ key: Certificate.PublicKey) -> (name: String, acceptable: Bool) {
        if P256.Signing.PublicKey(key) != nil { return ("ECDSA P-256", true) }
        if P384.Signing.PublicKey(key) != nil { return ("ECDSA P-384", true) }
        if Curve25519.Signing.PublicKey(key) != nil { return ("Ed25519", true) }
        if let rsa = _RSA.Signing.PublicKey(key) { return ("RSA-\(rsa.keySizeInBits)", rsa.keySizeInBits >= 2048) }
        if P521.Signing.PublicKey(key) != nil { return ("ECDSA P-521", true) }
        return ("\(key)", false)
    }
}
