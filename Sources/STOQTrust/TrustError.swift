/// Why a TrustChain operation (creating or loading the authority, issuing, reading PEM) failed.
///
/// A struct with a nested `Code` rather than an enum so codes can be added without breaking
/// callers that switch on them.
public struct TrustError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The kind of failure; `message` says what exactly.
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        /// The stable name (what logs and JSON print).
        public let rawValue: String
        /// Wraps a name; STOQ's own codes are the static members.
        public init(rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }
        /// An IPv4 address was given where STOQ only accepts IPv6.
        public static let ipv4Refused = Code(rawValue: "ipv4Refused")
        /// A string was neither a valid IPv6 address nor anything else accepted there.
        public static let invalidAddress = Code(rawValue: "invalidAddress")
        /// A DNS name is not a valid host name (labels of letters, digits and hyphens).
        public static let invalidDNSName = Code(rawValue: "invalidDNSName")
        /// A certificate would carry no subject alternative name at all.
        public static let noSubjectAlternativeNames = Code(rawValue: "noSubjectAlternativeNames")
        /// A lifetime is zero, negative or outlives the issuing certificate.
        public static let invalidLifetime = Code(rawValue: "invalidLifetime")
        /// A certificate signing request's signature does not verify.
        public static let invalidCSR = Code(rawValue: "invalidCSR")
        /// `create` found an authority already there; it never overwrites keys.
        public static let alreadyExists = Code(rawValue: "alreadyExists")
        /// A file the authority needs is missing.
        public static let missingFile = Code(rawValue: "missingFile")
        /// A file is not the PEM it should be (certificate, key or CSR).
        public static let invalidPEM = Code(rawValue: "invalidPEM")
        /// Reading or writing a file failed.
        public static let io = Code(rawValue: "io")
    }

    /// The kind of failure.
    public var code: Code
    /// A sentence naming the offending value and what is allowed.
    public var message: String

    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }
}
