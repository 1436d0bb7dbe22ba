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
}
