import Crypto
import Foundation

// The JOSE pieces both ACME (STOQACME) and access tokens (STOQAccess) sign and verify with:
// one implementation, so an ACME request and a bearer token can never disagree on what
// base64url or an ES256 signature is.

/// Base64url without padding (RFC 4648 §5), the only encoding JOSE uses.
public enum Base64URL {
    /// Encodes `bytes` without padding.
    public static func encode(_ bytes: some DataProtocol) -> String {
        Data(bytes).base64EncodedString()
            .replacingOccurrences(of: "+", with: "-")
            .replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }

    /// Decodes unpadded base64url; nil when the text holds other characters. Padding is refused
    /// because RFC 7515 §2 forbids it and accepting it would give one value two encodings.
    public static func decode(_ text: String) -> Data? {
        guard !text.contains("="), text.utf8.allSatisfy({ $0 != UInt8(ascii: "+") && $0 != UInt8(ascii: "/") }) else {
            return nil
        }
        var s = text.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while s.count % 4 != 0 { s += "=" }
        return Data(base64Encoded: s)
    }
}

/// JWS alg ES256 (RFC 7518 §3.4): ECDSA P-256 with SHA-256, the signature as the 64-byte
/// R‖S concatenation (not DER).
public enum ES256 {
    /// The JWS `alg` name.
    public static let algorithm = "ES256"

    /// Signs the JWS signing input (`protected.payload`, ASCII).
    public static func sign(_ input: some DataProtocol, with key: P256.Signing.PrivateKey) throws -> Data {
        try key.signature(for: Data(input)).rawRepresentation
    }

    /// Whether `signature` (R‖S) over `input` verifies with `key`; a signature of the wrong
    /// length is simply false.
    public static func verify(_ signature: some DataProtocol, over input: some DataProtocol, with key: P256.Signing.PublicKey) -> Bool {
        guard let sig = try? P256.Signing.ECDSASignature(rawRepresentation: Data(signature)) else { return false }
        return key.isValidSignature(sig, for: Data(input))
    }
}
