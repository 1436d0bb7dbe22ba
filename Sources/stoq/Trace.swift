import ArgumentParser
import Foundation
import STOQCore

/// `--trace`, `--traceparent`: W3C trace context sent with a request, so that the node's spans
/// (and those of the nodes it fetches through) join one trace. The CLI exports no spans of its
/// own: with `--trace` it only makes up the root span's ids and prints the trace id to look for
/// in the collector; the node's server span names that root as its parent.
struct TraceOptions: ParsableArguments {
    @Flag(help: "Start a trace: send a new W3C traceparent (sampled) and print its trace id to stderr.")
    var trace = false
    @Option(
        help: ArgumentHelp(
            "Send this W3C traceparent (00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>).",
            discussion: "Without --trace or --traceparent, the TRACEPARENT and TRACESTATE environment variables are sent when set."))
    var traceparent: String?
    @Option(help: "Send this W3C tracestate with the traceparent.") var tracestate: String?

    /// The header fields to send (empty: none), and the trace id to print; exits 2 on a
    /// malformed traceparent.
    func headers(environment: [String: String] = ProcessInfo.processInfo.environment) throws -> [(String, String)] {
        if trace && traceparent != nil { throw fail("--trace starts a new trace; --traceparent joins one: give one of them", code: 2) }
        var parent = traceparent, state = tracestate
        if trace {
            parent = TraceParent.random().description
            FileHandle.standardError.write(Data("trace: \(parent!.split(separator: "-")[1])\n".utf8))
        } else if parent == nil, let env = environment["TRACEPARENT"], !env.isEmpty {
            parent = env
            state = state ?? environment["TRACESTATE"]
        }
        guard let parent else { return [] }
        guard TraceParent(parent) != nil else {
            throw fail("traceparent \(parent.prefix(100)): expected 00-<32 hex trace id, not all zero>-<16 hex parent id, not all zero>-<2 hex flags>", code: 2)
        }
        var out = [("traceparent", parent.lowercased())]
        if let state, !state.isEmpty { out.append(("tracestate", state)) }
        return out
    }
}

/// A W3C `traceparent` (Trace Context, version 00).
struct TraceParent: CustomStringConvertible, Equatable {
    var traceID: String
    var parentID: String
    var flags: UInt8

    /// Parses version 00 (a later version's first four fields are read the same way).
    init?(_ text: String) {
        let parts = text.lowercased().split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count >= 4, parts[0].count == 2, parts[0] != "ff", Self.isHex(parts[0]) else { return nil }
        if parts[0] == "00" && parts.count != 4 { return nil }
        let (t, p, f) = (parts[1], parts[2], parts[3])
        guard t.count == 32, p.count == 16, f.count == 2, Self.isHex(t), Self.isHex(p), Self.isHex(f) else { return nil }
        guard t.contains(where: { $0 != "0" }), p.contains(where: { $0 != "0" }) else { return nil }
        (traceID, parentID, flags) = (String(t), String(p), UInt8(f, radix: 16)!)
    }

    init(traceID: String, parentID: String, flags: UInt8) {
        (self.traceID, self.parentID, self.flags) = (traceID, parentID, flags)
    }

    /// A new trace, sampled: random trace and parent ids.
    static func random() -> TraceParent {
        var g = SystemRandomNumberGenerator()
        func hex(_ bytes: Int) -> String {
            var s = ""
            while s.count < bytes * 2 || !s.contains(where: { $0 != "0" }) {
                if s.count >= bytes * 2 { s = "" }
                s += String(format: "%02x", UInt8.random(in: 0...255, using: &g))
            }
            return s
        }
        return TraceParent(traceID: hex(16), parentID: hex(8), flags: 1)
    }

    var description: String { "00-\(traceID)-\(parentID)-\(String(format: "%02x", flags))" }

    private static func isHex(_ s: Substring) -> Bool { Hex.isDigits(s) && s == s.lowercased() }
}
