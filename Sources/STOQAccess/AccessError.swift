/// Why a bearer token, a token key or an access file was refused.
///
/// A struct with a nested `Code` rather than an enum so codes can be added without breaking
/// callers that switch on them. The code's name is what a 401's `error_description` starts
/// with, so a client can tell an expired token from a forged one.
public struct AccessError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The kind of failure; `message` says what exactly.
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        /// The stable name (what logs, 401 bodies and JSON print).
        public let rawValue: String
        /// Wraps a name; STOQ's own codes are the static members.
        public init(rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }
        /// Not a compact JWS (three base64url parts) carrying JSON with the claims STOQ needs.
        public static let malformed = Code(rawValue: "malformed")
        /// The header names an algorithm other than ES256 (`none` included).
        public static let unsupportedAlgorithm = Code(rawValue: "unsupported_algorithm")
        /// The issuer (`iss`, a key thumbprint) is none of the keys this node accepts.
        public static let unknownKey = Code(rawValue: "unknown_key")
        /// The issuer's key is accepted but the signature does not verify with it.
        public static let badSignature = Code(rawValue: "bad_signature")
        /// `exp` has passed.
        public static let expired = Code(rawValue: "expired")
        /// `nbf` (or `iat`) is still in the future, beyond the allowed clock skew.
        public static let notYetValid = Code(rawValue: "not_yet_valid")
        /// A key file is missing, unreadable or not a P-256 key.
        public static let badKey = Code(rawValue: "bad_key")
        /// Reading or writing an access file failed.
        public static let io = Code(rawValue: "io")
    }

    /// The kind of failure.
    public var code: Code
    /// A sentence naming what is wrong.
    public var message: String

    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code): \(message)" }
}
