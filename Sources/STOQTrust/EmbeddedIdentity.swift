import Crypto
import Foundation
import STOQCore
import SwiftASN1
import X509

/// The node's own identity until TrustChain issues it one: an ECDSA P-256 key and a
/// self-signed certificate (which clients trust with `--ca <cert.pem>`), kept under
/// `<data_dir>/identity/` with mode 0600.
public struct EmbeddedIdentity: Sendable {
    /// PEM certificate path.
    public let certificatePath: String
    /// PEM private key path.
    public let keyPath: String

    /// Loads the identity under `directory`, creating it first if it does not exist.
    /// The certificate names `localhost`, `names`, `::1` and `addresses`.
    public static func loadOrCreate(
        in directory: String, names: [String], addresses: [IPv6Address],
        lifetime: TimeInterval = 365 * 86400
    ) throws -> EmbeddedIdentity {
        let fm = FileManager.default
        let cert = directory + "/cert.pem", key = directory + "/key.pem"
        if fm.fileExists(atPath: cert) && fm.fileExists(atPath: key) {
            return EmbeddedIdentity(certificatePath: cert, keyPath: key)
        }
        try fm.createDirectory(
            atPath: directory, withIntermediateDirectories: true,
            attributes: [.posixPermissions: 0o700])
        let (certPEM, keyPEM) = try makeSelfSigned(names: names, addresses: addresses, lifetime: lifetime)
        try writePrivate(keyPEM, to: key)
        try writePrivate(certPEM, to: cert)
        return EmbeddedIdentity(certificatePath: cert, keyPath: key)
    }

    /// A self-signed certificate and key as PEM strings.
    public static func makeSelfSigned(
        names: [String], addresses: [IPv6Address],
        lifetime: TimeInterval = 365 * 86400
    ) throws -> (certificate: String, key: String) {
        let signingKey = P256.Signing.PrivateKey()
        let key = Certificate.PrivateKey(signingKey)
        let subject = try DistinguishedName {
            OrganizationName("STOQ")
            CommonName(names.first ?? "localhost")
        }
        var sans: [GeneralName] = []
        var seenNames = Set<String>()
        for n in ["localhost"] + names where !n.isEmpty && seenNames.insert(n).inserted { sans.append(.dnsName(n)) }
        var seenAddrs = Set<IPv6Address>()
        for a in [IPv6Address.loopback] + addresses where seenAddrs.insert(a).inserted {
            let bytes = withUnsafeBytes(of: a.bytes) { Array($0) }
            sans.append(.ipAddress(ASN1OctetString(contentBytes: ArraySlice(bytes))))
        }
        let now = Date()
        let extensions = try Certificate.Extensions {
            Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
            Critical(KeyUsage(digitalSignature: true, keyCertSign: true))
            try ExtendedKeyUsage([.serverAuth, .clientAuth])
            SubjectAlternativeNames(sans)
        }
        let certificate = try Certificate(
            version: .v3, serialNumber: randomSerial(), publicKey: key.publicKey,
            notValidBefore: now.addingTimeInterval(-300), notValidAfter: now.addingTimeInterval(lifetime),
            issuer: subject, subject: subject, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: extensions, issuerPrivateKey: key)
        return (try certificate.serializeAsPEM().pemString + "\n", signingKey.pemRepresentation + "\n")
    }

    /// 16 random bytes with the top bit clear: a 20-byte random serial (the library's default)
    /// DER-encodes to 21 bytes half the time, and GnuTLS refuses serials over 20 bytes.
    static func randomSerial() -> Certificate.SerialNumber {
        var bytes = (0..<16).map { _ in UInt8.random(in: 0...255) }
        bytes[0] = (bytes[0] & 0x7f) | 0x01
        return Certificate.SerialNumber(bytes: bytes)
    }

    private static func writePrivate(_ text: String, to path: String) throws {
        let tmp = path + ".tmp"
        guard
            FileManager.default.createFile(
                atPath: tmp, contents: Data(text.utf8),
                attributes: [.posixPermissions: 0o600])
        else {
            throw CocoaError(.fileWriteUnknown, userInfo: [NSFilePathErrorKey: tmp])
        }
        guard rename(tmp, path) == 0 else {
            throw CocoaError(.fileWriteUnknown, userInfo: [NSFilePathErrorKey: path])
        }
    }
}
