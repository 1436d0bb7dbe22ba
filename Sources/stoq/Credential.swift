import ArgumentParser
import Foundation
import STOQAccess
import STOQConfig
import STOQCore
import STOQTransfer

/// The bearer token `stoq` presents (`Authorization: Bearer …`, docs/access.md), from the
/// first of: --token, --token-file, $STOQ_TOKEN, and, only when the node is on this machine,
/// the operator token a node started here with the embedded defaults wrote
/// (./stoq-data/access/operator.token): the quick start's `stoq put` needs no flag, and the
/// operator's token is never sent to another host.
struct CredentialOptions: ParsableArguments {
    @Option(help: "A bearer token to present (from `stoq trust token`, or a node's operator.token).")
    var token: String?
    @Option(name: .customLong("token-file"), help: "Read the bearer token from this file.")
    var tokenFile: String?

    /// The operator token a node running here with the default `node.data_dir` keeps.
    static var localOperatorToken: String { AccessFiles.operatorToken(dataDir: NodeConfig.defaultDataDirectory) }

    func validate() throws {
        if token != nil && tokenFile != nil { throw ValidationError("give --token or --token-file, not both") }
    }

    /// The `authorization` header for a request to `url`, none when there is no token.
    func headers(for url: STOQURL) throws -> [(String, String)] {
        if let token { return [("authorization", "Bearer \(token)")] }
        if let tokenFile {
            do { return [("authorization", "Bearer \(try AccessFiles.readToken(tokenFile))")] } catch {
                throw fail("--token-file: \(error.message)", code: 2)
            }
        }
        if let env = ProcessInfo.processInfo.environment["STOQ_TOKEN"], !env.isEmpty { return [("authorization", "Bearer \(env)")] }
        let local = Self.localOperatorToken
        if Self.isThisMachine(url.endpoint.address), let t = try? AccessFiles.readToken(local) {
            return [("authorization", "Bearer \(t)")]
        }
        return []
    }

    /// Whether `a` is loopback or one of this machine's own addresses.
    static func isThisMachine(_ a: IPv6Address) -> Bool {
        if a == .loopback { return true }
        var ifa: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&ifa) == 0 else { return false }
        defer { freeifaddrs(ifa) }
        var p = ifa
        while let i = p {
            if let sa = i.pointee.ifa_addr, sa.pointee.sa_family == sa_family_t(AF_INET6) {
                let mine = sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { IPv6Address($0.pointee.sin6_addr) }
                if mine == a { return true }
            }
            p = i.pointee.ifa_next
        }
        return false
    }
}
