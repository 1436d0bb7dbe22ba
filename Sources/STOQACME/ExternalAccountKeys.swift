@preconcurrency import Crypto
import Foundation
import STOQCore
import STOQTrust
#if canImport(Glibc)
import Glibc
#endif

/// An external account binding key (RFC 8555 §7.3.4): the credential an operator hands a node
/// so its ACME account may obtain certificates for exactly the identifiers listed here.
public struct ExternalAccountKey: Codable, Sendable, Equatable {
    /// The key identifier the client sends as the inner JWS's `kid`.
    public var kid: String
    /// The node's name, for the operator.
    public var name: String
    /// The HMAC-SHA256 key, base64url. Secret: stored mode 0600, never logged.
    public var hmacKey: String
    /// DNS names the key authorizes (lower case, no trailing dot).
    public var dnsNames: [String]
    /// IPv6 addresses the key authorizes (canonical text).
    public var ipAddresses: [String]

    /// The identifiers this key authorizes, in ACME form.
    public var identifiers: Set<ACMEIdentifier> {
        Set(dnsNames.map(ACMEIdentifier.dns) + ipAddresses.map(ACMEIdentifier.ip))
    }

    /// The MAC key.
    public var symmetricKey: SymmetricKey? { Base64URL.decode(hmacKey).map { SymmetricKey(data: $0) } }
}

/// Why an external account key could not be created or read.
public struct ExternalAccountKeyError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The kind of failure.
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        /// The stable name (what logs and JSON print).
        public let rawValue: String
        /// Wraps a name; STOQ's own codes are the static members.
        public init(rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }
        /// The node name is not 1–63 letters, digits or hyphens.
        public static let invalidName = Code(rawValue: "invalidName")
        /// An identifier is not a valid DNS name or IPv6 address (IPv4 is refused).
        public static let invalidIdentifier = Code(rawValue: "invalidIdentifier")
        /// Neither a DNS name nor an address was given.
        public static let noIdentifiers = Code(rawValue: "noIdentifiers")
        /// A key for this node name already exists.
        public static let alreadyExists = Code(rawValue: "alreadyExists")
        /// A key file is unreadable or damaged.
        public static let invalidFile = Code(rawValue: "invalidFile")
        /// Reading or writing failed.
        public static let io = Code(rawValue: "io")
    }
    /// The kind of failure.
    public var code: Code
    /// What exactly was wrong.
    public var message: String
    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }
    public var description: String { message }
}

/// The EAB keys of a certificate authority: one JSON file per key under `<ca>/acme-eab/`
/// (directory 0700, files 0600), so adding a node never rewrites another node's key.
public struct ExternalAccountKeyStore: Sendable {
    /// The directory holding the key files.
    public let directory: String

    /// The store belonging to the authority in `caDirectory`.
    public init(caDirectory: String) { directory = caDirectory + "/acme-eab" }

    /// Creates a key for node `name` authorizing `dnsNames` and `ipAddresses`: a random kid
    /// and 32 random HMAC bytes. Refuses a second key for the same name (revoke by deleting
    /// the file; then add again).
    public func add(name: String, dnsNames: [String], ipAddresses: [String]) throws -> ExternalAccountKey {
        guard (1...63).contains(name.utf8.count),
            name.utf8.allSatisfy({ ($0 >= 0x61 && $0 <= 0x7a) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2d })
        else {
            throw ExternalAccountKeyError(.invalidName, "node name \"\(name)\": expected 1-63 lower-case letters, digits or hyphens")
        }
        let names = try dnsNames.map(Self.normalizedDNSName)
        let addrs = try ipAddresses.map(Self.normalizedIPv6)
        guard !names.isEmpty || !addrs.isEmpty else {
            throw ExternalAccountKeyError(.noIdentifiers, "node \(name): give at least one --dns name or --ip address")
        }
        if try all().contains(where: { $0.name == name }) {
            throw ExternalAccountKeyError(.alreadyExists, "node \(name) already has an EAB key in \(directory); delete its file to replace it")
        }
        var rng = SystemRandomNumberGenerator()
        let suffix = (0..<6).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &rng)) }.joined()
        let mac = (0..<32).map { _ in UInt8.random(in: 0...255, using: &rng) }
        let key = ExternalAccountKey(
            kid: "\(name)-\(suffix)", name: name, hmacKey: Base64URL.encode(mac),
            dnsNames: Array(Set(names)).sorted(), ipAddresses: Array(Set(addrs)).sorted())
        do {
            try FileManager.default.createDirectory(
                atPath: directory, withIntermediateDirectories: true,
                attributes: [.posixPermissions: 0o700])
        } catch {
            throw ExternalAccountKeyError(.io, "\(directory): cannot create (\(error.localizedDescription))")
        }
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        let text = String(decoding: try enc.encode(key), as: UTF8.self) + "\n"
        do { try PEMFiles.writeFile(text, to: path(kid: key.kid), mode: 0o600) } catch {
            throw ExternalAccountKeyError(.io, "\(error)")
        }
        return key
    }

    /// The key with identifier `kid`, or nil when there is none.
    public func key(kid: String) throws -> ExternalAccountKey? {
        // A kid names a file: refuse anything that could leave the directory.
        guard !kid.isEmpty, !kid.contains("/"), !kid.hasPrefix(".") else { return nil }
        let p = path(kid: kid)
        guard let data = FileManager.default.contents(atPath: p) else { return nil }
        do { return try JSONDecoder().decode(ExternalAccountKey.self, from: data) } catch {
            throw ExternalAccountKeyError(.invalidFile, "\(p): not an EAB key file (\(error))")
        }
    }

    /// Every key in the store.
    public func all() throws -> [ExternalAccountKey] {
        guard let files = try? FileManager.default.contentsOfDirectory(atPath: directory) else { return [] }
        return try files.filter { $0.hasSuffix(".json") }.sorted().compactMap { try key(kid: String($0.dropLast(5))) }
    }

    private func path(kid: String) -> String { directory + "/" + kid + ".json" }

    /// Lower-cases a DNS name, drops a trailing dot and checks its labels, as the CA does.
    static func normalizedDNSName(_ text: String) throws -> String {
        var n = text.lowercased()
        if n.hasSuffix(".") { n.removeLast() }
        let labels = n.split(separator: ".", omittingEmptySubsequences: false)
        let ok =
            !n.isEmpty && n.utf8.count <= 253 && IPv6Address(n) == nil
            && labels.allSatisfy { l in
                (1...63).contains(l.utf8.count) && l.first != "-" && l.last != "-"
                    && l.utf8.allSatisfy { ($0 >= 0x61 && $0 <= 0x7a) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2d }
            } && !labels.allSatisfy { $0.allSatisfy(\.isNumber) }
        guard ok else {
            throw ExternalAccountKeyError(
                .invalidIdentifier, "\(text) is not a valid DNS name (labels of 1-63 letters, digits, hyphens; no wildcards, no IPv4)")
        }
        return n
    }

    /// The canonical text of an IPv6 address; IPv4 (dotted or mapped) is refused.
    static func normalizedIPv6(_ text: String) throws -> String {
        guard let a = IPv6Address(text), !a.isIPv4Mapped else {
            throw ExternalAccountKeyError(.invalidIdentifier, "\(text) is not an IPv6 address (STOQ is IPv6 only)")
        }
        return a.description
    }
}
