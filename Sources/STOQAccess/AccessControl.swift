@preconcurrency import Crypto
import Foundation
import STOQCore
import Synchronization

/// What a worker enforces: the policy and the keys whose tokens it accepts.
public struct AccessSettings: Sendable {
    /// `[access] write` and `read`.
    public var policy: AccessPolicy
    /// The node's own token key's public half first, then `[access] token_keys`.
    public var keys: [P256.Signing.PublicKey]

    /// Creates settings.
    public init(policy: AccessPolicy, keys: [P256.Signing.PublicKey]) {
        self.policy = policy
        self.keys = keys
    }
}

/// The access settings in force, published by the node at start and at each reload, taken by
/// every worker between batches (one atomic load a turn when nothing changed).
public final class AccessControl: @unchecked Sendable {
    private let lock = NSLock()
    private let version = Atomic<Int>(1)
    private var current: AccessSettings

    /// Starts with `settings`.
    public init(_ settings: AccessSettings) { current = settings }

    /// Replaces the settings; workers take them at their next turn.
    public func publish(_ settings: AccessSettings) {
        lock.withLock {
            current = settings
            version.add(1, ordering: .releasing)
        }
    }

    /// The settings now (for a reader that is not a worker, e.g. the admin API).
    public var settings: AccessSettings { lock.withLock { current } }

    /// The settings if they changed since `seen` (which is updated).
    public func take(after seen: inout Int) -> AccessSettings? {
        guard version.load(ordering: .acquiring) != seen else { return nil }
        return lock.withLock {
            seen = version.load(ordering: .relaxed)
            return current
        }
    }
}

/// One worker's gate: turns a request's credentials into a principal (verifying bearer
/// tokens, remembering the good ones so a client's every request does not cost an ECDSA
/// verification) and asks the policy. Worker thread only.
public final class AccessGate {
    /// What this worker enforces now.
    public var settings: AccessSettings {
        didSet { verified.removeAll(keepingCapacity: true) }
    }
    /// Tokens that verified, with their claims (expiry is checked again on each use).
    private var verified: [String: AccessClaims] = [:]
    /// Bounds `verified`: a client sending endless distinct tokens costs verifications, not memory.
    static let cacheLimit = 256

    /// Creates a gate.
    public init(_ settings: AccessSettings) { self.settings = settings }

    /// The principal behind a request: its bearer token if it sent one (an invalid one is an
    /// error, never silently anonymous), else its client certificate (`encoded`, as the
    /// handshake left it; "" for none), else its address.
    public func principal(authorization: String, certificate: String, peer: IPv6Address, now: Int64) throws(AccessError) -> AccessPrincipal {
        if !authorization.isEmpty {
            guard let token = AccessToken.bearer(authorization) else {
                throw AccessError(.malformed, "the Authorization header is not \"Bearer <token>\"")
            }
            if let c = verified[token] {
                guard now < c.expires else {
                    verified[token] = nil
                    throw AccessError(.expired, "expired at \(AccessToken.iso(c.expires)) (now \(AccessToken.iso(now)))")
                }
                return .token(c)
            }
            let c = try AccessToken.verify(token, keys: settings.keys, now: now)
            if verified.count >= Self.cacheLimit { verified.removeAll(keepingCapacity: true) }
            verified[token] = c
            return .token(c)
        }
        if let c = CertificateIdentity(encoded: certificate) { return .certificate(c) }
        return .anonymous(peer)
    }
}
