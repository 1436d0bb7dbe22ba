import STOQConfig
import STOQCore
import STOQTrust
import X509

/// The serials this node's CA has revoked (`data_dir/trust/revoked.txt`, where `stoq trust
/// serve`'s revocations and the operator's go), as every check of a client certificate reads
/// them at each handshake: QUIC mutual TLS, the admin API's mutual TLS and mesh adverts'
/// signers. The checks are made once; a reload (SIGHUP, or the file changing) reads the file
/// again and replaces the serials here, so that a revocation refuses its certificate from the
/// next handshake without a restart. (Each check used to hold the serials read at start.)
final class RevocationList: Sendable {
    /// The file, under the node's `data_dir` (which changes only at a restart).
    let path: String
    private let serials = Replaceable<Set<Certificate.SerialNumber>>([])

    init(dataDir: String) { path = dataDir + "/trust/" + TrustAuthority.FileName.revoked }

    /// Whether anything judges client certificates under `cfg`, and so reads the revoked serials.
    static func needed(by cfg: NodeConfig) -> Bool {
        cfg.network.clientAuth != .none || cfg.admin.auth == .mtls || cfg.mesh.enabled
    }

    /// Reads the file (absent: nothing is revoked) and applies what it says; whether that
    /// changed the serials held. A line that is not a serial throws, naming the file and the
    /// line, and the serials held stay (`PEMFiles.readSerials`, the one parser of the file).
    @discardableResult
    func reload() throws(NodeError) -> Bool {
        let read: Set<Certificate.SerialNumber>
        do { read = try PEMFiles.readSerials(path, missingIsEmpty: true) } catch {
            throw NodeError(.identity, "revoked serials: \(error)")
        }
        guard read != serials.current else { return false }
        serials.replace(read)
        return true
    }

    /// `verifier` with the serials revoked now in place of those it was made with.
    func applied(to verifier: PeerVerifier) -> PeerVerifier {
        var v = verifier
        v.revokedSerials = serials.current
        return v
    }
}
