@preconcurrency import Crypto
import Foundation
import STOQCore
import STOQTrust

/// What a token (or a certificate) lets its holder do on a node. Ordered: each role may do
/// what the ones below it may.
public enum AccessRole: String, Sendable, CaseIterable, Comparable, Codable {
    /// Reads what `[access] read` protects (`token` or `certificate` prefixes); never writes.
    case reader
    /// Reads, and writes (PUT, DELETE, POST) within its scope.
    case writer
    /// Everything, on every path (the operator's credential).
    case admin

    private var rank: Int {
        switch self {
        case .reader: 0
        case .writer: 1
        case .admin: 2
        }
    }
    public static func < (a: AccessRole, b: AccessRole) -> Bool { a.rank < b.rank }
}

/// Where and how a token may be used: path prefixes and HTTP methods. `"/"` covers every
/// path and `"*"` every method; `GET` also allows `HEAD`.
public struct AccessScope: Sendable, Equatable, Codable {
    /// Path prefixes, e.g. `/objects/a/`.
    public var prefixes: [String]
    /// Upper-case HTTP methods, or `*`.
    public var methods: [String]

    /// Creates a scope.
    public init(prefixes: [String], methods: [String]) {
        self.prefixes = prefixes
        self.methods = methods.map { $0.uppercased() }
    }

    /// Every path, every method.
    public static let everything = AccessScope(prefixes: ["/"], methods: ["*"])

    /// The methods a role gets when none are named: readers read, writers also write.
    public static func defaultMethods(for role: AccessRole) -> [String] {
        switch role {
        case .reader: ["GET", "HEAD"]
        case .writer: ["GET", "HEAD", "PUT", "DELETE", "POST"]
        case .admin: ["*"]
        }
    }

    /// Whether `method` is in scope.
    public func allows(method: String) -> Bool {
        methods.contains("*") || methods.contains(method) || (method == "HEAD" && methods.contains("GET"))
    }

    /// Whether `path` is under one of the prefixes.
    public func covers(path: String) -> Bool { prefixes.contains { path.hasPrefix($0) } }
}

/// A verified token's claims (RFC 7519 names, plus STOQ's `stoq` claim).
public struct AccessClaims: Sendable, Equatable {
    /// Who the token was issued to (`sub`).
    public var subject: String
    /// The issuing key's RFC 7638 thumbprint (`iss`): which accepted key must verify it.
    public var issuer: String
    /// Issued at, Unix seconds (`iat`).
    public var issuedAt: Int64
    /// Not before, Unix seconds (`nbf`); nil: from `iat`.
    public var notBefore: Int64?
    /// Expiry, Unix seconds (`exp`).
    public var expires: Int64
    /// `stoq.role`.
    public var role: AccessRole
    /// `stoq.prefixes` and `stoq.methods`.
    public var scope: AccessScope

    /// Creates claims; `issuer` is filled in by `AccessToken.sign`.
    public init(
        subject: String, issuedAt: Int64, notBefore: Int64? = nil, expires: Int64, role: AccessRole, scope: AccessScope,
        issuer: String = ""
    ) {
        (self.subject, self.issuedAt, self.notBefore, self.expires, self.role, self.scope, self.issuer) =
            (subject, issuedAt, notBefore, expires, role, scope, issuer)
    }
}

/// STOQ's bearer tokens: compact JWS (RFC 7515) carrying a JWT (RFC 7519), alg ES256, no
/// `kid`: the `iss` claim is the signing key's RFC 7638 thumbprint, so a node holding several
/// accepted keys knows which one must verify (and tells "unknown issuer" from "forged").
public enum AccessToken {
    /// The token of an `Authorization: Bearer <token>` value (the scheme in any case, blanks
    /// around either part ignored); nil when the value is not of that form. The one parser of
    /// the header: the node's access check and its admin API both use it.
    public static func bearer(_ authorization: String) -> String? {
        let h = authorization.trimmingCharacters(in: .whitespaces)
        guard h.count > 7, h.prefix(7).lowercased() == "bearer " else { return nil }
        return h.dropFirst(7).trimmingCharacters(in: .whitespaces)
    }

    /// Clock skew tolerated on `nbf`/`iat` (seconds): a token minted on a host whose clock
    /// runs a little ahead still works at once.
    public static let skew: Int64 = 60

    /// The RFC 7638 thumbprint of a P-256 public key (base64url SHA-256 of its canonical JWK).
    public static func thumbprint(_ key: P256.Signing.PublicKey) -> String {
        let raw = key.rawRepresentation
        let json = "{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"\(Base64URL.encode(raw.prefix(32)))\",\"y\":\"\(Base64URL.encode(raw.suffix(32)))\"}"
        return Base64URL.encode(Data(SHA256.hash(data: Data(json.utf8))))
    }

    /// Signs `claims` with `key` (its thumbprint becomes `iss`); returns the compact token.
    public static func sign(_ claims: AccessClaims, with key: P256.Signing.PrivateKey) throws -> String {
        var payload: [String: Any] = [
            "sub": claims.subject, "iss": thumbprint(key.publicKey), "iat": claims.issuedAt, "exp": claims.expires,
            "stoq": ["role": claims.role.rawValue, "prefixes": claims.scope.prefixes, "methods": claims.scope.methods],
        ]
        if let nbf = claims.notBefore { payload["nbf"] = nbf }
        let header = Base64URL.encode(Data(#"{"alg":"ES256","typ":"JWT"}"#.utf8))
        let body = Base64URL.encode(try JSONSerialization.data(withJSONObject: payload, options: [.sortedKeys, .withoutEscapingSlashes]))
        let input = header + "." + body
        return input + "." + Base64URL.encode(try ES256.sign(Data(input.utf8), with: key))
    }

    /// Verifies `token` against the accepted `keys` at `now` (Unix seconds) and returns its
    /// claims. Checks, in order: form, algorithm, issuer, signature, `exp`, `nbf`/`iat`.
    public static func verify(_ token: String, keys: [P256.Signing.PublicKey], now: Int64) throws(AccessError) -> AccessClaims {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let headerData = Base64URL.decode(String(parts[0])),
            let bodyData = Base64URL.decode(String(parts[1])), let signature = Base64URL.decode(String(parts[2]))
        else {
            throw AccessError(.malformed, "not a compact JWS (three base64url parts separated by dots)")
        }
        guard let header = (try? JSONSerialization.jsonObject(with: headerData)) as? [String: Any] else {
            throw AccessError(.malformed, "the header is not a JSON object")
        }
        guard let alg = header["alg"] as? String, alg == ES256.algorithm else {
            // The header is the client's: the line shows only the start of a long alg.
            throw AccessError(.unsupportedAlgorithm, "alg \(header["alg"].map { ShownText.cut("\($0)") } ?? "(none)") is not ES256")
        }
        guard let body = (try? JSONSerialization.jsonObject(with: bodyData)) as? [String: Any] else {
            throw AccessError(.malformed, "the payload is not a JSON object")
        }
        let claims = try parseClaims(body)
        guard let key = keys.first(where: { thumbprint($0) == claims.issuer }) else {
            throw AccessError(.unknownKey, "issued by key \(ShownText.cut(claims.issuer)), which this node does not accept")
        }
        let input = Data(token.utf8.prefix(parts[0].utf8.count + 1 + parts[1].utf8.count))
        guard ES256.verify(signature, over: input, with: key) else {
            throw AccessError(.badSignature, "the signature does not verify with issuer key \(claims.issuer)")
        }
        if now >= claims.expires {
            throw AccessError(.expired, "expired at \(iso(claims.expires)) (now \(iso(now)))")
        }
        let start = claims.notBefore ?? claims.issuedAt
        if start > now + skew {
            throw AccessError(.notYetValid, "valid from \(iso(start)) (now \(iso(now)))")
        }
        return claims
    }

    private static func parseClaims(_ b: [String: Any]) throws(AccessError) -> AccessClaims {
        func int(_ k: String) -> Int64? {
            // JSON has one number type: accept whole numbers only (NumericDate, RFC 7519 §2).
            guard let n = b[k] as? NSNumber, !(b[k] is Bool), n.doubleValue == n.doubleValue.rounded() else { return nil }
            return n.int64Value
        }
        guard let sub = b["sub"] as? String, !sub.isEmpty else { throw AccessError(.malformed, "claim sub is missing or empty") }
        guard let iss = b["iss"] as? String, !iss.isEmpty else { throw AccessError(.malformed, "claim iss is missing or empty") }
        guard let iat = int("iat") else { throw AccessError(.malformed, "claim iat is missing or not an integer") }
        guard let exp = int("exp") else { throw AccessError(.malformed, "claim exp is missing or not an integer") }
        if b["nbf"] != nil, int("nbf") == nil { throw AccessError(.malformed, "claim nbf is not an integer") }
        guard let stoq = b["stoq"] as? [String: Any] else { throw AccessError(.malformed, "claim stoq is missing") }
        guard let r = stoq["role"] as? String, let role = AccessRole(rawValue: r) else {
            throw AccessError(.malformed, "claim stoq.role is not one of reader, writer, admin")
        }
        guard let prefixes = stoq["prefixes"] as? [String], !prefixes.isEmpty, prefixes.allSatisfy({ $0.hasPrefix("/") }) else {
            throw AccessError(.malformed, "claim stoq.prefixes is not a non-empty list of paths starting with /")
        }
        guard let methods = stoq["methods"] as? [String], !methods.isEmpty else {
            throw AccessError(.malformed, "claim stoq.methods is not a non-empty list of methods")
        }
        return AccessClaims(
            subject: sub, issuedAt: iat, notBefore: int("nbf"), expires: exp, role: role,
            scope: AccessScope(prefixes: prefixes, methods: methods), issuer: iss)
    }

    static func iso(_ t: Int64) -> String {
        ISO8601DateFormatter().string(from: Date(timeIntervalSince1970: TimeInterval(t)))
    }
}
