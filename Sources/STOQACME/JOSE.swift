@preconcurrency import Crypto
import Foundation
import STOQTrust
@preconcurrency import _CryptoExtras

// JOSE as ACME uses it (RFC 7515 flattened JSON serialization, RFC 7517 keys, RFC 7638
// thumbprints), over STOQTrust's Base64URL and ES256. One implementation for both the server and the client, so what the client
// signs and what the server accepts can never drift apart.

/// A public key as a JSON Web Key: the account keys ACME accepts.
public enum JWK: Sendable {
    /// An ECDSA P-256 key (alg ES256).
    case p256(P256.Signing.PublicKey)
    /// An ECDSA P-384 key (alg ES384).
    case p384(P384.Signing.PublicKey)
    /// An RSA key of at least 2048 bits (alg RS256).
    case rsa(_RSA.Signing.PublicKey)

    /// The JWS `alg` that goes with this key.
    public var algorithm: String {
        switch self {
        case .p256: "ES256"
        case .p384: "ES384"
        case .rsa: "RS256"
        }
    }

    /// The key's members (kty, crv, x, y or n, e).
    public var members: [String: String] {
        switch self {
        case .p256(let k):
            let raw = k.rawRepresentation
            return ["kty": "EC", "crv": "P-256", "x": Base64URL.encode(raw.prefix(32)), "y": Base64URL.encode(raw.suffix(32))]
        case .p384(let k):
            let raw = k.rawRepresentation
            return ["kty": "EC", "crv": "P-384", "x": Base64URL.encode(raw.prefix(48)), "y": Base64URL.encode(raw.suffix(48))]
        case .rsa(let k):
            // getKeyPrimitives only fails for keys BoringSSL could not have produced.
            let p = try! k.getKeyPrimitives()
            return ["kty": "RSA", "n": Base64URL.encode(p.modulus), "e": Base64URL.encode(p.publicExponent)]
        }
    }

    /// The members that RFC 7638 hashes, in lexicographic order, without whitespace.
    public var canonicalJSON: String {
        let required: [String] =
            switch self {
            case .p256, .p384: ["crv", "kty", "x", "y"]
            case .rsa: ["e", "kty", "n"]
            }
        let m = members
        return "{" + required.map { "\"\($0)\":\"\(m[$0]!)\"" }.joined(separator: ",") + "}"
    }

    /// The RFC 7638 SHA-256 thumbprint, base64url: the key's stable identity.
    public var thumbprint: String { Base64URL.encode(Data(SHA256.hash(data: Data(canonicalJSON.utf8)))) }

    /// Reads a key from its JSON members; the error names the member that is wrong.
    public init(members m: [String: Any]) throws {
        func field(_ name: String) throws -> Data {
            guard let s = m[name] as? String, let d = Base64URL.decode(s), !d.isEmpty else {
                throw ACMEProblem(.malformed, "jwk: member \"\(name)\" is missing or not base64url")
            }
            return d
        }
        switch m["kty"] as? String {
        case "EC":
            let crv = m["crv"] as? String
            let x = try field("x"), y = try field("y")
            do {
                switch crv {
                case "P-256":
                    guard x.count == 32, y.count == 32 else { throw ACMEProblem(.malformed, "jwk: P-256 x and y must be 32 bytes") }
                    self = .p256(try P256.Signing.PublicKey(rawRepresentation: x + y))
                case "P-384":
                    guard x.count == 48, y.count == 48 else { throw ACMEProblem(.malformed, "jwk: P-384 x and y must be 48 bytes") }
                    self = .p384(try P384.Signing.PublicKey(rawRepresentation: x + y))
                default:
                    throw ACMEProblem(.badPublicKey, "jwk: curve \(crv ?? "(none)") is not supported (P-256, P-384)")
                }
            } catch let p as ACMEProblem {
                throw p
            } catch {
                throw ACMEProblem(.badPublicKey, "jwk: the point is not on curve \(crv ?? "")")
            }
        case "RSA":
            let n = try field("n"), e = try field("e")
            do { self = .rsa(try _RSA.Signing.PublicKey(n: n, e: e)) } catch {
                throw ACMEProblem(.badPublicKey, "jwk: RSA key refused (\(n.count * 8) bits; at least 2048 needed)")
            }
        case let kty:
            throw ACMEProblem(.badPublicKey, "jwk: key type \(kty ?? "(none)") is not supported (EC, RSA)")
        }
    }

    /// Whether `signature` over `input` verifies for `algorithm` with this key. A mismatched
    /// algorithm is reported, not just a false signature, so the client learns what to fix.
    func verify(signature: Data, input: Data, algorithm alg: String) throws -> Bool {
        guard alg == algorithm else {
            throw ACMEProblem(.badSignatureAlgorithm, "alg \(alg) does not match the \(members["kty"]!) key (expected \(algorithm))")
        }
        switch self {
        case .p256(let k):
            return ES256.verify(signature, over: input, with: k)
        case .p384(let k):
            guard let sig = try? P384.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return k.isValidSignature(sig, for: input)
        case .rsa(let k):
            return k.isValidSignature(
                _RSA.Signing.RSASignature(rawRepresentation: signature), for: input,
                padding: .insecurePKCS1v1_5)
        }
    }

    /// True when both describe the same key.
    public func sameKey(as other: JWK) -> Bool { thumbprint == other.thumbprint }
}

/// A key that signs JWS: an account key (ECDSA or RSA), or an EAB MAC key (HS256).
public enum JWSSigner: Sendable {
    /// ES256 with a P-256 key.
    case p256(P256.Signing.PrivateKey)
    /// RS256 with an RSA key.
    case rsa(_RSA.Signing.PrivateKey)
    /// HS256 with a symmetric key (external account binding).
    case hmac(SymmetricKey)

    /// The JWS `alg`.
    public var algorithm: String {
        switch self {
        case .p256: "ES256"
        case .rsa: "RS256"
        case .hmac: "HS256"
        }
    }

    /// The public key (nil for MAC keys, which have none).
    public var jwk: JWK? {
        switch self {
        case .p256(let k): .p256(k.publicKey)
        case .rsa(let k): .rsa(k.publicKey)
        case .hmac: nil
        }
    }

    func sign(_ input: Data) throws -> Data {
        switch self {
        case .p256(let k): try ES256.sign(input, with: k)
        case .rsa(let k): try k.signature(for: input, padding: .insecurePKCS1v1_5).rawRepresentation
        case .hmac(let k): Data(HMAC<SHA256>.authenticationCode(for: input, using: k))
        }
    }
}

/// A JWS in flattened JSON serialization (RFC 7515 §7.2.2), the only form ACME allows.
public struct JWS: Sendable {
    /// The protected header as sent (base64url), which is what the signature covers.
    public var protected: String
    /// The payload as sent (base64url); empty for POST-as-GET.
    public var payload: String
    /// The signature (base64url).
    public var signature: String

    /// Signs `payload` with `header` members (`alg` is added from the key).
    public static func sign(header: [String: Any], payload: Data, with signer: JWSSigner) throws -> JWS {
        var h = header
        h["alg"] = signer.algorithm
        let headerJSON = try JSONSerialization.data(withJSONObject: h, options: [.sortedKeys, .withoutEscapingSlashes])
        let p = Base64URL.encode(headerJSON)
        let body = payload.isEmpty ? "" : Base64URL.encode(payload)
        let sig = try signer.sign(Data((p + "." + body).utf8))
        return JWS(protected: p, payload: body, signature: Base64URL.encode(sig))
    }

    /// The JSON document to send (`application/jose+json`).
    public func serialized() -> Data {
        try! JSONSerialization.data(withJSONObject: jsonObject, options: [.sortedKeys])
    }

    /// The JWS as a JSON object, for embedding (external account binding).
    public var jsonObject: [String: String] { ["protected": protected, "payload": payload, "signature": signature] }

    /// Reads a flattened JWS; refuses the general serialization and unknown members.
    public init(json object: Any) throws {
        guard let o = object as? [String: Any] else { throw ACMEProblem(.malformed, "the body is not a JSON object (expected a flattened JWS)") }
        if o["signatures"] != nil { throw ACMEProblem(.malformed, "JWS general serialization is not allowed; use the flattened form") }
        if o["header"] != nil { throw ACMEProblem(.malformed, "JWS unprotected header is not allowed") }
        guard let p = o["protected"] as? String, let pl = o["payload"] as? String, let s = o["signature"] as? String else {
            throw ACMEProblem(.malformed, "JWS needs string members protected, payload and signature")
        }
        self.init(protected: p, payload: pl, signature: s)
    }

    /// Creates a JWS from its three parts.
    public init(protected: String, payload: String, signature: String) {
        self.protected = protected
        self.payload = payload
        self.signature = signature
    }

    /// The decoded protected header.
    public func header() throws -> [String: Any] {
        guard let d = Base64URL.decode(protected),
            let h = try? JSONSerialization.jsonObject(with: d) as? [String: Any]
        else {
            throw ACMEProblem(.malformed, "JWS protected header is not base64url JSON")
        }
        return h
    }

    /// The decoded payload (empty for POST-as-GET).
    public func payloadData() throws -> Data {
        if payload.isEmpty { return Data() }
        guard let d = Base64URL.decode(payload) else { throw ACMEProblem(.malformed, "JWS payload is not base64url") }
        return d
    }

    /// Checks the signature with `key` for the header's `alg`.
    public func verify(with key: JWK) throws -> Bool {
        let h = try header()
        guard let alg = h["alg"] as? String else { throw ACMEProblem(.malformed, "JWS protected header has no alg") }
        guard let sig = Base64URL.decode(signature) else { throw ACMEProblem(.malformed, "JWS signature is not base64url") }
        return try key.verify(signature: sig, input: Data((protected + "." + payload).utf8), algorithm: alg)
    }

    /// Checks an HS256 MAC with `key` (external account binding), in constant time.
    public func verifyMAC(with key: SymmetricKey) throws -> Bool {
        let h = try header()
        guard h["alg"] as? String == "HS256" else {
            throw ACMEProblem(.badSignatureAlgorithm, "externalAccountBinding: alg \(h["alg"] as? String ?? "(none)") is not supported (HS256)")
        }
        guard let sig = Base64URL.decode(signature) else { throw ACMEProblem(.malformed, "externalAccountBinding: signature is not base64url") }
        return HMAC<SHA256>.isValidAuthenticationCode(sig, authenticating: Data((protected + "." + payload).utf8), using: key)
    }
}
