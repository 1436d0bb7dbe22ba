import ArgumentParser
import Crypto
import Foundation
import Logging
import STOQACME
import STOQAccess
import STOQConfig
import STOQCore
import STOQTrust
import X509

/// `stoq trust …`: the TrustChain certificate authority and certificate checks.
struct TrustCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "trust",
        abstract: "TrustChain: create a certificate authority, issue node certificates, inspect and verify them.",
        subcommands: [Init.self, Issue.self, Token.self, Show.self, Verify.self, AddNode.self, Serve.self, ACMEIssue.self, Audit.self])

    struct Init: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a root and an intermediate CA (ECDSA P-256) under a directory.",
            discussion: """
                Writes root.pem (the bundle peers trust), root-key.pem, intermediate.pem and \
                intermediate-key.pem (keys mode 0600, directory 0700). Issuing never reads \
                root-key.pem: move it offline once the intermediate exists. Never overwrites.

                Example: stoq trust init --dir /etc/stoq/ca
                """)
        @Option(help: "Directory for the authority's files (created if missing).") var dir: String
        @Option(help: "Organization name in the CA subjects.") var name = "STOQ"

        func run() throws {
            let ca: TrustAuthority
            do { ca = try TrustAuthority.create(in: dir, name: name) } catch { throw fail("\(error)") }
            print("root:         \(dir)/\(TrustAuthority.FileName.rootCertificate)  (\(ca.root.subject); give this to peers as --bundle)")
            print("intermediate: \(dir)/\(TrustAuthority.FileName.intermediateCertificate)  (\(ca.intermediate.subject))")
            print("root key:     \(dir)/\(TrustAuthority.FileName.rootKey)  (move offline; issuing does not need it)")
        }
    }

    struct Issue: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Issue a node certificate signed by the intermediate CA.",
            discussion: """
                SANs are DNS names and IPv6 addresses only (IPv4 is refused). The certificate \
                allows serverAuth and clientAuth. --out gets the chain (node, then intermediate); \
                without --csr a new P-256 key is written to --key-out (mode 0600). The precertificate \
                is appended to <dir>/transparency.log first and the certificate embeds the log's SCT \
                (a node serving this CA's log sees the entry at its next request).

                Example: stoq trust issue --dir ca --dns node1.example --ip 2001:db8::1 --lifetime 24h --out cert.pem --key-out key.pem

                --role writer|reader|admin (repeatable) adds the SAN URI urn:stoq:role:<role>: a node \
                with network.client_auth on grants the certificate's holder that role (docs/access.md). \
                With roles and no --dns/--ip the certificate is a client's: clientAuth only, subject \
                CN=--name. Example: stoq trust issue --dir stoq-data/trust --role writer --name alice \
                --out alice.pem --key-out alice-key.pem
                """)
        @Option(help: "The authority's directory (from `stoq trust init`).") var dir: String
        @Option(help: "A DNS name for the certificate (repeatable).") var dns: [String] = []
        @Option(help: "An IPv6 address for the certificate (repeatable).") var ip: [String] = []
        @Option(help: "An access role the certificate grants: writer, reader or admin (repeatable).") var role: [String] = []
        @Option(help: "The subject's common name (default: the first DNS name or address, or \"stoq client\").") var name: String?
        @Option(help: "Validity, e.g. 1h, 24h, 7d.") var lifetime = "24h"
        @Option(help: "Certify the key in this PEM CSR instead of generating one.") var csr: String?
        @Option(help: "Write the certificate chain here.") var out: String
        @Option(name: .customLong("key-out"), help: "Write the new private key here (not with --csr).") var keyOut: String?

        func validate() throws {
            if csr == nil && keyOut == nil { throw ValidationError("--key-out is required unless --csr is given") }
            if csr != nil && keyOut != nil { throw ValidationError("--key-out makes no sense with --csr: the key stays with the requester") }
            guard let ns = Units.duration(lifetime), ns >= 1_000_000_000 else {
                throw ValidationError("--lifetime \(lifetime): expected a duration of at least 1s, e.g. 1h, 24h, 7d")
            }
            _ = ns
            for r in role where AccessRole(rawValue: r) == nil {
                throw ValidationError("--role \(r): expected writer, reader or admin")
            }
        }

        func run() throws {
            let seconds = TimeInterval(Units.duration(lifetime)!) / 1e9
            let uris = role.compactMap(AccessRole.init(rawValue:)).map(CertificateIdentity.uri(for:))
            do {
                var ca = try TrustAuthority.load(from: dir)
                // An intermediate near its end is re-issued here as a node does; one that cannot
                // be (root key offline) only clamps the certificate, and says why.
                do {
                    if let renewed = try ca.renewIntermediateIfDue() {
                        ca = renewed
                        FileHandle.standardError.write(
                            Data("stoq: re-issued \(dir)/intermediate.pem from the root (same key), valid until \(ca.intermediate.notValidAfter)\n".utf8))
                    }
                } catch {
                    FileHandle.standardError.write(Data("stoq: warning: \(error)\n".utf8))
                }
                if let warning = ca.rootExpiryWarning() { FileHandle.standardError.write(Data("stoq: warning: \(warning)\n".utf8)) }
                // The CA's own log: the precertificate is logged before the certificate exists.
                let log = try openAuthorityLog(caDirectory: dir)
                let cert: Certificate
                if let csr {
                    cert = try ca.issue(
                        csr: try PEMFiles.readCSR(csr), dnsNames: dns, ipv6Addresses: ip, uris: uris, commonName: name,
                        lifetime: seconds, log: log)
                    try PEMFiles.writeFile(try PEMFiles.pem([cert, ca.intermediate]), to: out, mode: 0o644)
                } else {
                    let issued = try ca.issueWithNewKey(
                        dnsNames: dns, ipv6Addresses: ip, uris: uris, commonName: name, lifetime: seconds, log: log)
                    cert = issued.certificate
                    try PEMFiles.writeFile(issued.keyPEM, to: keyOut!, mode: 0o600)
                    try PEMFiles.writeFile(issued.chainPEM, to: out, mode: 0o644)
                }
                let s = CertificateSummary(cert)
                let names = s.dnsNames.map { "DNS:\($0)" } + s.ipAddresses.map { "IP:\($0)" } + uris.map { "URI:\($0)" }
                print("issued \(s.serial) for \(names.joined(separator: ", ")), valid until \(iso(s.notAfter)) -> \(out) (log entry \(log.size - 1))")
            } catch { throw fail("\(error)") }
        }
    }

    struct Token: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Issue a bearer token (compact JWS, ES256) a node accepts as a credential.",
            discussion: """
                Signs with --key: a node's own data_dir/access/token-key.pem (tokens it always \
                accepts), or another key a node lists in [access] token_keys. The token names its \
                issuer key (iss, RFC 7638 thumbprint), its subject, role, path prefixes and methods, \
                and expires after --lifetime. Hand it to the client: stoq put … --token TOKEN \
                (or --token-file, or $STOQ_TOKEN). docs/access.md.

                Example: stoq trust token --key stoq-data/access/token-key.pem --subject alice \
                --prefix /objects/a- --methods PUT,DELETE --role writer --lifetime 30d
                """)
        @Option(help: "The signing key (P-256 PEM), e.g. stoq-data/access/token-key.pem.") var key: String
        @Option(help: "Who the token is for (the sub claim; the node's identity token:<subject>).") var subject: String
        @Option(help: "A path prefix the token covers, e.g. /objects/a- (object names are flat: no /) (repeatable; default /).") var prefix: [String] = []
        @Option(help: "Comma-separated methods, e.g. PUT,DELETE (default: the role's: reader GET,HEAD; writer also PUT,DELETE,POST; admin *).")
        var methods: String?
        @Option(help: "reader, writer or admin.") var role = "writer"
        @Option(help: "Validity, e.g. 1h, 30d.") var lifetime = "30d"
        @Flag(help: "Print {\"token\": …, \"claims\": …} as JSON.") var json = false

        func validate() throws {
            guard AccessRole(rawValue: role) != nil else { throw ValidationError("--role \(role): expected reader, writer or admin") }
            guard let ns = Units.duration(lifetime), ns >= 1_000_000_000 else {
                throw ValidationError("--lifetime \(lifetime): expected a duration of at least 1s, e.g. 1h, 30d")
            }
            for p in prefix where !p.hasPrefix("/") { throw ValidationError("--prefix \(p): a path prefix starts with /") }
            guard !subject.isEmpty else { throw ValidationError("--subject: must not be empty") }
            let ms = (methods ?? "GET").split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces).uppercased() }
            let known: Set<String> = ["GET", "HEAD", "PUT", "DELETE", "POST", "*"]
            for m in ms where !known.contains(m) { throw ValidationError("--methods: \(m) is not one of GET, HEAD, PUT, DELETE, POST, *") }
        }

        func run() throws {
            let r = AccessRole(rawValue: role)!
            let now = Int64(Date().timeIntervalSince1970)
            let scope = AccessScope(
                prefixes: prefix.isEmpty ? ["/"] : prefix,
                methods: methods.map { $0.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) } } ?? AccessScope.defaultMethods(for: r))
            let claims = AccessClaims(
                subject: subject, issuedAt: now, expires: now + Int64(Units.duration(lifetime)! / 1_000_000_000), role: r, scope: scope)
            let token: String
            do { token = try AccessToken.sign(claims, with: try AccessFiles.readPrivateKey(key)) } catch { throw fail("\(error)") }
            guard json else { return print(token) }
            let obj: [String: Any] = [
                "token": token,
                "claims": [
                    "sub": subject, "role": r.rawValue, "prefixes": scope.prefixes, "methods": scope.methods, "iat": now,
                    "exp": claims.expires,
                ],
            ]
            let data = try JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys, .withoutEscapingSlashes])
            print(String(decoding: data, as: UTF8.self))
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print a certificate's subject, issuer, serial, validity, SANs, EKU, key type and SCTs.",
            discussion: """
                Shows every certificate in the file (a chain file lists the node first). Embedded \
                SCTs are checked against --log-key (repeatable) using the next certificate in the \
                file (or --issuer) as the issuer: valid, invalid (forged or altered), unknown log, \
                or unchecked when there is no issuer or no log key.

                Example: stoq trust show cert.pem --log-key log.pub.pem --json
                """)
        @Argument(help: "A PEM certificate or chain file.") var cert: String
        @Option(name: .customLong("log-key"), help: "A trusted log's public key (PEM), to check SCTs (repeatable).") var logKeys: [String] = []
        @Option(help: "The issuer's certificate (PEM), when the file holds only the leaf.") var issuer: String?
        @Flag(help: "Print {\"certificates\": [ … ]} as JSON.") var json = false

        func run() throws {
            let certs: [Certificate], logs: [P256.Signing.PublicKey], extraIssuer: Certificate?
            do {
                certs = try PEMFiles.readCertificates(cert)
                logs = try CertificateTransparency.loadLogKeys(logKeys)
                extraIssuer = try issuer.map { try PEMFiles.readCertificates($0)[0] }
            } catch { throw fail("\(error)", code: 2) }
            let summaries = certs.enumerated().map { i, c in
                var s = CertificateSummary(c)
                if let iss = i + 1 < certs.count ? certs[i + 1] : extraIssuer, !logs.isEmpty {
                    s.checkSCTs(of: c, issuer: iss, logs: logs)
                }
                return s
            }
            if json {
                let enc = JSONEncoder()
                enc.outputFormatting = [.sortedKeys]
                enc.dateEncodingStrategy = .iso8601
                print(String(decoding: try enc.encode(["certificates": summaries]), as: UTF8.self))
                return
            }
            for (i, s) in summaries.enumerated() {
                if i > 0 { print("") }
                print("subject:    \(s.subject)")
                print("issuer:     \(s.issuer)")
                print("serial:     \(s.serial)")
                print("validity:   \(iso(s.notBefore)) … \(iso(s.notAfter))\(s.notAfter < Date() ? " (expired)" : "")")
                let sans = s.dnsNames.map { "DNS:\($0)" } + s.ipAddresses.map { "IP:\($0)" }
                print("SANs:       \(sans.isEmpty ? "(none)" : sans.joined(separator: ", "))")
                print("EKU:        \(s.extendedKeyUsage.isEmpty ? "(none)" : s.extendedKeyUsage.joined(separator: ", "))")
                print("key:        \(s.keyType)\(s.isCA ? " (CA)" : "")")
                if s.scts.isEmpty && !s.isCA { print("SCTs:       (none)") }
                for sct in s.scts {
                    print("SCT:        log \(sct.logID) at \(iso(sct.timestamp)): \(sct.status)")
                }
            }
        }
    }

    struct Verify: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Verify a certificate chain against a trusted root bundle; exit 0 if valid, 1 with the reason if not.",
            discussion: """
                The same policy (PeerVerifier) the node applies to client certificates and \
                stoq get to servers, with the same reasons: chain to a root in --bundle, chain \
                length leaf to root, validity dates, key strength and signature hash, --revoked \
                serials, an end-entity leaf, keyUsage, EKU (serverAuth, or clientAuth with \
                --client), the name (--dns or --ip, in a SAN only); with --require-transparency, \
                an embedded SCT that verifies with a --log-key. \
                Reasons: expired, notYetValid, wrongEKU, sanMismatch, unknownRoot, revoked, \
                chainTooLong, keyTooWeak, weakSignature, wrongKeyUsage, invalidChain, sctMissing, \
                sctInvalid, sctUnknownLog. Unreadable input or an IPv4 --ip exits 2.

                Example: stoq trust verify cert.pem --bundle ca/root.pem --ip 2001:db8::1
                """)
        @Argument(help: "PEM file: the certificate, followed by any intermediates.") var cert: String
        @Option(help: "PEM file of trusted root certificates.") var bundle: String
        @Option(help: "The DNS name the certificate must carry.") var dns: String?
        @Option(help: "The IPv6 address the certificate must carry.") var ip: String?
        @Flag(help: "Check the certificate as a client's (clientAuth) instead of a server's.") var client = false
        @Option(help: "File of revoked serial numbers in hex, one per line.") var revoked: String?
        @Option(name: .customLong("max-chain"), help: "Longest accepted chain, leaf and root included.")
        var maxChain = PeerVerifier.defaultMaxChainLength
        @Flag(name: .customLong("require-transparency"), help: "Require an embedded SCT from a log given by --log-key.")
        var requireTransparency = false
        @Option(name: .customLong("log-key"), help: "A trusted log's public key (PEM; repeatable).") var logKeys: [String] = []
        @Flag(help: "Print {\"valid\": …} as JSON.") var json = false

        func validate() throws {
            if requireTransparency && logKeys.isEmpty { throw ValidationError("--require-transparency needs at least one --log-key") }
            if dns != nil && ip != nil { throw ValidationError("give --dns or --ip, not both") }
            if maxChain < 1 { throw ValidationError("--max-chain \(maxChain): expected at least 1") }
        }

        func run() async throws {
            let chain: [[UInt8]], roots: [Certificate], serials: Set<Certificate.SerialNumber>, logs: [P256.Signing.PublicKey]
            do {
                logs = try CertificateTransparency.loadLogKeys(logKeys)
                // DER, unparsed: a certificate swift-certificates refuses still gets a verdict.
                chain = try PEMFiles.readCertificateDER(cert)
                roots = try PEMFiles.readCertificates(bundle)
                serials = try revoked.map { try PEMFiles.readSerials($0) } ?? []
            } catch { throw fail("\(error)", code: 2) }
            let verifier = PeerVerifier(
                roots: roots, revokedSerials: serials, maxChainLength: maxChain,
                role: client ? .client : .server, transparencyLogs: requireTransparency ? logs : nil)
            switch Result(catching: { () throws(PeerVerificationError) in try verifier.verify(derChain: chain, dnsName: dns, ipv6Address: ip) }) {
            case .success(let validated):
                let subjects = validated.map { $0.subject.description }
                if json {
                    printObject(["valid": true, "chain": subjects])
                } else {
                    print("valid: \(subjects.joined(separator: " <- "))")
                }
            case .failure(let e):
                // A bad request (an IPv4 --ip) is a usage error, not a verdict on the certificate.
                let status: Int32 = e.code == .invalidInput ? 2 : 1
                if json {
                    printObject(["valid": false, "reason": e.code.rawValue, "message": e.message])
                    throw ExitCode(status)
                }
                throw fail("\(cert): refused (\(e.code.rawValue)): \(e.message)", code: status)
            }
        }
    }
}

extension TrustCommand {
    struct AddNode: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "add-node",
            abstract: "Create an ACME external account binding (EAB) key that authorizes a node's names and addresses.",
            discussion: """
                Stores the key under <dir>/acme-eab/<kid>.json (mode 0600) and prints the key id and \
                the base64url HMAC key: hand both to the node (stoq trust acme-issue --eab-kid … \
                --eab-hmac-key …, or any ACME client's EAB options). Orders for any other identifier \
                are refused with rejectedIdentifier. Delete the file to withdraw the node's authority.

                Example: stoq trust add-node node1 --dir ca --dns node1.example --ip 2001:db8::1
                """)
        @Argument(help: "The node's name (lower-case letters, digits, hyphens).") var name: String
        @Option(help: "The authority's directory.") var dir: String
        @Option(help: "A DNS name the node may hold (repeatable).") var dns: [String] = []
        @Option(help: "An IPv6 address the node may hold (repeatable).") var ip: [String] = []
        @Flag(help: "Print {\"kid\": …, \"hmac_key\": …} as JSON.") var json = false

        func run() throws {
            do {
                _ = try TrustAuthority.load(from: dir)
                let key = try ExternalAccountKeyStore(caDirectory: dir).add(name: name, dnsNames: dns, ipAddresses: ip)
                if json {
                    printObject(["kid": key.kid, "hmac_key": key.hmacKey, "dns": key.dnsNames, "ip": key.ipAddresses])
                } else {
                    print("kid:      \(key.kid)")
                    print("hmac key: \(key.hmacKey)")
                    let ids = key.dnsNames.map { "DNS:\($0)" } + key.ipAddresses.map { "IP:\($0)" }
                    print("allows:   \(ids.joined(separator: ", "))")
                }
            } catch { throw fail("\(error)") }
        }
    }

    struct Serve: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run the TrustChain ACME server (RFC 8555, HTTPS) in the foreground.",
            discussion: """
                Accounts must carry an external account binding from `stoq trust add-node`; orders \
                for the identifiers that key allows are ready at once (no challenge), others are \
                refused. Certificates are issued by the intermediate and appended to \
                <dir>/transparency.log before they are returned; revocations go to <dir>/revoked.txt. \
                Without --cert/--key the server issues its own TLS certificate from the CA for the \
                listen address and --tls-dns names: clients then trust <dir>/root.pem.

                Example: stoq trust serve --dir ca --listen [::1]:14000   (directory: https://[::1]:14000/directory)
                """)
        @Option(help: "The authority's directory.") var dir: String
        @Option(help: "[ipv6]:port to listen on (IPv6 only).") var listen = "[::1]:14000"
        @Option(help: "TLS certificate chain PEM (default: issue one from the CA).") var cert: String?
        @Option(help: "TLS private key PEM (with --cert).") var key: String?
        @Option(name: .customLong("tls-dns"), help: "DNS names for the self-issued TLS certificate (repeatable).") var tlsDNS: [String] = ["localhost"]
        @Option(name: .customLong("base-url"), help: "The URL clients use (default: https:// + the request's Host header).") var baseURL: String?
        @Option(help: "Lifetime of issued certificates, e.g. 24h.") var lifetime = "24h"

        func validate() throws {
            if (cert == nil) != (key == nil) { throw ValidationError("give --cert and --key together, or neither") }
            guard let ns = Units.duration(lifetime), ns >= 1_000_000_000 else {
                throw ValidationError("--lifetime \(lifetime): expected a duration of at least 1s, e.g. 1h, 24h")
            }
            if case .failure(let e) = IPv6Endpoint.parse(listen) { throw ValidationError("--listen \(listen): \(e.reason)") }
        }

        func run() async throws {
            let endpoint = try IPv6Endpoint.parse(listen).get()
            LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
            do {
                let ca = try TrustAuthority.load(from: dir)
                var config = ACMEServer.Configuration(baseURL: baseURL)
                config.certificateLifetime = TimeInterval(Units.duration(lifetime)!) / 1e9
                let chainPEM: String, keyPEM: String
                if let cert, let key {
                    chainPEM = try String(contentsOfFile: cert, encoding: .utf8)
                    keyPEM = try String(contentsOfFile: key, encoding: .utf8)
                } else {
                    let ips = endpoint.address.isUnspecified ? ["::1"] : [endpoint.address.description]
                    // Logged like any other certificate; the log is closed again before the
                    // ACME server opens (and locks) it.
                    let tls = try { () throws -> (certificate: Certificate, chainPEM: String, keyPEM: String) in
                        let log = try openAuthorityLog(caDirectory: dir)
                        return try ca.issueWithNewKey(dnsNames: tlsDNS, ipv6Addresses: ips, log: log)
                    }()
                    chainPEM = tls.chainPEM
                    keyPEM = tls.keyPEM
                }
                let server = try ACMEServer(caDirectory: dir, configuration: config)
                let https = try await ACMEHTTPSServer.start(server: server, address: endpoint, certificateChainPEM: chainPEM, keyPEM: keyPEM)
                print(
                    "ACME directory: https://[\(https.localAddress.address)]:\(https.localAddress.port)/directory  (TLS trust: \(cert ?? dir + "/" + TrustAuthority.FileName.rootCertificate); log: \(dir)/\(TrustAuthority.FileName.transparencyLog), \(await server.transparencyLogSize) entries)"
                )
                fflush(nil)  // scripts wait for this line on a pipe
                await https.waitUntilClosed()
            } catch { throw fail("\(error)") }
        }
    }

    struct ACMEIssue: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "acme-issue",
            abstract: "Obtain a certificate from an ACME server (STOQ's or any RFC 8555 server).",
            discussion: """
                Creates an account (with the EAB key when given), orders the names, answers pending \
                challenges with {} (only servers that validate by other means, e.g. pebble with \
                PEBBLE_VA_ALWAYS_VALID=1), finalizes with a CSR for a fresh P-256 key and downloads \
                the chain. Retries badNonce, 5xx and connection errors with backoff.

                Example: stoq trust acme-issue --directory https://[::1]:14000/directory --ca-file ca/root.pem \
                  --dns node1.example --eab-kid node1-… --eab-hmac-key … --out cert.pem --key-out key.pem
                """)
        @Option(help: "The ACME directory URL.") var directory: String
        @Option(name: .customLong("ca-file"), help: "PEM roots that verify the ACME server's TLS certificate.") var caFile: String?
        @Option(help: "A DNS name (repeatable).") var dns: [String] = []
        @Option(help: "An IPv6 address (repeatable).") var ip: [String] = []
        @Option(name: .customLong("eab-kid"), help: "External account binding key id.") var eabKid: String?
        @Option(name: .customLong("eab-hmac-key"), help: "External account binding HMAC key, base64url.") var eabHmacKey: String?
        @Option(help: "Contact e-mail for the account.") var email: String?
        @Option(help: "Write the certificate chain here.") var out: String
        @Option(name: .customLong("key-out"), help: "Write the private key here (mode 0600).") var keyOut: String
        @Flag(help: "Print {\"serial\": …} as JSON.") var json = false

        func validate() throws {
            if dns.isEmpty && ip.isEmpty { throw ValidationError("give at least one --dns or --ip") }
            if (eabKid == nil) != (eabHmacKey == nil) { throw ValidationError("give --eab-kid and --eab-hmac-key together") }
        }

        func run() async throws {
            var trust: String?
            if let caFile {
                do { trust = try String(contentsOfFile: caFile, encoding: .utf8) } catch {
                    throw fail("\(caFile): cannot read (\(error.localizedDescription))", code: 2)
                }
            }
            let ids = dns.map(ACMEIdentifier.dns) + ip.map(ACMEIdentifier.ip)
            let client: ACMEClient
            do { client = try ACMEClient(directoryURL: directory, trustRootsPEM: trust) } catch { throw fail("\(error)", code: 2) }
            do {
                let eab = eabKid.map { ExternalAccountBinding(kid: $0, hmacKeyBase64URL: eabHmacKey!) }
                let got = try await client.obtainCertificate(for: ids, eab: eab, contact: email.map { ["mailto:\($0)"] } ?? [])
                try PEMFiles.writeFile(got.privateKeyPEM, to: keyOut, mode: 0o600)
                try PEMFiles.writeFile(got.chainPEM, to: out, mode: 0o644)
                let s = CertificateSummary(got.chain[0])
                await client.shutdown()
                if json {
                    printObject(["serial": s.serial, "not_after": iso(s.notAfter), "issuer": s.issuer, "out": out])
                } else {
                    print("issued \(s.serial) by \(s.issuer), valid until \(iso(s.notAfter)) -> \(out) (key \(keyOut))")
                }
            } catch {
                await client.shutdown()
                throw fail("\(error)")
            }
        }
    }
}

private func iso(_ d: Date) -> String { ISO8601DateFormatter().string(from: d) }

private func printObject(_ obj: [String: Any]) {
    let data = try! JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys])
    print(String(decoding: data, as: UTF8.self))
}

/// A CA directory's transparency log, opened for a command: a torn tail cut on open (a crash
/// mid-append) is said on stderr, not only repaired.
func openAuthorityLog(caDirectory: String) throws -> TransparencyLog {
    try TransparencyLog.openForAuthority(caDirectory: caDirectory) { FileHandle.standardError.write(Data("stoq: warning: \($0)\n".utf8)) }
}
