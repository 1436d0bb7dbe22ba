import Foundation
import STOQTestSupport
import STOQACME
import STOQCore
import STOQTrust
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A CA in a temporary directory with a STOQ ACME server on [::1] (a free port), TLS by a
/// certificate the CA issued for localhost and ::1. The directory goes with the last copy of the
/// fixture: after the test, or after the task its `defer { Task { await f.stop() } }` starts has
/// stopped the servers, so nothing is still writing there.
struct ACMEFixture {
    let directory: TemporaryDirectory
    let authority: TrustAuthority
    let server: ACMEServer
    let https: ACMEHTTPSServer
    let rootPEM: String

    var dir: String { directory.path }
    var directoryURL: String { "https://[::1]:\(https.localAddress.port)/directory" }

    static func start(lifetime: TimeInterval = 3600) async throws -> ACMEFixture {
        let directory = try TemporaryDirectory("stoq-acme")
        let dir = directory.path
        let ca = try TrustAuthority.create(in: dir + "/ca")
        let tls = try ca.issueWithNewKey(dnsNames: ["localhost"], ipv6Addresses: ["::1"])
        var config = ACMEServer.Configuration()
        config.certificateLifetime = lifetime
        let server = try ACMEServer(caDirectory: dir + "/ca", configuration: config)
        let https = try await ACMEHTTPSServer.start(
            server: server, address: IPv6Endpoint(address: .loopback, port: 0),
            certificateChainPEM: tls.chainPEM, keyPEM: tls.keyPEM)
        let rootPEM = try String(contentsOfFile: dir + "/ca/root.pem", encoding: .utf8)
        return ACMEFixture(directory: directory, authority: ca, server: server, https: https, rootPEM: rootPEM)
    }

    var caDirectory: String { dir + "/ca" }

    func addNode(_ name: String, dns: [String] = [], ip: [String] = []) throws -> ExternalAccountBinding {
        let k = try ExternalAccountKeyStore(caDirectory: caDirectory).add(name: name, dnsNames: dns, ipAddresses: ip)
        return ExternalAccountBinding(kid: k.kid, hmacKeyBase64URL: k.hmacKey)
    }

    func client() throws -> ACMEClient {
        var o = ACMEClient.Options()
        o.pollInterval = 0.05
        o.pollTimeout = 10
        return try ACMEClient(directoryURL: directoryURL, trustRootsPEM: rootPEM, options: o)
    }

    func stop() async {
        await https.shutdown()
        await server.close()
    }
}

/// A TCP port on [::1] that was free a moment ago (for servers the test starts as processes).
func freeLoopbackPort() throws -> UInt16 {
    let fd = socket(AF_INET6, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { try Test.cancel("cannot open a socket") }
    defer { close(fd) }
    var sa = sockaddr_in6()
    sa.sin6_family = sa_family_t(AF_INET6)
    sa.sin6_addr = IPv6Address.loopback.in6
    var len = socklen_t(MemoryLayout<sockaddr_in6>.size)
    let ok = withUnsafeMutablePointer(to: &sa) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 }
    }
    guard ok else { try Test.cancel("cannot bind [::1]:0") }
    return UInt16(bigEndian: sa.sin6_port)
}

/// The full path of `name` on PATH, or nil.
func findExecutable(_ name: String) -> String? {
    for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
        let p = "\(dir)/\(name)"
        if FileManager.default.isExecutableFile(atPath: p) { return p }
    }
    return nil
}

/// Asserts that `body` throws an ACME problem of type `code` whose detail contains `detail`.
func assertProblem(
    _ code: ACMEProblem.Code, detailContains detail: String? = nil, sourceLocation: SourceLocation = #_sourceLocation,
    _ body: () async throws -> Void
) async {
    do {
        try await body()
        Issue.record("expected \(code), but it succeeded", sourceLocation: sourceLocation)
    } catch let e as ACMEClientError {
        guard let p = e.problem else { Issue.record("expected \(code), got \(e)", sourceLocation: sourceLocation); return }
        #expect(p.code == code, "\(p)", sourceLocation: sourceLocation)
        if let detail { #expect(p.detail.contains(detail), "detail \"\(p.detail)\" lacks \"\(detail)\"", sourceLocation: sourceLocation) }
    } catch {
        Issue.record("expected \(code), got \(error)", sourceLocation: sourceLocation)
    }
}
