import Crypto
import Foundation
import Logging
import STOQAccess
import STOQConfig
import STOQCore
import STOQMesh
import STOQTransfer
import STOQTrust
import X509

extension Node {
    /// The mesh service, when `[mesh]` asks for one: this node's certificate and key sign its
    /// adverts; neighbours are verified like an edge's origin (`peerTrust`), and adverts'
    /// signers against the same roots. Started by `start()` once the workers serve.
    static func makeMesh(
        _ cfg: NodeConfig, certificate: String, key: String, revocations: RevocationList, logger: Logger
    ) throws(NodeError) -> MeshService? {
        guard cfg.mesh.enabled else { return nil }
        let chain: [Certificate]
        let signingKey: P256.Signing.PrivateKey
        do {
            chain = try PEMFiles.readCertificates(certificate)
            signingKey = try PEMFiles.p256PrivateKey(pem: String(contentsOfFile: key, encoding: .utf8))
        } catch {
            throw NodeError(.identity, "mesh: the node's certificate \(certificate) and P-256 key \(key) sign its adverts: \(error)")
        }
        guard !chain.isEmpty else { throw NodeError(.identity, "mesh: \(certificate) holds no certificate") }
        let trust = peerTrust(cfg)
        var local = Set(localAddresses())
        local.insert(IPv6Address.loopback)
        var s = MeshService.Settings(
            chain: chain, key: signingKey, trust: trust, verifyChain: try advertVerifier(trust, revocations: revocations),
            listenPort: cfg.network.listenAddress.port, localAddresses: local)
        s.probeInterval = cfg.mesh.probeInterval
        s.downAfter = cfg.mesh.downAfter
        s.flapDamping = cfg.mesh.flapDamping
        s.updateInterval = cfg.routing.updateInterval
        s.algorithm = cfg.routing.algorithm
        s.maxHops = cfg.routing.maxHops
        s.multipathScheduler = cfg.routing.multipathScheduler
        let identity = NodeIdentity(publicKey: chain[0].publicKey)
        let registration = registrationURL(cfg).map { MeshMember(url: $0, nodeID: identity) }
        let discovery = DiscoverySelection.backend(
            for: cfg.mesh, listenPort: cfg.network.listenAddress.port, registration: registration, logger: logger)
        return MeshService(settings: s, discovery: discovery, datapath: DatapathSelection.originFetch, logger: logger)
    }

    /// Who may sign an advert: a node's certificate (`NodeCertificate`), chaining to the roots
    /// neighbours are verified against, not revoked by this node's CA (the serials
    /// `revocations` holds when the advert arrives).
    static func advertVerifier(
        _ trust: ClientTrust, revocations: RevocationList
    ) throws(NodeError) -> @Sendable ([Certificate]) throws -> Void {
        let verifier: PeerVerifier
        do {
            let roots = try trust.caFile.map { try PEMFiles.readCertificates($0) } ?? PEMFiles.systemRoots()
            verifier = PeerVerifier(roots: roots, role: .client)
        } catch {
            throw NodeError(.identity, "mesh: cannot read the roots adverts are verified against: \(error)")
        }
        return { chain in
            _ = try revocations.applied(to: verifier).verifySynchronously(chain: chain)
            if let leaf = chain.first, let why = NodeCertificate.refusal(leaf) { throw AdvertSignerError(reason: why) }
        }
    }

    /// The URL this node registers under (etcd): its listen address when that is specific, else
    /// its first global address (a /128 on the loopback first: a node's own address in a routed mesh).
    static func registrationURL(_ cfg: NodeConfig) -> MeshURL? {
        let listen = cfg.network.listenAddress
        if !listen.address.isUnspecified { return MeshURL(endpoint: listen) }
        let candidates = localAddresses().filter { $0 != .loopback }
        guard let a = candidates.first else { return nil }
        return MeshURL(endpoint: IPv6Endpoint(address: a, port: listen.port))
    }
}

/// An advert's signer that chains to the roots but may not sign adverts.
struct AdvertSignerError: Error, CustomStringConvertible {
    let reason: String
    var description: String { reason }
}
