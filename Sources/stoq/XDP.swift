import ArgumentParser
import Foundation
#if AFXDP
import STOQDatapathXDP
#endif

/// `stoq xdp …`: the operator's view of STOQ's XDP program. Attach and detach run
/// scripts/xdp-attach (the one implementation of both); status reads the pinned maps.
struct XDPCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "xdp",
        abstract: "Attach, detach and inspect STOQ's XDP program.",
        subcommands: [Attach.self, Detach.self, Status.self])

    /// scripts/xdp-attach of the checkout this binary was built in (…/.build/<config>/stoq),
    /// or of $STOQ_ROOT.
    static func script() throws -> String {
        var candidates: [String] = []
        if let root = ProcessInfo.processInfo.environment["STOQ_ROOT"] { candidates.append(root) }
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()
        for _ in 0..<5 {
            candidates.append(dir.path)
            dir.deleteLastPathComponent()
        }
        for c in candidates where FileManager.default.isExecutableFile(atPath: c + "/scripts/xdp-attach") {
            return c + "/scripts/xdp-attach"
        }
        throw fail("cannot find scripts/xdp-attach next to this binary; set STOQ_ROOT to the STOQ checkout")
    }

    static func exec(_ args: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try script())
        p.arguments = args
        try p.run()
        p.waitUntilExit()
        if p.terminationStatus != 0 { throw ExitCode(p.terminationStatus) }
    }

    struct Attach: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Attach the XDP program to an interface and pin its maps.",
            discussion: "Example: stoq xdp attach eth0 --mode native --ports 4433")
        @Argument(help: "The interface.") var interface: String
        @Option(help: "native (in the driver), skb (generic, any interface) or auto: native, falling back to skb.") var mode = "auto"
        @Option(help: "The node's UDP ports, comma-separated.") var ports = "4433"
        @Option(help: ArgumentHelp("Refused unless 0: stoq-node needs steering by receive queue.", visibility: .hidden))
        var workers = 0
        func validate() throws {
            guard ["auto", "native", "skb"].contains(mode) else { throw ValidationError("--mode \(mode): expected auto, native or skb") }
            // stoq-node registers the socket of queue q at xsk_map[q]; a frame steered by CID to
            // another index meets a socket bound to another queue, and the kernel drops it.
            guard workers == 0 else {
                throw ValidationError(
                    "--workers \(workers): steering by CID cannot work with stoq-node (it registers the socket of queue q at xsk_map[q], and the kernel drops a frame redirected to a socket bound to another queue); leave it out: the program steers by receive queue"
                )
            }
        }
        func run() throws {
            try XDPCommand.exec([interface, "--mode", mode, "--ports", ports])
        }
    }

    struct Detach: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Detach the XDP program and remove what attach pinned.",
            discussion: "Example: stoq xdp detach eth0")
        @Argument(help: "The interface.") var interface: String
        func run() throws { try XDPCommand.exec(["--detach", interface]) }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show how the XDP program is attached and its counters.",
            discussion: "Example: stoq xdp status eth0 --json")
        @Argument(help: "The interface.") var interface: String
        @Flag(help: "Print one JSON object.") var json = false
        func run() throws {
            #if AFXDP
            let s: XDPProgramStatus
            do { s = try XDPProgramStatus.read(interface: interface) } catch { throw fail("\(interface): \(error)") }
            if json {
                var counters: [String: UInt64] = [:]
                for c in s.counters { counters[c.name] = c.value }
                let obj: [String: Any] = [
                    "interface": interface, "mode": s.mode, "program_id": s.programID,
                    "pinned": s.pinDirectory, "counters": counters,
                ]
                let data = try JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys])
                print(String(decoding: data, as: UTF8.self))
                return
            }
            print("\(interface): XDP \(s.mode)\(s.programID != 0 ? ", program id \(s.programID)" : "")")
            if s.counters.isEmpty {
                print("  no STOQ maps pinned at \(s.pinDirectory) (attach with: stoq xdp attach \(interface))")
            }
            for c in s.counters { print("  \(c.name): \(c.value)") }
            #else
            throw fail("af_xdp is not compiled in (this stoq was built without the AFXDP package trait)")
            #endif
        }
    }
}
