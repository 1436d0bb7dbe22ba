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

/// STOQ's one certificate policy, for both ends of mutual TLS: the node verifying a client, the
/// client (`stoq get`, the edge fetcher) verifying a server, and `stoq trust verify`. The TLS
/// handshake hands the DER chain the peer sent to `refusal(derChain:serverName:)`; the CLI
/// calls `verify(derChain:…)`; both run the same checks in the same order, so they give the
/// same verdict and the same words.
///
/// The checks: every certificate parses (an RSA key under 2048 bits or a SHA-1 signature is a
/// verdict, not a parse error); a path from the leaf to a root in the bundle with valid
/// signatures; its length, leaf to root, at most `maxChainLength`; validity dates; key
/// strength (ECDSA P-256/P-384/P-521, Ed25519, RSA ≥ 2048) and signature hash (SHA-256 or
/// stronger) along the path; revocation; the leaf an end entity (not CA:TRUE) whose keyUsage,
/// if present, allows digitalSignature, and every issuer's keyUsage, if present, keyCertSign;
/// the leaf's extended key usage (serverAuth for a server, clientAuth for a client, required);
/// the expected name in a subject alternative name (never the subject CN, RFC 9525); the
/// library's RFC 5280 rules (basic and name constraints, version); and, when required, an
/// embedded SCT from a trusted log.
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

    /// The default longest chain, leaf to root inclusive (leaf, two intermediates, root), for
    /// both roles: the node's `[trust]`, `stoq get` and `stoq trust verify --max-chain`.
    public static let defaultMaxChainLength = 4

    /// The trusted roots.
    public var roots: [Certificate]
    /// Serial numbers the caller has revoked.
    public var revokedSerials: Set<Certificate.SerialNumber>
    /// The longest chain accepted, counted over the verified path from the leaf to the root,
    /// both included (3 = leaf, intermediate, root); what the peer sent does not matter.
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
    public init(
        roots: [Certificate], revokedSerials: Set<Certificate.SerialNumber> = [],
        maxChainLength: Int = PeerVerifier.defaultMaxChainLength,
        role: Role = .server, transparencyLogs: [P256.Signing.PublicKey]? = nil
    ) {
        self.logKeys = transparencyLogs.map(TrustedLogKeys.init)
        self.roots = roots
        self.revokedSerials = revokedSerials
        self.maxChainLength = maxChainLength
        self.role = role
    }

    /// What this verifier enforces, as a digest: two verifiers with the same fingerprint apply
    /// the same rule (a configuration reload compares them to decide whether to rebuild).
    public var fingerprint: String {
        var h = SHA256()
        h.update(data: Array("\(role) \(maxChainLength)\n".utf8))
        for r in roots { h.update(data: Self.der(r)) }
        for s in revokedSerials.map({ CertificateSummary.hex($0) }).sorted() { h.update(data: Array("r\(s)".utf8)) }
        for k in logKeys?.keys ?? [] { h.update(data: Array("l".utf8) + Array(k.derRepresentation)) }
        return h.finalize().map { String(format: "%02x", $0) }.joined()
    }

    /// Verifies `chain` (leaf first, then any intermediates the peer sent) at `now`. When
    /// `dnsName` or `ipv6Address` is given, the leaf must name it. Returns the validated chain,
    /// leaf to root; throws `PeerVerificationError` otherwise.
    public func verify(
        chain: [Certificate], dnsName: String? = nil, ipv6Address: String? = nil,
        now: Date = Date()
    ) async throws -> [Certificate] {
        try verify(derChain: chain.map(Self.der), dnsName: dnsName, ipv6Address: ipv6Address, now: now)
    }

    /// `verify(chain:)` for a caller that must not suspend (the mesh thread checking an
    /// advert's signer).
    public func verifySynchronously(chain: [Certificate], now: Date = Date()) throws(PeerVerificationError) -> [Certificate] {
        try verify(derChain: chain.map(Self.der), now: now)
    }

    /// The TLS handshake's entry: nil to accept the DER chain the peer sent (leaf first), else
    /// the refusal as "code: message". `serverName` is what the client dialled (a DNS name or
    /// an IPv6 literal); nil when verifying a client.
    public func refusal(derChain: [[UInt8]], serverName: String?) -> String? {
        var dns: String?, ip: String?
        if let serverName, !serverName.isEmpty {
            if IPv6Address(serverName) != nil { ip = serverName } else { dns = serverName }
        }
        do {
            _ = try verify(derChain: derChain, dnsName: dns, ipv6Address: ip)
            return nil
        } catch {
            return error.description
        }
    }

    /// Verifies the DER chain the peer sent (leaf first) at `now`, synchronously: the TLS
    /// handshake calls it from the worker thread. Returns the validated path, leaf to root.
    public func verify(
        derChain: [[UInt8]], dnsName: String? = nil, ipv6Address: String? = nil,
        now: Date = Date()
    ) throws(PeerVerificationError) -> [Certificate] {
        guard !derChain.isEmpty else {
            throw PeerVerificationError(.invalidInput, "no certificate to verify")
        }
        if let ipv6Address, IPv6Address(ipv6Address) == nil {
            var v4 = in_addr()
            let isV4 = ipv6Address.withCString { inet_pton(AF_INET, $0, &v4) } == 1 || ipv6Address.lowercased().hasPrefix("::ffff:")
            throw PeerVerificationError(
                .invalidInput,
                isV4
                    ? "\(ipv6Address) is an IPv4 address; STOQ is IPv6 only"
                    : "\(ipv6Address) is not an IPv6 address")
        }
        var sent: [Certificate] = []
        for (i, der) in derChain.enumerated() {
            do { sent.append(try Certificate(derEncoded: der)) } catch {
                // swift-certificates refuses RSA under 2048 bits and some signature algorithms
                // at parse time; those are verdicts on the certificate, so name them.
                throw RawCertificate.verdict(der, role: i == 0 ? "leaf" : "intermediate", index: i, parseError: error)
            }
        }
        let path = try buildPath(sent)
        try PeerPolicy(
            now: now, maxChainLength: maxChainLength, revoked: revokedSerials,
            usage: role == .server ? .serverAuth : .clientAuth, dnsName: dnsName, ipv6Address: ipv6Address,
            transparencyLogs: logKeys
        ).check(path)
        return path
    }

    /// The path from the leaf to a trusted root through what the peer sent, each signature
    /// verified: the shortest, found breadth first, each certificate reached once, so at most
    /// (sent)² signatures are checked whatever the peer sent. (Depth first, which tried every
    /// ordering, took minutes on ten mutually signed intermediates.) Without one, the error
    /// names the first certificate whose issuer is missing or whose signature does not verify
    /// with its issuer's key.
    private func buildPath(_ sent: [Certificate]) throws(PeerVerificationError) -> [Certificate] {
        var badSignature: String?
        func role(_ i: Int) -> String { i == 0 ? "leaf" : "intermediate" }
        // By index into `sent` (0, the leaf, first): who led to it.
        var from: [Int: Int] = [:]
        var queue = [0], head = 0
        func path(to i: Int) -> [Certificate] {
            var out = [sent[i]], at = i
            while let p = from[at] {
                out.append(sent[p])
                at = p
            }
            return out.reversed()
        }
        while head < queue.count {
            let i = queue[head]
            head += 1
            let tip = sent[i]
            if roots.contains(tip) { return path(to: i) }
            for root in roots where root.subject == tip.issuer {
                if root.publicKey.isValidSignature(tip.signature, for: tip) { return path(to: i) + [root] }
                badSignature =
                    badSignature
                    ?? "signature of \(role(i)) \(tip.subject) does not verify with the key of its issuer, trusted root \(root.subject)"
            }
            for j in sent.indices.dropFirst() where j != i && from[j] == nil && sent[j].subject == tip.issuer {
                guard sent[j].publicKey.isValidSignature(tip.signature, for: tip) else {
                    badSignature =
                        badSignature ?? "signature of \(role(i)) \(tip.subject) does not verify with the key of its issuer \(sent[j].subject)"
                    continue
                }
                from[j] = i
                queue.append(j)
            }
        }
        if let badSignature { throw PeerVerificationError(.unknownRoot, badSignature) }
        let intermediates = sent.dropFirst()
        var tip = sent[0]
        var seen: [Certificate] = [tip]
        while let next = intermediates.first(where: { $0.subject == tip.issuer && !seen.contains($0) }) {
            tip = next
            seen.append(next)
        }
        throw PeerVerificationError(.unknownRoot, "no chain to a trusted root: issuer \(tip.issuer) of \(tip.subject) is not in the trust bundle")
    }

    static func der(_ c: Certificate) -> [UInt8] {
        var s = DER.Serializer()
        try? s.serialize(c)
        return s.serializedBytes
    }
}

/// STOQ's rules over a verified path (leaf to root), then the library's RFC 5280 policy. The
/// library's failure reason is a string; `decode` turns it into a typed error.
struct PeerPolicy {
    /// Critical extensions STOQ processes (here or in the library's RFC 5280 policy).
    static let handledCriticalExtensions: [ASN1ObjectIdentifier] =
        [
            .X509ExtensionID.extendedKeyUsage, .X509ExtensionID.subjectAlternativeName, .X509ExtensionID.keyUsage,
        ] + RFC5280Policy().verifyingCriticalExtensions
    let now: Date
    let maxChainLength: Int
    let revoked: Set<Certificate.SerialNumber>
    let usage: ExtendedKeyUsage.Usage
    let dnsName: String?
    let ipv6Address: String?
    let transparencyLogs: TrustedLogKeys?

    static func decode(_ reason: PolicyFailureReason) -> PeerVerificationError {
        PeerVerificationError(.invalidChain, reason.description)
    }

    /// swift-certificates builds `UnverifiedCertificateChain` only inside its async `Verifier`;
    /// the handshake needs a synchronous answer, so STOQ builds the path itself and hands it
    /// to the library's (synchronous) policies. The type is one stored `[Certificate]`.
    static func unverified(_ path: [Certificate]) -> UnverifiedCertificateChain {
        precondition(!path.isEmpty && MemoryLayout<UnverifiedCertificateChain>.size == MemoryLayout<[Certificate]>.size)
        return unsafeBitCast(path, to: UnverifiedCertificateChain.self)
    }

    static let acceptedKeys = "accepted: ECDSA P-256, ECDSA P-384, ECDSA P-521, Ed25519, RSA ≥ 2048"

    func check(_ certs: [Certificate]) throws(PeerVerificationError) {
        func role(_ i: Int) -> String { i == 0 ? "leaf" : i == certs.count - 1 ? "root" : "intermediate" }
        func fail(_ code: PeerVerificationError.Code, _ message: String) -> PeerVerificationError {
            PeerVerificationError(code, message)
        }

        if certs.count > maxChainLength {
            throw fail(.chainTooLong, "chain of \(certs.count) certificates (leaf to root) exceeds the maximum of \(maxChainLength)")
        }
        for (i, c) in certs.enumerated() {
            for ext in c.extensions where ext.critical && !Self.handledCriticalExtensions.contains(ext.oid) {
                throw fail(.invalidChain, "\(role(i)) \(c.subject) has critical extension \(ext.oid) that STOQ does not process")
            }
        }
        let stamp = ISO8601DateFormatter()
        for (i, c) in certs.enumerated() {
            if now < c.notValidBefore {
                throw fail(.notYetValid, "\(role(i)) \(c.subject) is not valid before \(stamp.string(from: c.notValidBefore)) (now \(stamp.string(from: now)))")
            }
            if now > c.notValidAfter {
                throw fail(.expired, "\(role(i)) \(c.subject) expired at \(stamp.string(from: c.notValidAfter)) (now \(stamp.string(from: now)))")
            }
        }
        for (i, c) in certs.enumerated() {
            let k = CertificateSummary.keyStrength(c.publicKey)
            if !k.acceptable {
                throw fail(.keyTooWeak, "\(role(i)) \(c.subject) has a \(k.name) key; \(Self.acceptedKeys)")
            }
        }
        // A root's self-signature is not relied on: it is trusted because it is in the bundle.
        for (i, c) in certs.enumerated() where i < certs.count - 1 || certs.count == 1 {
            if let weak = RawCertificate.weakSignatureName(c.signatureAlgorithm.description, oid: nil) {
                throw fail(.weakSignature, "\(role(i)) \(c.subject) is signed with \(weak); accepted: SHA-256 or stronger")
            }
        }
        for (i, c) in certs.enumerated() where revoked.contains(c.serialNumber) {
            throw fail(.revoked, "\(role(i)) \(c.subject) serial \(CertificateSummary.hex(c.serialNumber)) is revoked")
        }
        let leaf = certs[0]
        // A CA certificate is no peer identity, unless the peer presents a pinned trust anchor
        // itself (a self-signed identity the bundle holds: the path is that one certificate).
        if certs.count > 1, case .isCertificateAuthority = (try? leaf.extensions.basicConstraints) ?? nil {
            throw fail(.invalidChain, "leaf \(leaf.subject) is a CA certificate (basicConstraints CA:TRUE); a peer must present an end-entity certificate")
        }
        for (i, c) in certs.enumerated() {
            let ku: KeyUsage?
            do { ku = try c.extensions.keyUsage } catch {
                throw fail(.wrongKeyUsage, "\(role(i)) \(c.subject) has a malformed key usage (\(error))")
            }
            guard let ku else { continue }
            if i == 0 && !ku.digitalSignature {
                throw fail(.wrongKeyUsage, "leaf \(c.subject) has keyUsage \(ku) without digitalSignature; TLS 1.3 needs it to sign the handshake")
            }
            if i > 0 && !ku.keyCertSign {
                throw fail(.wrongKeyUsage, "\(role(i)) \(c.subject) issues \(certs[i - 1].subject) but its keyUsage \(ku) lacks keyCertSign")
            }
        }
        let eku: ExtendedKeyUsage?
        do { eku = try leaf.extensions.extendedKeyUsage } catch {
            throw fail(.wrongEKU, "leaf \(leaf.subject) has a malformed extended key usage (\(error))")
        }
        guard let eku else {
            throw fail(.wrongEKU, "leaf \(leaf.subject) has no extended key usage; \(usage) is required")
        }
        guard eku.contains(usage) else {
            throw fail(.wrongEKU, "leaf \(leaf.subject) allows [\(eku.map(\.description).joined(separator: ", "))]; \(usage) is required")
        }
        let chain = Self.unverified(certs)
        if dnsName != nil || ipv6Address != nil {
            let (dns, ips) = CertificateSummary.alternativeNames(leaf)
            let names = dns.map { "DNS:\($0)" } + ips.map { "IP:\($0)" }
            let wanted = [dnsName.map { "DNS:\($0)" }, ipv6Address.map { "IP:\($0)" }].compactMap { $0 }.joined(separator: " or ")
            // RFC 9525: names are matched in the subject alternative names only. The library
            // falls back to the subject CN when no SAN of the wanted type exists, so those
            // cases stop here.
            if names.isEmpty {
                throw fail(.sanMismatch, "leaf \(leaf.subject) has no subject alternative name, not \(wanted) (the subject CN is not a name, RFC 9525)")
            }
            if (dnsName != nil && dns.isEmpty && ipv6Address == nil) || (ipv6Address != nil && ips.isEmpty && dnsName == nil) {
                throw fail(.sanMismatch, "leaf \(leaf.subject) names [\(names.joined(separator: ", "))], not \(wanted)")
            }
            // RFC 6125 matching (case, trailing dot, wildcards) is the library's.
            var identity = ServerIdentityPolicy(serverHostname: dnsName, serverIP: ipv6Address)
            if case .failsToMeetPolicy = identity.chainMeetsPolicyRequirements(chain: chain) {
                throw fail(.sanMismatch, "leaf \(leaf.subject) names [\(names.joined(separator: ", "))], not \(wanted)")
            }
        }
        if case .failsToMeetPolicy(let reason) = RFC5280Policy(fixedExpiryValidationTime: now).chainMeetsPolicyRequirements(chain: chain) {
            throw Self.decode(reason)
        }
        if let logs = transparencyLogs {
            // A trusted root presented as the leaf has no issuer to recompute an entry with.
            guard certs.count >= 2 else {
                throw fail(.sctMissing, "leaf \(leaf.subject) is itself a root; transparency needs a logged, issued certificate")
            }
            switch CertificateTransparency.verify(leaf, issuer: certs[1], trustedLogs: logs.keys) {
            case .valid: break
            case .missing:
                throw fail(.sctMissing, "leaf \(leaf.subject) carries no SCT; transparency is required")
            case .forged(let why):
                throw fail(.sctInvalid, "leaf \(leaf.subject): SCT signature invalid (forged): \(why)")
            case .unknownLog(let ids):
                throw fail(
                    .sctUnknownLog,
                    "leaf \(leaf.subject) has SCTs only from unknown logs (log id \(ids.map { Data($0).base64EncodedString() }.joined(separator: ", ")))")
            }
        }
    }
}

/// What can be read from a certificate swift-certificates will not parse, so the refusal names
/// the rule it breaks (a weak key, a weak signature hash) rather than "does not parse".
enum RawCertificate {
    static let rsaEncryption = "1.2.840.113549.1.1.1"
    static let ecPublicKey = "1.2.840.10045.2.1"
    static let curves = [
        "1.2.840.10045.3.1.7": "ECDSA P-256", "1.3.132.0.34": "ECDSA P-384", "1.3.132.0.35": "ECDSA P-521",
        "1.2.840.10045.3.1.1": "ECDSA P-192", "1.3.132.0.33": "ECDSA P-224",
    ]
    static let weakSignatures = [
        "1.2.840.113549.1.1.5": "SHA-1 (sha1WithRSAEncryption)", "1.2.840.10045.4.1": "SHA-1 (ecdsa-with-SHA1)",
        "1.2.840.113549.1.1.4": "MD5 (md5WithRSAEncryption)", "1.2.840.10040.4.3": "SHA-1 (dsa-with-sha1)",
        "1.3.14.3.2.29": "SHA-1 (sha1WithRSASignature)",
    ]

    /// The weak hash a signature algorithm uses, by the library's description or by OID.
    static func weakSignatureName(_ description: String, oid: String?) -> String? {
        if let oid, let w = weakSignatures[oid] { return w }
        if description.contains("sha1WithRSAEncryption") { return weakSignatures["1.2.840.113549.1.1.5"] }
        if description.lowercased().contains("sha1") { return "SHA-1 (\(description))" }
        return nil
    }

    /// The refusal for the certificate at `index` of what the peer sent, which did not parse.
    static func verdict(_ der: [UInt8], role: String, index: Int, parseError: Error) -> PeerVerificationError {
        guard let top = try? DER.parse(der), case .constructed(let outer) = top.content,
            let tbs = outer.first(where: { _ in true }), case .constructed(let tbsNodes) = tbs.content
        else {
            return PeerVerificationError(.invalidChain, "certificate \(index + 1) of the chain is not DER X.509 (\(parseError))")
        }
        var fields = Array(tbsNodes)
        if let first = fields.first, first.identifier.tagClass == .contextSpecific { fields.removeFirst() }
        guard fields.count >= 6 else {
            return PeerVerificationError(.invalidChain, "certificate \(index + 1) of the chain is not DER X.509 (\(parseError))")
        }
        let subject = (try? DistinguishedName(derEncoded: fields[4]))?.description ?? "certificate \(index + 1)"
        if let key = keyName(fields[5]), !key.acceptable {
            return PeerVerificationError(.keyTooWeak, "\(role) \(subject) has a \(key.name) key; \(PeerPolicy.acceptedKeys)")
        }
        if let oid = firstOID(fields[1]), let weak = weakSignatureName("", oid: oid) {
            return PeerVerificationError(.weakSignature, "\(role) \(subject) is signed with \(weak); accepted: SHA-256 or stronger")
        }
        return PeerVerificationError(.invalidChain, "\(role) \(subject) does not parse (\(parseError))")
    }

    static func firstOID(_ node: ASN1Node) -> String? {
        guard case .constructed(let c) = node.content, let n = c.first(where: { _ in true }),
            let oid = try? ASN1ObjectIdentifier(derEncoded: n)
        else { return nil }
        return oid.description
    }

    /// The key's name and whether STOQ accepts it, from a SubjectPublicKeyInfo node.
    static func keyName(_ spki: ASN1Node) -> (name: String, acceptable: Bool)? {
        guard case .constructed(let parts) = spki.content else { return nil }
        let p = Array(parts)
        guard p.count == 2, case .constructed(let algParts) = p[0].content else { return nil }
        let alg = Array(algParts)
        guard let oid = alg.first.flatMap({ try? ASN1ObjectIdentifier(derEncoded: $0) })?.description else { return nil }
        if oid == ecPublicKey {
            let curve = alg.count > 1 ? (try? ASN1ObjectIdentifier(derEncoded: alg[1]))?.description : nil
            let name = curve.flatMap { curves[$0] } ?? "ECDSA curve \(curve ?? "?")"
            return (name, ["ECDSA P-256", "ECDSA P-384", "ECDSA P-521"].contains(name))
        }
        guard oid == rsaEncryption, let bits = try? ASN1BitString(derEncoded: p[1]),
            let key = try? DER.parse(Array(bits.bytes)), case .constructed(let nums) = key.content,
            let modulus = nums.first(where: { _ in true }), case .primitive(let m) = modulus.content
        else { return nil }
        let bytes = m.drop(while: { $0 == 0 })
        let size = bytes.isEmpty ? 0 : bytes.count * 8 - (bytes.first!.leadingZeroBitCount)
        return ("RSA-\(size)", size >= 2048)
    }
}
