import Crypto
import Foundation
import STOQCore
import SwiftASN1
@_spi(FixedExpiryValidationTime) import X509
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Verifies a peer's certificate chain for STOQ's mutual TLS: swift-certificates' `Verifier`
/// builds and signature-checks the chain to a root in the bundle, and a policy set decides
/// whether to trust it — STOQ's own rules first (length, validity, key strength, revocation,
/// EKU, names), then the library's RFC 5280 policy (basic and name constraints).
///
/// Each refusal is a `PeerVerificationError` with its own `Code`.
public struct PeerVerifier: Sendable {
    /// Which end the peer is: it decides the extended key usage the leaf must carry.
    public enum Role: Sendable {
        /// The peer is a server (leaf needs serverAuth).
        case server
        /// The peer is a client (leaf needs clientAuth).
        case client
    }

    /// The trusted roots.
    public var roots: [Certificate]
    /// Serial numbers the caller has revoked.
    public var revokedSerials: Set<Certificate.SerialNumber>
    /// The longest chain accepted, leaf and root included (3 = leaf, intermediate, root).
    public var maxChainLength: Int
    /// The role the peer plays.
    public var role: Role
    /// When set, transparency is required: the leaf must carry an embedded SCT that verifies
    /// with one of these log keys (`trust.require_transparency`).
    public var transparencyLogs: [P256.Signing.PublicKey]? {
        get { logKeys?.keys }
        set { logKeys = newValue.map(TrustedLogKeys.init) }
    }
    private var logKeys: TrustedLogKeys?

    /// Creates a verifier trusting `roots`.
    public init(roots: [Certificate], revokedSerials: Set<Certificate.SerialNumber> = [], maxChainLength: Int = 3,
                role: Role = .server, transparencyLogs: [P256.Signing.PublicKey]? = nil) {
        self.logKeys = transparencyLogs.map(TrustedLogKeys.init)
        self.roots = roots
        self.revokedSerials = revokedSerials
        self.maxChainLength = maxChainLength
        self.role = role
    }

    /// Verifies `chain` (leaf first, then any intermediates the peer sent) at `now`. When
    /// `dnsName` or `ipv6Address` is given, the leaf must name it. Returns the validated chain,
    /// leaf to root; throws `PeerVerificationError` otherwise.
    public func verify(chain: [Certificate], dnsName: String? = nil, ipv6Address: String? = nil,
                       now: Date = Date()) async throws -> [Certificate] {
        guard let leaf = chain.first else {
            throw PeerVerificationError(.invalidInput, "no certificate to verify")
        }
        if let ipv6Address, IPv6Address(ipv6Address) == nil {
            var v4 = in_addr()
            let isV4 = ipv6Address.withCString { inet_pton(AF_INET, $0, &v4) } == 1 || ipv6Address.lowercased().hasPrefix("::ffff:")
            throw PeerVerificationError(.invalidInput, isV4 ? "\(ipv6Address) is an IPv4 address; STOQ is IPv6 only"
                                                            : "\(ipv6Address) is not an IPv6 address")
        }
        let policy = PeerPolicy(now: now, maxChainLength: maxChainLength, revoked: revokedSerials,
                                usage: role == .server ? .serverAuth : .clientAuth,
                                dnsName: dnsName, ipv6Address: ipv6Address, transparencyLogs: logKeys)
        var handled = policy.verifyingCriticalExtensions
        handled += RFC5280Policy(fixedExpiryValidationTime: now).verifyingCriticalExtensions
        // The library reports an unknown critical extension as "no chain"; name it instead.
        for c in chain {
            for ext in c.extensions where ext.critical && !handled.contains(ext.oid) {
                throw PeerVerificationError(.invalidChain, "\(c.subject) has critical extension \(ext.oid) that STOQ does not process")
            }
        }
        var verifier = Verifier(rootCertificates: CertificateStore(roots)) {
            policy
            RFC5280Policy(fixedExpiryValidationTime: now)
        }
        let result = await verifier.validate(leaf: leaf, intermediates: CertificateStore(chain.dropFirst()))
        switch result {
        case .validCertificate(let validated):
            return Array(validated)
        case .couldNotValidate(let failures):
            guard let first = failures.first else {
                throw PeerVerificationError(.unknownRoot, unknownRootMessage(chain))
            }
            throw PeerPolicy.decode(first.policyFailureReason)
        }
    }

    /// Explains why no chain was found: whose issuer is missing, or whose signature failed.
    private func unknownRootMessage(_ chain: [Certificate]) -> String {
        var tip = chain[0]
        var seen = 0
        while seen < chain.count, let next = chain.dropFirst().first(where: { $0.subject == tip.issuer && $0 != tip }) {
            tip = next
            seen += 1
        }
        if roots.contains(where: { $0.subject == tip.issuer }) {
            return "\(tip.subject) names trusted root \(tip.issuer) as issuer, but that root's signature does not verify"
        }
        return "no chain to a trusted root: issuer \(tip.issuer) of \(tip.subject) is not in the trust bundle"
    }
}

/// STOQ's rules as a swift-certificates policy. The library's failure reason is a string, so
/// the code travels as a prefix of it and `decode` turns it back into a typed error.
struct PeerPolicy: VerifierPolicy {
    let verifyingCriticalExtensions: [ASN1ObjectIdentifier] = [
        .X509ExtensionID.extendedKeyUsage, .X509ExtensionID.subjectAlternativeName,
    ]
    let now: Date
    let maxChainLength: Int
    let revoked: Set<Certificate.SerialNumber>
    let usage: ExtendedKeyUsage.Usage
    let dnsName: String?
    let ipv6Address: String?
    let transparencyLogs: TrustedLogKeys?

    static let prefix = "stoq.trust."

    static func fail(_ code: PeerVerificationError.Code, _ message: String) -> PolicyEvaluationResult {
        .failsToMeetPolicy(reason: prefix + code.rawValue + ": " + message)
    }

    static func decode(_ reason: PolicyFailureReason) -> PeerVerificationError {
        let text = reason.description
        if text.hasPrefix(prefix), let colon = text.firstIndex(of: ":"),
           let code = PeerVerificationError.Code(rawValue: String(text[text.index(text.startIndex, offsetBy: prefix.count)..<colon])) {
            return PeerVerificationError(code, String(text[text.index(colon, offsetBy: 2)...]))
        }
        return PeerVerificationError(.invalidChain, text)
    }

    func chainMeetsPolicyRequirements(chain: UnverifiedCertificateChain) -> PolicyEvaluationResult {
        let certs = Array(chain)
        func role(_ i: Int) -> String { i == 0 ? "leaf" : i == certs.count - 1 ? "root" : "intermediate" }

        if certs.count > maxChainLength {
            return Self.fail(.chainTooLong, "chain of \(certs.count) certificates (leaf to root) exceeds the maximum of \(maxChainLength)")
        }
        let stamp = ISO8601DateFormatter()
        for (i, c) in certs.enumerated() {
            if now < c.notValidBefore {
                return Self.fail(.notYetValid, "\(role(i)) \(c.subject) is not valid before \(stamp.string(from: c.notValidBefore)) (now \(stamp.string(from: now)))")
            }
            if now > c.notValidAfter {
                return Self.fail(.expired, "\(role(i)) \(c.subject) expired at \(stamp.string(from: c.notValidAfter)) (now \(stamp.string(from: now)))")
            }
        }
        for (i, c) in certs.enumerated() {
            let k = CertificateSummary.keyStrength(c.publicKey)
            if !k.acceptable {
                return Self.fail(.keyTooWeak, "\(role(i)) \(c.subject) has a \(k.name) key; accepted: ECDSA P-256, ECDSA P-384, Ed25519, RSA ≥ 2048")
            }
        }
        for (i, c) in certs.enumerated() where revoked.contains(c.serialNumber) {
            return Self.fail(.revoked, "\(role(i)) \(c.subject) serial \(CertificateSummary.hex(c.serialNumber)) is revoked")
        }
        let leaf = certs[0]
        let eku: ExtendedKeyUsage?
        do { eku = try leaf.extensions.extendedKeyUsage } catch {
            return Self.fail(.wrongEKU, "leaf \(leaf.subject) has a malformed extended key usage (\(error))")
        }
        guard let eku else {
            return Self.fail(.wrongEKU, "leaf \(leaf.subject) has no extended key usage; \(usage) is required")
        }
        guard eku.contains(usage) else {
            return Self.fail(.wrongEKU, "leaf \(leaf.subject) allows [\(eku.map(\.description).joined(separator: ", "))]; \(usage) is required")
        }
        if dnsName != nil || ipv6Address != nil {
            // RFC 6125 matching (case, trailing dot, wildcards) is the library's.
            var identity = ServerIdentityPolicy(serverHostname: dnsName, serverIP: ipv6Address)
            if case .failsToMeetPolicy = identity.chainMeetsPolicyRequirements(chain: chain) {
                let (dns, ips) = CertificateSummary.alternativeNames(leaf)
                let names = dns.map { "DNS:\($0)" } + ips.map { "IP:\($0)" }
                let wanted = [dnsName.map { "DNS:\($0)" }, ipv6Address.map { "IP:\($0)" }].compactMap { $0 }.joined(separator: " or ")
                return Self.fail(.sanMismatch, "leaf \(leaf.subject) names [\(names.joined(separator: ", "))], not \(wanted)")
            }
        }
        if let logs = transparencyLogs {
            // A trusted root presented as the leaf has no issuer to recompute an entry with.
            guard certs.count >= 2 else {
                return Self.fail(.sctMissing, "leaf \(leaf.subject) is itself a root; transparency needs a logged, issued certificate")
            }
            switch CertificateTransparency.verify(leaf, issuer: certs[1], trustedLogs: logs.keys) {
            case .valid: break
            case .missing:
                return Self.fail(.sctMissing, "leaf \(leaf.subject) carries no SCT; transparency is required")
            case .forged(let why):
                return Self.fail(.sctInvalid, "leaf \(leaf.subject): SCT signature invalid (forged): \(why)")
            case .unknownLog(let ids):
                return Self.fail(.sctUnknownLog, "leaf \(leaf.subject) has SCTs only from unknown logs (log id \(ids.map { Data($0).base64EncodedString() }.joined(separator: ", ")))")
            }
        }
        return .meetsPolicy
    }
}
