import STOQCore
import STOQTrust

/// `[access] write`: who may write (PUT, DELETE, POST).
public enum WriteAccess: String, Sendable, CaseIterable {
    /// A writer credential: a token with role writer or admin scoped to the path and method,
    /// or a client certificate with role writer or admin. The default.
    case authorized
    /// Anyone who can reach the node (logged as a warning at start).
    case `public`
}

/// `[access] read`, per path prefix: who may read (GET, HEAD) under it.
public enum ReadAccess: String, Sendable, CaseIterable {
    /// Anyone. The default for `/`.
    case `public`
    /// A bearer token whose scope covers the path and allows GET.
    case token
    /// A client certificate that chains to the node's trust and carries a role.
    case certificate
}

/// The client certificate identity the TLS handshake accepted: its subject and the roles its
/// SAN URIs `urn:stoq:role:<role>` grant.
public struct CertificateIdentity: Sendable, Equatable {
    /// The subject (or, without one, the first SAN), as the node names the client.
    public var subject: String
    /// The roles the certificate carries (empty: it authenticates but grants nothing).
    public var roles: [AccessRole]
    /// A node's certified key id (`CertificateSummary.keyID`, hex): its mesh id, which unlike
    /// the subject no two nodes share and which stays across renewals; "" for a certificate
    /// that is not a node's (`NodeCertificate`), or when not known.
    public var key: String

    /// Creates an identity.
    public init(subject: String, roles: [AccessRole], key: String = "") {
        self.subject = subject
        self.roles = roles
        self.key = key
    }

    /// What every role's SAN URI starts with.
    public static let roleURIPrefix = NodeCertificate.roleURIPrefix

    /// The SAN URI that grants `role` (`stoq trust issue --role`).
    public static func uri(for role: AccessRole) -> String { roleURIPrefix + role.rawValue }

    /// The role a SAN URI grants, or nil for any other URI.
    public static func role(fromURI uri: String) -> AccessRole? {
        guard uri.hasPrefix(roleURIPrefix) else { return nil }
        return AccessRole(rawValue: String(uri.dropFirst(roleURIPrefix.count)))
    }

    /// The strongest role, nil when none.
    public var highestRole: AccessRole? { roles.max() }

    /// The form the TLS layer carries from the handshake to the connection
    /// (`QUICConnection.peerIdentity`): `roles|key|subject`, roles comma-separated.
    public var encoded: String { roles.map(\.rawValue).joined(separator: ",") + "|" + key + "|" + subject }

    /// Reads `encoded`; nil for "" (no certificate) or another form.
    public init?(encoded: String) {
        let parts = encoded.split(separator: "|", maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count == 3 else { return nil }
        let roles = parts[0].split(separator: ",").compactMap { AccessRole(rawValue: String($0)) }
        self.init(subject: String(parts[2]), roles: roles, key: String(parts[1]))
    }
}

/// Who sent a request, as far as the node could establish it.
public enum AccessPrincipal: Sendable, Equatable {
    /// A verified bearer token.
    case token(AccessClaims)
    /// A client certificate accepted in the handshake.
    case certificate(CertificateIdentity)
    /// Neither: known only by its address.
    case anonymous(IPv6Address)

    /// The key quotas and rate limits use (`HTTPRequest.identity`): `token:<subject>`,
    /// `cert:<subject>`, or `addr:<address masked to /64>/64`.
    public var identity: String {
        switch self {
        case .token(let c): "token:\(c.subject)"
        case .certificate(let c): "cert:\(c.subject)"
        case .anonymous(let a): "addr:\(a.slash64)/64"
        }
    }

    /// The role the credential carries (nil: anonymous).
    public var role: AccessRole? {
        switch self {
        case .token(let c): c.role
        case .certificate(let c): c.highestRole
        case .anonymous: nil
        }
    }

    var name: String {
        switch self {
        case .token(let c): "token for \(c.subject)"
        case .certificate(let c): "certificate \(c.subject)"
        case .anonymous: "anonymous client"
        }
    }
}

/// What the policy decided about one request.
public struct AccessDecision: Sendable, Equatable {
    /// 0: allowed; else 401 (no or invalid credential) or 403 (the credential is not enough).
    public var status: Int
    /// Why it was refused ("" when allowed): the response body and the log line.
    public var reason: String

    /// Allowed.
    public static let allow = AccessDecision(status: 0, reason: "")
    /// Refused: 401, a credential is needed.
    public static func unauthenticated(_ reason: String) -> AccessDecision { AccessDecision(status: 401, reason: reason) }
    /// Refused: 403, the credential does not reach this far.
    public static func forbidden(_ reason: String) -> AccessDecision { AccessDecision(status: 403, reason: reason) }
    /// Whether the request may proceed.
    public var allowed: Bool { status == 0 }
}

/// Who may write and read what on a node (`[access]`): the one decision the router asks before
/// any service sees a request. Pure: principal in, decision out.
public struct AccessPolicy: Sendable, Equatable {
    /// `[access] write`.
    public var write: WriteAccess
    /// `[access] read` as (prefix, rule), longest prefix first; `/` is public unless named.
    public private(set) var read: [(prefix: String, rule: ReadAccess)]

    /// Creates a policy; `read` maps path prefixes to rules.
    public init(write: WriteAccess = .authorized, read: [String: ReadAccess] = [:]) {
        self.write = write
        var rules = read
        if rules["/"] == nil { rules["/"] = .public }
        self.read = rules.map { ($0.key, $0.value) }.sorted { ($0.prefix.count, $0.prefix) > ($1.prefix.count, $1.prefix) }
    }

    public static func == (a: AccessPolicy, b: AccessPolicy) -> Bool {
        a.write == b.write && a.read.map(\.prefix) == b.read.map(\.prefix) && a.read.map(\.rule) == b.read.map(\.rule)
    }

    /// Writes are everything but GET and HEAD: PUT (objects, chunks, manifests), DELETE, POST
    /// (`/_stoq/missing`).
    public static func isWrite(_ method: String) -> Bool { method != "GET" && method != "HEAD" }

    /// Requests every node accepts without a credential: mesh adverts carry the origin node's
    /// signature (SignedAdvert), which the mesh checks itself.
    public static func selfAuthenticating(method: String, path: String) -> Bool {
        method == "PUT" && path == NodePaths.meshAdvert
    }

    /// The path a request's scope and read rule are judged on: a manifest or a relayed
    /// manifest is its object (`/manifests/a/x` → `/objects/a/x`), so a prefix rule or token
    /// for `/objects/a/` covers the chunked form too. Chunks are content-addressed and stay
    /// `/chunks/<id>`: a chunk names no object, and its id is the hash of its bytes.
    public static func scopePath(_ path: String) -> String {
        var p = Substring(path)
        if p.hasPrefix(NodePaths.relayPrefix) {
            // /_stoq/relay/<holder>/<hops>/<resource>
            let rest = p.dropFirst(NodePaths.relayPrefix.count).split(separator: "/", maxSplits: 2, omittingEmptySubsequences: false)
            if rest.count == 3 { p = "/" + rest[2] }
        }
        if p.hasPrefix("/manifests/") { return "/objects/" + p.dropFirst("/manifests/".count) }
        return String(p)
    }

    /// The read rule for `path`: the longest matching prefix's.
    public func readRule(for path: String) -> ReadAccess {
        let p = Self.scopePath(path)
        return read.first { p.hasPrefix($0.prefix) }?.rule ?? .public
    }

    /// Whether `principal` may send `method` to `path`.
    public func decide(method: String, path: String, principal: AccessPrincipal) -> AccessDecision {
        if Self.isWrite(method) {
            if Self.selfAuthenticating(method: method, path: path) || write == .public { return .allow }
            return decideWrite(method: method, path: path, principal: principal)
        }
        return decideRead(method: method, path: path, principal: principal)
    }

    private func decideWrite(method: String, path: String, principal: AccessPrincipal) -> AccessDecision {
        let target = Self.scopePath(path)
        switch principal {
        case .anonymous:
            return .unauthenticated("\(method) \(path) needs a credential: a bearer token or a client certificate with the writer role")
        case .certificate(let c):
            guard let role = c.highestRole, role >= .writer else {
                let has = c.roles.isEmpty ? "no role" : "role " + c.roles.map(\.rawValue).joined(separator: ",")
                return .forbidden("certificate \(c.subject) has \(has), which may not write \(path)")
            }
            return .allow
        case .token(let c):
            guard c.role >= .writer else { return .forbidden("token for \(c.subject) has role \(c.role.rawValue), which may not write \(path)") }
            if c.role == .admin { return .allow }
            // The missing-chunks query is the first step of a chunked PUT: it needs PUT.
            let needed = target == NodePaths.missing ? "PUT" : method
            guard c.scope.allows(method: needed) else {
                return .forbidden("token for \(c.subject) may not \(needed) (it allows \(c.scope.methods.joined(separator: ",")))")
            }
            // Content-addressed uploads (chunks, the missing-chunks query) name no object: a
            // writer may send them; the manifest that makes an object of them is scope-checked.
            if target.hasPrefix("/chunks/") || target == NodePaths.missing { return .allow }
            guard c.scope.covers(path: target) else {
                return .forbidden("token for \(c.scope.prefixes.joined(separator: ",")) may not write \(path)")
            }
            return .allow
        }
    }

    private func decideRead(method: String, path: String, principal: AccessPrincipal) -> AccessDecision {
        let rule = readRule(for: path)
        if rule == .public || principal.role == .admin { return .allow }
        switch (rule, principal) {
        case (.token, .token(let c)):
            guard c.scope.allows(method: method) else {
                return .forbidden("token for \(c.subject) may not \(method) (it allows \(c.scope.methods.joined(separator: ",")))")
            }
            guard c.scope.covers(path: Self.scopePath(path)) else {
                return .forbidden("token for \(c.scope.prefixes.joined(separator: ",")) may not read \(path)")
            }
            return .allow
        case (.certificate, .certificate(let c)):
            guard !c.roles.isEmpty else { return .forbidden("certificate \(c.subject) has no role, which may not read \(path)") }
            return .allow
        case (_, .anonymous):
            return .unauthenticated("\(path) is readable with a \(rule == .token ? "bearer token" : "client certificate") only")
        default:
            return .forbidden("\(principal.name) may not read \(path): it is readable with a \(rule == .token ? "bearer token" : "client certificate") only")
        }
    }
}
