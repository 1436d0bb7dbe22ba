import AsyncHTTPClient
@preconcurrency import Crypto
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOSSL
import STOQCore
import STOQTrust
import SwiftASN1
import X509

/// Why an ACME client operation failed.
public struct ACMEClientError: Error, Sendable, CustomStringConvertible {
    /// The kind of failure.
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        /// The stable name (what logs and JSON print).
        public let rawValue: String
        /// Wraps a name; STOQ's own codes are the static members.
        public init(rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }
        /// The server answered with a problem document (see `problem`).
        public static let problem = Code(rawValue: "problem")
        /// The connection failed (after retries).
        public static let transport = Code(rawValue: "transport")
        /// The server answered something ACME does not allow (missing header, bad JSON, …).
        public static let protocolViolation = Code(rawValue: "protocolViolation")
        /// An order or authorization did not reach a final state in time.
        public static let timeout = Code(rawValue: "timeout")
        /// An order or authorization became invalid.
        public static let invalid = Code(rawValue: "invalid")
        /// A local input (CA file, identifier, EAB key) is unusable.
        public static let invalidInput = Code(rawValue: "invalidInput")
    }
    /// The kind of failure.
    public var code: Code
    /// What exactly went wrong.
    public var message: String
    /// The server's problem document, for `.problem`.
    public var problem: ACMEProblem?

    /// Creates an error.
    public init(_ code: Code, _ message: String, problem: ACMEProblem? = nil) {
        self.code = code
        self.message = message
        self.problem = problem
    }

    public var description: String { message }
}

/// An external account binding credential as an operator hands it out (`stoq trust add-node`).
public struct ExternalAccountBinding: Sendable {
    /// The key identifier.
    public var kid: String
    /// The HMAC key, base64url (as printed by `add-node` and as pebble's config holds it).
    public var hmacKeyBase64URL: String

    /// Creates a binding credential.
    public init(kid: String, hmacKeyBase64URL: String) {
        self.kid = kid
        self.hmacKeyBase64URL = hmacKeyBase64URL
    }
}

/// A certificate obtained through ACME.
public struct ACMEIssuedCertificate: Sendable {
    /// The chain as served (leaf first), PEM.
    public var chainPEM: String
    /// The parsed chain.
    public var chain: [Certificate]
    /// The certificate's private key (P-256), PEM. Secret: write it 0600, never log it.
    public var privateKeyPEM: String
    /// The order's URL.
    public var orderURL: String
}

/// An ACME (RFC 8555) client: account (with external account binding), order, authorizations
/// (answering a pending challenge for servers that need it), finalize with a CSR, poll, download,
/// revoke. HTTPS through async-http-client, trusting only the roots it is given when given any.
///
/// Requests that fail with `badNonce`, a 5xx status or a connection error are retried with
/// exponential backoff and jitter, at most `Options.maxAttempts` times. Logs name URLs, statuses
/// and problem types; never keys, MACs or JWS bodies.
public actor ACMEClient {
    /// Retry and polling settings with their defaults.
    public struct Options: Sendable {
        /// Tries per request, the first included.
        public var maxAttempts = 6
        /// The first backoff delay; doubled per retry up to `maxDelay`, then scaled by a random
        /// factor in 0.5…1 so many clients that failed together do not retry together.
        public var baseDelay: TimeInterval = 0.2
        /// The longest backoff delay.
        public var maxDelay: TimeInterval = 5
        /// Delay between polls of an order or authorization when the server sends no Retry-After.
        public var pollInterval: TimeInterval = 0.5
        /// How long to poll before giving up.
        public var pollTimeout: TimeInterval = 60
        /// Timeout of one HTTP request.
        public var requestTimeout: TimeInterval = 30
        /// Creates the defaults.
        public init() {}
    }

    /// The directory URL.
    public let directoryURL: String
    /// The settings.
    public let options: Options
    /// The account key (P-256); generated unless given.
    public let accountKey: P256.Signing.PrivateKey
    /// The account URL once registered.
    public private(set) var accountURL: String?
    /// How many requests were retried because of `badNonce` (pebble rejects some on purpose).
    public private(set) var badNonceRetries = 0
    /// How many requests were retried because of a 5xx or a connection error.
    public private(set) var transientRetries = 0

    private let http: HTTPClient
    private let logger: Logger
    private var directoryCache: ACMEDirectory?
    private var nonce: String?

    /// A client for the server whose directory is at `directoryURL`. With `trustRootsPEM`,
    /// only those certificates are trusted for the server's TLS certificate; without, the system's.
    public init(
        directoryURL: String, trustRootsPEM: String? = nil, accountKey: P256.Signing.PrivateKey = .init(),
        options: Options = Options(), logger: Logger = Logger(label: "stoq.acme.client")
    ) throws {
        var tls = TLSConfiguration.makeClientConfiguration()
        if let pem = trustRootsPEM {
            do { tls.trustRoots = .certificates(try NIOSSLCertificate.fromPEMBytes(Array(pem.utf8))) } catch {
                throw ACMEClientError(.invalidInput, "CA file: not PEM certificates (\(error))")
            }
        }
        var config = HTTPClient.Configuration(tlsConfiguration: tls)
        config.redirectConfiguration = .disallow
        // Retries are ours (bounded, with backoff, and never for an untrusted certificate);
        // the pool's own would silently retry a refused connection until the request deadline.
        config.connectionPool.retryConnectionEstablishment = false
        config.timeout.connect = .seconds(10)
        http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: config)
        self.directoryURL = directoryURL
        self.accountKey = accountKey
        self.options = options
        self.logger = logger
    }

    /// Closes the client's connections. Call once when done.
    public func shutdown() async {
        try? await http.shutdown()
    }

    // MARK: HTTP

    /// A response as the client keeps it.
    public struct Response: Sendable {
        /// HTTP status.
        public var status: Int
        /// Header fields.
        public var headers: HTTPHeaders
        /// The body.
        public var body: Data
        /// The problem document, when the body is one.
        public var problem: ACMEProblem? {
            guard status >= 400 else { return nil }
            return ACMEProblem(json: body, status: status)
                ?? ACMEProblem(.serverInternal, "HTTP \(status) without a problem document", status: status)
        }
    }

    private func send(_ method: HTTPMethod, _ url: String, body: Data? = nil) async throws -> Response {
        var req = HTTPClientRequest(url: url)
        req.method = method
        req.headers.add(name: "User-Agent", value: "stoq-acme/1")
        if let body {
            req.headers.add(name: "Content-Type", value: "application/jose+json")
            req.body = .bytes(ByteBuffer(bytes: body))
        }
        let r = try await http.execute(req, timeout: .milliseconds(Int64(options.requestTimeout * 1000)))
        let bytes = try await r.body.collect(upTo: 4 << 20)
        if let n = r.headers.first(name: "Replay-Nonce"), !n.isEmpty { nonce = n }
        logger.debug("acme request", metadata: ["method": "\(method.rawValue)", "url": "\(url)", "status": "\(r.status.code)"])
        return Response(status: Int(r.status.code), headers: r.headers, body: Data(bytes.readableBytesView))
    }

    /// Connection errors are worth retrying; a TLS certificate the client does not trust is not
    /// (it will not change in a second, and retrying only delays the real message).
    private static func retryable(_ error: Error) -> Bool {
        if let e = error as? NIOSSLError, case .handshakeFailed = e { return false }
        if error is NIOSSLExtraError { return false }
        return true
    }

    /// A transport error in words an operator can act on.
    private static func explain(_ error: Error) -> String {
        if let e = error as? NIOSSLError, case .handshakeFailed = e {
            return "TLS handshake failed: the server's certificate does not verify against the trusted roots (--ca-file) (\(e))"
        }
        return "\(error)"
    }

    private func backoff(_ attempt: Int) async {
        let d = min(options.maxDelay, options.baseDelay * pow(2, Double(attempt))) * Double.random(in: 0.5...1)
        try? await Task.sleep(nanoseconds: UInt64(d * 1e9))
    }

    /// GET with retries on 5xx and connection errors.
    private func get(_ url: String) async throws -> Response {
        var attempt = 0
        while true {
            do {
                let r = try await send(.GET, url)
                if r.status >= 500 && attempt + 1 < options.maxAttempts {
                    transientRetries += 1
                    await backoff(attempt); attempt += 1; continue
                }
                if let p = r.problem { throw ACMEClientError(.problem, "GET \(url): \(p)", problem: p) }
                return r
            } catch let e as ACMEClientError {
                throw e
            } catch {
                guard attempt + 1 < options.maxAttempts, Self.retryable(error) else {
                    throw ACMEClientError(.transport, "GET \(url): \(Self.explain(error)) (after \(attempt + 1) tries)")
                }
                transientRetries += 1
                await backoff(attempt); attempt += 1
            }
        }
    }

    /// The server's directory (fetched once).
    public func directory() async throws -> ACMEDirectory {
        if let d = directoryCache { return d }
        let r = try await get(directoryURL)
        do {
            let d = try JSONDecoder().decode(ACMEDirectory.self, from: r.body)
            directoryCache = d
            return d
        } catch {
            throw ACMEClientError(.protocolViolation, "\(directoryURL): not an ACME directory (\(error))")
        }
    }

    /// A fresh nonce from newNonce (HEAD).
    public func freshNonce() async throws -> String {
        let d = try await directory()
        var attempt = 0
        while true {
            do {
                let r = try await send(.HEAD, d.newNonce)
                if let n = r.headers.first(name: "Replay-Nonce"), !n.isEmpty, r.status < 300 { return n }
                guard r.status >= 500, attempt + 1 < options.maxAttempts else {
                    throw ACMEClientError(.protocolViolation, "HEAD \(d.newNonce): HTTP \(r.status) without Replay-Nonce")
                }
            } catch let e as ACMEClientError {
                throw e
            } catch {
                guard attempt + 1 < options.maxAttempts, Self.retryable(error) else {
                    throw ACMEClientError(.transport, "HEAD \(d.newNonce): \(Self.explain(error)) (after \(attempt + 1) tries)")
                }
            }
            transientRetries += 1
            await backoff(attempt); attempt += 1
        }
    }

    /// POSTs a JWS signed by the account (`kid`) or, with `useJWK`, by the bare key. `payload`
    /// nil is POST-as-GET. Retries on badNonce (with the nonce the error carried), 5xx and
    /// connection errors; throws the server's problem otherwise.
    public func post(_ url: String, payload: Data?, useJWK: Bool = false) async throws -> Response {
        var attempt = 0
        while true {
            let n: String
            if let cached = nonce { n = cached; nonce = nil } else { n = try await freshNonce() }
            var header: [String: Any] = ["nonce": n, "url": url]
            if useJWK {
                header["jwk"] = JWK.p256(accountKey.publicKey).members
            } else {
                guard let kid = accountURL else { throw ACMEClientError(.invalidInput, "POST \(url): no account yet; register first") }
                header["kid"] = kid
            }
            let jws = try JWS.sign(header: header, payload: payload ?? Data(), with: .p256(accountKey))
            let r: Response
            do { r = try await send(.POST, url, body: jws.serialized()) } catch {
                guard attempt + 1 < options.maxAttempts, Self.retryable(error) else {
                    throw ACMEClientError(.transport, "POST \(url): \(Self.explain(error)) (after \(attempt + 1) tries)")
                }
                transientRetries += 1
                nonce = nil
                await backoff(attempt); attempt += 1
                continue
            }
            guard let p = r.problem else { return r }
            if attempt + 1 < options.maxAttempts {
                if p.code == .badNonce {
                    // The fresh nonce came with the error (send() kept it); no need to wait.
                    badNonceRetries += 1
                    logger.info("acme badNonce, retrying", metadata: ["url": "\(url)"])
                    attempt += 1
                    continue
                }
                if r.status >= 500 {
                    transientRetries += 1
                    await backoff(attempt); attempt += 1
                    continue
                }
            }
            throw ACMEClientError(.problem, "POST \(url): \(p)", problem: p)
        }
    }

    // MARK: protocol steps

    /// Registers (or finds) the account for `accountKey`, binding it to an external account
    /// key when given. Returns the account URL.
    @discardableResult
    public func register(eab: ExternalAccountBinding? = nil, contact: [String] = []) async throws -> String {
        let d = try await directory()
        var payload: [String: Any] = ["termsOfServiceAgreed": true]
        if !contact.isEmpty { payload["contact"] = contact }
        if let eab {
            guard let mac = Base64URL.decode(eab.hmacKeyBase64URL), !mac.isEmpty else {
                throw ACMEClientError(.invalidInput, "EAB HMAC key is not base64url")
            }
            let jwkJSON = try JSONSerialization.data(withJSONObject: JWK.p256(accountKey.publicKey).members, options: [.sortedKeys])
            let inner = try JWS.sign(
                header: ["kid": eab.kid, "url": d.newAccount], payload: jwkJSON,
                with: .hmac(SymmetricKey(data: mac)))
            payload["externalAccountBinding"] = inner.jsonObject
        }
        let r = try await post(d.newAccount, payload: try JSONSerialization.data(withJSONObject: payload), useJWK: true)
        guard let loc = r.headers.first(name: "Location") else {
            throw ACMEClientError(.protocolViolation, "newAccount: HTTP \(r.status) without a Location header")
        }
        accountURL = loc
        logger.info("acme account", metadata: ["account": "\(loc)", "new": "\(r.status == 201)"])
        return loc
    }

    /// Creates an order for `identifiers`. Returns its URL and state.
    public func newOrder(_ identifiers: [ACMEIdentifier]) async throws -> (url: String, order: ACMEOrder) {
        let d = try await directory()
        let body = try JSONEncoder().encode(["identifiers": identifiers])
        let r = try await post(d.newOrder, payload: body)
        guard let loc = r.headers.first(name: "Location") else {
            throw ACMEClientError(.protocolViolation, "newOrder: HTTP \(r.status) without a Location header")
        }
        return (loc, try decode(ACMEOrder.self, r, what: "order"))
    }

    /// Fetches an order (POST-as-GET).
    public func order(_ url: String) async throws -> ACMEOrder {
        try decode(ACMEOrder.self, try await post(url, payload: nil), what: "order")
    }

    /// Brings every authorization of `order` to valid: already-valid ones are left alone; for a
    /// pending one the client POSTs `{}` to a challenge (http-01 preferred) and polls. The client
    /// does not serve challenge responses itself: this is for servers that authorize by other
    /// means (STOQ's EAB) or test servers that validate anything (pebble's PEBBLE_VA_ALWAYS_VALID).
    public func completeAuthorizations(_ order: ACMEOrder) async throws {
        for url in order.authorizations {
            var authz = try decode(ACMEAuthorization.self, try await post(url, payload: nil), what: "authorization")
            if authz.status == "valid" { continue }
            guard authz.status == "pending" else {
                throw ACMEClientError(.invalid, "authorization for \(authz.identifier) is \(authz.status)")
            }
            let pick = authz.challenges.first { $0.type == "http-01" } ?? authz.challenges.first
            guard let challenge = pick else {
                throw ACMEClientError(.protocolViolation, "authorization for \(authz.identifier) is pending with no challenge")
            }
            _ = try await post(challenge.url, payload: Data("{}".utf8))
            let deadline = Date().addingTimeInterval(options.pollTimeout)
            while authz.status == "pending" || authz.status == "processing" {
                guard Date() < deadline else {
                    throw ACMEClientError(.timeout, "authorization for \(authz.identifier) still \(authz.status) after \(Int(options.pollTimeout))s")
                }
                try await Task.sleep(nanoseconds: UInt64(options.pollInterval * 1e9))
                authz = try decode(ACMEAuthorization.self, try await post(url, payload: nil), what: "authorization")
            }
            guard authz.status == "valid" else {
                throw ACMEClientError(.invalid, "authorization for \(authz.identifier) became \(authz.status)")
            }
        }
    }

    /// Sends the CSR and polls the order until it is valid; returns the final order.
    public func finalize(orderURL: String, order: ACMEOrder, csrDER: [UInt8]) async throws -> ACMEOrder {
        let body = try JSONSerialization.data(withJSONObject: ["csr": Base64URL.encode(csrDER)])
        var o: ACMEOrder
        do {
            o = try decode(ACMEOrder.self, try await post(order.finalize, payload: body), what: "order")
        } catch let e as ACMEClientError where e.problem?.code == .orderNotReady {
            // A finalize sent again after its answer was lost finds the order past ready (the
            // first one went through): follow the order rather than throw its certificate away.
            o = try await self.order(orderURL)
            guard o.status == "processing" || o.status == "valid" else { throw e }
        }
        let deadline = Date().addingTimeInterval(options.pollTimeout)
        while o.status == "processing" || o.status == "ready" || o.status == "pending" {
            guard Date() < deadline else {
                throw ACMEClientError(.timeout, "order \(orderURL) still \(o.status) after \(Int(options.pollTimeout))s")
            }
            try await Task.sleep(nanoseconds: UInt64(options.pollInterval * 1e9))
            o = try await self.order(orderURL)
        }
        guard o.status == "valid" else {
            throw ACMEClientError(.invalid, "order \(orderURL) became \(o.status)\(o.error.map { ": \($0.type) \($0.detail ?? "")" } ?? "")")
        }
        return o
    }

    /// Downloads the certificate chain (PEM, leaf first).
    public func downloadCertificate(_ url: String) async throws -> String {
        let r = try await post(url, payload: nil)
        let text = String(decoding: r.body, as: UTF8.self)
        guard text.contains("-----BEGIN CERTIFICATE-----") else {
            throw ACMEClientError(.protocolViolation, "\(url): not a PEM certificate chain")
        }
        return text
    }

    /// Revokes `certificate`, signed by the account. `reason` is an RFC 5280 reason code.
    public func revoke(_ certificate: Certificate, reason: Int? = nil) async throws {
        let d = try await directory()
        var payload: [String: Any] = ["certificate": Base64URL.encode(try DERBytes.of(certificate))]
        if let reason { payload["reason"] = reason }
        _ = try await post(d.revokeCert, payload: try JSONSerialization.data(withJSONObject: payload))
    }

    /// The whole flow: account (with `eab`), order, authorizations, a fresh P-256 key and its
    /// CSR, finalize, poll, download.
    public func obtainCertificate(
        for identifiers: [ACMEIdentifier], eab: ExternalAccountBinding? = nil,
        contact: [String] = [], key certificateKey: P256.Signing.PrivateKey? = nil
    ) async throws -> ACMEIssuedCertificate {
        if accountURL == nil { try await register(eab: eab, contact: contact) }
        let (orderURL, order) = try await newOrder(identifiers)
        try await completeAuthorizations(order)
        // The certificate's key: a new one, or the caller's (a mesh node keeps its id's key).
        let key = certificateKey ?? P256.Signing.PrivateKey()
        let csr = try Self.makeCSR(identifiers: identifiers, key: key)
        let done = try await finalize(orderURL: orderURL, order: order, csrDER: csr)
        guard let certURL = done.certificate else {
            throw ACMEClientError(.protocolViolation, "order \(orderURL) is valid without a certificate URL")
        }
        let pem = try await downloadCertificate(certURL)
        let chain: [Certificate]
        do { chain = try PEMDocument.parseMultiple(pemString: pem).map { try Certificate(pemDocument: $0) } } catch {
            throw ACMEClientError(.protocolViolation, "\(certURL): chain does not parse (\(error))")
        }
        guard let leaf = chain.first, leaf.publicKey == Certificate.PublicKey(key.publicKey) else {
            throw ACMEClientError(.protocolViolation, "\(certURL): the leaf certificate is not for the key in our CSR")
        }
        logger.info(
            "acme certificate obtained",
            metadata: [
                "serial": "\(CertificateSummary(leaf).serial)", "identifiers": "\(identifiers.map(\.description).joined(separator: ","))",
            ])
        return ACMEIssuedCertificate(chainPEM: pem, chain: chain, privateKeyPEM: key.pemRepresentation + "\n", orderURL: orderURL)
    }

    /// A PKCS#10 request (DER) for `identifiers`, signed with `key`: DNS and IPv6 SANs, and the
    /// first DNS name as common name (none when there are only addresses).
    public static func makeCSR(identifiers: [ACMEIdentifier], key: P256.Signing.PrivateKey) throws -> [UInt8] {
        var sans: [GeneralName] = []
        for id in identifiers {
            switch id.type {
            case "dns": sans.append(.dnsName(id.value))
            case "ip":
                guard let a = IPv6Address(id.value) else {
                    throw ACMEClientError(.invalidInput, "\(id.value) is not an IPv6 address (STOQ is IPv6 only)")
                }
                sans.append(.ipAddress(ASN1OctetString(contentBytes: ArraySlice(withUnsafeBytes(of: a.bytes) { Array($0) }))))
            default: throw ACMEClientError(.invalidInput, "identifier type \(id.type) is not supported (dns, ip)")
            }
        }
        let firstDNS = identifiers.first { $0.type == "dns" }?.value
        let subject = try DistinguishedName { if let firstDNS { CommonName(firstDNS) } }
        let ext = try Certificate.Extensions { SubjectAlternativeNames(sans) }
        let attrs = CertificateSigningRequest.Attributes([try .init(ExtensionRequest(extensions: ext))])
        let csr = try CertificateSigningRequest(
            version: .v1, subject: subject, privateKey: Certificate.PrivateKey(key),
            attributes: attrs, signatureAlgorithm: .ecdsaWithSHA256)
        return try DERBytes.of(csr)
    }

    private func decode<T: Decodable>(_ type: T.Type, _ r: Response, what: String) throws -> T {
        do { return try JSONDecoder().decode(T.self, from: r.body) } catch {
            throw ACMEClientError(.protocolViolation, "\(what): response does not parse (\(error))")
        }
    }
}
