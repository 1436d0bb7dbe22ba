import Crypto
import Foundation
import Synchronization
import Logging
import STOQACME
import STOQConfig
import STOQCore
import STOQQUIC
import STOQTrust
import SwiftASN1
import X509

/// The node's TLS identity over time: issues the first certificate at start, renews it at
/// `cert_lifetime − renew_before` (jittered), and publishes each new one to the workers,
/// which swap it in between batches. Established connections keep the credentials their
/// session was made with; a failed renewal keeps the current certificate, logs, counts
/// and retries with backoff while it is still valid.
package final class CertificateManager: @unchecked Sendable {
    /// The credentials new handshakes should use, with a version the workers compare.
    package final class Published: @unchecked Sendable {
        private let lock = NSLock()
        /// Bumped with each publish, under the lock; read without it every turn.
        private let version = Atomic<Int>(0)
        private var credentials: TLSCredentials
        /// Called after each publish (set once at start): wakes the workers so that they
        /// take the new credentials at once rather than at their next turn.
        package var onPublish: (@Sendable () -> Void)?
        package init(_ c: TLSCredentials) { credentials = c }
        package func publish(_ c: TLSCredentials) {
            lock.withLock {
                credentials = c
                version.add(1, ordering: .releasing)
            }
            onPublish?()
        }
        /// The credentials if they changed since `seen` (which is updated). One atomic load
        /// when they did not.
        package func take(after seen: inout Int) -> TLSCredentials? {
            guard version.load(ordering: .acquiring) != seen else { return nil }
            return lock.withLock {
                seen = version.load(ordering: .relaxed)
                return credentials
            }
        }
        package var current: TLSCredentials { lock.withLock { credentials } }
    }

    /// What the rotation did, for metrics.
    package struct Counters: Sendable {
        package var rotations: UInt64 = 0
        package var failures: UInt64 = 0
        package var notAfter: Date = .distantPast
        /// The current certificate's start of validity.
        package var notBefore: Date = .distantPast
        package var serial = ""
        /// The embedded CA's root and intermediate ends (nil in ACME mode), so a dashboard can
        /// alert on a root nobody replaced or an intermediate that stopped being re-issued.
        package var rootNotAfter: Date?
        package var intermediateNotAfter: Date?
    }

    private var trustValue: NodeConfig.Trust
    private var clientAuthValue: ClientAuthentication?
    /// Lifetimes, mode and ACME settings (a reload may change them; the next renewal uses them).
    var trust: NodeConfig.Trust { state.withLock { trustValue } }
    /// What clients' certificates must satisfy (mutual TLS), applied to every credential made.
    var clientAuth: ClientAuthentication? { state.withLock { clientAuthValue } }
    /// The TLS suites every credential made accepts (`tls.cipher_suites`; nil: all).
    let cipherSuites: [String]?
    package let identityDirectory: String
    let caDirectory: String
    let names: [String]
    let addresses: [String]
    let logger: Logger
    /// The certificate clients should trust: the embedded CA's root, or the first chain.
    package private(set) var trustAnchorPath = ""
    package private(set) var published: Published!
    private let state = NSLock()
    /// Held while credentials are made from identity/ and published, by a renewal or a reload:
    /// a reload that read the files before a renewal wrote them would otherwise publish the old
    /// certificate over the new one (or a key that is not the certificate's).
    private let publishing = NSLock()
    private var counterValues = Counters()
    private let stopped = StopSignal()
    private let wake = StopSignal()

    package var counters: Counters { state.withLock { counterValues } }

    /// Renew for the key already in identity/ (its first issuance too, if one is there)
    /// instead of a new key each time: a mesh node's id is its key's hash, and its adverts
    /// must go on verifying under the same id with each new certificate. Set before `start`.
    package var keepsKey = false
    /// Called with each renewed chain (leaf first) once it is published; any thread may set it.
    package var onRenew: (@Sendable ([Certificate]) -> Void)? {
        get { state.withLock { onRenewValue } }
        set { state.withLock { onRenewValue = newValue } }
    }
    private var onRenewValue: (@Sendable ([Certificate]) -> Void)?

    /// The embedded CA's transparency log: every certificate is appended before it is used.
    package private(set) var log: CertificateLogService?

    package init(
        trust: NodeConfig.Trust, clientAuth: ClientAuthentication?, cipherSuites: [String]? = nil, dataDirectory: String,
        names: [String], addresses: [IPv6Address], logger: Logger
    ) {
        self.trustValue = trust
        self.clientAuthValue = clientAuth
        self.cipherSuites = cipherSuites
        self.identityDirectory = dataDirectory + "/identity"
        self.caDirectory = dataDirectory + "/trust"
        // Only what a certificate can name: valid DNS labels, and IPv6 (the node is IPv6 only).
        self.names = names.filter { n in
            n.split(separator: ".").allSatisfy { l in
                !l.isEmpty && l.count <= 63 && l.allSatisfy { $0.isLetter || $0.isNumber || $0 == "-" } && l.first != "-" && l.last != "-"
            }
        }
        self.addresses = addresses.map(\.description)
        self.logger = logger
    }

    /// Issues the first certificate (blocking) and starts the renewal thread. A replacement of
    /// identity/'s files that a crash cut short is finished first (`recoverIdentity`).
    package func start() throws -> TLSCredentials {
        try recoverIdentity()
        let creds = try install(try issue())
        published = Published(creds)
        let t = Thread { [self] in rotationLoop() }
        t.name = "stoq-cert-rotation"
        t.start()
        return creds
    }

    package func stop() {
        stopped.set()
        wake.set()
    }

    /// A reload: new trust settings take effect at the next renewal; new client-certificate
    /// rules at once (the current certificate is loaded again with them and published).
    /// A failure (the identity cannot be loaded with the new rules) changes nothing: the reload
    /// keeps the running configuration, and so does the manager.
    /// Waits for a renewal being installed and published (not for its issuance) to finish.
    package func update(trust: NodeConfig.Trust, clientAuth: ClientAuthentication?) throws {
        try publishing.withLock {
            let rulesChanged = state.withLock { clientAuthValue != clientAuth }
            let credentials =
                rulesChanged
                ? try TLSCredentials(
                    certificateFile: identityDirectory + "/cert.pem",
                    keyFile: identityDirectory + "/key.pem", clientAuth: clientAuth, cipherSuites: cipherSuites) : nil
            state.withLock {
                trustValue = trust
                clientAuthValue = clientAuth
            }
            if let credentials { published.publish(credentials) }
        }
        wake.set()
    }

    /// When to renew a certificate valid from `notBefore` to `notAfter`: `renew_before` ahead
    /// (a third of the lifetime by default), minus up to 10 % of that window at random, so that
    /// a fleet issued together does not renew together. A window as long as the certificate
    /// (an ACME CA that issues shorter ones than `cert_lifetime`) is a third of it instead:
    /// taken as it stood, every certificate would be due as it arrived, and renewed again and
    /// again without a pause.
    func renewalTime(notBefore: Date, notAfter: Date) -> Date {
        let lifetime = Double(trust.certLifetime) / 1e9
        let configured = trust.renewBefore > 0 ? Double(trust.renewBefore) / 1e9 : lifetime / 3
        let validity = notAfter.timeIntervalSince(notBefore)
        // With its jitter (up to a tenth more), the window must still leave a tenth of the
        // certificate's validity before it is due.
        let before = configured * 1.1 < validity * 0.9 ? configured : max(0, validity / 3)
        return notAfter.addingTimeInterval(-before - Double.random(in: 0...(before * 0.1)))
    }

    private func rotationLoop() {
        var backoff = RenewalBackoff()
        while !stopped.isSet {
            let c = counters
            let next = renewalTime(notBefore: c.notBefore, notAfter: c.notAfter)
            // A reload (new lifetimes) wakes the wait early, to compute the time again.
            if wake.wait(until: next) {
                if stopped.isSet { return }
                wake.reset()
                continue
            }
            do {
                // Issued without the lock (an ACME order may take minutes: a reload must not
                // wait on it), installed and published under it.
                let issued = try issue()
                try publishing.withLock { published.publish(try install(issued)) }
                onRenew?(issued.chain)
                backoff.reset()
            } catch {
                state.withLock { counterValues.failures += 1 }
                let left = counters.notAfter.timeIntervalSinceNow
                let wait = backoff.next(timeLeft: left)
                let standing =
                    left > 0
                    ? "the current one stays, valid for \(Int(left))s more"
                    : "the current one expired \(Int(-left))s ago; new handshakes fail until a renewal succeeds"
                logger.error("certificate renewal failed (\(standing)); next attempt in \(Int(wait))s: \(error)")
                if stopped.wait(until: Date().addingTimeInterval(wait)) { return }
            }
        }
    }

    /// A certificate issued (embedded CA or ACME) and its key, not yet installed.
    struct Issued {
        var chainPEM: String
        var keyPEM: String
        /// Leaf first.
        var chain: [Certificate]
    }

    /// Issues a certificate, by the embedded CA or ACME, for a new key or (`keepsKey`) the one
    /// in identity/. A kept key that is there but does not load fails the renewal (the current
    /// certificate stays, and it is retried): a new key would be a new node id.
    private func issue() throws -> Issued {
        let lifetime = Double(trust.certLifetime) / 1e9
        let keyPath = identityDirectory + "/key.pem"
        var kept: (key: P256.Signing.PrivateKey, pem: String)?
        // Once a certificate is out, a kept key that has gone is a failure too: a new one
        // would be a new id.
        if keepsKey && (published != nil || FileManager.default.fileExists(atPath: keyPath)) {
            do {
                let pem = try String(contentsOfFile: keyPath, encoding: .utf8)
                kept = (try PEMFiles.p256PrivateKey(pem: pem), pem)
            } catch {
                throw NodeError(.identity, "\(keyPath): the mesh node's key (its id) does not load: \(error)")
            }
        }
        switch trust.mode {
        case .acme:
            let issued = try acmeIssue(key: kept?.key)
            if trustAnchorPath.isEmpty { trustAnchorPath = trust.acme.ca.isEmpty ? identityDirectory + "/cert.pem" : trust.acme.ca }
            return issued
        case .embedded:
            let ca = try embeddedAuthority()
            if log == nil { log = try CertificateLogService(caDirectory: caDirectory, logger: logger) }
            trustAnchorPath = caDirectory + "/" + TrustAuthority.FileName.rootCertificate
            // Logged (as a precertificate) before it exists; the SCT is embedded.
            if let kept {
                let cert = try ca.issue(
                    publicKey: Certificate.PublicKey(kept.key.publicKey), dnsNames: names, ipv6Addresses: addresses,
                    lifetime: lifetime, log: log!)
                return Issued(chainPEM: try PEMFiles.pem([cert, ca.intermediate]), keyPEM: kept.pem, chain: [cert, ca.intermediate])
            }
            let issued = try ca.issueWithNewKey(dnsNames: names, ipv6Addresses: addresses, lifetime: lifetime, log: log!)
            return Issued(chainPEM: issued.chainPEM, keyPEM: issued.keyPEM, chain: [issued.certificate, ca.intermediate])
        }
    }

    /// Brings identity/'s chain and key back to one whole pair, old or new, after a crash in the
    /// middle of replacing them (`PEMFiles.recoverReplacement`), and logs what it found and did:
    /// the key a mesh node keeps (its id) and any reload must be the certificate's, and the
    /// copies a replacement keeps beside them must not pile up.
    private func recoverIdentity() throws {
        let files = [identityDirectory + "/cert.pem", identityDirectory + "/key.pem"]
        do {
            for r in try PEMFiles.recoverReplacement(of: files) {
                logger.warning("identity files recovered: \(r)", metadata: ["directory": "\(identityDirectory)"])
            }
        } catch let e as TrustError {
            throw NodeError(.identity, "\(e.message) (finishing a replacement of \(files.joined(separator: " and ")) a crash cut short)")
        }
    }

    /// Writes an issued chain and key under identity/ as one change, and loads them. Both are
    /// written and fsync'd before either replaces its file, and a failed rename puts back the
    /// one already replaced (`PEMFiles.replaceFiles`): a full disk between the two must not leave
    /// a new key beside the old certificate, which neither this node nor a reload could load.
    private func install(_ issued: Issued) throws -> TLSCredentials {
        let (chainPEM, keyPEM, leaf) = (issued.chainPEM, issued.keyPEM, issued.chain[0])
        try FileManager.default.createDirectory(
            atPath: identityDirectory, withIntermediateDirectories: true,
            attributes: [.posixPermissions: 0o700])
        do {
            try PEMFiles.replaceFiles([
                (chainPEM, identityDirectory + "/cert.pem", 0o644), (keyPEM, identityDirectory + "/key.pem", 0o600),
            ])
        } catch let e as TrustError {
            throw NodeError(.identity, e.message)
        }
        let creds = try TLSCredentials(
            certificateFile: identityDirectory + "/cert.pem", keyFile: identityDirectory + "/key.pem",
            clientAuth: clientAuth, cipherSuites: cipherSuites)
        let serial = CertificateSummary.hex(leaf.serialNumber)
        state.withLock {
            counterValues.rotations += 1
            counterValues.notAfter = leaf.notValidAfter
            counterValues.notBefore = leaf.notValidBefore
            counterValues.serial = serial
        }
        logger.notice(
            "certificate issued",
            metadata: [
                "serial": "\(serial)", "not_after": "\(leaf.notValidAfter)", "mode": "\(trust.mode)",
                "renews_at": "\(renewalTime(notBefore: leaf.notValidBefore, notAfter: leaf.notValidAfter))",
            ])
        return creds
    }

    /// The node's CA, created on first use. Loaded again for each renewal, which is when its
    /// own lifetimes are looked after: the intermediate is re-issued from the root a month
    /// before it ends (`TrustAuthority.renewIntermediateIfDue`) — without that, every renewal
    /// failed from three years after the CA was made — and a root with under half a year left
    /// is warned about at every renewal. Neither stops the node's own certificate: a failed
    /// re-issue is logged and the certificate is issued to end with the intermediate.
    private func embeddedAuthority() throws -> TrustAuthority {
        let root = caDirectory + "/" + TrustAuthority.FileName.rootCertificate
        var ca: TrustAuthority
        if FileManager.default.fileExists(atPath: root) {
            ca = try TrustAuthority.load(from: caDirectory)
        } else {
            logger.notice("creating the node's TrustChain CA under \(caDirectory)")
            ca = try TrustAuthority.create(in: caDirectory)
        }
        let before = ca.intermediate.notValidAfter
        do {
            if let renewed = try ca.renewIntermediateIfDue() {
                ca = renewed
                logger.notice(
                    "intermediate CA re-issued from the root (same key)",
                    metadata: [
                        "file": "\(caDirectory)/\(TrustAuthority.FileName.intermediateCertificate)",
                        "serial": "\(CertificateSummary.hex(ca.intermediate.serialNumber))",
                        "old_not_after": "\(before)", "not_after": "\(ca.intermediate.notValidAfter)",
                    ])
            }
        } catch {
            logger.error("intermediate CA not re-issued: \(error)")
        }
        if let warning = ca.rootExpiryWarning() { logger.critical("\(warning)") }
        state.withLock {
            counterValues.rootNotAfter = ca.root.notValidAfter
            counterValues.intermediateNotAfter = ca.intermediate.notValidAfter
        }
        return ca
    }

    /// One ACME issuance, run to completion on this thread (the control plane's, never a worker's).
    private func acmeIssue(key: P256.Signing.PrivateKey?) throws -> Issued {
        let a = trust.acme
        let roots = a.ca.isEmpty ? nil : try String(contentsOfFile: a.ca, encoding: .utf8)
        let identifiers = names.map(ACMEIdentifier.dns) + addresses.map(ACMEIdentifier.ip)
        let eab = a.eabKid.isEmpty ? nil : ExternalAccountBinding(kid: a.eabKid, hmacKeyBase64URL: a.eabHmacKey)
        let client = try ACMEClient(directoryURL: a.directory, trustRootsPEM: roots, logger: logger)
        let result = ResultBox()
        let done = DispatchSemaphore(value: 0)
        let keyBytes = key?.rawRepresentation  // the key crosses into the task as bytes
        Task {
            do {
                let kept = try keyBytes.map { try P256.Signing.PrivateKey(rawRepresentation: $0) }
                result.value = .success(try await client.obtainCertificate(for: identifiers, eab: eab, key: kept))
            } catch {
                result.value = .failure(error)
            }
            await client.shutdown()
            done.signal()
        }
        done.wait()
        let issued = try result.value!.get()
        return Issued(chainPEM: issued.chainPEM, keyPEM: issued.privateKeyPEM, chain: issued.chain)
    }

    final class ResultBox: @unchecked Sendable { var value: Result<ACMEIssuedCertificate, Error>? }
}

/// How long the rotation waits after a failed renewal: exponential, from `floor` to
/// `ceiling`, and while the certificate is valid at most a tenth of the time it has left, or
/// the floor when that is less, so one with little left is retried more often — and one with
/// under five minutes left every 30 s, not after its end. Once it has expired the backoff
/// alone decides: a tenth of what is left, applied there, was a retry every second, forever —
/// in ACME mode a whole order each time, which a public CA's rate limits answer with a ban,
/// and an error line each time. The floor holds from the first retry: one order per 30 s at
/// most.
struct RenewalBackoff {
    /// The shortest wait: a failure seconds ago is rarely cured yet, and an ACME order costs.
    static let floor: TimeInterval = 30
    /// The longest wait: an expired certificate is an outage, so not much longer than this.
    static let ceiling: TimeInterval = 300
    private var delay = RenewalBackoff.floor

    /// The wait before the next attempt, `timeLeft` seconds before the certificate's end
    /// (negative once past it); each call doubles the next, up to `ceiling`.
    mutating func next(timeLeft: TimeInterval) -> TimeInterval {
        let wait = timeLeft > 0 ? min(delay, max(Self.floor, timeLeft / 10)) : delay
        delay = min(delay * 2, Self.ceiling)
        return wait
    }

    /// After a success: the next failure starts again at the floor.
    mutating func reset() { delay = Self.floor }
}

/// A stop signal a thread can sleep on until a deadline.
final class StopSignal: @unchecked Sendable {
    private let cond = NSCondition()
    private var set_ = false
    var isSet: Bool { cond.withLock { set_ } }
    func set() {
        cond.withLock {
            set_ = true; cond.broadcast()
        }
    }
    func reset() { cond.withLock { set_ = false } }
    /// Sleeps until `deadline` or the signal; returns whether the signal came.
    func wait(until deadline: Date) -> Bool {
        cond.withLock {
            while !set_ && Date() < deadline { _ = cond.wait(until: deadline) }
            return set_
        }
    }
}
