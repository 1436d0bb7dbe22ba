/// Why `PeerVerifier` refused a peer's certificate chain. Every refusal has its own code so
/// callers (and tests) can act on the reason, and a message naming the certificate involved.
public struct PeerVerificationError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The reason for the refusal.
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        /// The stable name (what logs and JSON print).
        public let rawValue: String
        /// Wraps a name; STOQ's own codes are the static members.
        public init(rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }
        /// A certificate in the chain is past its notAfter.
        public static let expired = Code(rawValue: "expired")
        /// A certificate in the chain is before its notBefore.
        public static let notYetValid = Code(rawValue: "notYetValid")
        /// The leaf lacks the extended key usage its role needs (serverAuth or clientAuth).
        public static let wrongEKU = Code(rawValue: "wrongEKU")
        /// The leaf names neither the expected DNS name nor the expected IPv6 address.
        public static let sanMismatch = Code(rawValue: "sanMismatch")
        /// No chain from the leaf reaches a root in the trust bundle with valid signatures.
        public static let unknownRoot = Code(rawValue: "unknownRoot")
        /// A certificate's serial is on the caller's revocation list.
        public static let revoked = Code(rawValue: "revoked")
        /// The chain (leaf to root inclusive) is longer than allowed.
        public static let chainTooLong = Code(rawValue: "chainTooLong")
        /// A key is weaker than allowed: RSA under 2048 bits, or a type other than
        /// ECDSA P-256/P-384/P-521, Ed25519 or RSA ≥ 2048.
        public static let keyTooWeak = Code(rawValue: "keyTooWeak")
        /// A certificate on the path (other than the trusted root) is signed with a broken
        /// hash: SHA-1 or MD5.
        public static let weakSignature = Code(rawValue: "weakSignature")
        /// A key usage extension forbids the certificate's job: a leaf without
        /// digitalSignature, or an issuer without keyCertSign.
        public static let wrongKeyUsage = Code(rawValue: "wrongKeyUsage")
        /// The chain breaks another RFC 5280 rule (basic constraints, name constraints,
        /// version, unhandled critical extension, a CA:TRUE leaf, a certificate that does not
        /// parse); the message carries the detail.
        public static let invalidChain = Code(rawValue: "invalidChain")
        /// Transparency is required and the leaf carries no embedded SCT.
        public static let sctMissing = Code(rawValue: "sctMissing")
        /// An SCT names a trusted log, but its signature does not cover this certificate
        /// (a forged or transplanted SCT), or the SCT list does not parse.
        public static let sctInvalid = Code(rawValue: "sctInvalid")
        /// Transparency is required and every SCT is from a log not in the trusted set.
        public static let sctUnknownLog = Code(rawValue: "sctUnknownLog")
        /// The request itself is unusable: no certificate, or an IPv4 / malformed expected address.
        public static let invalidInput = Code(rawValue: "invalidInput")
        /// Every code STOQ defines, for counters and documentation.
        public static let allCases: [Code] = [
            .expired, .notYetValid, .wrongEKU, .sanMismatch, .unknownRoot, .revoked, .chainTooLong, .keyTooWeak, .weakSignature, .wrongKeyUsage, .invalidChain,
            .sctMissing, .sctInvalid, .sctUnknownLog, .invalidInput,
        ]
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
