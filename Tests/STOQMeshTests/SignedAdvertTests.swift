import Crypto
import Foundation
import STOQTestSupport
import STOQCore
import STOQMesh
import STOQRouting
import SwiftASN1
import STOQTrust
import Testing
import X509

/// One authority and nodes it certified, made once for the suite.
struct MeshFixture: Sendable {
    struct Node: Sendable {
        let chain: [Certificate]
        let keyPEM: String
        var key: P256.Signing.PrivateKey { try! P256.Signing.PrivateKey(pemRepresentation: keyPEM) }
        var id: NodeIdentity { NodeIdentity(publicKey: chain[0].publicKey) }
    }

    let ca: TrustAuthority
    let nodes: [Node]
    let stranger: Node

    static let shared: MeshFixture = {
        func node(_ ca: TrustAuthority, _ n: Int) -> Node {
            let issued = try! ca.issueWithNewKey(dnsNames: ["node\(n).mesh"])
            return Node(chain: [issued.certificate, ca.intermediate], keyPEM: issued.keyPEM)
        }
        // The authorities keep what they issue with in memory: their files can go at once.
        let scratch = try! TemporaryDirectory("stoq-mesh")
        defer { scratch.remove() }
        let dir = scratch.url.path
        let ca = try! TrustAuthority.create(in: dir + "/ca")
        let other = try! TrustAuthority.create(in: dir + "/other", name: "Elsewhere")
        return MeshFixture(ca: ca, nodes: (1...3).map { node(ca, $0) }, stranger: node(other, 9))
    }()

    /// The node role's verifier over this authority: what a mesh node runs on an advert's chain.
    func trust(_ chain: [Certificate]) async throws {
        _ = try await PeerVerifier(roots: [ca.root], role: .server).verify(chain: chain)
    }
}

let now: UInt64 = UInt64(Date().timeIntervalSince1970 * 1000)

func advert(
    _ from: MeshFixture.Node, to: [MeshFixture.Node], sequence: UInt64 = 7, issued: UInt64 = now,
    lifetime: UInt32 = 30_000
) throws -> AdvertBody {
    try AdvertBody(
        origin: from.id, sequence: sequence, issuedMillis: issued, lifetimeMillis: lifetime, loadPPM: 125_000,
        links: to.enumerated().map { i, n in
            .init(
                neighbour: n.id, rttMicros: 1_000 * UInt32(i + 1), rttVarMicros: 250, lossPPM: 10_000,
                deliveryKbps: 100_000, peerLoadPPM: 300_000 + UInt32(i))
        })
}

@Suite struct SignedAdvertTests {
    let f = MeshFixture.shared

    @Test func signedAdvertRoundTripsAndVerifies() async throws {
        let a = try advert(f.nodes[0], to: [f.nodes[1], f.nodes[2]])
        let signed = try SignedAdvert.sign(a, chain: f.nodes[0].chain, key: f.nodes[0].key)
        let back = try await SignedAdvert.verify(signed.bytes, nowMillis: now, trust: f.trust)
        #expect(back.advert == a)
        #expect(back.advert.links.map(\.neighbour) == [f.nodes[1].id, f.nodes[2].id])
        #expect(back.bytes == signed.bytes)
        #expect(signed.bytes.count < SignedAdvert.maxSize)
    }

    /// Every way an advert can be wrong is refused with its own code, and a refusal never
    /// depends on which check ran first when only one rule is broken.
    @Test func forgedAlteredAndUntrustedAdvertsAreRefusedByName() async throws {
        let n = f.nodes
        let good = try SignedAdvert.sign(advert(n[0], to: [n[1]]), chain: n[0].chain, key: n[0].key).bytes

        // One flipped bit in a link's RTT: the signature no longer verifies.
        var altered = good
        altered[AdvertBody.headerSize + 33] ^= 0x01
        await expectRefused(altered, .badSignature)

        // Node 1's advert, signed by node 2's key with node 2's chain: origin is not the signer.
        let body = try advert(n[0], to: [n[1]])
        #expect(throws: AdvertError.self) { _ = try SignedAdvert.sign(body, chain: n[1].chain, key: n[1].key) }
        let forged = replaceChainAndSign(body.encodeBody(), chain: n[1].chain, key: n[1].key)
        await expectRefused(forged, .originMismatch)

        // A stranger's well-formed, correctly signed advert: its CA is not ours.
        let strange = try SignedAdvert.sign(advert(f.stranger, to: [n[0]]), chain: f.stranger.chain, key: f.stranger.key)
        await expectRefused(strange.bytes, .untrustedSigner)

        // Old and future adverts.
        let old = try SignedAdvert.sign(advert(n[0], to: [n[1]], issued: now - 60_000, lifetime: 30_000), chain: n[0].chain, key: n[0].key)
        await expectRefused(old.bytes, .expired)
        let future = try SignedAdvert.sign(advert(n[0], to: [n[1]], issued: now + 60_000), chain: n[0].chain, key: n[0].key)
        await expectRefused(future.bytes, .fromTheFuture)
        // An issue time so far ahead that issue + lifetime wraps: still the future, not expired.
        let wrapped = try SignedAdvert.sign(advert(n[0], to: [n[1]], issued: .max - 10), chain: n[0].chain, key: n[0].key)
        await expectRefused(wrapped.bytes, .fromTheFuture)

        // Structure.
        await expectRefused(Array(good.prefix(20)), .malformed)
        await expectRefused(good + [0], .malformed)
        await expectRefused([0x53, 0x51, 0x4C, 0x42] + good.dropFirst(4), .badMagic)
        var v2 = good
        v2[4] = 2
        await expectRefused(v2, .unsupportedVersion)
        await expectRefused(good + [UInt8](repeating: 0, count: SignedAdvert.maxSize), .oversized)
        var noChain = Array(body.encodeBody())
        noChain.append(0)
        await expectRefused(noChain, .badChain)
    }

    /// The time window needs only the body: an advert out of it is refused as such before its
    /// certificates are parsed or its signature checked (a flood of old copies costs a parse).
    @Test func theTimeWindowIsCheckedBeforeTheChainAndTheSignature() async throws {
        let n = f.nodes
        var old = try SignedAdvert.sign(advert(n[0], to: [n[1]], issued: now - 60_000, lifetime: 30_000), chain: n[0].chain, key: n[0].key).bytes
        old[AdvertBody.headerSize + 33] ^= 0x01  // the signature no longer verifies
        await expectRefused(old, .expired)
        var future = try advert(n[0], to: [n[1]], issued: now + 60_000).encodeBody()
        future.append(0)  // no certificate at all
        await expectRefused(future, .fromTheFuture)
    }

    @Test func theBodyRulesHoldForTheEncoderAndTheDecoderAlike() throws {
        let n = f.nodes
        #expect(throws: AdvertError.self) { try advert(n[0], to: [n[0]]) }  // a link to itself
        #expect(throws: AdvertError.self) { try advert(n[0], to: [n[1], n[1]]) }  // the same neighbour twice
        #expect(throws: AdvertError.self) { try advert(n[0], to: [n[1]], lifetime: 10) }
        // The longest lifetime is routing's (which bounds routing.update_interval), spelled again in this fuzzed file.
        #expect(AdvertBody.lifetimeRange.upperBound == LinkStateAdvert.maxLifetimeMillis)
        // The same rules on the wire: a body that repeats a neighbour does not decode.
        var twice = try advert(n[0], to: [n[1], n[2]]).encodeBody()
        let first = AdvertBody.headerSize
        twice.replaceSubrange((first + AdvertBody.linkSize)..<(first + AdvertBody.linkSize + 32), with: n[1].id.bytes)
        do {
            _ = try AdvertBody.decodeBody(twice[...])
            Issue.record("a repeated neighbour decoded")
        } catch {
            #expect(error.code == .badValue)
            #expect(error.detail == "link 1 repeats neighbour \(n[1].id)")
        }
    }

    /// What a node accepted goes into the routing database in routing's units, and a replay of
    /// the same advert is the database's `duplicate`.
    @Test func anAcceptedAdvertFeedsTheLinkStateDatabase() async throws {
        let n = f.nodes
        let signed = try SignedAdvert.sign(advert(n[0], to: [n[1], n[2]]), chain: n[0].chain, key: n[0].key)
        let accepted = try await SignedAdvert.verify(signed.bytes, nowMillis: now, trust: f.trust)
        let ls = accepted.advert.linkState
        #expect(ls.origin == n[0].id.routingID && ls.sequence == 7)
        #expect(ls.links.map(\.peer) == [n[1].id.routingID, n[2].id.routingID])
        #expect(ls.links[1].metrics == LinkMetrics(rttMs: 2, rttVarMs: 0.25, lossRate: 0.01, deliveryRate: 12_500_000, load: 0.300001))
        var db = LinkStateDatabase()
        let changes = try db.apply(ls, now: 1)
        #expect(changes.count == 2)
        #expect(throws: LinkStateError.self) { _ = try db.apply(ls, now: 2) }
        #expect(db.refused[.duplicate] == 1)
    }

    /// An advert lives what is left of its origin's lifetime when it arrives, not all of it
    /// again at each hop: passed on late, it still ends when its origin said; an origin's clock
    /// a little ahead does not lengthen it.
    @Test func anAdvertLivesWhatIsLeftOfItsLifetime() throws {
        let a = try advert(f.nodes[0], to: [f.nodes[1]], issued: 1_000_000, lifetime: 15_000)
        #expect(a.linkState.lifetime == 15_000 * Nanos.millisecond)
        #expect(a.linkState(nowMillis: 1_010_000, clockSkewMillis: 0).lifetime == 5_000 * Nanos.millisecond)
        #expect(a.linkState(nowMillis: 997_000, clockSkewMillis: 0).lifetime == 15_000 * Nanos.millisecond)
        #expect(a.linkState(nowMillis: 1_015_000, clockSkewMillis: 0).lifetime == 1 * Nanos.millisecond)
        // Up to the clock skew allowed, an origin's clock behind this node's costs nothing.
        #expect(a.linkState(nowMillis: 1_015_000).lifetime == SignedAdvert.clockSkewMillis * Nanos.millisecond)
        #expect(a.linkState(nowMillis: 1_004_000).lifetime == 15_000 * Nanos.millisecond)
    }

    /// The format article's independent reader (Python, `cryptography`) decodes and verifies what
    /// this encoder writes, field for field.
    @Test func anIndependentReaderAgreesFieldForField() throws {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Resources/advert.py").path
        let a = try advert(f.nodes[0], to: [f.nodes[1], f.nodes[2]])
        let signed = try SignedAdvert.sign(a, chain: f.nodes[0].chain, key: f.nodes[0].key)
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("advert-\(UUID()).bin")
        try Data(signed.bytes).write(to: file)
        defer { try? FileManager.default.removeItem(at: file) }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["python3", script, file.path]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        try #require(p.terminationStatus == 0, "advert.py failed: \(String(decoding: data, as: UTF8.self))")
        let json = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        #expect(json["origin"] as? String == a.origin.hex)
        #expect(json["signer_key_sha256"] as? String == a.origin.hex)
        #expect(json["signature_valid"] as? Bool == true)
        #expect((json["sequence"] as? NSNumber)?.uint64Value == a.sequence)
        #expect((json["issued_ms"] as? NSNumber)?.uint64Value == a.issuedMillis)
        #expect((json["lifetime_ms"] as? NSNumber)?.uint32Value == a.lifetimeMillis)
        #expect((json["load_ppm"] as? NSNumber)?.uint32Value == a.loadPPM)
        let links = try #require(json["links"] as? [[String: Any]])
        #expect(links.count == 2)
        for (l, mine) in zip(links, a.links) {
            #expect(l["neighbour"] as? String == mine.neighbour.hex)
            #expect((l["rtt_us"] as? NSNumber)?.uint32Value == mine.rttMicros)
            #expect((l["rtt_var_us"] as? NSNumber)?.uint32Value == mine.rttVarMicros)
            #expect((l["loss_ppm"] as? NSNumber)?.uint32Value == mine.lossPPM)
            #expect((l["delivery_kbps"] as? NSNumber)?.uint32Value == mine.deliveryKbps)
            #expect((l["peer_load_ppm"] as? NSNumber)?.uint32Value == mine.peerLoadPPM)
        }
        #expect((json["chain"] as? [String])?.count == 2)
    }

    private func expectRefused(_ bytes: [UInt8], _ code: AdvertError.Code, sourceLocation: SourceLocation = #_sourceLocation) async {
        do {
            _ = try await SignedAdvert.verify(bytes, nowMillis: now, trust: f.trust)
            Issue.record("accepted an advert that breaks \(code)", sourceLocation: sourceLocation)
        } catch {
            #expect(error.code == code, "\(error)", sourceLocation: sourceLocation)
        }
    }

    /// Builds the wire form by hand around `body`, as a forger would.
    private func replaceChainAndSign(_ body: [UInt8], chain: [Certificate], key: P256.Signing.PrivateKey) -> [UInt8] {
        var out = body
        out.append(UInt8(chain.count))
        for c in chain {
            var s = DER.Serializer()
            try! s.serialize(c)
            out += [UInt8(s.serializedBytes.count >> 8), UInt8(s.serializedBytes.count & 0xff)] + s.serializedBytes
        }
        let sig = try! key.signature(for: out).derRepresentation
        return out + [UInt8(sig.count >> 8), UInt8(sig.count & 0xff)] + sig
    }
}
