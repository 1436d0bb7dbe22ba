import Crypto
import Foundation
import STOQTrust
import SwiftASN1
import Testing

/// P-256 key files as other tools write them.
@Suite struct P256KeyFileTests {
    /// An RFC 5915 ECPrivateKey whose privateKey octets are `scalar` as given (no padding or
    /// trimming): what GnuTLS's certtool writes for a key whose top bit is set is 33 bytes.
    static func sec1PEM(scalar: [UInt8]) throws -> String {
        var s = DER.Serializer()
        try s.appendConstructedNode(identifier: .sequence) { s in
            try s.serialize(1)
            try s.serialize(ASN1OctetString(contentBytes: ArraySlice(scalar)))
            try s.serialize(
                ASN1ObjectIdentifier("1.2.840.10045.3.1.7"), explicitlyTaggedWithTagNumber: 0, tagClass: .contextSpecific)
        }
        return PEMDocument(type: "EC PRIVATE KEY", derBytes: s.serializedBytes).pemString
    }

    @Test func aScalarWithALeadingZeroOrShortIsTheSameKey() throws {
        var key = P256.Signing.PrivateKey()
        while key.rawRepresentation.first! < 0x80 { key = P256.Signing.PrivateKey() }
        let raw = Array(key.rawRepresentation)
        // 33 bytes, as certtool writes it: swift-crypto alone refuses it.
        let padded = try Self.sec1PEM(scalar: [0] + raw)
        #expect(throws: (any Error).self) { try P256.Signing.PrivateKey(pemRepresentation: padded) }
        #expect(try PEMFiles.p256PrivateKey(pem: padded).rawRepresentation == key.rawRepresentation)
        // The well-formed encodings still load as they are.
        #expect(try PEMFiles.p256PrivateKey(pem: key.pemRepresentation).rawRepresentation == key.rawRepresentation)
        #expect(try PEMFiles.p256PrivateKey(pem: Self.sec1PEM(scalar: raw)).rawRepresentation == key.rawRepresentation)
        // A scalar with a leading zero byte, written short (31 bytes).
        let short = try P256.Signing.PrivateKey(rawRepresentation: [0] + raw.dropFirst())
        let shortPEM = try Self.sec1PEM(scalar: Array(raw.dropFirst()))
        #expect(try PEMFiles.p256PrivateKey(pem: shortPEM).rawRepresentation == short.rawRepresentation)
        // Not a key at all: the library's error.
        #expect(throws: (any Error).self) { try PEMFiles.p256PrivateKey(pem: "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n") }
    }

    /// A temporary file a crash left (0644), or a link planted in its place, is not written
    /// through: the key lands in a new 0600 file, and what the link named is untouched.
    @Test func aKeyIsNeverWrittenThroughALeftoverTemporaryFile() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("stoq-pem-\(UUID())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let key = dir + "/key.pem", victim = dir + "/victim"
        #expect(FileManager.default.createFile(atPath: key + ".tmp", contents: Data("old".utf8), attributes: [.posixPermissions: 0o644]))
        try PEMFiles.writeFile("secret 1\n", to: key, mode: 0o600)
        #expect(try String(contentsOfFile: key, encoding: .utf8) == "secret 1\n")
        #expect((try FileManager.default.attributesOfItem(atPath: key)[.posixPermissions] as? Int) == 0o600)
        #expect(FileManager.default.createFile(atPath: victim, contents: Data("untouched".utf8)))
        try FileManager.default.createSymbolicLink(atPath: key + ".tmp", withDestinationPath: victim)
        try PEMFiles.writeFile("secret 2\n", to: key, mode: 0o600)
        #expect(try String(contentsOfFile: key, encoding: .utf8) == "secret 2\n")
        #expect(try String(contentsOfFile: victim, encoding: .utf8) == "untouched")
        #expect(!FileManager.default.fileExists(atPath: key + ".tmp"))
    }
}
