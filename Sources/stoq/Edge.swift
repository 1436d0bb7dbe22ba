import ArgumentParser
import Foundation
import NIOHTTP1

/// `stoq edge purge`: drops objects from an edge node's cache through its admin API, so that
/// the next request for each asks the origin (or the mesh) again (docs/content.md).
struct EdgeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "edge",
        abstract: "Operate an edge node's cache (through its admin API).",
        subcommands: [Purge.self])

    struct Purge: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Drop objects from the edge cache: the next request for each asks its upstream again.",
            discussion: """
                Example: stoq edge purge http://[::1]:9464 index.html video.mp4
                The object's manifest goes; its chunks stay (they are named by their content).
                With [admin] auth = "token", set STOQ_ADMIN_TOKEN_FILE to a file holding the token;
                with auth = "mtls", STOQ_ADMIN_CA, STOQ_ADMIN_CERT and STOQ_ADMIN_KEY (stoq status --help).
                Exits 1 if any object could not be purged (each is named), 2 on a bad admin URL.
                """)
        @Argument(help: "The edge node's admin API, http://[ipv6]:port (https:// under admin.auth = \"mtls\")") var admin: String
        @Argument(help: "The objects' names, as in /objects/<name>.") var names: [String]

        func validate() throws {
            if names.isEmpty { throw ValidationError("name at least one object to purge") }
        }

        func run() async throws {
            var failed = 0
            for name in names {
                let escaped = name.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed.subtracting(["/"])) ?? name
                let (_, status, data) = try await AdminAPI.request(admin, "/edge/purge/" + escaped, method: .POST)
                let text = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
                if status == 200 {
                    print(text)
                } else {
                    failed += 1
                    FileHandle.standardError.write(Data("stoq: \(name): HTTP \(status): \(text)\(AdminAPI.hint(status))\n".utf8))
                }
            }
            if failed > 0 { throw ExitCode(1) }
        }
    }
}
