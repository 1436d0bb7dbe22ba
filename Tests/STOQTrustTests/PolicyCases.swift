import _CryptoExtras
import Crypto
import Foundation
import SwiftASN1
import X509
@testable import STOQTrust

/// A signing identity for building test chains: certificate, key, and the signature algorithm
/// its key signs with.
struct Signer {
    let cert: Certificate
    let key: Certificate.PrivateKey
    let algorithm: Certificate.SignatureAlgorithm
}

/// Key types a case can use.
enum KeyKind {
    case p256, p384, p521, ed25519, rsa2048, rsa1024

    func make() throws -> (key: Certificate.PrivateKey, algorithm: Certificate.SignatureAlgorithm) {
        switch self {
        case .p256: (Certificate.PrivateKey(P256.Signing.PrivateKey()), .ecdsaWithSHA256)
        case .p384: (Certificate.PrivateKey(P384.Signing.PrivateKey()), .ecdsaWithSHA384)
        case .p521: (Certificate.PrivateKey(P521.Signing.PrivateKey()), .ecdsaWithSHA512)
        case .ed25519: (Certificate.PrivateKey(Curve25519.Signing.PrivateKey()), .ed25519)
        case .rsa2048: (Certificate.PrivateKey(try _RSA.Signing.PrivateKey(keySize: .bits2048)), .sha256WithRSAEncryption)
        case .rsa1024: (Certificate.PrivateKey(try _RSA.Signing.PrivateKey(unsafeKeySize: .init(bitCount: 1024))), .sha256WithRSAEncryption)
        }
    }
}

/// One certificate set judged by the policy: the chain a peer sends (leaf first) and its key,
/// the roots the judge trusts, what it expects, and the verdict the policy must give.
struct PolicyCase: Sendable, CustomStringConvertible {
    let name: String
    /// The role of the peer whose certificate is judged.
    let role: PeerVerifier.Role
    let chain: [Certificate]
    let keyPEM: String
    let roots: [Certificate]
    let revoked: Set<Certificate.SerialNumber>
    /// What the client dials (role server only).
    let serverName: String?
    /// The expected refusal code; nil: accepted.
    let expected: PeerVerificationError.Code?
    /// Text the refusal message must contain.
    let messageContains: String?

    /// The leaf's keyUsage forbids signing, so no GnuTLS peer can present it.
    var unpresentable: Bool {
        if let ku = (try? chain[0].extensions.keyUsage) ?? nil { return !ku.digitalSignature }
        return false
    }

    var description: String { "\(role == .server ? "server" : "client") cert: \(name)" }

    var verifier: PeerVerifier { PeerVerifier(roots: roots, revokedSerials: revoked, role: role) }
    var derChain: [[UInt8]] { chain.map(PeerVerifier.der) }
}

/// Builds the shared case set: the refusals PeerVerifierTests covers, P-521, and the depth
/// edge cases, for a server's and for a client's certificate.
enum PolicyCases {
    static let name = "node1.stoq.test"

    static func certificate(
        _ cn: String, key: Certificate.PublicKey, issuer: Signer?, selfKey: Certificate.PrivateKey? = nil,
        signatureAlgorithm: Certificate.SignatureAlgorithm? = nil, ca: Bool = false,
        keyUsage: KeyUsage? = nil, eku: [ExtendedKeyUsage.Usage]? = [.serverAuth, .clientAuth],
        dns: [String]? = [name], ips: [String] = [],
        notBefore: Date = Date() - 600, notAfter: Date = Date() + 86400
    ) throws -> Certificate {
        let subject = try DistinguishedName { CommonName(cn) }
        let ku = keyUsage ?? (ca ? KeyUsage(keyCertSign: true) : KeyUsage(digitalSignature: true))
        let exts = try Certificate.Extensions {
            Critical(ca ? BasicConstraints.isCertificateAuthority(maxPathLength: nil) : BasicConstraints.notCertificateAuthority)
            Critical(ku)
            if let eku { try ExtendedKeyUsage(eku) }
            if dns != nil || !ips.isEmpty {
                SubjectAlternativeNames(
                    (dns ?? []).map { .dnsName($0) }
                        + ips.map { ip in
                            var a = in6_addr()
                            _ = inet_pton(AF_INET6, ip, &a)
                            return .ipAddress(ASN1OctetString(contentBytes: ArraySlice(withUnsafeBytes(of: &a) { Array($0) })))
                        })
            }
        }
        return try Certificate(
            version: .v3, serialNumber: CertFactory.serial(), publicKey: key, notValidBefore: notBefore, notValidAfter: notAfter,
            issuer: issuer?.cert.subject ?? subject, subject: subject,
            signatureAlgorithm: signatureAlgorithm ?? issuer?.algorithm ?? .ecdsaWithSHA256,
            extensions: exts, issuerPrivateKey: issuer?.key ?? selfKey!)
    }

    static func root(_ cn: String) throws -> Signer {
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        return Signer(
            cert: try certificate(cn, key: key.publicKey, issuer: nil, selfKey: key, ca: true, eku: nil, dns: nil),
            key: key, algorithm: .ecdsaWithSHA256)
    }

    static func intermediate(_ cn: String, under issuer: Signer, kind: KeyKind = .p256, keyUsage: KeyUsage? = nil) throws -> Signer {
        let (key, alg) = try kind.make()
        return Signer(
            cert: try certificate(cn, key: key.publicKey, issuer: issuer, ca: true, keyUsage: keyUsage, eku: nil, dns: nil),
            key: key, algorithm: alg)
    }

    static func pem(_ key: Certificate.PrivateKey) throws -> String { try key.serializeAsPEM().pemString + "\n" }

    /// Every case for `role`.
    static func all(_ role: PeerVerifier.Role) throws -> [PolicyCase] {
        let root = try Self.root("Case Root")
        let inter = try intermediate("Case Intermediate", under: root)
        let otherRoot = try Self.root("Other Root")
        let otherInter = try intermediate("Case Intermediate", under: otherRoot)
        var cases: [PolicyCase] = []
        let dialled = role == .server ? name : nil

        func add(
            _ name: String, _ kind: KeyKind = .p256, issuer: Signer? = nil, extra: [Certificate]? = nil,
            roots: [Certificate]? = nil, revokeLeaf: Bool = false, serverName: String? = dialled,
            expect: PeerVerificationError.Code?, contains: String? = nil,
            leaf build: ((Certificate.PublicKey, Signer) throws -> Certificate)? = nil
        ) throws {
            let (key, _) = try kind.make()
            let signer = issuer ?? inter
            let leaf = try build?(key.publicKey, signer) ?? certificate("leaf.test", key: key.publicKey, issuer: signer)
            cases.append(
                PolicyCase(
                    name: name, role: role, chain: [leaf] + (extra ?? [inter.cert]), keyPEM: try pem(key),
                    roots: roots ?? [root.cert], revoked: revokeLeaf ? [leaf.serialNumber] : [],
                    serverName: serverName, expected: expect, messageContains: contains))
        }

        try add("valid P-256", expect: nil)
        try add("valid P-384", .p384, expect: nil)
        try add("valid P-521 (accepted in both roles)", .p521, expect: nil)
        try add("valid Ed25519", .ed25519, expect: nil)
        try add("valid RSA-2048", .rsa2048, expect: nil)
        try add("RSA-1024", .rsa1024, expect: .keyTooWeak, contains: "has a RSA-1024 key")
        let rsaInter = try intermediate("RSA Intermediate", under: root, kind: .rsa2048)
        try add(
            "SHA-1 signature", .rsa2048, issuer: rsaInter, extra: [rsaInter.cert], expect: .weakSignature,
            contains: "leaf CN=leaf.test is signed with SHA-1"
        ) { k, s in
            try certificate("leaf.test", key: k, issuer: s, signatureAlgorithm: .sha1WithRSAEncryption)
        }
        try add("no EKU", expect: .wrongEKU, contains: "has no extended key usage") { k, s in
            try certificate("leaf.test", key: k, issuer: s, eku: nil)
        }
        let otherUsage: ExtendedKeyUsage.Usage = role == .server ? .clientAuth : .serverAuth
        try add("EKU of the other role only", expect: .wrongEKU) { k, s in
            try certificate("leaf.test", key: k, issuer: s, eku: [otherUsage])
        }
        try add("CA:TRUE leaf", expect: .invalidChain, contains: "is a CA certificate") { k, s in
            try certificate("leaf.test", key: k, issuer: s, ca: true, keyUsage: KeyUsage(digitalSignature: true, keyCertSign: true))
        }
        try add("keyCertSign-only leaf", expect: .wrongKeyUsage, contains: "without digitalSignature") { k, s in
            try certificate("leaf.test", key: k, issuer: s, keyUsage: KeyUsage(keyCertSign: true))
        }
        let noSign = try intermediate("No-Sign Intermediate", under: root, keyUsage: KeyUsage(digitalSignature: true))
        try add(
            "intermediate without keyCertSign", issuer: noSign, extra: [noSign.cert], expect: .wrongKeyUsage,
            contains: "lacks keyCertSign")
        try add("expired", expect: .expired) { k, s in
            try certificate("leaf.test", key: k, issuer: s, notBefore: Date() - 7200, notAfter: Date() - 3600)
        }
        try add("not yet valid", expect: .notYetValid) { k, s in
            try certificate("leaf.test", key: k, issuer: s, notBefore: Date() + 3600, notAfter: Date() + 7200)
        }
        try add("unknown root", issuer: otherInter, extra: [otherInter.cert], expect: .unknownRoot)
        try add(
            "broken leaf signature", expect: .unknownRoot,
            contains: "signature of leaf CN=leaf.test does not verify with the key of its issuer CN=Case Intermediate"
        ) { k, _ in
            // Names the real intermediate as issuer, signed by another key.
            try certificate("leaf.test", key: k, issuer: otherInter)
        }
        try add("revoked", revokeLeaf: true, expect: .revoked)
        // Depth, counted leaf to root over the verified path (the limit is 4).
        let i1 = try intermediate("Depth 1", under: root)
        let i2 = try intermediate("Depth 2", under: i1)
        let i3 = try intermediate("Depth 3", under: i2)
        try add("depth 4 (leaf, 2 intermediates, root)", issuer: i2, extra: [i2.cert, i1.cert], expect: nil)
        try add(
            "depth 5, four sent", issuer: i3, extra: [i3.cert, i2.cert, i1.cert], expect: .chainTooLong,
            contains: "chain of 5 certificates (leaf to root) exceeds the maximum of 4")
        var deep = root
        var sent: [Certificate] = []
        for d in 1...8 {
            deep = try intermediate("Deep \(d)", under: deep)
            sent.insert(deep.cert, at: 0)
        }
        try add(
            "depth 10", issuer: deep, extra: sent, expect: .chainTooLong,
            contains: "chain of 10 certificates (leaf to root) exceeds the maximum of 4")
        if role == .server {
            try add("name only in the subject CN", expect: .sanMismatch, contains: "has no subject alternative name") { k, s in
                try certificate(name, key: k, issuer: s, dns: nil)
            }
            try add(
                "SAN names another host", serverName: "node2.stoq.test", expect: .sanMismatch,
                contains: "names [DNS:node1.stoq.test], not DNS:node2.stoq.test")
            try add("IPv6 SAN dialled by address", serverName: "fd00::1", expect: nil) { k, s in
                try certificate("leaf.test", key: k, issuer: s, ips: ["fd00::1"])
            }
        }
        return cases
    }
}
