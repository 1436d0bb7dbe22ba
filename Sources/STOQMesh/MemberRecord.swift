import Foundation
import STOQConfig
import STOQCore

/// A node's registration under `mesh.etcd_prefix`: key `<prefix><name>`, where `<name>` is the
/// node id in lowercase hex (64 characters), or `[addr]:port` for a node registered without one;
/// value a small JSON object:
///
///     {"url":"https://[fd00:57::1]:4433","node_id":"9f86d0…(64 hex)"}
///
/// `node_id` may be absent. Unknown fields are ignored (later versions may add some). A value
/// that breaks these rules is refused with a `Refusal` code, counted, and the rest of the
/// prefix is still used.
public enum MemberRecord {
    /// The largest value accepted.
    public static let maxValueBytes = 1024

    /// Why a record under the prefix was refused (`stoq_mesh_discovery_refused_total{reason}`).
    public struct Refusal: Error, Hashable, Sendable, CustomStringConvertible {
        /// The counted reason.
        public let code: String
        /// What exactly, naming the key or field.
        public let detail: String
        public var description: String { "\(code): \(detail)" }

        /// More than `maxValueBytes`.
        public static let tooLarge = "too_large"
        /// Not a JSON object.
        public static let notJSON = "not_json"
        /// `url` missing or not `https://[ipv6]:port`.
        public static let badURL = "bad_url"
        /// `url` names an IPv4 address.
        public static let ipv4 = "ipv4"
        /// `node_id` present but not 64 lowercase hex characters.
        public static let badNodeID = "bad_node_id"
        /// The key's name is not the record's node id (or, without one, its `[addr]:port`).
        public static let keyMismatch = "key_mismatch"
        /// The key is not valid base64 or not under the prefix (a broken gateway answer).
        public static let badKey = "bad_key"
    }

    /// The key `member` registers under.
    public static func key(prefix: String, for member: MeshMember) -> String {
        prefix + (member.nodeID?.hex ?? member.url.endpoint.description)
    }

    /// The value `member` registers.
    public static func encode(_ member: MeshMember) -> [UInt8] {
        var s = "{\"url\":\"\(member.url)\""
        if let id = member.nodeID { s += ",\"node_id\":\"\(id.hex)\"" }
        return Array((s + "}").utf8)
    }

    /// The member a record names, or why it is refused. `name` is the key without the prefix.
    public static func decode(name: String, value: [UInt8]) -> Result<MeshMember, Refusal> {
        func refuse(_ code: String, _ detail: String) -> Result<MeshMember, Refusal> {
            .failure(Refusal(code: code, detail: "key …\(name.prefix(80)): \(detail)"))
        }
        guard value.count <= maxValueBytes else { return refuse(Refusal.tooLarge, "\(value.count)-byte value, more than \(maxValueBytes)") }
        guard let object = try? JSONSerialization.jsonObject(with: Data(value)) as? [String: Any] else {
            return refuse(Refusal.notJSON, "the value is not a JSON object")
        }
        guard let text = object["url"] as? String else { return refuse(Refusal.badURL, "no \"url\" string") }
        let url: MeshURL
        switch MeshURL.parse(text, scheme: "https") {
        case .success(let u): url = u
        case .failure(let e):
            return refuse(e.code == .ipv4Refused ? Refusal.ipv4 : Refusal.badURL, "url \"\(text.prefix(80))\": \(e.reason)")
        }
        var id: NodeIdentity?
        if let raw = object["node_id"] {
            guard let hex = raw as? String, hex.utf8.count == 64,
                let bytes = Self.bytes(hex: hex)
            else {
                return refuse(Refusal.badNodeID, "node_id is not 64 lowercase hex characters")
            }
            id = NodeIdentity(bytes)
        }
        let member = MeshMember(url: url, nodeID: id)
        let expected = id?.hex ?? url.endpoint.description
        guard name == expected else { return refuse(Refusal.keyMismatch, "the key should end in \(expected)") }
        return .success(member)
    }

    static func bytes(hex: String) -> [UInt8]? {
        var out: [UInt8] = []
        var hi: UInt8?
        for c in hex.utf8 {
            let v: UInt8
            switch c {
            case 0x30...0x39: v = c - 0x30
            case 0x61...0x66: v = c - 0x61 + 10
            default: return nil
            }
            if let h = hi { out.append(h << 4 | v); hi = nil } else { hi = v }
        }
        return hi == nil ? out : nil
    }
}
