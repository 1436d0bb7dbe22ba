import ArgumentParser
import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1
import NIOSSL

/// `stoq status`: a node's live numbers from its admin API (`[admin] listen`).
struct StatusCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show a node's workers, datapaths and counters (from its admin API).",
        discussion: """
            Example: stoq status http://[::1]:9464
                     stoq status http://[::1]:9464 --json
            The node must run with [admin] listen set; stoq-node prints the address as "admin:".
            With [admin] auth = "token", set STOQ_ADMIN_TOKEN_FILE to a file holding the token.
            With auth = "mtls" (https://), set STOQ_ADMIN_CA to the node's root.pem and
            STOQ_ADMIN_CERT / STOQ_ADMIN_KEY to a certificate from the node's CA and its key.
            """)

    @Argument(help: "The admin API, http://[ipv6]:port (https:// under admin.auth = \"mtls\")") var admin: String
    @Flag(help: "Print the node's /status JSON as it is.") var json = false

    func run() async throws {
        let (base, data) = try await AdminAPI.status(admin)
        let text = String(decoding: data, as: UTF8.self)
        if json { print(text); return }
        guard let doc = try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any],
            let workers = doc["workers"] as? [[String: Any]]
        else { throw fail("\(base)/status: not a STOQ status document") }
        print("worker  datapath  connections  datagrams in/out        requests  chunks served/stored  detail")
        for w in workers {
            let diag = (w["diagnostics"] as? [String: String]) ?? [:]
            let detail = diag["xdp_mode"].map { "xdp \($0), zero-copy \(diag["zero_copy"] ?? "?")" } ?? "\(w["features"] ?? "")"
            print(
                String(
                    format: "%6d  %-8@  %11d  %10d / %-10d  %8d  %8d / %-8d  %@",
                    w["worker"] as? Int ?? 0, (w["backend"] as? String ?? "?") as NSString, w["connections"] as? Int ?? 0,
                    w["datagrams_in"] as? Int ?? 0, w["datagrams_out"] as? Int ?? 0, w["requests"] as? Int ?? 0,
                    w["chunks_served"] as? Int ?? 0, w["chunks_stored"] as? Int ?? 0, detail as NSString))
        }
        if let s = doc["store"] as? [String: Any] {
            print(
                "store: \(s["chunks_written"] ?? 0) chunks written (\(s["bytes_written"] ?? 0) bytes), \(s["dedup_hits"] ?? 0) dedup hits, \(s["corrupt_quarantined"] ?? 0) quarantined"
            )
        }
    }
}

/// The admin API's `/status` document, for `stoq status` and `stoq mesh`.
enum AdminAPI {
    /// Where `stoq status`, `stoq mesh` and `stoq edge` find the admin API's bearer token
    /// (`admin.auth = "token"`), and under `auth = "mtls"` what verifies the node and the
    /// certificate presented to it: the environment, so that every subcommand takes them the
    /// same way.
    static let tokenFileVariable = "STOQ_ADMIN_TOKEN_FILE"
    static let caVariable = "STOQ_ADMIN_CA"
    static let certVariable = "STOQ_ADMIN_CERT"
    static let keyVariable = "STOQ_ADMIN_KEY"

    /// The TLS an `https://` admin API (`auth = "mtls"`) needs: the node verified against
    /// `STOQ_ADMIN_CA`, the certificate of `STOQ_ADMIN_CERT`/`STOQ_ADMIN_KEY` presented. Exits
    /// 2 naming what is missing or does not load.
    static func mutualTLS(_ base: String) throws -> TLSConfiguration {
        let env = ProcessInfo.processInfo.environment
        let ca = env[caVariable] ?? "", cert = env[certVariable] ?? "", key = env[keyVariable] ?? ""
        guard !ca.isEmpty, !cert.isEmpty, !key.isEmpty else {
            throw fail(
                "\(base): an https:// admin API (admin.auth = \"mtls\") needs \(caVariable) (the node's root.pem), \(certVariable) and \(keyVariable) (a certificate from the node's CA and its key); \([caVariable, certVariable, keyVariable].filter { (env[$0] ?? "").isEmpty }.joined(separator: ", ")) not set",
                code: 2)
        }
        var tls = TLSConfiguration.makeClientConfiguration()
        // The chain must lead to STOQ_ADMIN_CA (the node's own CA: only its nodes hold such
        // certificates); the address typed need not be in the certificate (one from
        // tls.cert_file or ACME may name DNS names only). With a public CA there, any
        // certificate it issued would pass: docs/api.md says to give the node's root.
        tls.certificateVerification = .noHostnameVerification
        do {
            tls.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(ca))
        } catch { throw fail("\(caVariable)=\(ca): \(error)", code: 2) }
        do {
            tls.certificateChain = try NIOSSLCertificate.fromPEMFile(cert).map { .certificate($0) }
        } catch { throw fail("\(certVariable)=\(cert): \(error)", code: 2) }
        do {
            tls.privateKey = .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
        } catch { throw fail("\(keyVariable)=\(key): \(error)", code: 2) }
        return tls
    }

    /// GETs `<admin>/status`: the base URL and the body. Exits 2 on a URL that is not
    /// `http[s]://[ipv6]:port`, 1 when the node cannot be read.
    static func status(_ admin: String) async throws -> (base: String, data: Data) {
        let (base, status, data) = try await request(admin, "/status")
        guard status == 200 else { throw fail("\(base)/status: HTTP \(status)\(hint(status))") }
        return (base, data)
    }

    /// Sends `method` `path` to the admin API `admin`: the base URL, the status and the body.
    /// Exits 2 on a URL that is not `http[s]://[ipv6]:port`, 1 when the node cannot be reached.
    static func request(_ admin: String, _ path: String, method: HTTPMethod = .GET) async throws -> (base: String, status: UInt, data: Data) {
        let base: String
        do { base = try MeshTables.adminBase(admin) } catch let e as MeshViewError { throw fail(e.message, code: 2) }
        var request = HTTPClientRequest(url: base + path)
        request.method = method
        if let file = ProcessInfo.processInfo.environment[tokenFileVariable], !file.isEmpty {
            guard let data = FileManager.default.contents(atPath: file) else { throw fail("\(tokenFileVariable)=\(file): cannot read the file") }
            let token = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            request.headers.add(name: "authorization", value: "Bearer \(token)")
        }
        var configuration = HTTPClient.Configuration()
        if base.hasPrefix("https://") { configuration.tlsConfiguration = try mutualTLS(base) }
        let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
        let answer: (status: UInt, body: ByteBuffer)
        do {
            let response = try await client.execute(request, timeout: .seconds(10))
            answer = (response.status.code, try await response.body.collect(upTo: 64 << 20))
        } catch let e as IOError {
            try? await client.shutdown()
            // NIO's text for a refused connect reads "connection reset (error set): Connection
            // refused) (errno: 111)"; the errno says it.
            throw fail("\(base)\(path): cannot connect: \(String(cString: strerror(e.errnoCode)))")
        } catch {
            try? await client.shutdown()
            throw fail("\(base)\(path): \(error)")
        }
        try? await client.shutdown()
        return (base, answer.status, Data(answer.body.readableBytesView))
    }

    /// What to add to an error for `status`: how to pass a token when the API wants one.
    static func hint(_ status: UInt) -> String {
        status == 401 ? ": the admin API wants a bearer token (admin.auth = \"token\"); set \(tokenFileVariable) to the file holding it" : ""
    }
}
