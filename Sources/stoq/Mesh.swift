import ArgumentParser
import Foundation

/// `stoq mesh status|routes|path`: what a node's mesh service last published, read from the
/// "mesh" object of its admin API's `/status` (docs/mesh.md, "Watching the mesh").
struct MeshCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mesh",
        abstract: "Show a node's mesh: neighbours, routes, the path to one node (from its admin API).",
        subcommands: [Status.self, Routes.self, Path.self])

    struct Options: ParsableArguments {
        @Argument(help: "The node's admin API, http://[ipv6]:port (https:// under admin.auth = \"mtls\")") var admin: String
        @Flag(help: "Print the JSON from /status (its \"mesh\" object, or the part asked for).") var json = false
    }

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "This node, its discovery, its neighbours' link metrics and the mesh counters.",
            discussion: "Example: stoq mesh status http://[::1]:9464")
        @OptionGroup var options: Options

        func run() async throws {
            let (m, raw) = try await MeshCommand.load(options.admin)
            if options.json { return MeshCommand.printJSON(raw) }
            print(MeshTables.status(m), terminator: "")
        }
    }

    struct Routes: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "The route table: one row per destination, with its link-disjoint backup.",
            discussion: "Example: stoq mesh routes http://[::1]:9464")
        @OptionGroup var options: Options

        func run() async throws {
            let (m, raw) = try await MeshCommand.load(options.admin)
            if options.json { return MeshCommand.printJSON(raw["routes"] ?? []) }
            print(MeshTables.routes(m), terminator: "")
        }
    }

    struct Path: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "The route to one node, primary and backup, hop by hop.",
            discussion: "Example: stoq mesh path http://[::1]:9464 7d1e5a9b")
        @OptionGroup var options: Options
        @Argument(help: "The destination's node id, or a unique prefix of it (at least 4 hex digits).") var node: String

        func run() async throws {
            let (m, raw) = try await MeshCommand.load(options.admin)
            do {
                let route = try MeshTables.route(m, prefix: node)
                if options.json {
                    let all = raw["routes"] as? [[String: Any]] ?? []
                    return MeshCommand.printJSON(all.first { $0["destination"] as? String == route.destination } ?? [:])
                }
                print(try MeshTables.path(m, prefix: node), terminator: "")
            } catch let e as MeshViewError {
                throw fail(e.message)
            }
        }
    }

    /// GETs `/status` and returns its "mesh" object, decoded and raw; exits 2 on a bad URL, 1
    /// when the node cannot be read or runs no mesh.
    static func load(_ admin: String) async throws -> (MeshStatusView, [String: Any]) {
        let (base, data) = try await AdminAPI.status(admin)
        let view: MeshStatusView?
        do { view = try MeshStatusView.decode(status: data) } catch {
            throw fail("\(base)/status: not a STOQ status document with a readable \"mesh\" object: \(error)")
        }
        guard let m = view, let doc = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
            let raw = doc["mesh"] as? [String: Any]
        else { throw fail("this node runs no mesh ([mesh] peers or discovery not configured)") }
        return (m, raw)
    }

    static func printJSON(_ value: Any) {
        guard let data = try? JSONSerialization.data(withJSONObject: value, options: [.prettyPrinted, .sortedKeys]) else { return }
        print(String(decoding: data, as: UTF8.self))
    }
}
