/// Why a TrustChain operation (creating or loading the authority, issuing, reading PEM) failed.
///
/// A struct with a nested `Code` rather than an enum so codes can be added without breaking
/// callers that switch on them.
public struct TrustError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The kind of failure; `message` says what exactly.
    public enum Code: String, Sendable, Equatable {
        /// An IPv4 address was given where STOQ only accepts IPv6.
        case ipv4Refused
        /// A string was neither a valid IPv6 address nor anything else accepted there.
        case invalidAddress
        /// A DNS name is not a valid host name (labels of letters, digits and hyphens).
        case invalidDNSName
        /// A certificate would carry no subject alternative name at all.
        case noSubjectAlternativeNames
        /// A lifetime is zero, negative or outlives the issuing certificate.
        case invalidLifetime
        /// A certificate signing request's signature does not verify.
        case invalidCSR
        /// `create` found an authority already there; it never overwrites keys.
        case alreadyExists
        /// A file the authority needs is missing.
        case missingFile
        /// A file is not the PEM it should be (certificate, key or CSR).
        case invalidPEM
        /// Reading or writing a file failed.
        case io
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
