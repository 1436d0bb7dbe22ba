@preconcurrency import Crypto
@preconcurrency import _CryptoExtras
#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import STOQCore
import STOQTrust
import SwiftASN1
import X509

/// An HTTP request as the ACME server core sees it: transport-neutral, so the protocol logic is
/// tested and reasoned about without sockets (the HTTPS listener is `ACMEHTTPSServer`).
public struct ACMEHTTPRequest: Sendable {
    /// GET, HEAD, POST, …
    public var method: String
    /// The path, without query.
    public var path: String
    /// Header fields, names lower-cased.
    public var headers: [String: String]
    /// The body.
    public var body: Data

    /// Creates a request.
    public init(method: String, path: String, headers: [String: String] = [:], body: Data = Data()) {
        self.method = method
        self.path = path
        self.headers = Dictionary(headers.map { ($0.key.lowercased(), $0.value) }, uniquingKeysWith: { a, _ in a })
        self.body = body
    }
}

/// The answer to an `ACMEHTTPRequest`.
public struct ACMEHTTPResponse: Sendable {
    /// HTTP status.
    public var status: Int
    /// Header fields.
    public var headers: [(String, String)]
    /// The body.
    public var body: Data
}

/// The ACME server role of TrustChain (RFC 8555): accounts bound to an operator's external
/// account key, orders for the identifiers that key authorizes, issuance through the
/// `TrustAuthority`, and every certificate appended to the transparency log before it is handed out.
///
/// Authorization is by external account binding instead of challenges: the operator already
/// said, with `stoq trust add-node`, which names and addresses a node may hold, so an
/// authorization for one of them is valid at once and any other identifier is refused with
/// `rejectedIdentifier`. The EAB key is re-read on every order, so deleting its file withdraws
/// the node's authority immediately.
///
/// Accounts, orders and authorizations live in memory (a restart forgets them; clients make a
/// new account). Issued certificates are reloaded from the log at start and revocations are kept
/// in `revoked.txt` (the format `stoq trust verify --revoked` reads), so both survive a restart.
public actor ACMEServer {
    /// Settings with their defaults.
    public struct Configuration: Sendable {
        /// The URL clients reach the server at, scheme + authority, no trailing slash
        /// (e.g. `https://[::1]:14000`); every resource URL and the JWS `url` check derive from it.
        /// nil: `https://` + the request's Host header, so one server answers under every name
        /// and address it is reached by (a listener on port 0 learns its port only when bound).
        public var baseURL: String?
        /// Lifetime of issued certificates.
        public var certificateLifetime: TimeInterval = TrustAuthority.defaultLifetime
        /// How many unused nonces are remembered; the oldest are forgotten first (a client
        /// holding one gets `badNonce` and retries).
        public var nonceCapacity = 10_000
        /// How long orders and authorizations stay usable.
        public var orderLifetime: TimeInterval = 3600
        /// Largest request body accepted.
        public var maxBodySize = 64 * 1024

        /// Settings for a server reached at `baseURL`.
        public init(baseURL: String? = nil) {
            var b = baseURL
            while b?.hasSuffix("/") == true { b?.removeLast() }
            self.baseURL = b
        }
    }

    private struct Account {
        var id: String
        var key: JWK
        var eabKid: String
        var contact: [String]
    }

    private struct Order {
        var id: String
        var accountID: String
        var identifiers: [ACMEIdentifier]
        var authorizationIDs: [String]
        var status: String
        var expires: Date
        var certificateID: String?
    }

    private struct Authorization {
        var id: String
        var accountID: String
        var identifier: ACMEIdentifier
        var expires: Date
    }

    private struct Issued {
        var id: String
        var accountID: String?
        var leaf: Certificate
        var chainPEM: String
    }

    /// The settings.
    public let configuration: Configuration
    private let authority: TrustAuthority
    private let eabKeys: ExternalAccountKeyStore
    private var log: TransparencyLog?
    private let revokedPath: String
    private let logger: Logger

    private var nonces = Set<String>()
    private var nonceOrder: [String] = []
    private var nonceHead = 0
    private var accounts: [String: Account] = [:]
    private var accountByThumbprint: [String: String] = [:]
    private var orders: [String: Order] = [:]
    private var authorizations: [String: Authorization] = [:]
    private var issued: [String: Issued] = [:]
    private var issuedBySerial: [String: String] = [:]
    private var revoked: Set<String> = []
    /// Serial → precert TBS of certificates logged before this process started (their
    /// account is unknown; revocation by certificate key or an authorized account still works).
    private var loggedTBS: [String: [UInt8]] = [:]

    /// Opens the server for the authority in `caDirectory`: loads the CA, the EAB keys, the
    /// transparency log (creating it and its key on first use) and the revoked serials.
    public init(caDirectory: String, configuration: Configuration, logger: Logger = Logger(label: "stoq.acme")) throws {
        self.configuration = configuration
        self.logger = logger
        authority = try TrustAuthority.load(from: caDirectory)
        eabKeys = ExternalAccountKeyStore(caDirectory: caDirectory)
        let log = try TransparencyLog.openForAuthority(caDirectory: caDirectory) { [logger] in logger.warning("\($0)") }
        self.log = log
        revokedPath = caDirectory + "/" + TrustAuthority.FileName.revoked
        if FileManager.default.fileExists(atPath: revokedPath) {
            revoked = Set(try PEMFiles.readSerials(revokedPath).map { CertificateSummary.hexSerial($0) })
        }
        // Certificates issued before a restart can still be revoked: the log holds each one's
        // precert TBS (older logs: the whole certificate).
        for i in 0..<log.size {
            guard let bytes = try? log.entry(at: i) else { continue }
            if let (_, entry) = CertificateTransparency.parseMerkleTreeLeaf(bytes) {
                if let serial = try? CertificateTransparency.serialNumber(ofTBS: entry.tbsCertificate) {
                    loggedTBS[CertificateSummary.hexSerial(serial)] = entry.tbsCertificate
                }
                continue
            }
            guard let leaf = try? Certificate(derEncoded: bytes) else { continue }
            let id = "log\(i)"
            issued[id] = Issued(id: id, accountID: nil, leaf: leaf, chainPEM: (try? PEMFiles.pem([leaf, authority.intermediate])) ?? "")
            issuedBySerial[CertificateSummary.hexSerial(leaf.serialNumber)] = id
        }
    }

    /// How many certificates the transparency log holds.
    public var transparencyLogSize: Int { log?.size ?? 0 }

    /// The transparency log's signed tree head now.
    public func signedTreeHead() throws -> SignedTreeHead? { try log?.signedTreeHead() }

    /// Closes the transparency log (releasing its lock); later finalize requests fail with
    /// serverInternal. For an orderly stop, and for tests that read the log file afterwards.
    public func close() { log = nil }

    // MARK: URLs

    /// The base URL of the request being handled (see `Configuration.baseURL`). Set at the start
    /// of `handle`; `route` never suspends, so no other request can change it meanwhile.
    private var base = ""
    private var directoryURL: String { base + "/directory" }
    private func url(_ path: String) -> String { base + path }

    // MARK: dispatch

    /// Answers one request. Never throws: every failure becomes a problem document.
    public func handle(_ request: ACMEHTTPRequest) async -> ACMEHTTPResponse {
        if let b = configuration.baseURL {
            base = b
        } else {
            // Only a bracketed IPv6 literal or a host name with an optional port is used; anything
            // else could smuggle a different URL into the directory.
            let host = request.headers["host"] ?? ""
            let ok =
                !host.isEmpty
                && host.utf8.allSatisfy { c in
                    (c >= 0x30 && c <= 0x39) || (c >= 0x61 && c <= 0x7a) || (c >= 0x41 && c <= 0x5a) || ":[].-".utf8.contains(c)
                }
            base = "https://" + (ok ? host : "localhost")
        }
        do {
            return try route(request)
        } catch let p as ACMEProblem {
            logger.info("acme refused", metadata: ["path": "\(request.path)", "type": "\(p.code)", "detail": "\(p.detail)"])
            return problem(p)
        } catch {
            logger.error("acme internal error", metadata: ["path": "\(request.path)", "error": "\(error)"])
            return problem(ACMEProblem(.serverInternal, "internal error: \(error)"))
        }
    }

    private func route(_ r: ACMEHTTPRequest) throws -> ACMEHTTPResponse {
        let parts = r.path.split(separator: "/").map(String.init)
        switch (r.method, parts.count, parts.first ?? "") {
        case ("GET", 1, "directory"):
            return json(200, directoryJSON())
        case ("HEAD", 2, "acme") where parts[1] == "new-nonce":
            return ACMEHTTPResponse(status: 200, headers: baseHeaders() + [("Cache-Control", "no-store")], body: Data())
        case ("GET", 2, "acme") where parts[1] == "new-nonce":
            return ACMEHTTPResponse(status: 204, headers: baseHeaders() + [("Cache-Control", "no-store")], body: Data())
        case ("POST", 2, "acme"), ("POST", 3, "acme"):
            return try post(r, parts: Array(parts.dropFirst()))
        case (_, _, "directory"), (_, _, "acme"):
            throw ACMEProblem(.malformed, "\(r.method) \(r.path): method not allowed (ACME resources take POST)", status: 405)
        default:
            throw ACMEProblem(.malformed, "\(r.path): no such resource", status: 404)
        }
    }

    private func directoryJSON() -> [String: Any] {
        [
            "newNonce": url("/acme/new-nonce"), "newAccount": url("/acme/new-account"), "newOrder": url("/acme/new-order"),
            "revokeCert": url("/acme/revoke-cert"),
            "meta": ["externalAccountRequired": true] as [String: Any],
        ]
    }

    // MARK: the JWS envelope

    /// Who signed a request: an existing account (`kid`) or a bare key (`jwk`).
    private enum Signer {
        case account(Account)
        case key(JWK)
    }

    private struct Verified {
        var signer: Signer
        var payload: Data
        var jws: JWS
    }

    private func post(_ r: ACMEHTTPRequest, parts: [String]) throws -> ACMEHTTPResponse {
        guard r.body.count <= configuration.maxBodySize else {
            throw ACMEProblem(.malformed, "request body of \(r.body.count) bytes exceeds \(configuration.maxBodySize)", status: 413)
        }
        let ctype = (r.headers["content-type"] ?? "").split(separator: ";").first.map { $0.trimmingCharacters(in: .whitespaces).lowercased() }
        guard ctype == "application/jose+json" else {
            throw ACMEProblem(.malformed, "Content-Type \(r.headers["content-type"] ?? "(none)"): expected application/jose+json", status: 415)
        }
        let endpoint = parts[0]
        let keyRule: KeyRule =
            switch endpoint {
            case "new-account": .jwk
            case "revoke-cert": .either
            default: .kid
            }
        let v = try verify(r, keyRule: keyRule)
        switch (endpoint, parts.count) {
        case ("new-account", 1): return try newAccount(v)
        case ("new-order", 1): return try newOrder(v)
        case ("revoke-cert", 1): return try revoke(v)
        case ("acct", 2): return try accountResource(v, id: parts[1])
        case ("order", 2): return try orderResource(v, id: parts[1])
        case ("authz", 2): return try authorizationResource(v, id: parts[1])
        case ("finalize", 2): return try finalize(v, orderID: parts[1])
        case ("cert", 2): return try certificateResource(v, id: parts[1])
        default: throw ACMEProblem(.malformed, "\(r.path): no such resource", status: 404)
        }
    }

    private enum KeyRule { case jwk, kid, either }

    /// RFC 8555 §6.2–6.5: algorithm, exactly one of jwk/kid, signature, nonce, url — in that
    /// order, so a request whose signature fails does not burn the nonce it carried.
    private func verify(_ r: ACMEHTTPRequest, keyRule: KeyRule) throws -> Verified {
        let object: Any
        do { object = try JSONSerialization.jsonObject(with: r.body) } catch {
            throw ACMEProblem(.malformed, "request body is not JSON")
        }
        let jws = try JWS(json: object)
        let h = try jws.header()
        guard let alg = h["alg"] as? String else { throw ACMEProblem(.malformed, "JWS protected header has no alg") }
        guard ["ES256", "ES384", "RS256"].contains(alg) else {
            throw ACMEProblem(.badSignatureAlgorithm, "alg \(alg) is not accepted (ES256, ES384, RS256)")
        }
        let jwkMembers = h["jwk"] as? [String: Any]
        let kid = h["kid"] as? String
        if jwkMembers != nil && kid != nil { throw ACMEProblem(.malformed, "JWS header has both jwk and kid; exactly one is allowed") }
        let signer: Signer
        switch (keyRule, jwkMembers, kid) {
        case (.jwk, let m?, nil), (.either, let m?, nil):
            signer = .key(try JWK(members: m))
        case (.kid, nil, let k?), (.either, nil, let k?):
            let prefix = url("/acme/acct/")
            guard k.hasPrefix(prefix), let a = accounts[String(k.dropFirst(prefix.count))] else {
                throw ACMEProblem(.accountDoesNotExist, "kid \(k) is not an account on this server")
            }
            signer = .account(a)
        case (.jwk, nil, _):
            throw ACMEProblem(.malformed, "\(r.path) must be signed with a jwk header (the new account key), not a kid")
        case (.kid, _, nil):
            throw ACMEProblem(.malformed, "\(r.path) must be signed with a kid header (the account URL), not a jwk")
        default:
            throw ACMEProblem(.malformed, "JWS header has neither jwk nor kid")
        }
        let key: JWK =
            switch signer {
            case .account(let a): a.key
            case .key(let k): k
            }
        guard try jws.verify(with: key) else {
            throw ACMEProblem(.malformed, "JWS signature does not verify with the \(keyRule == .kid ? "account" : "jwk") key")
        }
        guard let nonce = h["nonce"] as? String else {
            throw ACMEProblem(.badNonce, "JWS protected header has no nonce; get one from \(url("/acme/new-nonce"))")
        }
        guard nonces.remove(nonce) != nil else {
            throw ACMEProblem(.badNonce, "nonce \(nonce) is unknown or was already used; retry with the Replay-Nonce of this response")
        }
        let expected = url(r.path)
        guard let u = h["url"] as? String else { throw ACMEProblem(.malformed, "JWS protected header has no url") }
        guard u == expected else {
            throw ACMEProblem(.unauthorized, "JWS url \(u) does not match the request URL \(expected)")
        }
        return Verified(signer: signer, payload: try jws.payloadData(), jws: jws)
    }

    private func requireAccount(_ v: Verified) throws -> Account {
        guard case .account(let a) = v.signer else { throw ACMEProblem(.malformed, "this request must be signed by an account (kid)") }
        return a
    }

    private func payloadObject(_ v: Verified, what: String) throws -> [String: Any] {
        guard !v.payload.isEmpty else { throw ACMEProblem(.malformed, "\(what): payload is empty (POST-as-GET is not allowed here)") }
        guard let o = try? JSONSerialization.jsonObject(with: v.payload) as? [String: Any] else {
            throw ACMEProblem(.malformed, "\(what): payload is not a JSON object")
        }
        return o
    }

    private func requirePostAsGet(_ v: Verified, what: String) throws {
        guard v.payload.isEmpty else { throw ACMEProblem(.malformed, "\(what): expected POST-as-GET (an empty payload)") }
    }

    // MARK: accounts

    private func newAccount(_ v: Verified) throws -> ACMEHTTPResponse {
        guard case .key(let key) = v.signer else { throw ACMEProblem(.malformed, "newAccount must be signed with jwk") }
        let o = try payloadObject(v, what: "newAccount")
        if let id = accountByThumbprint[key.thumbprint], let a = accounts[id] {
            return json(200, accountJSON(a), location: url("/acme/acct/\(a.id)"))
        }
        if o["onlyReturnExisting"] as? Bool == true {
            throw ACMEProblem(.accountDoesNotExist, "no account exists for this key (onlyReturnExisting)")
        }
        guard let eabObject = o["externalAccountBinding"] else {
            throw ACMEProblem(
                .externalAccountRequired,
                "this server requires externalAccountBinding; get a key id and HMAC key from `stoq trust add-node`")
        }
        let eab: JWS
        do { eab = try JWS(json: eabObject) } catch let p as ACMEProblem {
            throw ACMEProblem(.malformed, "externalAccountBinding: \(p.detail)")
        }
        let eh = try eab.header()
        guard let kid = eh["kid"] as? String else { throw ACMEProblem(.malformed, "externalAccountBinding: protected header has no kid") }
        guard eh["nonce"] == nil else { throw ACMEProblem(.malformed, "externalAccountBinding: protected header must not carry a nonce") }
        guard eh["url"] as? String == url("/acme/new-account") else {
            throw ACMEProblem(.unauthorized, "externalAccountBinding: url \(eh["url"] as? String ?? "(none)") is not \(url("/acme/new-account"))")
        }
        guard let stored = try eabKeys.key(kid: kid), let mac = stored.symmetricKey else {
            throw ACMEProblem(.unauthorized, "externalAccountBinding: key id \(kid) is not known to this CA")
        }
        guard try eab.verifyMAC(with: mac) else {
            throw ACMEProblem(.unauthorized, "externalAccountBinding: HMAC does not verify for key id \(kid)")
        }
        guard let inner = try? JSONSerialization.jsonObject(with: try eab.payloadData()) as? [String: Any],
            let bound = try? JWK(members: inner), bound.sameKey(as: key)
        else {
            throw ACMEProblem(.malformed, "externalAccountBinding: payload is not the account's jwk")
        }
        if o["termsOfServiceAgreed"] != nil && !(o["termsOfServiceAgreed"] is Bool) {
            throw ACMEProblem(.malformed, "newAccount: termsOfServiceAgreed must be a boolean")
        }
        let contact = (o["contact"] as? [String]) ?? []
        let a = Account(id: Self.randomID(), key: key, eabKid: kid, contact: contact)
        accounts[a.id] = a
        accountByThumbprint[key.thumbprint] = a.id
        logger.info("acme account created", metadata: ["account": "\(a.id)", "eab": "\(kid)"])
        return json(201, accountJSON(a), location: url("/acme/acct/\(a.id)"))
    }

    private func accountJSON(_ a: Account) -> [String: Any] {
        ["status": "valid", "contact": a.contact, "orders": url("/acme/acct/\(a.id)/orders")]
    }

    private func accountResource(_ v: Verified, id: String) throws -> ACMEHTTPResponse {
        let a = try requireAccount(v)
        guard a.id == id else { throw ACMEProblem(.unauthorized, "account \(id) is not the signing account") }
        return json(200, accountJSON(a), location: url("/acme/acct/\(a.id)"))
    }

    // MARK: orders

    /// Checks and normalizes an identifier: DNS names as the CA accepts them, IPv6 addresses
    /// in canonical text; IPv4 and other types refused.
    private func normalize(_ id: ACMEIdentifier) throws -> ACMEIdentifier {
        switch id.type {
        case "dns":
            guard let n = try? ExternalAccountKeyStore.normalizedDNSName(id.value) else {
                throw ACMEProblem(.rejectedIdentifier, "dns identifier \(id.value) is not a valid host name (wildcards are not issued)")
            }
            return .dns(n)
        case "ip":
            guard let n = try? ExternalAccountKeyStore.normalizedIPv6(id.value) else {
                throw ACMEProblem(.rejectedIdentifier, "ip identifier \(id.value) is not an IPv6 address; STOQ issues for IPv6 only")
            }
            return .ip(n)
        default:
            throw ACMEProblem(.unsupportedIdentifier, "identifier type \(id.type) is not supported (dns, ip)")
        }
    }

    /// The external account key `a` was bound with, read again now: deleting its file
    /// withdraws the node's authority at once, for new orders and ready ones alike.
    private func liveKey(of a: Account) throws -> ExternalAccountKey {
        guard let eab = try eabKeys.key(kid: a.eabKid) else {
            throw ACMEProblem(.unauthorized, "the external account key \(a.eabKid) of this account was withdrawn")
        }
        return eab
    }

    private func newOrder(_ v: Verified) throws -> ACMEHTTPResponse {
        let a = try requireAccount(v)
        let o = try payloadObject(v, what: "newOrder")
        if o["notBefore"] != nil || o["notAfter"] != nil {
            throw ACMEProblem(.malformed, "newOrder: notBefore/notAfter are not supported; the CA sets a \(Int(configuration.certificateLifetime))s lifetime")
        }
        guard let list = o["identifiers"] as? [[String: Any]], !list.isEmpty else {
            throw ACMEProblem(.malformed, "newOrder: identifiers must be a non-empty array")
        }
        var ids: [ACMEIdentifier] = []
        for item in list {
            guard let t = item["type"] as? String, let val = item["value"] as? String else {
                throw ACMEProblem(.malformed, "newOrder: each identifier needs string type and value")
            }
            let n = try normalize(ACMEIdentifier(type: t, value: val))
            if !ids.contains(n) { ids.append(n) }
        }
        let eab = try liveKey(of: a)
        let allowed = eab.identifiers
        let refused = ids.filter { !allowed.contains($0) }
        guard refused.isEmpty else {
            throw ACMEProblem(
                .rejectedIdentifier,
                "\(refused.map(\.description).joined(separator: ", ")) not authorized for external account key \(eab.kid) (it allows \(allowed.map(\.description).sorted().joined(separator: ", ")))"
            )
        }
        let expires = Date().addingTimeInterval(configuration.orderLifetime)
        var authzIDs: [String] = []
        for id in ids {
            let z = Authorization(id: Self.randomID(), accountID: a.id, identifier: id, expires: expires)
            authorizations[z.id] = z
            authzIDs.append(z.id)
        }
        let order = Order(
            id: Self.randomID(), accountID: a.id, identifiers: ids, authorizationIDs: authzIDs,
            status: "ready", expires: expires)
        orders[order.id] = order
        return json(201, orderJSON(order), location: url("/acme/order/\(order.id)"))
    }

    private func orderJSON(_ o: Order) -> [String: Any] {
        var j: [String: Any] = [
            "status": o.status, "expires": RFC3339.string(o.expires),
            "identifiers": o.identifiers.map { ["type": $0.type, "value": $0.value] },
            "authorizations": o.authorizationIDs.map { url("/acme/authz/\($0)") },
            "finalize": url("/acme/finalize/\(o.id)"),
        ]
        if let c = o.certificateID { j["certificate"] = url("/acme/cert/\(c)") }
        return j
    }

    private func ownedOrder(_ v: Verified, id: String) throws -> Order {
        let a = try requireAccount(v)
        guard let o = orders[id] else { throw ACMEProblem(.malformed, "order \(id) does not exist", status: 404) }
        guard o.accountID == a.id else { throw ACMEProblem(.unauthorized, "order \(id) belongs to another account") }
        return o
    }

    private func orderResource(_ v: Verified, id: String) throws -> ACMEHTTPResponse {
        try requirePostAsGet(v, what: "order")
        let o = try ownedOrder(v, id: id)
        return json(200, orderJSON(o))
    }

    private func authorizationResource(_ v: Verified, id: String) throws -> ACMEHTTPResponse {
        let a = try requireAccount(v)
        guard let z = authorizations[id] else { throw ACMEProblem(.malformed, "authorization \(id) does not exist", status: 404) }
        guard z.accountID == a.id else { throw ACMEProblem(.unauthorized, "authorization \(id) belongs to another account") }
        // Valid without a challenge: the external account key already authorizes the identifier.
        return json(
            200,
            [
                "identifier": ["type": z.identifier.type, "value": z.identifier.value],
                "status": "valid", "expires": RFC3339.string(z.expires), "challenges": [[String: Any]](),
            ])
    }

    // MARK: finalize and certificates

    private func finalize(_ v: Verified, orderID: String) throws -> ACMEHTTPResponse {
        var order = try ownedOrder(v, id: orderID)
        guard order.status == "ready" else {
            throw ACMEProblem(.orderNotReady, "order \(orderID) is \(order.status), not ready")
        }
        guard order.expires > Date() else { throw ACMEProblem(.orderNotReady, "order \(orderID) expired at \(RFC3339.string(order.expires))") }
        if case .account(let a) = v.signer {
            // Orders are ready at once: without this a withdrawn key kept its ready orders' worth
            // of certificates for the orders' hour.
            let allowed = try liveKey(of: a).identifiers
            let refused = order.identifiers.filter { !allowed.contains($0) }
            guard refused.isEmpty else {
                throw ACMEProblem(
                    .unauthorized,
                    "finalize: \(refused.map(\.description).joined(separator: ", ")) no longer authorized for external account key \(a.eabKid)")
            }
        }
        let o = try payloadObject(v, what: "finalize")
        guard let csrText = o["csr"] as? String, let der = Base64URL.decode(csrText) else {
            throw ACMEProblem(.malformed, "finalize: csr must be the base64url DER of a PKCS#10 request")
        }
        let csr: CertificateSigningRequest
        do { csr = try CertificateSigningRequest(derEncoded: Array(der)) } catch {
            throw ACMEProblem(.badCSR, "finalize: csr does not parse as PKCS#10 (\(error))")
        }
        guard csr.publicKey.isValidSignature(csr.signature, for: csr) else {
            throw ACMEProblem(.badCSR, "finalize: the CSR's signature does not verify with its own public key")
        }
        let requested = try Self.identifiers(in: csr)
        let ordered = Set(order.identifiers)
        guard requested == ordered else {
            let extra = requested.subtracting(ordered).map(\.description).sorted()
            let missing = ordered.subtracting(requested).map(\.description).sorted()
            throw ACMEProblem(
                .badCSR,
                "finalize: CSR names differ from the order (extra: \(extra.isEmpty ? "none" : extra.joined(separator: ", ")); missing: \(missing.isEmpty ? "none" : missing.joined(separator: ", ")))"
            )
        }
        let dns = order.identifiers.filter { $0.type == "dns" }.map(\.value)
        let ips = order.identifiers.filter { $0.type == "ip" }.map(\.value)
        let cert: Certificate
        do {
            // Logged (as a precertificate) before it exists: a certificate the log does not hold
            // is never issued, and it carries the log's SCT.
            guard let log else { throw ACMEProblem(.serverInternal, "finalize: the server is shutting down (transparency log closed)") }
            cert = try authority.issue(
                csr: csr, dnsNames: dns, ipv6Addresses: ips, lifetime: configuration.certificateLifetime,
                log: log)
        } catch let e as TrustError {
            throw ACMEProblem(e.code == .invalidCSR ? .badCSR : .serverInternal, "finalize: \(e.message)")
        }
        let index = (log?.size ?? 0) - 1
        let issuedID = Self.randomID()
        let serial = CertificateSummary.hexSerial(cert.serialNumber)
        issued[issuedID] = Issued(
            id: issuedID, accountID: order.accountID, leaf: cert,
            chainPEM: try PEMFiles.pem([cert, authority.intermediate]))
        issuedBySerial[serial] = issuedID
        order.status = "valid"
        order.certificateID = issuedID
        orders[order.id] = order
        logger.info(
            "acme certificate issued",
            metadata: [
                "serial": "\(serial)", "identifiers": "\(order.identifiers.map(\.description).joined(separator: ","))",
                "log_index": "\(index)",
            ])
        return json(200, orderJSON(order), location: url("/acme/order/\(order.id)"))
    }

    /// The identifiers a CSR asks for: its SAN extension plus the subject CN (which must then be
    /// one of them). IPv4 addresses are refused.
    static func identifiers(in csr: CertificateSigningRequest) throws -> Set<ACMEIdentifier> {
        var out = Set<ACMEIdentifier>()
        let ext: ExtensionRequest?
        do { ext = try csr.attributes.extensionRequest } catch {
            throw ACMEProblem(.badCSR, "finalize: the CSR's extension request does not parse (\(error))")
        }
        if let sans = try? ext?.extensions.subjectAlternativeNames {
            for name in sans {
                switch name {
                case .dnsName(let n):
                    guard let v = try? ExternalAccountKeyStore.normalizedDNSName(n) else {
                        throw ACMEProblem(.badCSR, "finalize: CSR DNS name \(n) is not a valid host name")
                    }
                    out.insert(.dns(v))
                case .ipAddress(let octets):
                    let bytes = Array(octets.bytes)
                    guard bytes.count == 16 else {
                        throw ACMEProblem(.badCSR, "finalize: CSR IP address of \(bytes.count) bytes is not IPv6; STOQ is IPv6 only")
                    }
                    var a = in6_addr()
                    withUnsafeMutableBytes(of: &a) { $0.copyBytes(from: bytes) }
                    out.insert(.ip(IPv6Address(a).description))
                default:
                    throw ACMEProblem(.badCSR, "finalize: CSR subject alternative name \(name) is not a DNS name or IP address")
                }
            }
        }
        for cn in csr.subject.flatMap({ $0 }) where cn.type == .RDNAttributeType.commonName {
            let text = String(describing: cn.value)
            let asID: ACMEIdentifier = IPv6Address(text).map { .ip($0.description) } ?? .dns(text.lowercased())
            guard out.isEmpty || out.contains(asID) else {
                throw ACMEProblem(.badCSR, "finalize: CSR common name \(text) is not among its subject alternative names")
            }
            out.insert(asID)
        }
        guard !out.isEmpty else { throw ACMEProblem(.badCSR, "finalize: the CSR names no identifier") }
        return out
    }

    private func certificateResource(_ v: Verified, id: String) throws -> ACMEHTTPResponse {
        try requirePostAsGet(v, what: "certificate")
        let a = try requireAccount(v)
        guard let c = issued[id] else { throw ACMEProblem(.malformed, "certificate \(id) does not exist", status: 404) }
        guard c.accountID == a.id else { throw ACMEProblem(.unauthorized, "certificate \(id) belongs to another account") }
        return ACMEHTTPResponse(
            status: 200, headers: baseHeaders() + [("Content-Type", "application/pem-certificate-chain")],
            body: Data(c.chainPEM.utf8))
    }

    /// RFC 5280 reasons a subscriber may give: unspecified, keyCompromise, affiliationChanged,
    /// superseded, cessationOfOperation, privilegeWithdrawn. caCompromise (2) is the operator's call.
    static let allowedRevocationReasons: Set<Int> = [0, 1, 3, 4, 5, 9]

    private func revoke(_ v: Verified) throws -> ACMEHTTPResponse {
        let o = try payloadObject(v, what: "revokeCert")
        guard let text = o["certificate"] as? String, let der = Base64URL.decode(text),
            let cert = try? Certificate(derEncoded: Array(der))
        else {
            throw ACMEProblem(.malformed, "revokeCert: certificate must be the base64url DER of a certificate")
        }
        if let reason = o["reason"] {
            guard let r = reason as? Int, Self.allowedRevocationReasons.contains(r) else {
                throw ACMEProblem(.badRevocationReason, "revokeCert: reason \(reason) is not allowed (0, 1, 3, 4, 5, 9)")
            }
        }
        let serial = CertificateSummary.hexSerial(cert.serialNumber)
        let entry: Issued
        if let id = issuedBySerial[serial], let e = issued[id], e.leaf == cert {
            entry = e
        } else if let tbs = loggedTBS[serial],
            (try? CertificateTransparency.entry(forFinalCertificate: cert, issuer: authority.intermediate))??.tbsCertificate == tbs,
            authority.intermediate.publicKey.isValidSignature(cert.signature, for: cert)
        {
            entry = Issued(id: "logged", accountID: nil, leaf: cert, chainPEM: "")
        } else {
            throw ACMEProblem(.malformed, "revokeCert: certificate \(serial) was not issued by this CA", status: 404)
        }
        switch v.signer {
        case .key(let k):
            guard let certKey = Self.jwk(of: cert), certKey.sameKey(as: k) else {
                throw ACMEProblem(.unauthorized, "revokeCert: the jwk is not certificate \(serial)'s key")
            }
        case .account(let a):
            let names = Set(CertificateSummary(cert).dnsNames.map(ACMEIdentifier.dns) + CertificateSummary(cert).ipAddresses.map(ACMEIdentifier.ip))
            // A certificate naming no host (a role certificate: URI names only) is no account's
            // to revoke by authorization: the empty set is a subset of every account's names.
            let covered = !names.isEmpty && ((try? eabKeys.key(kid: a.eabKid))?.map { names.isSubset(of: $0.identifiers) } ?? false)
            guard entry.accountID == a.id || covered else {
                throw ACMEProblem(.unauthorized, "revokeCert: account \(a.id) neither ordered certificate \(serial) nor is authorized for all its names")
            }
        }
        guard !revoked.contains(serial) else { throw ACMEProblem(.alreadyRevoked, "certificate \(serial) is already revoked") }
        revoked.insert(serial)
        do {
            try PEMFiles.appendSerial(serial, to: revokedPath, header: "# serials revoked through ACME, read by `stoq trust verify --revoked`")
        } catch {
            revoked.remove(serial)
            throw error
        }
        logger.info("acme certificate revoked", metadata: ["serial": "\(serial)"])
        return ACMEHTTPResponse(status: 200, headers: baseHeaders(), body: Data())
    }

    /// Revoked serials (lower-case hex).
    public var revokedSerials: Set<String> { revoked }

    static func jwk(of cert: Certificate) -> JWK? {
        if let k = P256.Signing.PublicKey(cert.publicKey) { return .p256(k) }
        if let k = P384.Signing.PublicKey(cert.publicKey) { return .p384(k) }
        if let k = _RSA.Signing.PublicKey(cert.publicKey) { return .rsa(k) }
        return nil
    }

    // MARK: responses

    private func freshNonce() -> String {
        var rng = SystemRandomNumberGenerator()
        let n = Base64URL.encode((0..<16).map { _ in UInt8.random(in: 0...255, using: &rng) })
        nonces.insert(n)
        nonceOrder.append(n)
        // Forget the oldest beyond capacity; compact the FIFO now and then instead of shifting it.
        while nonceOrder.count - nonceHead > configuration.nonceCapacity {
            nonces.remove(nonceOrder[nonceHead])
            nonceHead += 1
        }
        if nonceHead > 4096 {
            nonceOrder.removeFirst(nonceHead)
            nonceHead = 0
        }
        return n
    }

    private func baseHeaders() -> [(String, String)] {
        [("Replay-Nonce", freshNonce()), ("Link", "<\(directoryURL)>;rel=\"index\"")]
    }

    private func json(_ status: Int, _ object: [String: Any], location: String? = nil) -> ACMEHTTPResponse {
        var h = baseHeaders() + [("Content-Type", "application/json")]
        if let location { h.append(("Location", location)) }
        let body = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes])) ?? Data()
        return ACMEHTTPResponse(status: status, headers: h, body: body)
    }

    private func problem(_ p: ACMEProblem) -> ACMEHTTPResponse {
        ACMEHTTPResponse(status: p.status, headers: baseHeaders() + [("Content-Type", "application/problem+json")], body: p.json())
    }

    private static func randomID() -> String {
        var rng = SystemRandomNumberGenerator()
        return Base64URL.encode((0..<12).map { _ in UInt8.random(in: 0...255, using: &rng) })
    }
}

extension CertificateSummary {
    /// A serial as lower-case hex, the form `revoked.txt` and `stoq trust show` use.
    static func hexSerial(_ s: Certificate.SerialNumber) -> String { s.bytes.map { String(format: "%02x", $0) }.joined() }
}
