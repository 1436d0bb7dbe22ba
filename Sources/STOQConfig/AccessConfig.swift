import STOQAccess
import TOMLKit

extension NodeConfig {
    /// `[access]`: who may write and read this node (docs/access.md). Writes need a credential
    /// by default; reads are public unless a prefix says otherwise.
    public struct Access: Sendable, Equatable {
        /// `write`: "authorized" (a writer token or certificate) or "public".
        public var write = WriteAccess.authorized
        /// `read`: path prefix → rule; the longest matching prefix decides.
        public var read: [String: ReadAccess] = ["/": .public]
        /// `token_keys`: PEM files of other issuers' P-256 public keys whose tokens are accepted
        /// too (the node's own `data_dir/access/token-key.pem` always is).
        public var tokenKeys: [String] = []

        public init() {}

        /// The policy these settings describe.
        public var policy: AccessPolicy { AccessPolicy(write: write, read: read) }
    }
}

extension Reader {
    /// Reads `[access]`; `overwrite` is the object gate's (LimitsConfig.swift), which needs a
    /// restart where the rest of the section reloads.
    mutating func access(_ a: inout NodeConfig.Access, overwrite: inout NodeConfig.Overwrite) {
        section("access") { s in
            s.choice("write", &a.write)
            s.choice("overwrite", &overwrite)
            s.readRules("read", &a.read)
            s.stringArray("token_keys", &a.tokenKeys)
        }
    }
}

extension Section {
    /// An inline table of path prefix → read rule, e.g. `{ "/" = "public", "/objects/private/" = "token" }`.
    mutating func readRules(_ key: String, _ out: inout [String: ReadAccess]) {
        guard let v = value(key) else { return }
        let rules = ReadAccess.allCases.map { "\"\($0.rawValue)\"" }.joined(separator: ", ")
        guard let t = v.table else {
            return fail(.badType, key, v, "an inline table of path prefix = rule, e.g. { \"/objects/private/\" = \"token\" }")
        }
        var r: [String: ReadAccess] = [:]
        var ok = true
        for k in t.keys.sorted() {
            let entry = "\(key).\"\(k)\""
            guard k.hasPrefix("/") else {
                fail(.badValue, entry, t[k]!, "a path prefix starting with / as the key (e.g. \"/objects/private/\")")
                ok = false
                continue
            }
            guard let s = t[k]!.string, let rule = ReadAccess(rawValue: s) else {
                fail(.badValue, entry, t[k]!, "one of \(rules)")
                ok = false
                continue
            }
            r[k] = rule
        }
        if ok {
            if r["/"] == nil { r["/"] = .public }
            out = r
        }
    }
}
