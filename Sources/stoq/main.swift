import ArgumentParser
import Foundation
import STOQ
import STOQConfig

// Top-level entry rather than @main: with more than one file in the target, SwiftPM
// compiles main.swift as top-level code, where @main is not allowed. The call goes through
// an async function because at top level `Stoq.main()` resolves to ParsableCommand's
// synchronous overload, which refuses to run async subcommands (`trust verify`).
func runStoq() async { await Stoq.main() }
await runStoq()

/// The operator CLI.
struct Stoq: AsyncParsableCommand {  // async because `trust verify` awaits swift-certificates' Verifier
    static let configuration = CommandConfiguration(
        commandName: "stoq",
        abstract: "STOQ command-line client and operator tool.",
        subcommands: [Get.self, Put.self, BenchCommand.self, ConfigCommand.self, TrustCommand.self, XDPCommand.self])
}

struct TrustOptions: ParsableArguments {
    @Option(help: "PEM certificate(s) to trust, e.g. the cert.pem a node prints as 'trust:'.")
    var ca: String?
    @Flag(help: "Do not verify the server's certificate (only for experiments).")
    var insecure = false
    var trust: ClientTrust { ClientTrust(caFile: ca, insecure: insecure) }
}

func fail(_ message: String, code: Int32 = 1) -> ExitCode {
    FileHandle.standardError.write(Data("stoq: \(message)\n".utf8))
    return ExitCode(code)
}

func printJSON(_ r: TransferResult) {
    let obj: [String: Any] = ["status": r.status, "bytes": r.bytes, "seconds": r.seconds, "gbps": r.gbps, "sha256": r.sha256]
    let data = try! JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys])
    print(String(decoding: data, as: UTF8.self))
}

func human(_ n: Double) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var v = n, i = 0
    while v >= 1024 && i < units.count - 1 { v /= 1024; i += 1 }
    return String(format: "%.1f %@", v, units[i])
}

struct Get: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Download an object over HTTP/3.",
        discussion: "Example: stoq get https://[::1]:4433/objects/a.bin -o a.bin --ca stoq-data/identity/cert.pem")

    @Argument(help: "https://[ipv6]:port/objects/<name>") var url: String
    @Option(name: .shortAndLong, help: "Write the body here (default: discard).") var output: String?
    @OptionGroup var trust: TrustOptions
    @Flag(help: "Print one JSON object with status, bytes, seconds, gbps and the body's sha256.") var json = false
    @Option(help: "Give up after this many seconds.") var timeout: Double = 300

    func run() throws {
        let u: STOQURL
        do { u = try STOQURL(url) } catch { throw fail("<url>: \(error)", code: 2) }
        var fd: Int32 = -1
        var temp: String?
        if let output, output != "-" {
            temp = output + ".part"
            fd = open(temp!, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw fail("-o \(output): \(String(cString: strerror(errno)))") }
        }
        let tty = isatty(STDERR_FILENO) == 1 && !json
        let start = Date()
        let result: TransferResult
        do {
            result = try STOQClient.get(u, into: fd, trust: trust.trust, hash: json || tty, timeout: timeout) { got, total in
                guard tty else { return }
                let secs = max(Date().timeIntervalSince(start), 0.001)
                let rate = Double(got) / secs
                var line = "\r\(human(Double(got)))"
                if let total, total > 0 {
                    let pct = Double(got) / Double(total)
                    let bar = String(repeating: "█", count: Int(pct * 30)).padding(toLength: 30, withPad: " ", startingAt: 0)
                    let eta = rate > 0 ? Double(total - min(got, total)) / rate : 0
                    line += " / \(human(Double(total))) [\(bar)] \(Int(pct * 100))%  ETA \(Int(eta))s"
                }
                line += "  \(human(rate))/s   "
                FileHandle.standardError.write(Data(line.utf8))
            }
        } catch {
            if fd >= 0 { close(fd); unlink(temp!) }
            throw fail("\(error)")
        }
        if tty { FileHandle.standardError.write(Data("\n".utf8)) }
        if fd >= 0 {
            close(fd)
            if result.status / 100 == 2 { rename(temp!, output!) } else { unlink(temp!) }
        }
        if json { printJSON(result) }
        guard result.status / 100 == 2 else { throw fail("\(u): HTTP \(result.status)") }
        if !json && !tty { return }
        if !json {
            FileHandle.standardError.write(Data(String(format: "%@ in %.2fs (%.2f Gbps), sha256 %@\n",
                                                      human(Double(result.bytes)), result.seconds, result.gbps, result.sha256).utf8))
        }
    }
}

struct Put: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Upload a file as an object (stored atomically by the node).",
        discussion: "Example: stoq put a.bin https://[::1]:4433/objects/a.bin --ca stoq-data/identity/cert.pem")

    @Argument(help: "The file to upload.") var file: String
    @Argument(help: "https://[ipv6]:port/objects/<name>") var url: String
    @OptionGroup var trust: TrustOptions
    @Flag(help: "Print one JSON object.") var json = false

    func run() throws {
        let u: STOQURL
        do { u = try STOQURL(url) } catch { throw fail("<url>: \(error)", code: 2) }
        let r: TransferResult
        do { r = try STOQClient.put(file: file, to: u, trust: trust.trust) } catch { throw fail("\(error)") }
        if json { printJSON(r) }
        guard r.status / 100 == 2 else { throw fail("\(u): HTTP \(r.status)") }
    }
}

struct ConfigCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "config", abstract: "Configuration tools.", subcommands: [Check.self])

    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Validate a node configuration file; exit 2 with every error if it is invalid.",
            discussion: "Example: stoq config check config/node.toml")
        @Argument(help: "The TOML file.") var file: String
        @Flag(help: "Print {\"valid\": …, \"errors\": […]}.") var json = false

        func run() throws {
            do {
                _ = try ConfigLoader.load(path: file)
                if json { print("{\"valid\":true,\"errors\":[]}") } else { print("\(file): valid") }
            } catch {
                if json {
                    let errs = error.errors.map { ["key": $0.key, "value": $0.value, "allowed": $0.allowed, "message": $0.description] }
                    let data = try! JSONSerialization.data(withJSONObject: ["valid": false, "errors": errs], options: [.sortedKeys])
                    print(String(decoding: data, as: UTF8.self))
                } else {
                    FileHandle.standardError.write(Data("\(error)\n".utf8))
                }
                throw ExitCode(2)
            }
        }
    }
}

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Load a node: many connections × streams of GETs; prints goodput, requests/s, latency p50/p99.",
        discussion: "Example: stoq bench https://[::1]:4433/objects/1m.bin --connections 4 --streams 8 --duration 10 --ca stoq-data/identity/cert.pem")

    @Argument(help: "https://[ipv6]:port/objects/<name>") var url: String
    @Option(help: "Concurrent connections.") var connections = 1
    @Option(help: "Concurrent requests per connection.") var streams = 1
    @Option(help: "Run this many seconds (default 10 unless --bytes is given).") var duration: Double?
    @Option(help: "Stop after this many body bytes.") var bytes: UInt64?
    @OptionGroup var trust: TrustOptions
    @Flag(help: "Print one JSON object.") var json = false

    func validate() throws {
        guard connections >= 1, connections <= 10_000 else { throw ValidationError("--connections \(connections): expected 1…10000") }
        guard streams >= 1, streams <= 256 else { throw ValidationError("--streams \(streams): expected 1…256") }
        if let duration, duration <= 0 { throw ValidationError("--duration \(duration): expected seconds > 0") }
    }

    func run() throws {
        let u: STOQURL
        do { u = try STOQURL(url) } catch { throw fail("<url>: \(error)", code: 2) }
        let r: BenchResult
        do {
            r = try STOQClient.bench(u, connections: connections, streams: streams,
                                     duration: duration ?? (bytes == nil ? 10 : nil), bytes: bytes, trust: trust.trust)
        } catch { throw fail("\(error)") }
        if json {
            let data = try JSONEncoder().encode(r)
            print(String(decoding: data, as: UTF8.self))
            return
        }
        print(String(format: "%d connection(s) × %d stream(s): %d requests (%d failed) in %.2fs",
                     r.connections, r.streams, r.requests, r.failed, r.seconds))
        print(String(format: "goodput %.2f Gbps, %.0f requests/s, latency p50 %.2f ms, p99 %.2f ms",
                     r.gbps, r.requestsPerSecond, r.latencyP50Ms, r.latencyP99Ms))
    }
}
