import AsyncHTTPClient
@preconcurrency import Crypto
import Foundation
import STOQTestSupport
import NIOCore
import NIOSSL
import STOQACME
import STOQCore
import STOQTrust
import X509
import Testing

/// STOQ's ACME client against Debian's pebble, and Debian's lego against STOQ's ACME server.
/// Each skips, saying why, when its program is not installed (scripts/install-deps installs both).
@Suite struct ACMEInteropTests {
    /// A child process that is killed when the test ends.
    final class Child {
        let process = Process()
        let output: String
        init(_ path: String, _ args: [String], env: [String: String], output: String) throws {
            process.executableURL = URL(fileURLWithPath: path)
            process.arguments = args
            var e = ProcessInfo.processInfo.environment
            for (k, v) in env { e[k] = v }
            process.environment = e
            _ = FileManager.default.createFile(atPath: output, contents: nil)
            let h = try FileHandle(forWritingTo: URL(fileURLWithPath: output))
            process.standardOutput = h
            process.standardError = h
            self.output = output
            try process.run()
        }
        var log: String { (try? String(contentsOfFile: output, encoding: .utf8)) ?? "" }
        func stop() {
            if process.isRunning { process.terminate() }
            process.waitUntilExit()
        }
    }

    @Test func clientAgainstPebble() async throws {
        guard let pebble = findExecutable("pebble") else {
            print("SKIP testClientAgainstPebble: pebble is not installed (Debian package `pebble`; scripts/install-deps installs it)")
            try Test.cancel("pebble is not installed (Debian package `pebble`; run scripts/install-deps)")
        }
        // Debian's pebble ships no test certificate (its docs name test/certs/, which the package
        // lacks), so the TLS certificate comes from a throwaway TrustChain CA and the client
        // trusts that CA's root.
        let scratch = try TemporaryDirectory("stoq-pebble")
        defer { scratch.remove() }
        let dir = scratch.path
        let ca = try TrustAuthority.create(in: dir + "/ca")
        let tls = try ca.issueWithNewKey(dnsNames: ["localhost"], ipv6Addresses: ["::1"])
        try tls.chainPEM.write(toFile: dir + "/cert.pem", atomically: true, encoding: .utf8)
        try tls.keyPEM.write(toFile: dir + "/key.pem", atomically: true, encoding: .utf8)
        let port = try freeLoopbackPort(), mgmt = try freeLoopbackPort()
        let mac = Base64URL.encode(SymmetricKey(size: .bits256).withUnsafeBytes { Data($0) })
        let config: [String: Any] = [
            "pebble": [
                "listenAddress": "[::1]:\(port)", "managementListenAddress": "[::1]:\(mgmt)",
                "certificate": dir + "/cert.pem", "privateKey": dir + "/key.pem",
                "httpPort": 5002, "tlsPort": 5001, "ocspResponderURL": "",
                "externalAccountBindingRequired": true, "externalAccountMACKeys": ["stoq-kid-1": mac],
            ] as [String: Any]
        ]
        try JSONSerialization.data(withJSONObject: config).write(to: URL(fileURLWithPath: dir + "/pebble.json"))
        // NONCEREJECT 25: pebble refuses a quarter of good nonces, which exercises the badNonce retry.
        let child = try Child(
            pebble, ["-config", dir + "/pebble.json"],
            env: [
                "PEBBLE_VA_ALWAYS_VALID": "1", "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "25",
                "PEBBLE_AUTHZREUSE": "0",
            ],
            output: dir + "/pebble.log")
        defer { child.stop() }

        var o = ACMEClient.Options()
        o.pollInterval = 0.1
        o.pollTimeout = 20
        o.maxAttempts = 8
        let directory = "https://[::1]:\(port)/dir"
        let trust = try String(contentsOfFile: dir + "/ca/root.pem", encoding: .utf8)
        try await waitForListener(port: port, child: child)

        let client = try ACMEClient(directoryURL: directory, trustRootsPEM: trust, options: o)
        defer { Task { await client.shutdown() } }
        // A wrong EAB MAC is refused by pebble too: our HS256 binding is what an independent server checks.
        let wrong = try ACMEClient(directoryURL: directory, trustRootsPEM: trust, options: o)
        defer { Task { await wrong.shutdown() } }
        do {
            try await wrong.register(eab: ExternalAccountBinding(kid: "stoq-kid-1", hmacKeyBase64URL: Base64URL.encode(Data(repeating: 7, count: 32))))
            Issue.record("pebble accepted a wrong EAB MAC")
        } catch let e as ACMEClientError {
            #expect(e.code == .problem, "\(e)")
        }

        let start = Date()
        let got = try await client.obtainCertificate(
            for: [.dns("node1.example"), .dns("www.node1.example"), .ip("::1")],
            eab: ExternalAccountBinding(kid: "stoq-kid-1", hmacKeyBase64URL: mac))
        let seconds = Date().timeIntervalSince(start)
        let s = CertificateSummary(got.chain[0])
        #expect(Set(s.dnsNames) == ["node1.example", "www.node1.example"])
        #expect(s.ipAddresses == ["::1"], "RFC 8738 IP identifier")
        #expect(s.issuer.contains("Pebble"), Comment(rawValue: s.issuer))
        let key = try P256.Signing.PrivateKey(pemRepresentation: got.privateKeyPEM)
        #expect(got.chain[0].publicKey == Certificate.PublicKey(key.publicKey))

        // The chain verifies against pebble's root, fetched from its management interface.
        var tlsConfig = TLSConfiguration.makeClientConfiguration()
        tlsConfig.trustRoots = .certificates(try NIOSSLCertificate.fromPEMBytes(Array(trust.utf8)))
        let http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: .init(tlsConfiguration: tlsConfig))
        defer { Task { try? await http.shutdown() } }
        let r = try await http.execute(HTTPClientRequest(url: "https://[::1]:\(mgmt)/roots/0"), timeout: .seconds(10))
        let rootPEM = String(buffer: try await r.body.collect(upTo: 1 << 20))
        let pebbleRoot = try Certificate(pemEncoded: rootPEM)
        _ = try await PeerVerifier(roots: [pebbleRoot]).verify(chain: got.chain, dnsName: "www.node1.example")

        try await client.revoke(got.chain[0])
        let nonceRetries = await client.badNonceRetries
        print(
            "pebble: certificate \(s.serial) for \((s.dnsNames + s.ipAddresses).joined(separator: ",")) in \(String(format: "%.2f", seconds)) s, \(nonceRetries) badNonce retries, revoked"
        )
    }

    @Test func legoAgainstSTOQServer() async throws {
        guard let lego = findExecutable("lego") else {
            print("SKIP testLegoAgainstSTOQServer: lego is not installed (Debian package `lego`; scripts/install-deps installs it)")
            try Test.cancel("lego is not installed (Debian package `lego`; run scripts/install-deps)")
        }
        let f = try await ACMEFixture.start()
        defer { Task { await f.stop() } }
        let eab = try f.addNode("legonode", dns: ["lego.example", "www.lego.example"])
        let scratch = try TemporaryDirectory("stoq-lego")
        defer { scratch.remove() }
        let work = scratch.path
        try f.rootPEM.write(toFile: work + "/root.pem", atomically: true, encoding: .utf8)
        let httpPort = try freeLoopbackPort()
        let start = Date()
        // --http is required by lego's CLI; its solver is never used because STOQ's
        // authorizations are already valid through the EAB key.
        let child = try Child(
            lego,
            [
                "--server", f.directoryURL, "--eab", "--kid", eab.kid, "--hmac", eab.hmacKeyBase64URL,
                "--email", "ops@lego.example", "--domains", "lego.example", "--domains", "www.lego.example",
                "--accept-tos", "--key-type", "ec256", "--http", "--http.port", "[::1]:\(httpPort)", "--path", work + "/lego", "run",
            ], env: ["LEGO_CA_CERTIFICATES": work + "/root.pem"], output: work + "/lego.log")
        let deadline = Date().addingTimeInterval(30)
        while child.process.isRunning && Date() < deadline { try await Task.sleep(nanoseconds: 100_000_000) }
        child.stop()
        let seconds = Date().timeIntervalSince(start)
        #expect(child.process.terminationStatus == 0, "lego failed:\n\(child.log)")
        let chain = try PEMFiles.readCertificates(work + "/lego/certificates/lego.example.crt")
        _ = try await PeerVerifier(roots: [f.authority.root]).verify(chain: chain, dnsName: "www.lego.example")
        #expect(Set(CertificateSummary(chain[0]).dnsNames) == ["lego.example", "www.lego.example"])
        let logSize = await f.server.transparencyLogSize
        #expect(logSize == 1)

        // lego asking for a name its EAB key does not allow fails, and the log does not grow.
        let bad = try Child(
            lego,
            [
                "--server", f.directoryURL, "--eab", "--kid", eab.kid, "--hmac", eab.hmacKeyBase64URL,
                "--email", "ops@lego.example", "--domains", "evil.example", "--accept-tos", "--key-type", "ec256",
                "--http", "--http.port", "[::1]:\(httpPort)", "--path", work + "/lego2", "run",
            ], env: ["LEGO_CA_CERTIFICATES": work + "/root.pem"], output: work + "/lego2.log")
        let deadline2 = Date().addingTimeInterval(30)
        while bad.process.isRunning && Date() < deadline2 { try await Task.sleep(nanoseconds: 100_000_000) }
        bad.stop()
        #expect(bad.process.terminationStatus != 0)
        #expect(bad.log.contains("rejectedIdentifier"), Comment(rawValue: bad.log))
        let logSize2 = await f.server.transparencyLogSize
        #expect(logSize2 == 1)
        print(
            "lego: certificate \(CertificateSummary(chain[0]).serial) for lego.example,www.lego.example from the STOQ ACME server in \(String(format: "%.2f", seconds)) s; evil.example refused (rejectedIdentifier)"
        )
    }

    /// Waits until something accepts TCP on [::1]:port, or fails with the child's output.
    private func waitForListener(port: UInt16, child: Child) async throws {
        let deadline = Date().addingTimeInterval(60)
        while Date() < deadline {
            guard child.process.isRunning else { Issue.record("exited early:\n\(child.log)"); try Test.cancel("child exited") }
            let fd = socket(AF_INET6, Int32(SOCK_STREAM.rawValue), 0)
            var sa = sockaddr_in6()
            sa.sin6_family = sa_family_t(AF_INET6)
            sa.sin6_addr = IPv6Address.loopback.in6
            sa.sin6_port = port.bigEndian
            let ok = withUnsafePointer(to: &sa) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) == 0 }
            }
            close(fd)
            if ok { return }
            try await Task.sleep(nanoseconds: 100_000_000)
        }
        Issue.record("nothing listened on [::1]:\(port) within 60 s:\n\(child.log)")
    }
}
