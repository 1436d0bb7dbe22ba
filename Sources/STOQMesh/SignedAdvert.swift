import Crypto
import STOQTrust
import SwiftASN1
import X509

/// A link-state advert as it crosses the mesh: the advert's body, the origin's certificate chain
/// (leaf first) and the leaf key's ECDSA P-256 / SHA-256 signature over everything before it.
///
/// Any node can check an advert it receives, from however many hops away: the chain must lead to
/// its trust (the caller's `trust` closure, normally `PeerVerifier` in the node role), the origin
/// id must be the hash of the leaf's key, and the signature must verify. Checks run cheapest
/// first, so a flood of garbage costs a parse, not a signature check.
///
/// Wire form (docs/mesh.md): body | chain count u8 | { length u16 | DER }… | signature length u16
/// | DER ECDSA signature. At most `maxSize` bytes in all.
public struct SignedAdvert: Sendable {
    /// The largest advert this node sends or reads.
    public static let maxSize = 16_384
    /// Certificates an advert may carry: leaf, intermediates, optionally the root.
    public static let chainRange = 1...4
    /// The largest certificate an advert may carry.
    public static let maxCertificateSize = 4_096
    /// How far ahead of this node's clock an advert's issue time may be.
    public static let clockSkewMillis: UInt64 = 5_000
    /// How long after an advert arrived an earlier one of its origin may still pass `verify`:
    /// issued no later, it lives at most the longest lifetime, give or take the clock skew.
    /// The routing database forgets an origin silent this long (`LinkStateDatabase.forgetAfter`).
    public static let replayHorizonNanos = (UInt64(AdvertBody.lifetimeRange.upperBound) + 2 * clockSkewMillis) * 1_000_000

    /// The advert.
    public let advert: AdvertBody
    /// The origin's certificate chain, leaf first.
    public let chain: [Certificate]
    /// The wire form, as signed and as forwarded (a relaying node never re-encodes).
    public let bytes: [UInt8]

    /// Signs `advert` with the origin's node key. `chain` is the origin's certificate chain, leaf
    /// first; the advert's origin must be the hash of the leaf's key.
    public static func sign(_ advert: AdvertBody, chain: [Certificate], key: P256.Signing.PrivateKey) throws -> SignedAdvert {
        guard let leaf = chain.first, chainRange.contains(chain.count) else {
            throw AdvertError(.badChain, "\(chain.count) certificates; an advert carries \(chainRange.lowerBound) to \(chainRange.upperBound)")
        }
        guard NodeIdentity(publicKey: leaf.publicKey) == advert.origin else {
            throw AdvertError(.originMismatch, "the advert's origin \(advert.origin) is not the leaf's key \(NodeIdentity(publicKey: leaf.publicKey))")
        }
        guard Certificate.PublicKey(key.publicKey) == leaf.publicKey else {
            throw AdvertError(.originMismatch, "the signing key is not the leaf certificate's key")
        }
        var out = advert.encodeBody()
        out.append(UInt8(chain.count))
        for cert in chain {
            var s = DER.Serializer()
            try s.serialize(cert)
            guard s.serializedBytes.count <= maxCertificateSize else {
                throw AdvertError(.badChain, "a certificate of \(s.serializedBytes.count) bytes; at most \(maxCertificateSize)")
            }
            append16(&out, s.serializedBytes.count)
            out.append(contentsOf: s.serializedBytes)
        }
        let signature = try key.signature(for: out).derRepresentation
        append16(&out, signature.count)
        out.append(contentsOf: signature)
        guard out.count <= maxSize else { throw AdvertError(.oversized, "\(out.count) bytes; at most \(maxSize)") }
        return SignedAdvert(advert: advert, chain: chain, bytes: out)
    }

    /// Checks an advert received from the mesh and returns it, or throws the first rule it
    /// breaks. `nowMillis` is this node's Unix time; `trust` throws when the chain (leaf first)
    /// does not lead to this node's trust. Staleness (a sequence not newer than the one held) is
    /// the link-state database's check, not this one's.
    public static func verify(
        _ bytes: [UInt8], nowMillis: UInt64,
        trust: ([Certificate]) async throws -> Void
    ) async throws(AdvertError) -> SignedAdvert {
        let advert = try check(bytes, nowMillis: nowMillis)
        do { try await trust(advert.chain) } catch {
            throw AdvertError(.untrustedSigner, "origin \(advert.advert.origin) (\(advert.chain[0].subject)): \(error)")
        }
        return advert
    }

    /// `verify`, for a caller on a thread of its own (the mesh service): `trust` is synchronous
    /// (`PeerVerifier.verify(derChain:)`).
    public static func verify(
        _ bytes: [UInt8], nowMillis: UInt64,
        trusting trust: ([Certificate]) throws -> Void
    ) throws(AdvertError) -> SignedAdvert {
        let advert = try check(bytes, nowMillis: nowMillis)
        do { try trust(advert.chain) } catch {
            throw AdvertError(.untrustedSigner, "origin \(advert.advert.origin) (\(advert.chain[0].subject)): \(error)")
        }
        return advert
    }

    /// Every rule but trust, cheapest first: size, format, time, chain shape, origin,
    /// signature. The time window needs the body alone, so an advert out of it (a flood of old
    /// copies) costs a parse, not a certificate parse and a signature check.
    private static func check(_ bytes: [UInt8], nowMillis: UInt64) throws(AdvertError) -> SignedAdvert {
        guard bytes.count <= maxSize else { throw AdvertError(.oversized, "\(bytes.count) bytes; at most \(maxSize)") }
        let (advert, bodyLength) = try AdvertBody.decodeBody(bytes[...])
        // The future first: an issue time near UInt64.max would wrap issue + lifetime.
        guard advert.issuedMillis <= nowMillis &+ clockSkewMillis else {
            throw AdvertError(.fromTheFuture, "issued \(advert.issuedMillis - nowMillis) ms in the future; clocks may differ by \(clockSkewMillis) ms")
        }
        guard advert.issuedMillis >= nowMillis || nowMillis - advert.issuedMillis <= UInt64(advert.lifetimeMillis) else {
            throw AdvertError(.expired, "issued \(nowMillis - advert.issuedMillis) ms ago with a lifetime of \(advert.lifetimeMillis) ms")
        }
        var r = Reader(bytes[bodyLength...])
        let count = Int(try r.u8("chain count"))
        guard chainRange.contains(count) else {
            throw AdvertError(.badChain, "\(count) certificates; an advert carries \(chainRange.lowerBound) to \(chainRange.upperBound)")
        }
        var chain = [Certificate]()
        for i in 0..<count {
            let length = Int(try r.u16("certificate \(i) length"))
            guard length <= maxCertificateSize else {
                throw AdvertError(.badChain, "certificate \(i) is \(length) bytes; at most \(maxCertificateSize)")
            }
            let der = try r.bytes(length, "certificate \(i)")
            do { chain.append(try Certificate(derEncoded: Array(der))) } catch {
                throw AdvertError(.badChain, "certificate \(i) does not parse: \(error)")
            }
        }
        let signedLength = bodyLength + r.offset
        let signatureLength = Int(try r.u16("signature length"))
        let signature = try r.bytes(signatureLength, "signature")
        guard r.remaining == 0 else { throw AdvertError(.malformed, "\(r.remaining) bytes after the signature") }

        let leaf = chain[0]
        let signer = NodeIdentity(publicKey: leaf.publicKey)
        guard signer == advert.origin else {
            throw AdvertError(.originMismatch, "origin \(advert.origin) but signed by the key of \(signer) (\(leaf.subject))")
        }
        guard leaf.publicKey.isValidSignature(signature, for: bytes[..<signedLength], signatureAlgorithm: .ecdsaWithSHA256) else {
            throw AdvertError(.badSignature, "the signature of origin \(advert.origin) does not verify: forged or altered")
        }
        return SignedAdvert(advert: advert, chain: chain, bytes: bytes)
    }

    private static func append16(_ out: inout [UInt8], _ v: Int) {
        out.append(UInt8(v >> 8))
        out.append(UInt8(v & 0xff))
    }
}

extension NodeIdentity {
    /// The id of the node whose key this is (`CertificateSummary.keyID`).
    public init(publicKey: Certificate.PublicKey) {
        self.init(CertificateSummary.keyID(publicKey))
    }
}
