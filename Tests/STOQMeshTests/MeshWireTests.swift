import STOQMesh
import STOQTransfer
import Testing

/// The relay path and the probe answer: what one node writes, the next parses, and what it
/// refuses.
@Suite struct MeshWireTests {
    static let holder = NodeIdentity((0..<32).map { UInt8($0 * 7 & 0xff) })
    static let chunk = String(repeating: "ab", count: 32)

    @Test func viaNamesEveryNodeARequestPassed() {
        let other = NodeIdentity((0..<32).map { UInt8(255 - $0) })
        let first = MeshWire.via("", adding: Self.holder)
        #expect(first == "3 \(Self.holder.hex)")
        let second = MeshWire.via(first, adding: other)
        #expect(second == "3 \(Self.holder.hex), 3 \(other.hex)")
        #expect(MeshWire.viaNodes(second) == [Self.holder.hex, other.hex])
        // A proxy's own entries (another protocol, a host name) and damaged ones name no node.
        #expect(MeshWire.viaNodes("1.1 proxy.example, 3 \(other.hex.uppercased()), 3 abc, 3") == [other.hex])
        #expect(MeshWire.viaNodes("").isEmpty)
    }

    @Test func relayPathsRoundTrip() throws {
        let p = MeshWire.relayPath(holder: Self.holder, hops: 3, .chunk(hex: Self.chunk))
        #expect(p == "/_stoq/relay/\(Self.holder.hex)/3/chunks/\(Self.chunk)")
        let r = try #require(MeshWire.parseRelay(p))
        #expect(r.holder == Self.holder.hex && r.hops == 3 && r.resourcePath == "/chunks/\(Self.chunk)")
        let m = try #require(MeshWire.parseRelay(MeshWire.relayPath(holder: Self.holder, hops: 1, .manifest(name: "a/b.bin"))))
        #expect(m.resourcePath == "/manifests/a/b.bin" && m.hops == 1)
        // A holder without that manifest is asked for the object whole, on the same relay path.
        let url = try STOQURL("https://[::1]:4433/")
        let asked = UpstreamAttempt(url: url, path: MeshWire.relayPath(holder: Self.holder, hops: 2, .manifest(name: "a/b.bin")), label: "x")
        let whole = try #require(asked.whole("a/b.bin"))
        #expect(whole.path == "/_stoq/relay/\(Self.holder.hex)/2/objects/a/b.bin")
        #expect(MeshWire.parseRelay(whole.path)?.resourcePath == "/objects/a/b.bin")
        #expect(UpstreamAttempt(url: url, path: "/manifests/a/b.bin", label: "origin").whole("a/b.bin")?.path == "/objects/a/b.bin")
        #expect(asked.whole("b.bin") == nil)  // another name's manifest
        #expect(UpstreamAttempt(url: url, path: "/chunks/\(Self.chunk)", label: "x").whole("a/b.bin") == nil)
        #expect(MeshWire.handles(p) && MeshWire.handles(MeshWire.probePath) && !MeshWire.handles("/chunks/\(Self.chunk)"))
    }

    @Test(arguments: [
        "/_stoq/relay/",
        "/_stoq/relay/abcd/1/chunks/x",  // holder too short
        "/_stoq/relay/\(String(repeating: "zz", count: 32))/1/chunks/x",  // not hex
        "/_stoq/relay/\(MeshWireTests.holder.hex)/chunks/x",  // no hop count
        "/_stoq/relay/\(MeshWireTests.holder.hex)/1234/chunks/x",  // absurd hop count
        "/_stoq/relay/\(MeshWireTests.holder.hex)/1/metrics",  // not a chunk, a manifest or an object
        "/_stoq/relay/\(MeshWireTests.holder.hex)1/chunks/x",  // no separator
    ])
    func malformedRelayPathsAreRefused(_ path: String) {
        #expect(MeshWire.parseRelay(path) == nil)
    }

    @Test func probeAnswersRoundTrip() throws {
        let a = MeshWire.ProbeAnswer(node: Self.holder, loadPPM: 250_000, sequence: 1_764_000_000_123)
        #expect(String(decoding: a.encoded, as: UTF8.self) == "stoq-mesh-probe 1\nnode \(Self.holder.hex)\nload 250000\nsequence 1764000000123\n")
        #expect(try MeshWire.ProbeAnswer(decoding: a.encoded) == a)
    }

    @Test func badProbeAnswersNameWhatIsWrong() {
        func refusal(_ text: String) -> AdvertError? {
            do { _ = try MeshWire.ProbeAnswer(decoding: Array(text.utf8)); return nil } catch { return error }
        }
        #expect(refusal("hello")?.code == .malformed)
        #expect(refusal("stoq-mesh-probe 1\nnode 12\nload 0\nsequence 1\n")?.detail == "probe answer: node is not 64 hex digits")
        #expect(refusal("stoq-mesh-probe 1\nnode \(Self.holder.hex)\nload 2000000\nsequence 1\n")?.code == .badValue)
        #expect(refusal("stoq-mesh-probe 1\nnode \(Self.holder.hex)\nweight 1\nsequence 1\n")?.detail == "probe answer line 3: expected load")
        #expect(refusal(String(repeating: "x", count: 600))?.code == .oversized)
    }
}
