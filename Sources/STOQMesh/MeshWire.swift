import STOQCore
import STOQTransfer

/// What nodes say to each other over their QUIC connections, besides adverts' bytes
/// (`SignedAdvert`): the paths, the relay header and the probe answer. One home for each, used
/// by the side that asks and the side that answers.
public enum MeshWire {
    /// `GET`: a probe; the answer is `ProbeAnswer`'s text.
    public static let probePath = NodePaths.meshProbe
    /// `PUT`: a signed advert (`SignedAdvert` bytes); answered 202 once queued.
    public static let advertPath = NodePaths.meshAdvert
    /// `GET /_stoq/relay/<holder>/<hops>/chunks/<sha256>`, `…/manifests/<name>` or
    /// `…/objects/<name>` (an object the holder has no manifest of, whole): fetch a resource
    /// from node `<holder>` (64 hex digits), relayed hop by hop. `<hops>` is how many
    /// hops the request has taken when it arrives (1 from the first node); each relay adds one
    /// and refuses a request that would exceed `routing.max_hops`.
    public static let relayPrefix = NodePaths.relayPrefix

    /// Whether a request path is the mesh's (probes, adverts, relays).
    public static func handles(_ path: String) -> Bool { path.hasPrefix(NodePaths.meshPrefix) || path.hasPrefix(relayPrefix) }

    /// A mesh request's `Via` (RFC 9110 §7.6.3): every node it has passed names itself,
    /// `3 <node id hex>` (HTTP/3, the node as pseudonym), after those before it. A relay never
    /// sends the request on to a node already named (split horizon by node, not by address:
    /// nodes sharing a host share its address).
    public static func via(_ incoming: String, adding node: NodeIdentity) -> String {
        incoming.isEmpty ? "3 \(node.hex)" : incoming + ", 3 \(node.hex)"
    }

    /// The node ids (hex) a `Via` names; entries that are not a mesh node's are ignored.
    public static func viaNodes(_ via: String) -> Set<String> {
        Set(
            via.split(separator: ",").compactMap { entry in
                let parts = entry.split(separator: " ")
                guard parts.count == 2, parts[0] == "3", parts[1].utf8.count == 64, Hex.isDigits(parts[1]) else { return nil }
                return parts[1].lowercased()
            })
    }

    /// The path that asks node `holder` for `resource`, having taken `hops` hops on arrival.
    public static func relayPath(holder: NodeIdentity, hops: Int, _ resource: UpstreamResource) -> String {
        "\(relayPrefix)\(holder.hex)/\(hops)\(resource.path)"
    }

    /// A relay path, taken apart: the holder (lower-case hex), the hops taken, and the resource
    /// path (`/chunks/…`, `/manifests/…` or `/objects/…`). Nil when it is not one.
    public static func parseRelay(_ path: String) -> (holder: String, hops: Int, resourcePath: String)? {
        guard path.hasPrefix(relayPrefix) else { return nil }
        let rest = path.dropFirst(relayPrefix.count)
        let holder = rest.prefix(64)
        guard holder.utf8.count == 64, Hex.isDigits(holder), rest.dropFirst(64).first == "/" else { return nil }
        let afterHolder = rest.dropFirst(65)
        let digits = afterHolder.prefix { $0.isNumber }
        guard (1...3).contains(digits.count), let hops = Int(digits) else { return nil }
        let resource = afterHolder.dropFirst(digits.count)
        guard resource.hasPrefix("/chunks/") || resource.hasPrefix("/manifests/") || resource.hasPrefix("/objects/") else { return nil }
        return (holder.lowercased(), hops, String(resource))
    }

    /// A probe's answer: who answered, how loaded it is, and the newest advert it signed.
    public struct ProbeAnswer: Sendable, Equatable {
        public var node: NodeIdentity
        /// Load, parts per million (active connections over `network.max_connections`).
        public var loadPPM: UInt32
        /// The sequence of the newest advert the node signed.
        public var sequence: UInt64

        public init(node: NodeIdentity, loadPPM: UInt32, sequence: UInt64) {
            (self.node, self.loadPPM, self.sequence) = (node, loadPPM, sequence)
        }

        static let magic = "stoq-mesh-probe 1"
        /// The longest answer taken: a prober writes no more of a body than this.
        public static let maxSize = 512

        /// The answer's bytes: four lines of text, so `curl` shows them.
        public var encoded: [UInt8] {
            Array("\(Self.magic)\nnode \(node.hex)\nload \(loadPPM)\nsequence \(sequence)\n".utf8)
        }

        /// Parses an answer; throws naming the line that is wrong.
        public init(decoding bytes: some Collection<UInt8>) throws(AdvertError) {
            guard bytes.count <= Self.maxSize else {
                throw AdvertError(.oversized, "probe answer of \(bytes.count) bytes; at most \(Self.maxSize)")
            }
            let lines = String(decoding: bytes, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false)
            guard lines.count == 5, lines[0] == Self.magic, lines[4].isEmpty else {
                throw AdvertError(.malformed, "not a probe answer (expected \"\(Self.magic)\" and three lines)")
            }
            func field(_ i: Int, _ name: String) throws(AdvertError) -> Substring {
                guard lines[i].hasPrefix(name + " ") else { throw AdvertError(.malformed, "probe answer line \(i + 1): expected \(name)") }
                return lines[i].dropFirst(name.count + 1)
            }
            let hex = try field(1, "node")
            guard hex.count == 64, let id = Hex.decode(hex) else {
                throw AdvertError(.malformed, "probe answer: node is not 64 hex digits")
            }
            guard let load = UInt32(try field(2, "load")), load <= PPM.whole else {
                throw AdvertError(.badValue, "probe answer: load is not 0...\(PPM.whole)")
            }
            guard let sequence = UInt64(try field(3, "sequence")) else { throw AdvertError(.malformed, "probe answer: bad sequence") }
            self.init(node: NodeIdentity(id), loadPPM: load, sequence: sequence)
        }
    }
}
