import Foundation
import Logging
import STOQConfig
import Testing

@testable import STOQRenewal

/// When a certificate is renewed: `renew_before` (a third of `cert_lifetime` by default) ahead
/// of its end, jittered by up to a tenth of that window.
@Suite struct RenewalScheduleTests {
    func manager(_ mode: NodeConfig.Trust.Mode) -> CertificateManager {
        var trust = NodeConfig.default.trust
        trust.mode = mode
        trust.certLifetime = 24 * 3_600_000_000_000
        return CertificateManager(
            trust: trust, clientAuth: nil, dataDirectory: "/nonexistent", names: ["n.test"], addresses: [], logger: Logger(label: "test"))
    }

    /// An ACME CA that issues 6 h certificates to a node whose own window is 8 h (a third of
    /// 24 h): every certificate was due as it arrived, and the node ran one order after
    /// another without a pause. The window is now a third of what the CA issued.
    @Test func aCertificateShorterThanTheWindowIsRenewedAThirdBeforeItsEnd() {
        let start = Date(timeIntervalSince1970: 1_800_000_000), hour = 3600.0
        let acme = manager(.acme)
        let short = acme.renewalTime(notBefore: start, notAfter: start + 6 * hour)
        #expect(short >= start + 6 * hour - 2.2 * hour && short <= start + 4 * hour, "\(short.timeIntervalSince(start) / hour) h")
        // Just longer than the window (a CA's 8 h and a minute's backdate): with the jitter it
        // would still be due on arrival, so a third too.
        let near = acme.renewalTime(notBefore: start, notAfter: start + 8 * hour + 60)
        #expect(near >= start + 8 * hour + 60 - 8.01 / 3 * 1.1 * hour && near > start + 5 * hour, "\(near.timeIntervalSince(start) / hour) h")
        // The configured window still rules where it fits.
        let full = acme.renewalTime(notBefore: start, notAfter: start + 24 * hour)
        #expect(full >= start + 24 * hour - 8.8 * hour && full <= start + 16 * hour, "\(full.timeIntervalSince(start) / hour) h")
    }

    /// A mesh node keeps its key (its id) across renewals: the certificate renews for the key
    /// in identity/, and one that is there but does not load fails the renewal rather than
    /// make a new key (a new id, and a TLS key its mesh id no longer matches).
    @Test func aKeptKeyIsRenewedForAndABrokenOneIsNotReplaced() throws {
        let dir = NSTemporaryDirectory() + "stoq-keep-key-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var trust = NodeConfig.default.trust
        trust.certLifetime = 3_600_000_000_000
        func manager() -> CertificateManager {
            let m = CertificateManager(
                trust: trust, clientAuth: nil, dataDirectory: dir, names: ["n.test"], addresses: [], logger: Logger(label: "test"))
            m.keepsKey = true
            return m
        }
        let first = manager()
        _ = try first.start()
        first.stop()
        let key = try String(contentsOfFile: dir + "/identity/key.pem", encoding: .utf8)
        let serial = first.counters.serial
        let second = manager()
        _ = try second.start()
        second.stop()
        #expect(try String(contentsOfFile: dir + "/identity/key.pem", encoding: .utf8) == key)
        #expect(second.counters.serial != serial)
        try "not a key\n".write(toFile: dir + "/identity/key.pem", atomically: true, encoding: .utf8)
        #expect(throws: (any Error).self) { _ = try manager().start() }
        #expect(try String(contentsOfFile: dir + "/identity/key.pem", encoding: .utf8) == "not a key\n")
    }
}
