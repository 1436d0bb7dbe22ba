import Foundation
import Logging
@testable import STOQAdmin
import STOQConfig
import STOQTrust
import STOQTestSupport
import Testing
import X509

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

    /// A crash in the middle of a renewal's install left the new certificate beside the old key
    /// (and the copies kept aside, which nothing removed): the next start puts the old pair back
    /// before anything reads the key (a mesh node's id), says so in its log, and leaves no copy.
    @Test func aStartFinishesAnInstallACrashCutShort() throws {
        let dir = NSTemporaryDirectory() + "stoq-recover-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var trust = NodeConfig.default.trust
        trust.certLifetime = 3_600_000_000_000
        func manager(_ logger: Logger) -> CertificateManager {
            let m = CertificateManager(
                trust: trust, clientAuth: nil, dataDirectory: dir, names: ["n.test"], addresses: [], logger: logger)
            m.keepsKey = true
            return m
        }
        let first = manager(Logger(label: "test"))
        _ = try first.start()
        first.stop()
        let identity = dir + "/identity", cert = dir + "/identity/cert.pem", key = dir + "/identity/key.pem"
        let keptKey = try String(contentsOfFile: key, encoding: .utf8)
        let other = try EmbeddedIdentity.makeSelfSigned(names: ["n.test"], addresses: [])
        #expect(throws: PEMFiles.ReplaceStopped(step: .renamed(0))) {
            try PEMFiles.replaceFiles([(other.certificate, cert, 0o644), (other.key, key, 0o600)], stop: { $0 == .renamed(0) })
        }
        let log = LogCapture()
        let second = manager(log.logger)
        _ = try second.start()
        second.stop()
        #expect(try String(contentsOfFile: key, encoding: .utf8) == keptKey)
        let leaf = try PEMFiles.readCertificates(cert)[0]
        #expect(leaf.publicKey == Certificate.PublicKey(try PEMFiles.p256PrivateKey(pem: keptKey).publicKey))
        #expect(try FileManager.default.contentsOfDirectory(atPath: identity).sorted() == ["cert.pem", "key.pem"])
        let warnings = log.messages(atLeast: .warning)
        #expect(
            warnings.contains {
                $0.hasPrefix(
                    "identity files recovered: replacing cert.pem, key.pem was cut short before every new file was in place: the old set is back; cleared ")
            }, "\(warnings)")
    }

    /// The waits after failed renewals, on a manual clock. They were `min(backoff, max(1,
    /// left / 10))`: a second apart once the certificate had expired (and seconds apart just
    /// before), forever — an ACME order and an error line each time. Now 30 s doubling to
    /// 5 min, capped by a tenth of the time left only while that is above the floor.
    @Test func failedRenewalsBackOffAndNeverSpinOnceExpired() {
        var now = Date(timeIntervalSince1970: 1_800_000_000)
        let notAfter = now + 3600  // renewals start failing with an hour left
        var backoff = RenewalBackoff()
        var waits: [(left: TimeInterval, wait: TimeInterval)] = []
        while now < notAfter + 3 * 3600 {
            let left = notAfter.timeIntervalSince(now)
            let wait = backoff.next(timeLeft: left)
            waits.append((left, wait))
            now += wait
        }
        #expect(waits.allSatisfy { $0.wait >= 30 && $0.wait <= 300 }, "\(waits.map(\.wait))")
        #expect(waits.prefix(5).map(\.wait) == [30, 60, 120, 240, 300])
        // While valid, a tenth of what is left caps the wait, or the floor when that is less:
        // the last minutes before the end are tried every 30 s, not skipped.
        #expect(waits.filter { $0.left > 0 }.allSatisfy { $0.wait <= max(30, $0.left / 10) }, "\(waits)")
        // Expired: one attempt per 5 min — 36 in three hours, where there were 10,800.
        let expired = waits.filter { $0.left <= 0 }
        #expect(!expired.isEmpty && expired.allSatisfy { $0.wait == 300 })
        #expect(expired.count <= 37, "\(expired.count) attempts in the three hours after expiry")

        // A run of failures that starts after expiry (or after a success) still grows from the floor.
        backoff.reset()
        var afterExpiry: [TimeInterval] = []
        for _ in 0..<6 { afterExpiry.append(backoff.next(timeLeft: -100)) }
        #expect(afterExpiry == [30, 60, 120, 240, 300, 300])
        // Seconds before the end, no longer a tenth of what is left.
        backoff.reset()
        let nearTheEnd = backoff.next(timeLeft: 20)
        #expect(nearTheEnd == 30)
        // A backoff grown to its ceiling, with 290 s left: the next try comes in 30 s, before the
        // end, not 300 s later (after it).
        for _ in 0..<6 { _ = backoff.next(timeLeft: -1) }
        #expect(backoff.next(timeLeft: 290) == 30)
    }

    /// A node whose CA was made 50 days ago with a 60-day intermediate (the 3-year default,
    /// shortened): its renewal re-issues the intermediate from the root, persists it, logs it,
    /// and serves the new one in its chain.
    @Test func theNodesCAReissuesItsIntermediateBeforeItRunsOut() throws {
        let dir = NSTemporaryDirectory() + "stoq-intermediate-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let day = 86400.0
        let ca = try TrustAuthority.create(in: dir + "/trust", now: Date() - 50 * day, intermediateLifetime: 60 * day)
        let lines = LogCapture()
        var trust = NodeConfig.default.trust
        trust.certLifetime = 24 * 3_600_000_000_000
        let m = CertificateManager(
            trust: trust, clientAuth: nil, dataDirectory: dir, names: ["n.test"], addresses: [],
            logger: Logger(label: "test", factory: { _ in lines }))
        _ = try m.start()
        m.stop()
        let onDisk = try PEMFiles.readCertificates(dir + "/trust/intermediate.pem")[0]
        #expect(onDisk.publicKey == ca.intermediate.publicKey && onDisk.serialNumber != ca.intermediate.serialNumber)
        #expect(abs(onDisk.notValidAfter.timeIntervalSinceNow - 60 * day) < 60)
        let chain = try PEMFiles.readCertificates(dir + "/identity/cert.pem")
        #expect(chain.count == 2 && chain[1] == onDisk)
        #expect(chain[0].notValidAfter.timeIntervalSinceNow > 23 * 3600)
        #expect(m.counters.intermediateNotAfter == onDisk.notValidAfter && m.counters.rootNotAfter == ca.root.notValidAfter)
        #expect(lines.messages().contains { $0.hasPrefix("intermediate CA re-issued from the root") })
        // Both ends reach the admin API, to alert on.
        let c = m.counters
        let text = NodeMetrics(
            workers: [], store: nil,
            certificate: .init(
                rotations: c.rotations, failures: c.failures, notAfter: c.notAfter, rootNotAfter: c.rootNotAfter,
                intermediateNotAfter: c.intermediateNotAfter),
            edge: nil
        ).prometheus()
        #expect(text.contains("\nstoq_trust_ca_not_after_seconds{ca=\"root\"} \(Int(ca.root.notValidAfter.timeIntervalSince1970))\n"))
        #expect(text.contains("\nstoq_trust_ca_not_after_seconds{ca=\"intermediate\"} \(Int(onDisk.notValidAfter.timeIntervalSince1970))\n"))
    }
}
