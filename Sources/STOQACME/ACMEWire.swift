import Foundation
import SwiftASN1

// The ACME (RFC 8555) resources as they travel in JSON, shared by server and client.

/// An ACME problem document (RFC 7807 + RFC 8555 §6.7): what the server answers when it refuses
/// a request, and what the client throws when it receives one.
public struct ACMEProblem: Error, Sendable, Equatable, CustomStringConvertible {
    /// The ACME error type (the URN's last part). A struct-nested code so types can be added.
    public struct Code: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
        /// The last part of `urn:ietf:params:acme:error:…`.
        public var rawValue: String
        /// Wraps a type name.
        public init(rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }

        /// The request is malformed.
        public static let malformed = Code(rawValue: "malformed")
        /// The nonce is missing, unknown or already used; retry with the fresh one sent along.
        public static let badNonce = Code(rawValue: "badNonce")
        /// The client lacks authorization for the action.
        public static let unauthorized = Code(rawValue: "unauthorized")
        /// No account exists for the key (or `kid`).
        public static let accountDoesNotExist = Code(rawValue: "accountDoesNotExist")
        /// The server will not issue for this identifier.
        public static let rejectedIdentifier = Code(rawValue: "rejectedIdentifier")
        /// The identifier's type is not supported.
        public static let unsupportedIdentifier = Code(rawValue: "unsupportedIdentifier")
        /// The CSR is unacceptable.
        public static let badCSR = Code(rawValue: "badCSR")
        /// The JWS algorithm is not supported.
        public static let badSignatureAlgorithm = Code(rawValue: "badSignatureAlgorithm")
        /// The account key is not acceptable.
        public static let badPublicKey = Code(rawValue: "badPublicKey")
        /// This server requires external account binding.
        public static let externalAccountRequired = Code(rawValue: "externalAccountRequired")
        /// Finalize before the order is ready.
        public static let orderNotReady = Code(rawValue: "orderNotReady")
        /// The certificate is already revoked.
        public static let alreadyRevoked = Code(rawValue: "alreadyRevoked")
        /// The revocation reason is not allowed.
        public static let badRevocationReason = Code(rawValue: "badRevocationReason")
        /// The server failed.
        public static let serverInternal = Code(rawValue: "serverInternal")
    }

    /// The URN prefix of every ACME error type.
    public static let urnPrefix = "urn:ietf:params:acme:error:"

    /// The error type.
    public var code: Code
    /// A sentence naming what was wrong.
    public var detail: String
    /// The HTTP status the server answered with (or will answer with).
    public var status: Int

    /// Creates a problem; the HTTP status defaults to the one RFC 8555 implies for `code`.
    public init(_ code: Code, _ detail: String, status: Int? = nil) {
        self.code = code
        self.detail = detail
        self.status = status ?? Self.defaultStatus(code)
    }

    /// The full `type` URN.
    public var type: String { Self.urnPrefix + code.rawValue }

    public var description: String { "\(type): \(detail) (HTTP \(status))" }

    static func defaultStatus(_ code: Code) -> Int {
        switch code {
        case .unauthorized: 403
        case .accountDoesNotExist: 400
        case .orderNotReady: 403
        case .serverInternal: 500
        default: 400
        }
    }

    /// The JSON body (`application/problem+json`).
    public func json() -> Data {
        try! JSONSerialization.data(
            withJSONObject: ["type": type, "detail": detail, "status": status] as [String: Any],
            options: [.sortedKeys, .withoutEscapingSlashes])
    }

    /// Reads a problem document; nil when `body` is not one.
    public init?(json body: Data, status: Int) {
        guard let o = try? JSONSerialization.jsonObject(with: body) as? [String: Any],
            let type = o["type"] as? String
        else { return nil }
        let name = type.hasPrefix(Self.urnPrefix) ? String(type.dropFirst(Self.urnPrefix.count)) : type
        self.init(Code(rawValue: name), o["detail"] as? String ?? "", status: status)
    }
}

/// An identifier a certificate names: `dns` (RFC 8555) or `ip` (RFC 8738; IPv6 only in STOQ).
public struct ACMEIdentifier: Codable, Sendable, Hashable, CustomStringConvertible {
    /// `dns` or `ip`.
    public var type: String
    /// The name or the address.
    public var value: String

    /// Creates an identifier.
    public init(type: String, value: String) {
        self.type = type
        self.value = value
    }

    /// A DNS identifier.
    public static func dns(_ name: String) -> ACMEIdentifier { ACMEIdentifier(type: "dns", value: name) }
    /// An IP identifier.
    public static func ip(_ address: String) -> ACMEIdentifier { ACMEIdentifier(type: "ip", value: address) }

    public var description: String { "\(type):\(value)" }
}

/// The directory: the one URL a client is configured with leads to all the others.
public struct ACMEDirectory: Codable, Sendable {
    /// Where to get a nonce.
    public var newNonce: String
    /// Where to create an account.
    public var newAccount: String
    /// Where to create an order.
    public var newOrder: String
    /// Where to revoke a certificate.
    public var revokeCert: String
    /// Where to roll over the account key (not offered by STOQ; optional).
    public var keyChange: String?
    /// Terms of service, EAB requirement.
    public var meta: Meta?

    /// Directory metadata.
    public struct Meta: Codable, Sendable {
        /// Terms of service URL.
        public var termsOfService: String?
        /// Whether newAccount must carry an external account binding.
        public var externalAccountRequired: Bool?
    }
}

/// An order (RFC 8555 §7.1.3).
public struct ACMEOrder: Codable, Sendable {
    /// pending, ready, processing, valid or invalid.
    public var status: String
    /// When the order expires (RFC 3339).
    public var expires: String?
    /// The identifiers the certificate will carry.
    public var identifiers: [ACMEIdentifier]
    /// One authorization URL per identifier.
    public var authorizations: [String]
    /// Where to send the CSR.
    public var finalize: String
    /// Where to download the certificate once valid.
    public var certificate: String?
    /// Why the order failed, when invalid.
    public var error: ProblemBody?
}

/// A problem embedded in a resource.
public struct ProblemBody: Codable, Sendable {
    /// The error type URN.
    public var type: String
    /// What was wrong.
    public var detail: String?
}

/// An authorization (RFC 8555 §7.1.4).
public struct ACMEAuthorization: Codable, Sendable {
    /// The identifier authorized.
    public var identifier: ACMEIdentifier
    /// pending, valid, invalid, deactivated, expired or revoked.
    public var status: String
    /// When it expires (RFC 3339).
    public var expires: String?
    /// The ways to prove control (empty when already valid by external account binding).
    public var challenges: [ACMEChallenge]
}

/// A challenge (RFC 8555 §8).
public struct ACMEChallenge: Codable, Sendable {
    /// http-01, dns-01, tls-alpn-01, …
    public var type: String
    /// Where to POST to start validation.
    public var url: String
    /// pending, processing, valid or invalid.
    public var status: String
    /// The token, for types that have one.
    public var token: String?
}

enum RFC3339 {
    static func string(_ date: Date) -> String {
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime]
        return f.string(from: date)
    }
}

enum DERBytes {
    /// The DER encoding of `value` (swift-asn1's one-shot helper is internal to it).
    static func of(_ value: some DERSerializable) throws -> [UInt8] {
        var s = DER.Serializer()
        try s.serialize(value)
        return s.serializedBytes
    }
}
