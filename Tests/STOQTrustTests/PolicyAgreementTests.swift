import Foundation
import STOQCore
import STOQQUIC
import STOQTestSupport
import Testing
import X509
@testable import STOQTrust

/// Records how a handshake ended, on one side.
final class HandshakeRecorder: QUICApplication {
    var established = false
    var closedReason: String?
    func handshakeCompleted(connection: QUICConnection) { established = true }
    func connectionClosed(connection: QUICConnection, reason: String) { closedReason = reason }
}

/// The same certificate sets judged by `stoq trust verify`'s code path and by the live
/// handshake (the real C/GnuTLS shim, two QUIC endpoints in memory): identical verdicts and
/// identical words, and the verdict each case is built to get.
@Suite struct PolicyAgreementTests {
    static let cases: [PolicyCase] = {
        do { return try PolicyCases.all(.server) + PolicyCases.all(.client) } catch { fatalError("building the cases: \(error)") }
    }()

    /// What `stoq trust verify` does: the chain from a PEM file as DER, the name as --dns or --ip.
    static func cliVerdict(_ c: PolicyCase, dir: String) throws -> String? {
        let path = dir + "/verify.pem"
        try PEMFiles.pem(c.chain).write(toFile: path, atomically: true, encoding: .utf8)
        let der = try PEMFiles.readCertificateDER(path)
        var dns: String?, ip: String?
        if let n = c.serverName {
            if IPv6Address(n) != nil { ip = n } else { dns = n }
        }
        do {
            _ = try c.verifier.verify(derChain: der, dnsName: dns, ipv6Address: ip)
            return nil
        } catch {
            return error.description
        }
    }

    /// The live handshake's verdict: the judged peer presents the chain; the other end runs the
    /// policy inside the TLS verify callback. Returns "code: message" as the refusal is logged.
    static func handshakeVerdict(_ c: PolicyCase, dir: String) throws -> String? {
        let chainPath = dir + "/peer.pem", keyPath = dir + "/peer.key"
        try PEMFiles.pem(c.chain).write(toFile: chainPath, atomically: true, encoding: .utf8)
        try c.keyPEM.write(toFile: keyPath, atomically: true, encoding: .utf8)
        let policy = PeerCertificateCheck(identity: c.verifier.fingerprint, c.verifier.refusal)
        let pair: EndpointPair
        let node = try TestIdentity()
        defer { node.remove() }
        switch c.role {
        case .server:
            pair = try EndpointPair(
                serverCredentials: TLSCredentials(certificateFile: chainPath, keyFile: keyPath),
                clientCredentials: TLSCredentials(policy: policy))
        case .client:
            // The node: a pinned self-signed identity, and client certificates judged by the policy.
            let trustNode = PeerVerifier(roots: try PEMFiles.readCertificates(node.identity.certificatePath))
            pair = try EndpointPair(
                serverCredentials: TLSCredentials(
                    certificateFile: node.identity.certificatePath, keyFile: node.identity.keyPath,
                    clientAuth: ClientAuthentication(mode: .required, policy: policy)),
                clientCredentials: TLSCredentials(
                    policy: PeerCertificateCheck(identity: trustNode.fingerprint, trustNode.refusal),
                    certificateFile: chainPath, keyFile: keyPath))
        }
        let serverApp = HandshakeRecorder(), clientApp = HandshakeRecorder()
        pair.server.application = serverApp
        pair.client.application = clientApp
        _ = try pair.connect(serverName: c.serverName ?? "fd00::1")
        let judge = c.role == .server ? clientApp : serverApp
        pair.run(for: 5_000_000_000) { judge.established || judge.closedReason != nil }
        if judge.established { return nil }
        let reason = judge.closedReason ?? "no verdict within 5 s of simulated time"
        let prefix = c.role == .server ? "TLS handshake failed: peer certificate refused: " : "client certificate refused: "
        guard reason.hasPrefix(prefix) else { return "not a certificate verdict: \(reason)" }
        return String(reason.dropFirst(prefix.count))
    }

    static func withoutClock(_ s: String) -> String {
        s.replacingOccurrences(of: #" \(now [0-9TZ:-]+\)"#, with: "", options: .regularExpression)
    }

    @Test(arguments: cases)
    func handshakeAndTrustVerifyAgree(_ c: PolicyCase) throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let cli = try Self.cliVerdict(c, dir: dir.path)
        if c.unpresentable {
            // GnuTLS cannot sign a handshake with this certificate, so no GnuTLS peer can present
            // it: loading it fails, naming why, rather than a silent anonymous handshake.
            let e = #expect(throws: TLSError.self) { try Self.handshakeVerdict(c, dir: dir.path) }
            #expect(e?.message.hasSuffix("keyUsage lacks digitalSignature, so it cannot sign a TLS 1.3 handshake") == true)
        } else {
            let live = try Self.handshakeVerdict(c, dir: dir.path)
            // The clock is in an expiry message ("now …"); everything else must be identical.
            #expect(live.map(Self.withoutClock) == cli.map(Self.withoutClock))
        }
        #expect(cli.map { String($0.prefix(while: { $0 != ":" })) } == c.expected?.rawValue, "\(cli ?? "accepted")")
        if let m = c.messageContains {
            #expect(cli?.contains(m) == true, "\(cli ?? "accepted")")
        }
    }

    /// Both roles use one depth limit, and it is the CLI's default.
    @Test func oneDepthLimitForBothRoles() {
        #expect(PeerVerifier(roots: [], role: .server).maxChainLength == PeerVerifier(roots: [], role: .client).maxChainLength)
        #expect(PeerVerifier.defaultMaxChainLength == 4)
    }
}
