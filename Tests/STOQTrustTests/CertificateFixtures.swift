import Crypto
import Foundation
import SwiftASN1
import X509
@testable import STOQTrust

/// Builds certificates by hand with swift-certificates, to make the bad ones `TrustAuthority`
/// refuses to issue.
enum CertFactory {
    static func serial() -> Certificate.SerialNumber {
        var b = (0..<16).map { _ in UInt8.random(in: 0...255) }
        b[0] = (b[0] & 0x7f) | 1
        return Certificate.SerialNumber(bytes: b)
    }

    static func name(_ cn: String) -> DistinguishedName {
        try! DistinguishedName { CommonName(cn) }
    }

    /// A self-signed CA with `pathLength` (nil: unlimited).
    static func root(_ cn: String, pathLength: Int? = nil, now: Date = Date())
        -> (cert: Certificate, key: Certificate.PrivateKey)
    {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let cert = try! Certificate(
            version: .v3, serialNumber: serial(), publicKey: key.publicKey,
            notValidBefore: now - 3600, notValidAfter: now + 86400 * 30,
            issuer: name(cn), subject: name(cn), signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try! Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: pathLength))
                Critical(KeyUsage(keyCertSign: true))
            },
            issuerPrivateKey: key)
        return (cert, key)
    }

    /// A CA signed by `issuer`.
    static func intermediate(
        _ cn: String, issuer: (cert: Certificate, key: Certificate.PrivateKey),
        pathLength: Int? = nil, now: Date = Date()
    ) -> (cert: Certificate, key: Certificate.PrivateKey) {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let cert = try! Certificate(
            version: .v3, serialNumber: serial(), publicKey: key.publicKey,
            notValidBefore: now - 3600, notValidAfter: now + 86400 * 30,
            issuer: issuer.cert.subject, subject: name(cn), signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try! Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: pathLength))
                Critical(KeyUsage(keyCertSign: true))
            },
            issuerPrivateKey: issuer.key)
        return (cert, key)
    }

    /// A leaf for `publicKey` signed by `issuer`, with the given EKUs and SANs.
    static func leaf(
        _ cn: String, publicKey: Certificate.PublicKey, issuer: (cert: Certificate, key: Certificate.PrivateKey),
        eku: [ExtendedKeyUsage.Usage]? = [.serverAuth, .clientAuth], dns: [String] = ["node1.stoq.test"],
        notBefore: Date = Date() - 60, notAfter: Date = Date() + 3600,
        serialNumber: Certificate.SerialNumber = serial()
    ) -> Certificate {
        try! Certificate(
            version: .v3, serialNumber: serialNumber, publicKey: publicKey,
            notValidBefore: notBefore, notValidAfter: notAfter,
            issuer: issuer.cert.subject, subject: name(cn), signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try! Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                if let eku { try ExtendedKeyUsage(eku) }
                SubjectAlternativeNames(dns.map { .dnsName($0) })
            },
            issuerPrivateKey: issuer.key)
    }
}

/// An authority on disk plus its intermediate key (read back from the file), so tests can
/// sign certificates the authority itself would refuse to issue.
struct AuthorityFixture {
    let dir: TempDir
    let authority: TrustAuthority
    let intermediateKey: Certificate.PrivateKey

    init() throws {
        dir = TempDir()
        authority = try TrustAuthority.create(in: dir.path + "/ca")
        let pem = try String(contentsOfFile: dir.path + "/ca/" + TrustAuthority.FileName.intermediateKey, encoding: .utf8)
        intermediateKey = try Certificate.PrivateKey(pemEncoded: pem)
    }

    var issuer: (cert: Certificate, key: Certificate.PrivateKey) { (authority.intermediate, intermediateKey) }

    func newKey() -> Certificate.PublicKey { Certificate.PublicKey(P256.Signing.PrivateKey().publicKey) }
}
