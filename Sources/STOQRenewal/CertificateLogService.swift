import Crypto
import Foundation
import Logging
import STOQCore
import STOQTrust
import X509

/// The node's CA transparency log (RFC 6962 hashing), shared by the certificate manager,
/// whose CA logs every precertificate before the certificate exists, and the workers, which serve it
/// under `/_stoq/log/`: `sth` (signed tree head), `key` (the log's public key, PEM),
/// `inclusion?hash=<leaf hash hex>[&size=N]` and `consistency?first=M&second=N`.
/// Requests are rare and small, so one lock guards the log.
package final class CertificateLogService: PrecertificateLog, @unchecked Sendable {
    private let lock = NSLock()
    private let log: TransparencyLog

    /// Opens the CA's log; a torn tail cut on open (a crash mid-append) is logged as a warning.
    init(caDirectory: String, logger: Logger) throws {
        log = try TransparencyLog.openForAuthority(caDirectory: caDirectory) { logger.warning("\($0)") }
    }

    var size: Int { lock.withLock { log.size } }

    /// The CA's precertificate submission: logged durably before the SCT comes back.
    package func addPrecertificate(_ precert: Certificate, issuer: Certificate) throws -> SignedCertificateTimestamp {
        try lock.withLock { try log.addPrecertificate(precert, issuer: issuer) }
    }

    /// Answers a `/_stoq/log/…` request: status, content type, body.
    package func handle(path: String) -> (Int, String, [UInt8]) {
        let parts = path.split(separator: "?", maxSplits: 1)
        let route = String(parts.first ?? "")
        var query: [String: String] = [:]
        if parts.count == 2 {
            for pair in parts[1].split(separator: "&") {
                let kv = pair.split(separator: "=", maxSplits: 1)
                if kv.count == 2 { query[String(kv[0])] = String(kv[1]) }
            }
        }
        func json(_ obj: [String: Any]) -> (Int, String, [UInt8]) {
            let data = (try? JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys])) ?? Data()
            return (200, "application/json", Array(data))
        }
        func bad(_ status: Int, _ why: String) -> (Int, String, [UInt8]) { (status, "text/plain", Array("\(why)\n".utf8)) }
        return lock.withLock {
            do {
                // `stoq trust issue` on this CA appends from another process.
                try log.refresh()
                switch route {
                case NodePaths.logTreeHead:
                    let sth = try log.signedTreeHead()
                    return json([
                        "tree_size": sth.treeSize, "timestamp": sth.timestamp, "root_hash": Hex.encode(sth.rootHash),
                        "signature": Data(sth.signature).base64EncodedString(),
                    ])
                case NodePaths.logKey:
                    return (200, "application/x-pem-file", Array((log.publicKey.pemRepresentation + "\n").utf8))
                case NodePaths.logInclusion:
                    guard let h = query["hash"].flatMap({ Hex.decode($0) }), h.count == 32 else {
                        return bad(400, "inclusion needs hash=<64 hex digits: the entry's RFC 6962 leaf hash>")
                    }
                    let size = query["size"].flatMap(Int.init) ?? log.size
                    guard size >= 1, size <= log.size else { return bad(400, "size \(size) is outside 1…\(log.size)") }
                    guard let index = log.tree.leafHashes.prefix(size).firstIndex(of: h) else {
                        return bad(404, "no entry with leaf hash \(Hex.encode(h)) in the first \(size)")
                    }
                    let proof = try log.inclusionProof(index: index, treeSize: size)
                    return json(["index": index, "tree_size": size, "path": proof.map { Hex.encode($0) }])
                case NodePaths.logConsistency:
                    guard let first = query["first"].flatMap(Int.init), let second = query["second"].flatMap(Int.init),
                        first >= 0, first <= second, second <= log.size
                    else {
                        return bad(400, "consistency needs 0 ≤ first ≤ second ≤ \(log.size)")
                    }
                    let proof = try log.consistencyProof(from: first, to: second)
                    return json(["first": first, "second": second, "path": proof.map { Hex.encode($0) }])
                default:
                    return bad(404, "no \(route): try \(NodePaths.logTreeHead), /key, /inclusion, /consistency")
                }
            } catch {
                return bad(500, "\(error)")
            }
        }
    }
}
