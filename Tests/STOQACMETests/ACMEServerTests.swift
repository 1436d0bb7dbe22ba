import AsyncHTTPClient
@preconcurrency import Crypto
import Foundation
import STOQTestSupport
import NIOCore
import NIOHTTP1
import NIOSSL
import STOQACME
import STOQCore
import STOQTrust
import SwiftASN1
import X509
import Testing
@preconcurrency import _CryptoExtras

/// STOQ's ACME client against STOQ's ACME server over HTTPS on [::1].
@Suite struct ACMEServerTests {
    @Test func issuesAuthorizedNamesVerifiesAndLogs() async throws {
        let f = try await ACMEFixture.start()
        let eab = try f.addNode("node1", dns: ["node1.example"], ip: ["2001:db8::1"])
        let client = try f.client()
        let got = try await client.obtainCertificate(for: [.dns("node1.example"), .ip("2001:0db8::1")], eab: eab)
        await client.shutdown()

        #expect(got.chain.count == 2, "leaf + intermediate")
        let s = CertificateSummary(got.chain[0])
        #expect(s.dnsNames == ["node1.example"])
        #expect(s.ipAddresses == ["2001:db8::1"])
        let verifier = PeerVerifier(roots: [f.authority.root])
        _ = try await verifier.verify(chain: got.chain, dnsName: "node1.example")
        _ = try await verifier.verify(chain: got.chain, ipv6Address: "2001:db8::1")
        // The key handed back is the one certified.
        let key = try P256.Signing.PrivateKey(pemRepresentation: got.privateKeyPEM)
        #expect(got.chain[0].publicKey == Certificate.PublicKey(key.publicKey))

        // The precertificate is in the transparency log on disk, with a valid inclusion proof,
        // and the certificate carries that log's SCT over it.
        await f.stop()
        let logKey = try P256.Signing.PrivateKey(pemRepresentation: String(contentsOfFile: f.caDirectory + "/log-key.pem", encoding: .utf8))
        let log = try TransparencyLog(path: f.caDirectory + "/transparency.log", signingKey: logKey)
        #expect(log.size == 1)
        let logged = try #require(CertificateTransparency.parseMerkleTreeLeaf(try log.entry(at: 0)))
        #expect(try CertificateTransparency.serialNumber(ofTBS: logged.entry.tbsCertificate) == got.chain[0].serialNumber)
        #expect(try CertificateTransparency.entry(forFinalCertificate: got.chain[0], issuer: got.chain[1]) == logged.entry)
        #expect(
            CertificateTransparency.verify(got.chain[0], issuer: got.chain[1], trustedLogs: [logKey.publicKey])
                == .valid(logID: log.logID, timestamp: logged.timestamp))
        let proof = try log.inclusionProof(index: 0)
        let leafHash = MerkleTree.leafHash(CertificateTransparency.merkleTreeLeaf(timestamp: logged.timestamp, entry: logged.entry))
        #expect(
            MerkleTree.verifyInclusion(
                leafHash: leafHash, leafIndex: 0, treeSize: 1,
                proof: proof, rootHash: try log.rootHash()))
    }

    @Test func unauthorizedIdentifiersAreRejected() async throws {
        let f = try await ACMEFixture.start()
        defer { Task { await f.stop() } }
        let eab = try f.addNode("node2", dns: ["node2.example"])
        let client = try f.client()
        defer { Task { await client.shutdown() } }
        try await client.register(eab: eab)
        await assertProblem(.rejectedIdentifier, detailContains: "dns:other.example") {
            _ = try await client.newOrder([.dns("node2.example"), .dns("other.example")])
        }
        await assertProblem(.rejectedIdentifier, detailContains: "2001:db8::99") {
            _ = try await client.newOrder([.ip("2001:db8::99")])
        }
        await assertProblem(.rejectedIdentifier, detailContains: "IPv6 only") {
            _ = try await client.newOrder([.ip("192.0.2.1")])
        }
        await assertProblem(.unsupportedIdentifier, detailContains: "email") {
            _ = try await client.newOrder([ACMEIdentifier(type: "email", value: "a@b.example")])
        }
        // The authorized name still works on the same account.
        let (_, order) = try await client.newOrder([.dns("NODE2.example.")])
        #expect(order.status == "ready")
        #expect(order.identifiers == [.dns("node2.example")])
        // Withdrawing the EAB key (deleting its file) withdraws the authority at once.
        try FileManager.default.removeItem(atPath: f.caDirectory + "/acme-eab/\(eab.kid).json")
        await assertProblem(.unauthorized, detailContains: eab.kid) {
            _ = try await client.newOrder([.dns("node2.example")])
        }
    }

    @Test func badExternalAccountBindingIsRefused() async throws {
        let f = try await ACMEFixture.start()
        defer { Task { await f.stop() } }
        let eab = try f.addNode("node3", dns: ["node3.example"])
        let c1 = try f.client(), c2 = try f.client(), c3 = try f.client()
        defer {
            Task {
                await c1.shutdown(); await c2.shutdown(); await c3.shutdown()
            }
        }
        let wrongKey = Base64URL.encode(SymmetricKey(size: .bits256).withUnsafeBytes { Data($0) })
        await assertProblem(.unauthorized, detailContains: "HMAC does not verify") {
            try await c1.register(eab: ExternalAccountBinding(kid: eab.kid, hmacKeyBase64URL: wrongKey))
        }
        await assertProblem(.unauthorized, detailContains: "nope-123") {
            try await c2.register(eab: ExternalAccountBinding(kid: "nope-123", hmacKeyBase64URL: eab.hmacKeyBase64URL))
        }
        await assertProblem(.externalAccountRequired) { try await c3.register() }
        let noAccount = await c3.accountURL
        #expect(noAccount == nil)
    }

    /// Raw JWS requests: a replayed nonce, a wrong url header, an RS256 account key.
    @Test func nonceReplayURLMismatchAndRS256() async throws {
        let f = try await ACMEFixture.start()
        defer { Task { await f.stop() } }
        let eab = try f.addNode("node4", dns: ["node4.example"])
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .certificates(try NIOSSLCertificate.fromPEMBytes(Array(f.rootPEM.utf8)))
        let http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: .init(tlsConfiguration: tls))
        defer { Task { try? await http.shutdown() } }
        let base = f.directoryURL.replacingOccurrences(of: "/directory", with: "")

        func send(_ url: String, _ body: Data?, method: HTTPMethod = .POST) async throws -> (Int, HTTPHeaders, Data) {
            var req = HTTPClientRequest(url: url)
            req.method = method
            if let body {
                req.headers.add(name: "Content-Type", value: "application/jose+json")
                req.body = .bytes(ByteBuffer(bytes: body))
            }
            let r = try await http.execute(req, timeout: .seconds(10))
            return (Int(r.status.code), r.headers, Data(try await r.body.collect(upTo: 1 << 20).readableBytesView))
        }
        func nonce() async throws -> String {
            let (status, h, _) = try await send(base + "/acme/new-nonce", nil, method: .HEAD)
            #expect(status == 200)
            return try #require(h.first(name: "Replay-Nonce"))
        }

        // RS256: an RSA-2048 account key registers with EAB.
        let rsa = try _RSA.Signing.PrivateKey(keySize: .bits2048)
        let jwk = JWK.rsa(rsa.publicKey)
        let inner = try JWS.sign(
            header: ["kid": eab.kid, "url": base + "/acme/new-account"],
            payload: JSONSerialization.data(withJSONObject: jwk.members, options: [.sortedKeys]),
            with: .hmac(SymmetricKey(data: Base64URL.decode(eab.hmacKeyBase64URL)!)))
        let payload = try JSONSerialization.data(withJSONObject: ["termsOfServiceAgreed": true, "externalAccountBinding": inner.jsonObject])
        let reg = try JWS.sign(
            header: ["nonce": try await nonce(), "url": base + "/acme/new-account", "jwk": jwk.members],
            payload: payload, with: .rsa(rsa))
        let (s1, h1, b1) = try await send(base + "/acme/new-account", reg.serialized())
        #expect(s1 == 201, Comment(rawValue: String(decoding: b1, as: UTF8.self)))
        let account = try #require(h1.first(name: "Location"))

        // A POST-as-GET of the account, then the very same JWS again: badNonce, with a fresh nonce.
        let get = try JWS.sign(header: ["nonce": try await nonce(), "url": account, "kid": account], payload: Data(), with: .rsa(rsa))
        let (s2, _, _) = try await send(account, get.serialized())
        #expect(s2 == 200)
        let (s3, h3, b3) = try await send(account, get.serialized())
        #expect(s3 == 400)
        #expect(h3.first(name: "Content-Type") == "application/problem+json")
        let p3 = try #require(ACMEProblem(json: b3, status: s3))
        #expect(p3.code == .badNonce)
        #expect(p3.detail.contains("already used"), Comment(rawValue: p3.detail))
        let fresh = try #require(h3.first(name: "Replay-Nonce"))
        // That fresh nonce works.
        let retry = try JWS.sign(header: ["nonce": fresh, "url": account, "kid": account], payload: Data(), with: .rsa(rsa))
        let (s4, _, _) = try await send(account, retry.serialized())
        #expect(s4 == 200)

        // A url header that is not the request URL.
        let wrongURL = try JWS.sign(
            header: ["nonce": try await nonce(), "url": base + "/acme/new-order", "kid": account],
            payload: Data(), with: .rsa(rsa))
        let (s5, _, b5) = try await send(account, wrongURL.serialized())
        let p5 = try #require(ACMEProblem(json: b5, status: s5))
        #expect(p5.code == .unauthorized)
        #expect(p5.detail.contains("does not match the request URL"), Comment(rawValue: p5.detail))

        // A signature by another key under the account's kid.
        let other = try JWS.sign(
            header: ["nonce": try await nonce(), "url": account, "kid": account], payload: Data(),
            with: .p256(P256.Signing.PrivateKey()))
        let (s6, _, b6) = try await send(account, other.serialized())
        let p6 = try #require(ACMEProblem(json: b6, status: s6))
        #expect(p6.code == .badSignatureAlgorithm, Comment(rawValue: p6.detail))  // ES256 against an RSA account key

        // Both jwk and kid.
        let both = try JWS.sign(
            header: ["nonce": try await nonce(), "url": account, "kid": account, "jwk": jwk.members],
            payload: Data(), with: .rsa(rsa))
        let (s7, _, b7) = try await send(account, both.serialized())
        #expect(ACMEProblem(json: b7, status: s7)?.code == .malformed)

        // Wrong content type.
        var req = HTTPClientRequest(url: account)
        req.method = .POST
        req.headers.add(name: "Content-Type", value: "application/json")
        req.body = .bytes(ByteBuffer(bytes: retry.serialized()))
        let r8 = try await http.execute(req, timeout: .seconds(10))
        #expect(r8.status.code == 415)
    }

    @Test func aCertificateIssuedBeforeARestartCanStillBeRevoked() async throws {
        // The log holds precert entries (TBS without the SCT list), not certificates: after a
        // restart the server matches a revocation request against them.
        let f = try await ACMEFixture.start()
        let eab = try f.addNode("node7", dns: ["node7.example"])
        let client = try f.client()
        let got = try await client.obtainCertificate(for: [.dns("node7.example")], eab: eab)
        await client.shutdown()
        await f.stop()
        let server = try ACMEServer(caDirectory: f.caDirectory, configuration: ACMEServer.Configuration())
        let tls = try f.authority.issueWithNewKey(dnsNames: ["localhost"], ipv6Addresses: ["::1"])
        let https = try await ACMEHTTPSServer.start(
            server: server, address: IPv6Endpoint(address: .loopback, port: 0),
            certificateChainPEM: tls.chainPEM, keyPEM: tls.keyPEM)
        let g = ACMEFixture(directory: f.directory, authority: f.authority, server: server, https: https, rootPEM: f.rootPEM)
        defer { Task { await g.stop() } }
        let again = try g.client()
        defer { Task { await again.shutdown() } }
        try await again.register(eab: eab)
        // A certificate the CA never issued, with the same names, is still refused.
        let foreign = try TrustAuthority.create(in: f.dir + "/other").issueWithNewKey(dnsNames: ["node7.example"]).certificate
        await assertProblem(.malformed) { try await again.revoke(foreign) }
        try await again.revoke(got.chain[0], reason: 4)
        let revoked = await server.revokedSerials
        #expect(revoked == [CertificateSummary(got.chain[0]).serial])
    }

    /// A revocation appends its serial: what the operator wrote by hand since the server
    /// started (a serial, a comment, a last line without its newline) stays. It used to
    /// rewrite the file from the serials read at start.
    @Test func aRevocationKeepsWhatTheOperatorWrote() throws {
        let dir = try TemporaryDirectory("stoq-revoked")
        defer { dir.remove() }
        let path = dir.path + "/revoked.txt"
        try PEMFiles.appendSerial("0a0b", to: path, header: "# serials revoked through ACME")
        try String(contentsOfFile: path, encoding: .utf8).appending("# by hand\n7fa6").write(toFile: path, atomically: true, encoding: .utf8)
        try PEMFiles.appendSerial("0c0d", to: path, header: "# serials revoked through ACME")
        let text = try String(contentsOfFile: path, encoding: .utf8)
        #expect(text.hasPrefix("# serials revoked through ACME"))
        #expect(text.hasSuffix("0a0b\n# by hand\n7fa6\n0c0d\n"), "\(text)")
        #expect(try PEMFiles.readSerials(path).count == 3)
    }

    /// Deleting a node's external account key withdraws its authority at once: an order it
    /// made before, ready, is not finalized after. (Only new orders looked at the key.)
    @Test func aWithdrawnKeyFinalizesNoReadyOrder() async throws {
        let f = try await ACMEFixture.start()
        defer { Task { await f.stop() } }
        let r = try await readyOrder(f, "node8")
        defer { Task { await r.client.shutdown() } }
        try FileManager.default.removeItem(atPath: f.caDirectory + "/acme-eab/\(r.eab.kid).json")
        await assertProblem(.unauthorized, detailContains: "was withdrawn") {
            _ = try await r.client.finalize(orderURL: r.url, order: r.order, csrDER: r.csr)
        }
    }

    /// A node registered with its own external account key, its order for `<name>.example`
    /// ready (authorizations done), and a CSR for it.
    func readyOrder(_ f: ACMEFixture, _ name: String) async throws
        -> (client: ACMEClient, eab: ExternalAccountBinding, url: String, order: ACMEOrder, csr: [UInt8])
    {
        let eab = try f.addNode(name, dns: ["\(name).example"])
        let client = try f.client()
        try await client.register(eab: eab)
        let ids = [ACMEIdentifier.dns("\(name).example")]
        let (url, order) = try await client.newOrder(ids)
        try await client.completeAuthorizations(order)
        return (client, eab, url, order, try ACMEClient.makeCSR(identifiers: ids, key: P256.Signing.PrivateKey()))
    }

    /// A finalize sent again (its answer was lost, the POST retried) meets the order already
    /// valid: the client follows the order to its certificate instead of failing on
    /// `orderNotReady` and throwing the issued certificate away.
    @Test func aFinalizeSentAgainFollowsTheOrder() async throws {
        let f = try await ACMEFixture.start()
        defer { Task { await f.stop() } }
        let r = try await readyOrder(f, "node9")
        defer { Task { await r.client.shutdown() } }
        let first = try await r.client.finalize(orderURL: r.url, order: r.order, csrDER: r.csr)
        let again = try await r.client.finalize(orderURL: r.url, order: r.order, csrDER: r.csr)
        #expect(first.status == "valid" && again.status == "valid" && again.certificate == first.certificate)
    }

    @Test func revocation() async throws {
        let f = try await ACMEFixture.start()
        defer { Task { await f.stop() } }
        let eab = try f.addNode("node5", dns: ["node5.example"])
        let client = try f.client()
        defer { Task { await client.shutdown() } }
        let got = try await client.obtainCertificate(for: [.dns("node5.example")], eab: eab)
        let serial = CertificateSummary(got.chain[0]).serial

        // Another account (authorized for other names) may not revoke it.
        let other = try f.client()
        defer { Task { await other.shutdown() } }
        try await other.register(eab: try f.addNode("node6", dns: ["node6.example"]))
        await assertProblem(.unauthorized, detailContains: serial) { try await other.revoke(got.chain[0]) }
        await assertProblem(.badRevocationReason) { try await client.revoke(got.chain[0], reason: 2) }

        try await client.revoke(got.chain[0], reason: 4)
        await assertProblem(.alreadyRevoked, detailContains: serial) { try await client.revoke(got.chain[0]) }
        let revokedSerials = await f.server.revokedSerials
        #expect(revokedSerials == [serial])
        // revoked.txt is what `stoq trust verify --revoked` reads; the verifier now refuses the chain.
        let serials = try PEMFiles.readSerials(f.caDirectory + "/revoked.txt")
        let verifier = PeerVerifier(roots: [f.authority.root], revokedSerials: serials)
        do {
            _ = try await verifier.verify(chain: got.chain, dnsName: "node5.example")
            Issue.record("a revoked certificate verified")
        } catch let e as PeerVerificationError {
            #expect(e.code == .revoked)
        }
        // A certificate this CA never issued.
        let foreign = try f.authority.issueWithNewKey(dnsNames: ["node5.example"]).certificate
        await assertProblem(.malformed, detailContains: "not issued by this CA") { try await client.revoke(foreign) }
    }

    @Test func finalizeRefusesCSRThatDiffersFromTheOrder() async throws {
        let f = try await ACMEFixture.start()
        defer { Task { await f.stop() } }
        let eab = try f.addNode("node7", dns: ["node7.example", "alt7.example"])
        let client = try f.client()
        defer { Task { await client.shutdown() } }
        try await client.register(eab: eab)
        let (url, order) = try await client.newOrder([.dns("node7.example")])
        let csr = try ACMEClient.makeCSR(identifiers: [.dns("node7.example"), .dns("alt7.example")], key: P256.Signing.PrivateKey())
        await assertProblem(.badCSR, detailContains: "extra: dns:alt7.example") {
            _ = try await client.finalize(orderURL: url, order: order, csrDER: csr)
        }
        let good = try ACMEClient.makeCSR(identifiers: [.dns("node7.example")], key: P256.Signing.PrivateKey())
        let done = try await client.finalize(orderURL: url, order: order, csrDER: good)
        #expect(done.status == "valid")
        // The server refuses a second finalize (the client's `finalize` follows the order then:
        // aFinalizeSentAgainFollowsTheOrder).
        let again = try JSONSerialization.data(withJSONObject: ["csr": Base64URL.encode(good)])
        await assertProblem(.orderNotReady) { _ = try await client.post(order.finalize, payload: again) }
    }

    @Test func clientRetriesConnectionErrorsButNotAnUntrustedCertificate() async throws {
        let f = try await ACMEFixture.start()
        defer { Task { await f.stop() } }
        var o = ACMEClient.Options()
        o.maxAttempts = 4
        o.baseDelay = 0.01
        // Short, so a hung attempt cannot stretch the test.
        o.requestTimeout = 1
        let started = Date()
        // A certificate from another CA: refused at once, not retried.
        let other = try TemporaryDirectory("stoq-other")
        defer { other.remove() }
        let otherRoot = try TrustAuthority.create(in: other.path + "/ca")
        let untrusting = try ACMEClient(directoryURL: f.directoryURL, trustRootsPEM: try PEMFiles.pem([otherRoot.root]), options: o)
        do {
            _ = try await untrusting.directory()
            Issue.record("a server certificate from another CA was accepted")
        } catch let e as ACMEClientError {
            #expect(e.code == .transport, "\(e)")
        }
        let r1 = await untrusting.transientRetries
        #expect(r1 == 0)
        print("untrusted certificate refused after \(String(format: "%.2f", Date().timeIntervalSince(started))) s")
        await untrusting.shutdown()
        // Nothing listening: retried with backoff, then given up after maxAttempts tries.
        let port = try freeLoopbackPort()
        let nobody = try ACMEClient(directoryURL: "https://[::1]:\(port)/directory", trustRootsPEM: f.rootPEM, options: o)
        do {
            _ = try await nobody.directory()
            Issue.record("connected to a closed port")
        } catch let e as ACMEClientError {
            #expect(e.code == .transport)
            #expect(e.message.contains("after 4 tries"), Comment(rawValue: e.message))
        }
        let r2 = await nobody.transientRetries
        #expect(r2 == 3)
        await nobody.shutdown()
    }
}
