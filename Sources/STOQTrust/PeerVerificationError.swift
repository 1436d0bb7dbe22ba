/// Why `PeerVerifier` refused a peer's certificate chain. Every refusal has its own code so
/// callers (and tests) can act on the reason, and a message naming the certificate involved.
public struct PeerVerificationError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The reason for the refusal.
    public enum Code: String, Sendable, Equatable, CaseIterable {
        /// A certificate in the chain is past its notAfter.
        case expired
        /// A certificate in the chain is before its notBefore.
        case notYetValid
        /// The leaf lacks the extended key usage its role needs (serverAuth or clientAuth).
        case wrongEKU
        /// The leaf names neither the expected DNS name nor the expected IPv6 address.
        case sanMismatch
        /// No chain from the leaf reaches a root in the trust bundle with valid signatures.
        case unknownRoot
        /// A certificate's serial is on the caller's revocation list.
        case revoked
        /// The chain (leaf to root inclusive) is longer than allowed.
        case chainTooLong
        /// A key is weaker than allowed: RSA under 2048 bits, or a type other than
        /// ECDSA P-256/P-384/P-521, Ed25519 or RSA ≥ 2048.
        case keyTooWeak
        /// A certificate on the path (other than the trusted root) is signed with a broken
        /// hash: SHA-1 or MD5.
        case weakSignature
        /// A key usage extension forbids the certificate's job: a leaf without
        /// digitalSignature, or an issuer without keyCertSign.
        case wrongKeyUsage
        /// The chain breaks another RFC 5280 rule (basic constraints, name constraints,
        /// version, unhandled critical extension, a CA:TRUE leaf, a certificate that does not
        /// parse); the message carries the detail.
        case invalidChain
        /// Transparency is required and the leaf carries no embedded SCT.
        case sctMissing
        /// An SCT names a trusted log, but its signature does not cover this certificate
        /// (a forged or transplanted SCT), or the SCT list does not parse.
        case sctInvalid
        /// Transparency is required and every SCT is from a log not in the trusted set.
        case sctUnknownLog
        /// The request itself is unusable: no certificate, or an IPv4 / malformed expected address.
        case invalidInput
    }

    /// The reason for the refusal.
    public var code: Code
    /// What was refused and why, naming the certificate.
    public var message: String

    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code.rawValue): \(message)" }
}
