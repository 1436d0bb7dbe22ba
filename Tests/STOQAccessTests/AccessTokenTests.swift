@preconcurrency import Crypto
import Foundation
import STOQAccess
import STOQTrust
import Testing

@Suite struct AccessTokenTests {
    let key = P256.Signing.PrivateKey()
    let now: Int64 = 1_800_000_000

    func claims(expires: Int64? = nil, notBefore: Int64? = nil, role: AccessRole = .writer) -> AccessClaims {
        AccessClaims(
            subject: "alice", issuedAt: now, notBefore: notBefore, expires: expires ?? now + 3600, role: role,
            scope: AccessScope(prefixes: ["/objects/a-"], methods: ["PUT", "DELETE"]))
    }

    func code(_ body: () throws -> AccessClaims) -> AccessError.Code? {
        do { _ = try body(); return nil } catch let e as AccessError { return e.code } catch { return AccessError.Code(rawValue: "\(error)") }
    }

    /// Segments of a token, each re-encoded after `edit` changes its JSON.
    func forge(_ token: String, header: ((inout [String: Any]) -> Void)? = nil, payload: ((inout [String: Any]) -> Void)? = nil) -> String {
        var parts = token.split(separator: ".").map(String.init)
        func edit(_ i: Int, _ f: (inout [String: Any]) -> Void) {
            var o = try! JSONSerialization.jsonObject(with: Base64URL.decode(parts[i])!) as! [String: Any]
            f(&o)
            parts[i] = Base64URL.encode(try! JSONSerialization.data(withJSONObject: o, options: [.sortedKeys]))
        }
        if let header { edit(0, header) }
        if let payload { edit(1, payload) }
        return parts.joined(separator: ".")
    }

    @Test func signedTokenVerifiesWithItsClaims() throws {
        let t = try AccessToken.sign(claims(), with: key)
        let c = try AccessToken.verify(t, keys: [P256.Signing.PrivateKey().publicKey, key.publicKey], now: now + 10)
        #expect(c.subject == "alice")
        #expect(c.role == .writer)
        #expect(c.scope == AccessScope(prefixes: ["/objects/a-"], methods: ["PUT", "DELETE"]))
        #expect(c.expires == now + 3600)
        #expect(c.issuer == AccessToken.thumbprint(key.publicKey))
        // No kid in the header: the issuer is the iss claim.
        let header = String(decoding: Base64URL.decode(String(t.split(separator: ".")[0]))!, as: UTF8.self)
        #expect(header == #"{"alg":"ES256","typ":"JWT"}"#)
    }

    @Test func malformedTokens() throws {
        let keys = [key.publicKey]
        #expect(code { try AccessToken.verify("", keys: keys, now: now) } == .malformed)
        #expect(code { try AccessToken.verify("a.b", keys: keys, now: now) } == .malformed)
        #expect(code { try AccessToken.verify("a.b.c.d", keys: keys, now: now) } == .malformed)
        #expect(code { try AccessToken.verify("!!.e30.AA", keys: keys, now: now) } == .malformed)
        let t = try AccessToken.sign(claims(), with: key)
        #expect(code { try AccessToken.verify(forge(t, payload: { $0["sub"] = nil }), keys: keys, now: now) } == .malformed)
        #expect(code { try AccessToken.verify(forge(t, payload: { $0["exp"] = "tomorrow" }), keys: keys, now: now) } == .malformed)
        #expect(code { try AccessToken.verify(forge(t, payload: { $0["exp"] = 1.5 }), keys: keys, now: now) } == .malformed)
        #expect(
            code { try AccessToken.verify(forge(t, payload: { $0["stoq"] = ["role": "god", "prefixes": ["/"], "methods": ["*"]] }), keys: keys, now: now) }
                == .malformed)
        #expect(
            code {
                try AccessToken.verify(forge(t, payload: { $0["stoq"] = ["role": "writer", "prefixes": ["objects"], "methods": ["*"]] }), keys: keys, now: now)
            } == .malformed)
    }

    @Test func algorithmOtherThanES256IsRefused() throws {
        let t = try AccessToken.sign(claims(), with: key)
        #expect(code { try AccessToken.verify(forge(t, header: { $0["alg"] = "none" }), keys: [key.publicKey], now: now) } == .unsupportedAlgorithm)
        #expect(code { try AccessToken.verify(forge(t, header: { $0["alg"] = "HS256" }), keys: [key.publicKey], now: now) } == .unsupportedAlgorithm)
    }

    @Test func tokenOfAnotherKeyIsUnknown() throws {
        let t = try AccessToken.sign(claims(), with: P256.Signing.PrivateKey())
        #expect(code { try AccessToken.verify(t, keys: [key.publicKey], now: now) } == .unknownKey)
        #expect(code { try AccessToken.verify(t, keys: [], now: now) } == .unknownKey)
    }

    /// The refusal's message (a 401's body, the access log's reason) shows a client-chosen alg
    /// or iss cut: its first 64 characters and its length, not the whole of it.
    @Test func refusalShowsALongAlgOrIssuerCut() throws {
        let t = try AccessToken.sign(claims(), with: key)
        let long = String(repeating: "x", count: 5000), shown = String(repeating: "x", count: 64) + "… (5000 bytes)"
        func message(_ token: String) -> String? {
            do { _ = try AccessToken.verify(token, keys: [key.publicKey], now: now); return nil } catch { return error.message }
        }
        #expect(message(forge(t, header: { $0["alg"] = long })) == "alg \(shown) is not ES256")
        #expect(message(forge(t, payload: { $0["iss"] = long })) == "issued by key \(shown), which this node does not accept")
        #expect(message(forge(t, header: { $0["alg"] = "HS256" })) == "alg HS256 is not ES256")
    }

    @Test func alteredClaimsOrSignatureAreRefused() throws {
        let t = try AccessToken.sign(claims(), with: key)
        // Widening the scope keeps iss, so the right key is tried, and fails.
        let widened = forge(t, payload: { $0["stoq"] = ["role": "admin", "prefixes": ["/"], "methods": ["*"]] })
        #expect(code { try AccessToken.verify(widened, keys: [key.publicKey], now: now) } == .badSignature)
        // Another key's signature on this token's input, under this key's iss.
        let parts = t.split(separator: ".")
        let input = Data((parts[0] + "." + parts[1]).utf8)
        let other = Base64URL.encode(try ES256.sign(input, with: P256.Signing.PrivateKey()))
        #expect(code { try AccessToken.verify(parts[0] + "." + parts[1] + "." + other, keys: [key.publicKey], now: now) } == .badSignature)
        #expect(code { try AccessToken.verify(parts[0] + "." + parts[1] + ".AAAA", keys: [key.publicKey], now: now) } == .badSignature)
    }

    @Test func expiryAndNotBefore() throws {
        let t = try AccessToken.sign(claims(expires: now + 100), with: key)
        #expect(code { try AccessToken.verify(t, keys: [key.publicKey], now: now + 99) } == nil)
        #expect(code { try AccessToken.verify(t, keys: [key.publicKey], now: now + 100) } == .expired)
        let later = try AccessToken.sign(claims(notBefore: now + 1000), with: key)
        #expect(code { try AccessToken.verify(later, keys: [key.publicKey], now: now) } == .notYetValid)
        // Within the clock skew allowed.
        #expect(code { try AccessToken.verify(later, keys: [key.publicKey], now: now + 1000 - AccessToken.skew) } == nil)
        // iat in the future counts when there is no nbf.
        #expect(code { try AccessToken.verify(t, keys: [key.publicKey], now: now - 2 * AccessToken.skew) } == .notYetValid)
    }

    @Test func gateCachesVerifiedTokensButStillExpiresThem() throws {
        let t = try AccessToken.sign(claims(expires: now + 100), with: key)
        let gate = AccessGate(AccessSettings(policy: AccessPolicy(), keys: [key.publicKey]))
        let p = try gate.principal(authorization: "Bearer " + t, certificate: "", peer: .loopback, now: now)
        #expect(p.identity == "token:alice")
        #expect(throws: AccessError.self) { try gate.principal(authorization: "Bearer " + t, certificate: "", peer: .loopback, now: now + 100) }
        #expect(throws: AccessError.self) { try gate.principal(authorization: "Basic dXNlcg==", certificate: "", peer: .loopback, now: now) }
        // New settings without the key: the cached verdict is forgotten.
        gate.settings = AccessSettings(policy: AccessPolicy(), keys: [])
        do { _ = try gate.principal(authorization: "Bearer " + t, certificate: "", peer: .loopback, now: now); Issue.record("accepted") } catch {
            #expect(error.code == .unknownKey)
        }
    }

    @Test func operatorTokenIsMadeOnceAndReissuedForAnotherKey() throws {
        let dir = NSTemporaryDirectory() + "stoq-access-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let k = try AccessFiles.loadOrCreateTokenKey(dataDir: dir)
        #expect(try AccessFiles.loadOrCreateTokenKey(dataDir: dir).rawRepresentation == k.rawRepresentation)
        var st = stat()
        #expect(stat(AccessFiles.tokenKey(dataDir: dir), &st) == 0 && st.st_mode & 0o777 == 0o600)
        #expect(try AccessFiles.ensureOperatorToken(dataDir: dir, key: k, now: now))
        #expect(try !AccessFiles.ensureOperatorToken(dataDir: dir, key: k, now: now + 86_400))
        #expect(stat(AccessFiles.operatorToken(dataDir: dir), &st) == 0 && st.st_mode & 0o777 == 0o600)
        let c = try AccessToken.verify(try AccessFiles.readToken(AccessFiles.operatorToken(dataDir: dir)), keys: [k.publicKey], now: now)
        #expect(c.role == .admin && c.scope == .everything && c.expires == now + AccessFiles.operatorLifetime)
        // Close to expiry, or signed by a key the node no longer has: a new one.
        #expect(try AccessFiles.ensureOperatorToken(dataDir: dir, key: k, now: now + AccessFiles.operatorLifetime - 86_400))
        #expect(try AccessFiles.ensureOperatorToken(dataDir: dir, key: P256.Signing.PrivateKey(), now: now))
    }
}
