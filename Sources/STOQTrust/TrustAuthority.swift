import Crypto
import Foundation
import STOQCore
import SwiftASN1
import X509
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The TrustChain certificate authority: an offline-capable root, an online intermediate, and
/// node certificates issued by the intermediate.
///
/// Files under the authority's directory (mode 0700):
/// - `root.pem` — the root certificate: the bundle peers trust.
/// - `root-key.pem` (0600) — the root key, in its own file so it can be moved offline;
///   issuing never reads it.
/// - `intermediate.pem`, `intermediate-key.pem` (0600) — the issuing CA.
///
/// All keys are ECDSA P-256. The root allows one CA below it (pathlen 1) and the intermediate
/// none (pathlen 0), so a leaked node key can never mint certificates.
public struct TrustAuthority: Sendable {
    /// File names inside the authority's directory.
    public enum FileName {
        /// The root certificate.
        public static let rootCertificate = "root.pem"
        /// The root key (move it offline after `create`).
        public static let rootKey = "root-key.pem"
        /// The intermediate certificate.
        public static let intermediateCertificate = "intermediate.pem"
        /// The intermediate key.
        public static let intermediateKey = "intermediate-key.pem"
        /// The transparency log of issued certificates (`TransparencyLog.openForAuthority`).
        public static let transparencyLog = "transparency.log"
        /// The log's signing key (P-256, 0600), created on first use.
        public static let logKey = "log-key.pem"
        /// Revoked serials, one hex serial per line (`PEMFiles.readSerials`): where `stoq trust
        /// serve` writes its revocations and a node whose CA this is reads them.
        public static let revoked = "revoked.txt"
    }

    /// The default node certificate lifetime: short, so rotation rather than revocation is
    /// the normal way a certificate stops being trusted.
    public static let defaultLifetime: TimeInterval = 24 * 3600
    /// How far notBefore is backdated, so peers whose clocks lag slightly accept a fresh certificate.
    public static let backdate: TimeInterval = 60
    /// How long before the intermediate ends `renewIntermediateIfDue` re-issues it. 30 days is
    /// far above the 24 h node rotation: dozens of renewals each get a chance, and when one
    /// cannot (the root key moved offline) the operator has a month of log lines to act on
    /// before node certificates, clamped to the intermediate's end, stop being issued.
    public static let intermediateRenewalMargin: TimeInterval = 30 * 86400
    /// How long before the root ends `rootExpiryWarning` speaks up. Nothing renews a root in
    /// place: a new one has to reach every peer's and client's trust bundle first, by hand,
    /// across the fleet, so half a year ahead.
    public static let rootExpiryWarningWindow: TimeInterval = 180 * 86400

    /// The directory holding the authority's files.
    public let directory: String
    /// The root certificate (the trust anchor).
    public let root: Certificate
    /// The intermediate certificate, which signs node certificates.
    public let intermediate: Certificate
    private let intermediateKey: Certificate.PrivateKey

    /// Creates a new root and intermediate under `directory` and writes them out. Refuses if
    /// any of the authority's files already exists: keys are never overwritten.
    public static func create(
        in directory: String, name: String = "STOQ", now: Date = Date(),
        rootLifetime: TimeInterval = 10 * 365 * 86400,
        intermediateLifetime: TimeInterval = 3 * 365 * 86400
    ) throws -> TrustAuthority {
        let fm = FileManager.default
        for f in [FileName.rootCertificate, FileName.rootKey, FileName.intermediateCertificate, FileName.intermediateKey]
        where fm.fileExists(atPath: directory + "/" + f) {
            throw TrustError(.alreadyExists, "\(directory)/\(f) already exists; refusing to overwrite an authority")
        }
        guard rootLifetime > 0, intermediateLifetime > 0, intermediateLifetime <= rootLifetime else {
            throw TrustError(.invalidLifetime, "CA lifetimes must be positive and the intermediate's within the root's")
        }
        do {
            try fm.createDirectory(
                atPath: directory, withIntermediateDirectories: true,
                attributes: [.posixPermissions: 0o700])
        } catch {
            throw TrustError(.io, "\(directory): cannot create (\(error.localizedDescription))")
        }

        let rootP256 = P256.Signing.PrivateKey()
        let rootKey = Certificate.PrivateKey(rootP256)
        let rootName = try DistinguishedName {
            OrganizationName(name)
            CommonName("\(name) Root CA")
        }
        let rootSKI = SubjectKeyIdentifier(hash: rootKey.publicKey)
        let root = try Certificate(
            version: .v3, serialNumber: randomSerial(), publicKey: rootKey.publicKey,
            notValidBefore: now.addingTimeInterval(-backdate), notValidAfter: now.addingTimeInterval(rootLifetime),
            issuer: rootName, subject: rootName, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 1))
                Critical(KeyUsage(keyCertSign: true, cRLSign: true))
                rootSKI
            },
            issuerPrivateKey: rootKey)

        let interP256 = P256.Signing.PrivateKey()
        let interKey = Certificate.PrivateKey(interP256)
        let interName = try DistinguishedName {
            OrganizationName(name)
            CommonName("\(name) Intermediate CA")
        }
        let intermediate = try Certificate(
            version: .v3, serialNumber: randomSerial(), publicKey: interKey.publicKey,
            notValidBefore: now.addingTimeInterval(-backdate), notValidAfter: now.addingTimeInterval(intermediateLifetime),
            issuer: rootName, subject: interName, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                Critical(KeyUsage(keyCertSign: true, cRLSign: true))
                SubjectKeyIdentifier(hash: interKey.publicKey)
                AuthorityKeyIdentifier(keyIdentifier: rootSKI.keyIdentifier)
            },
            issuerPrivateKey: rootKey)

        // Keys first: a crash part-way leaves files that make the next `create` refuse rather
        // than certificates whose keys are lost.
        try PEMFiles.writeFile(rootP256.pemRepresentation + "\n", to: directory + "/" + FileName.rootKey, mode: 0o600)
        try PEMFiles.writeFile(interP256.pemRepresentation + "\n", to: directory + "/" + FileName.intermediateKey, mode: 0o600)
        try PEMFiles.writeFile(try PEMFiles.pem([root]), to: directory + "/" + FileName.rootCertificate, mode: 0o644)
        try PEMFiles.writeFile(try PEMFiles.pem([intermediate]), to: directory + "/" + FileName.intermediateCertificate, mode: 0o644)
        return TrustAuthority(directory: directory, root: root, intermediate: intermediate, intermediateKey: interKey)
    }

    /// Loads an authority created by `create`. Needs the root certificate, the intermediate
    /// certificate and the intermediate key — not the root key.
    public static func load(from directory: String) throws -> TrustAuthority {
        let root = try PEMFiles.readCertificates(directory + "/" + FileName.rootCertificate)[0]
        let intermediate = try PEMFiles.readCertificates(directory + "/" + FileName.intermediateCertificate)[0]
        let keyPath = directory + "/" + FileName.intermediateKey
        let key: Certificate.PrivateKey
        do { key = try Certificate.PrivateKey(pemEncoded: try PEMFiles.readText(keyPath)) } catch let e as TrustError {
            throw e
        } catch {
            throw TrustError(.invalidPEM, "\(keyPath): not a private key (\(error))")
        }
        guard key.publicKey == intermediate.publicKey else {
            throw TrustError(.invalidPEM, "\(keyPath) does not match \(directory)/\(FileName.intermediateCertificate)")
        }
        return TrustAuthority(directory: directory, root: root, intermediate: intermediate, intermediateKey: key)
    }

    /// Re-issues the intermediate from the root once it has less than `margin` left, and
    /// returns the authority that issues with it; nil when it is not due (or a new one could
    /// end no later, the root ending first). The new intermediate keeps the subject, the key
    /// and every extension, and gets the old one's lifetime again (at most to the root's end):
    /// peers trust the root and verify the path the chain gives them, so they accept it at
    /// once, and as the key and its identifier are the same, a certificate issued under either
    /// verifies under both. Keeping the key also makes the change one file (`intermediate.pem`,
    /// replaced atomically), so no crash can leave a certificate beside a key that is not its.
    ///
    /// Needs the root key (`root-key.pem` in the directory); throws `missingFile` naming the
    /// date and what to do when it has been moved offline, `invalidLifetime` when the root has
    /// itself expired.
    public func renewIntermediateIfDue(
        now: Date = Date(), margin: TimeInterval = TrustAuthority.intermediateRenewalMargin
    ) throws -> TrustAuthority? {
        guard intermediate.notValidAfter.timeIntervalSince(now) < margin else { return nil }
        let lifetime = intermediate.notValidAfter.timeIntervalSince(intermediate.notValidBefore) - Self.backdate
        let notAfter = min(now.addingTimeInterval(lifetime), root.notValidAfter)
        guard notAfter > intermediate.notValidAfter else { return nil }
        guard root.notValidAfter > now else {
            throw TrustError(
                .invalidLifetime,
                "the root CA \(directory)/\(FileName.rootCertificate) expired at \(root.notValidAfter); nothing it signs verifies: create a new authority (stoq trust init) and give its root.pem to every peer"
            )
        }
        let keyPath = directory + "/" + FileName.rootKey
        guard FileManager.default.fileExists(atPath: keyPath) else {
            throw TrustError(
                .missingFile,
                "the intermediate CA \(directory)/\(FileName.intermediateCertificate) expires at \(intermediate.notValidAfter) and \(keyPath), which re-issues it, is not there: put the root key back (it is re-issued at the next renewal); until then certificates end with the intermediate"
            )
        }
        let rootKey: Certificate.PrivateKey
        do { rootKey = Certificate.PrivateKey(try PEMFiles.p256PrivateKey(pem: try PEMFiles.readText(keyPath))) } catch let e as TrustError {
            throw e
        } catch {
            throw TrustError(.invalidPEM, "\(keyPath): not a P-256 private key (\(error))")
        }
        guard rootKey.publicKey == root.publicKey else {
            throw TrustError(.invalidPEM, "\(keyPath) does not match \(directory)/\(FileName.rootCertificate)")
        }
        let renewed = try Certificate(
            version: .v3, serialNumber: Self.randomSerial(), publicKey: intermediate.publicKey,
            notValidBefore: now.addingTimeInterval(-Self.backdate), notValidAfter: notAfter,
            issuer: root.subject, subject: intermediate.subject, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: intermediate.extensions, issuerPrivateKey: rootKey)
        try PEMFiles.writeFile(
            try PEMFiles.pem([renewed]), to: directory + "/" + FileName.intermediateCertificate, mode: 0o644)
        return TrustAuthority(directory: directory, root: root, intermediate: renewed, intermediateKey: intermediateKey)
    }

    /// A warning to log when the root has less than `within` left, naming its end and what the
    /// operator must do; nil while it has more.
    public func rootExpiryWarning(now: Date = Date(), within: TimeInterval = TrustAuthority.rootExpiryWarningWindow) -> String? {
        let left = root.notValidAfter.timeIntervalSince(now)
        guard left < within else { return nil }
        let when =
            left > 0
            ? "expires at \(root.notValidAfter) (in \(Int(left / 86400)) days)" : "expired at \(root.notValidAfter)"
        return
            "the TrustChain root CA \(directory)/\(FileName.rootCertificate) \(when), and nothing renews a root in place: every certificate it anchors stops verifying then. Create a new authority (stoq trust init --dir NEW), add NEW/root.pem to every peer's and client's trust bundle beside the old root, then move this CA's issuing to NEW"
    }

    /// Issues a node certificate for `publicKey`, signed by the intermediate.
    ///
    /// - Parameters:
    ///   - dnsNames: host names for the subject alternative name (at least one name or address overall).
    ///   - ipv6Addresses: IPv6 addresses in text form; IPv4 is refused (`ipv4Refused`).
    ///   - lifetime: seconds from `now` (default 24 h); cut to end with the intermediate if it
    ///     would outlive it. Refused (`invalidLifetime`) once the intermediate has expired.
    ///   - log: the transparency log. With one, the precertificate flow of RFC 6962 §3.1 runs:
    ///     a precertificate (same fields plus the critical poison) is signed and logged — durably,
    ///     before this returns — and the final certificate carries the log's SCT as its last
    ///     extension. Without one (tests, tools that only need a certificate) nothing is logged
    ///     and the certificate has no SCT; every CA role in STOQ passes its log.
    ///   - uris: SAN URIs, e.g. `urn:stoq:role:writer` (the access roles a client certificate
    ///     grants). A certificate with URIs but no DNS name or address is a client's: it gets
    ///     clientAuth only, and `commonName` (default "stoq client") as its subject.
    public func issue(
        publicKey: Certificate.PublicKey, dnsNames: [String], ipv6Addresses: [String] = [],
        uris: [String] = [], commonName: String? = nil,
        lifetime: TimeInterval = TrustAuthority.defaultLifetime, now: Date = Date(),
        log: (any PrecertificateLog)? = nil
    ) throws -> Certificate {
        let names = try dnsNames.map(Self.validatedDNSName)
        let addresses = try ipv6Addresses.map(Self.parseIPv6)
        guard !names.isEmpty || !addresses.isEmpty || !uris.isEmpty else {
            throw TrustError(.noSubjectAlternativeNames, "a node certificate needs at least one DNS name or IPv6 address")
        }
        let clientOnly = names.isEmpty && addresses.isEmpty
        guard lifetime > 0 else {
            throw TrustError(.invalidLifetime, "lifetime \(String(format: "%g", lifetime))s: expected more than 0 seconds")
        }
        // Clamped rather than refused: a certificate that ends with its issuer is still one a
        // node can serve with while the intermediate is re-issued (`renewIntermediateIfDue`).
        let notAfter = min(now.addingTimeInterval(lifetime), intermediate.notValidAfter)
        guard notAfter > now else {
            throw TrustError(
                .invalidLifetime,
                "the intermediate CA \(directory)/\(FileName.intermediateCertificate) expired at \(intermediate.notValidAfter): re-issue it from the root (a node does so itself at its next renewal while \(FileName.rootKey) is in \(directory))"
            )
        }
        var sans: [GeneralName] = []
        var seenNames = Set<String>(), seenAddrs = Set<IPv6Address>()
        for n in names where seenNames.insert(n).inserted { sans.append(.dnsName(n)) }
        for a in addresses where seenAddrs.insert(a).inserted {
            sans.append(.ipAddress(ASN1OctetString(contentBytes: ArraySlice(withUnsafeBytes(of: a.bytes) { Array($0) }))))
        }
        for u in uris where !sans.contains(.uniformResourceIdentifier(u)) { sans.append(.uniformResourceIdentifier(u)) }
        let subject = try DistinguishedName { CommonName(commonName ?? names.first ?? addresses.first?.description ?? "stoq client") }
        let issuerSKI =
            (try? intermediate.extensions.subjectKeyIdentifier)??.keyIdentifier
            ?? SubjectKeyIdentifier(hash: intermediate.publicKey).keyIdentifier
        let extensions = try Certificate.Extensions {
            Critical(BasicConstraints.notCertificateAuthority)
            Critical(KeyUsage(digitalSignature: true))
            try ExtendedKeyUsage(clientOnly ? [.clientAuth] : [.serverAuth, .clientAuth])
            SubjectAlternativeNames(sans)
            SubjectKeyIdentifier(hash: publicKey)
            AuthorityKeyIdentifier(keyIdentifier: issuerSKI)
        }
        // Precertificate and final certificate share every field but the last extension, so
        // the log's entry (TBS without poison) is the final TBS without its SCT list.
        let serial = Self.randomSerial()
        func sign(_ last: Certificate.Extension?) throws -> Certificate {
            var exts = extensions
            if let last { try exts.append(last) }
            return try Certificate(
                version: .v3, serialNumber: serial, publicKey: publicKey,
                notValidBefore: now.addingTimeInterval(-Self.backdate), notValidAfter: notAfter,
                issuer: intermediate.subject, subject: subject, signatureAlgorithm: .ecdsaWithSHA256,
                extensions: exts, issuerPrivateKey: intermediateKey)
        }
        guard let log else { return try sign(nil) }
        let precert = try sign(CertificateTransparency.poison)
        let sct = try log.addPrecertificate(precert, issuer: intermediate)
        return try sign(CertificateTransparency.sctListExtension([sct]))
    }

    /// Issues a node certificate for the key in a certificate signing request, after checking
    /// the request's signature (proof the requester holds the key). Names come from the
    /// arguments, never from the request: the authority decides what a node may claim.
    public func issue(
        csr: CertificateSigningRequest, dnsNames: [String], ipv6Addresses: [String] = [],
        uris: [String] = [], commonName: String? = nil,
        lifetime: TimeInterval = TrustAuthority.defaultLifetime, now: Date = Date(),
        log: (any PrecertificateLog)? = nil
    ) throws -> Certificate {
        guard csr.publicKey.isValidSignature(csr.signature, for: csr) else {
            throw TrustError(.invalidCSR, "the CSR's signature does not verify with its own public key")
        }
        return try issue(
            publicKey: csr.publicKey, dnsNames: dnsNames, ipv6Addresses: ipv6Addresses,
            uris: uris, commonName: commonName, lifetime: lifetime, now: now, log: log)
    }

    /// Generates a P-256 key and issues a certificate for it. Returns the chain (node, then
    /// intermediate) as PEM, ready for a TLS server to present, and the key as PEM.
    public func issueWithNewKey(
        dnsNames: [String], ipv6Addresses: [String] = [], uris: [String] = [], commonName: String? = nil,
        lifetime: TimeInterval = TrustAuthority.defaultLifetime,
        now: Date = Date(), log: (any PrecertificateLog)? = nil
    )
        throws -> (certificate: Certificate, chainPEM: String, keyPEM: String)
    {
        let key = P256.Signing.PrivateKey()
        let cert = try issue(
            publicKey: Certificate.PublicKey(key.publicKey), dnsNames: dnsNames,
            ipv6Addresses: ipv6Addresses, uris: uris, commonName: commonName, lifetime: lifetime, now: now, log: log)
        return (cert, try PEMFiles.pem([cert, intermediate]), key.pemRepresentation + "\n")
    }

    // MARK: validation helpers

    /// Parses an IPv6 address, refusing IPv4 (dotted or mapped) by name.
    static func parseIPv6(_ text: String) throws -> IPv6Address {
        if let a = IPv6Address(text) { return a }
        var v4 = in_addr()
        if text.withCString({ inet_pton(AF_INET, $0, &v4) }) == 1 || text.lowercased().hasPrefix("::ffff:") {
            throw TrustError(.ipv4Refused, "\(text) is an IPv4 address; STOQ is IPv6 only")
        }
        throw TrustError(.invalidAddress, "\(text) is not an IPv6 address (e.g. 2001:db8::1)")
    }

    /// Lower-cases and checks a host name: labels of 1–63 letters, digits or hyphens (not at
    /// either end), at most 253 characters. Wildcards are refused: node certificates name nodes.
    static func validatedDNSName(_ text: String) throws -> String {
        var name = text.lowercased()
        if name.hasSuffix(".") { name.removeLast() }
        var v4 = in_addr()
        if name.withCString({ inet_pton(AF_INET, $0, &v4) }) == 1 {
            throw TrustError(.ipv4Refused, "\(text) is an IPv4 address; STOQ is IPv6 only")
        }
        if IPv6Address(name) != nil {
            throw TrustError(.invalidDNSName, "\(text) is an IP address; pass it as an IPv6 address, not a DNS name")
        }
        let labels = name.split(separator: ".", omittingEmptySubsequences: false)
        let ok =
            !name.isEmpty && name.utf8.count <= 253
            && labels.allSatisfy { l in
                (1...63).contains(l.utf8.count) && l.first != "-" && l.last != "-"
                    && l.utf8.allSatisfy { ($0 >= 0x61 && $0 <= 0x7a) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2d }
            }
        guard ok else {
            throw TrustError(
                .invalidDNSName,
                "\(text) is not a valid DNS name (labels of 1-63 letters, digits, hyphens; no wildcards)")
        }
        return name
    }

    /// 16 random bytes with the top bit clear and never a leading zero byte: positive, and
    /// within the 20 bytes GnuTLS accepts.
    static func randomSerial() -> Certificate.SerialNumber {
        var g = SystemRandomNumberGenerator()
        var bytes = (0..<16).map { _ in UInt8.random(in: 0...255, using: &g) }
        bytes[0] = (bytes[0] & 0x7f) | 0x01
        return Certificate.SerialNumber(bytes: bytes)
    }
}
