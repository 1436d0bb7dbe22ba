// libFuzzer target for what STOQ's ACME code reads off the network. Server side (ACMEServer):
// a request body as a flattened JWS (JWS(json:)), its protected header, an embedded `jwk`
// (JWK(members:)), the signature check, the payload as JSON, an external account binding
// (verifyMAC), and a finalize CSR (base64url DER → CertificateSigningRequest →
// ACMEServer.identifiers). Client side (ACMEClient): directory, order and authorization
// documents (JSONDecoder) and problem documents. Not part of the package build:
// `scripts/fuzz acme` recompiles STOQACME with coverage.
//
// Input: byte 0 picks the reader (mod 4); the rest is the body.
// Properties: nothing crashes; base64url decoding inverts encoding; a problem document keeps
// the type it was given, minus the ACME URN prefix.

@preconcurrency import Crypto
import Foundation
import X509
@testable import STOQACME
import STOQTrust

// Read-only after start; libFuzzer calls in from one thread.
nonisolated(unsafe) let eabKey = SymmetricKey(data: Data(repeating: 7, count: 32))

@_cdecl("LLVMFuzzerTestOneInput")
public func acmeFuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let data, size >= 1 else { return 0 }
    let body = Data(UnsafeBufferPointer(start: data + 1, count: size - 1))
    switch data[0] % 4 {
    case 0:
        guard let object = try? JSONSerialization.jsonObject(with: body), let jws = try? JWS(json: object) else { return 0 }
        let header = try? jws.header()
        if let members = header?["jwk"] as? [String: Any], let key = try? JWK(members: members) {
            _ = key.thumbprint
            _ = try? jws.verify(with: key)
        }
        _ = try? jws.verifyMAC(with: eabKey)
        if let payload = try? jws.payloadData(), !payload.isEmpty {
            if let o = (try? JSONSerialization.jsonObject(with: payload)) as? [String: Any], let inner = o["externalAccountBinding"] {
                _ = try? JWS(json: inner).verifyMAC(with: eabKey)
            }
        }
    case 1:
        _ = try? JSONDecoder().decode(ACMEDirectory.self, from: body)
        _ = try? JSONDecoder().decode(ACMEOrder.self, from: body)
        _ = try? JSONDecoder().decode(ACMEAuthorization.self, from: body)
        if let p = ACMEProblem(json: body, status: 400), let o = (try? JSONSerialization.jsonObject(with: body)) as? [String: Any],
            let type = o["type"] as? String
        {
            let expected = type.hasPrefix(ACMEProblem.urnPrefix) ? String(type.dropFirst(ACMEProblem.urnPrefix.count)) : type
            guard p.code.rawValue == expected else { fatalError("problem type \(type) read as \(p.code.rawValue)") }
        }
    case 2:
        let text = String(decoding: body, as: UTF8.self)
        if let bytes = Base64URL.decode(text) {
            guard Base64URL.decode(Base64URL.encode(bytes)) == bytes else { fatalError("base64url round trip") }
            if let csr = try? CertificateSigningRequest(derEncoded: Array(bytes)) {
                _ = try? ACMEServer.identifiers(in: csr)
                _ = csr.publicKey.isValidSignature(csr.signature, for: csr)
            }
        }
    default:
        if let csr = try? CertificateSigningRequest(derEncoded: Array(body)) {
            _ = try? ACMEServer.identifiers(in: csr)
        }
    }
    return 0
}
