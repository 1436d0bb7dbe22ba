import ArgumentParser
import Crypto
import Foundation
import STOQ
import STOQCore
import STOQTrust
import SwiftASN1
import X509

/// `stoq trust audit`: checks a node's transparency log from the outside.
struct Audit: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Audit a node's certificate transparency log: signed tree head, consistency with an earlier one, inclusion of a certificate.",
        discussion: """
            Example: stoq trust audit https://[2001:db8::10]:4433 --ca root.pem --log-key log.pem \\
                       --previous sth.json --include node.pem --save sth.json
            Verifies the tree head's signature with --log-key (without it, the key the node serves,
            which is trust on first use: save it), that the log only grew since --previous (an RFC 6962
            consistency proof), and that --include's first certificate is in it (an inclusion proof).
            A certificate with an embedded SCT from this log is found by its precert entry (RFC 6962:
            its TBS without the SCT list, the issuer's key hash, the SCT's timestamp), and the SCT's
            signature is checked too; one without an SCT by its DER (logs from before SCTs).
            Exit 0 when every check passes, 1 with the failed check named.
            """)

    @Argument(help: "The node, https://[ipv6]:port") var node: String
    @OptionGroup var trust: TrustOptions
    /// The log's public key (PEM), as published by its operator: TrustOptions' --log-key.
    var logKey: String? { trust.logKeys.first }
    @Option(help: "A tree head saved earlier with --save: the log must be consistent with it.") var previous: String?
    @Option(help: "A PEM certificate (or chain: leaf, then its issuer) that must be in the log.") var include: String?
    @Option(name: .customLong("issuer"), help: "The issuer of --include's certificate, when that file holds only the leaf.")
    var issuerPath: String?
    @Option(help: "Write the verified tree head here (JSON), for the next audit's --previous.") var save: String?
    @Flag(help: "Print one JSON object.") var json = false

    struct Head: Codable {
        var treeSize: UInt64
        var timestamp: UInt64
        var rootHash: String
        var signature: String
        enum CodingKeys: String, CodingKey {
            case treeSize = "tree_size", timestamp, rootHash = "root_hash", signature
        }
    }

    func get(_ path: String) throws -> [UInt8] {
        let base = node.hasSuffix("/") ? String(node.dropLast()) : node
        let url: STOQURL
        do { url = try STOQURL(base + path) } catch { throw fail("<node>: \(error)", code: 2) }
        let r: (status: Int, body: [UInt8])
        do { r = try STOQClient.fetch(url, trust: trust.trust, datapath: .ioUring) } catch { throw fail("\(path): \(error)") }
        guard r.status == 200 else { throw fail("\(path): HTTP \(r.status) \(String(decoding: r.body.prefix(300), as: UTF8.self))") }
        return r.body
    }

    func run() throws {
        var report: [String: Any] = ["node": node]
        func check(_ ok: Bool, _ what: String) throws {
            report[what] = ok
            if !ok {
                if json { printReport(report) }
                throw fail("audit failed: \(what)")
            }
        }
        let key: P256.Signing.PublicKey
        if let logKey {
            // The same reading as `trust verify --log-key` and the node's trust.transparency_logs.
            do { key = try CertificateTransparency.loadLogKeys([logKey])[0] } catch { throw fail("--log-key \(logKey): \(error)", code: 2) }
        } else {
            let pem = String(decoding: try get(NodePaths.logKey), as: UTF8.self)
            do { key = try P256.Signing.PublicKey(pemRepresentation: pem) } catch { throw fail("the node's log key is not a P-256 public key: \(error)") }
        }
        report["log_key_from"] = logKey == nil ? "the node (trust on first use)" : logKey!
        let head = try JSONDecoder().decode(Head.self, from: Data(try get(NodePaths.logTreeHead)))
        guard let root = Hex.decode(head.rootHash), let sig = Data(base64Encoded: head.signature) else {
            throw fail("the node's tree head does not parse")
        }
        // Proofs index the tree with Int: a size past it is no log this machine could check.
        guard Int(exactly: head.treeSize) != nil else { throw fail("the node's tree head has a tree size of \(head.treeSize), past any log") }
        let sth = SignedTreeHead(treeSize: head.treeSize, timestamp: head.timestamp, rootHash: root, signature: Array(sig))
        report["tree_size"] = head.treeSize
        try check(sth.verify(with: key), "tree head signature")

        if let previous {
            guard let saved = FileManager.default.contents(atPath: previous) else {
                throw fail("--previous \(previous): cannot read the file", code: 2)
            }
            let old: Head
            do { old = try JSONDecoder().decode(Head.self, from: saved) } catch {
                throw fail("--previous \(previous): not a tree head saved by --save (JSON with tree_size, timestamp, root_hash, signature)", code: 2)
            }
            guard let oldRoot = Hex.decode(old.rootHash) else { throw fail("\(previous): bad root_hash") }
            try check(old.treeSize <= head.treeSize, "log did not shrink")
            let proof = try proofPath(try get("\(NodePaths.logConsistency)?first=\(old.treeSize)&second=\(head.treeSize)"))
            try check(
                MerkleTree.verifyConsistency(
                    oldSize: Int(old.treeSize), newSize: Int(head.treeSize), oldRoot: oldRoot,
                    newRoot: root, proof: proof), "consistent with \(previous)")
        }
        if let cert = include {
            let certs = try PEMFiles.readCertificates(cert)
            guard let leaf = certs.first else { throw fail("\(cert): no certificate") }
            let leafHash: MerkleHash
            let scts = (try? CertificateTransparency.embeddedSCTs(leaf)) ?? []
            let logID = CertificateTransparency.logID(of: key)
            if let sct = scts.first(where: { $0.logID == logID }) {
                // Logged as a precertificate: the leaf is the MerkleTreeLeaf recomputed from the
                // final certificate (TBS without its SCT list) and the SCT's timestamp.
                let given = try issuerPath.map { try PEMFiles.readCertificates($0)[0] }
                guard let issuer = certs.dropFirst().first ?? given else {
                    throw fail("\(cert) carries an SCT: its issuer is needed to recompute the log entry (a chain file, or --issuer)", code: 2)
                }
                guard let entry = try CertificateTransparency.entry(forFinalCertificate: leaf, issuer: issuer) else {
                    throw fail("\(cert): the SCT list extension does not parse")
                }
                try check(sct.verify(entry: entry, key: key), "\(cert) SCT signature")
                leafHash = MerkleTree.leafHash(CertificateTransparency.merkleTreeLeaf(timestamp: sct.timestamp, entry: entry))
            } else {
                // Logs written before SCTs hold the DER certificate itself.
                var der = DER.Serializer()
                try der.serialize(leaf)
                leafHash = MerkleTree.leafHash(der.serializedBytes)
            }
            let body = try get("\(NodePaths.logInclusion)?hash=\(Hex.encode(leafHash))&size=\(head.treeSize)")
            let obj = try JSONSerialization.jsonObject(with: Data(body)) as? [String: Any] ?? [:]
            let index = obj["index"] as? Int ?? -1
            report["cert_index"] = index
            try check(
                MerkleTree.verifyInclusion(
                    leafHash: leafHash, leafIndex: index, treeSize: Int(head.treeSize),
                    proof: try proofPath(body), rootHash: root), "\(cert) included")
        }
        // Atomically: a run cut short must not leave a torn head for the next audit to compare with.
        if let save { try PEMFiles.writeFile(String(decoding: try JSONEncoder().encode(head), as: UTF8.self), to: save, mode: 0o644) }
        if json {
            printReport(report)
        } else {
            print(
                "audit ok: tree size \(head.treeSize), signature valid\(previous.map { ", consistent with \($0)" } ?? "")\(include.map { ", \($0) included" } ?? "")"
            )
        }
    }

    func proofPath(_ body: [UInt8]) throws -> [MerkleHash] {
        let obj = try JSONSerialization.jsonObject(with: Data(body)) as? [String: Any] ?? [:]
        return (obj["path"] as? [String] ?? []).compactMap { Hex.decode($0) }
    }

    func printReport(_ report: [String: Any]) {
        let data = (try? JSONSerialization.data(withJSONObject: report, options: [.sortedKeys])) ?? Data("{}".utf8)
        print(String(decoding: data, as: UTF8.self))
    }
}
