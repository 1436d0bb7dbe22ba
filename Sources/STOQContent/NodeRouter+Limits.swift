import STOQAccess
import STOQCore
import STOQMesh
import STOQQUIC

/// Per-client rate limits at the router (`[limits] requests_per_second`, `request_burst`,
/// `bytes_per_second`): every request is admitted or refused here before a service sees it,
/// keyed by `clientIdentity` (so the access policy's identity once it has set one). Mesh
/// traffic between nodes (probes, adverts, relays) on a connection that showed a node's
/// certificate (verified, no access role, serverAuth: `NodeCertificate`) is not limited: it is
/// the mesh's own machinery, paced by it. The same paths from anyone else are limited like any
/// request (a relay path serves objects, and an advert needs no credential).
extension NodeRouter {
    /// Whether `request` may go on; answers 429 with `Retry-After` itself when not.
    func admitRate(_ request: HTTPRequest, _ stream: HTTPStream, _ connection: QUICConnection) -> Bool {
        guard let rates, !(MeshWire.handles(request.path) && Self.isNode(connection.peerIdentity)) else { return true }
        let client = clientIdentity(request, peer: connection.peer)
        let announced = request.contentLength.map { UInt64(max(0, $0)) } ?? 0
        guard let refusal = rates.admit(client, bodyBytes: announced, now: monotonicNow()) else {
            // Charged its announced length now, so that uploads started side by side see each
            // other's debt; settled at its end against what arrived: a PUT refused at its head
            // (413, 507, 412, 405) gets back the length it never sent, one of unknown length
            // pays what it sent.
            if request.hasBody || announced > 0, rates.settings.bytesPerSecond > 0 {
                unmetered[stream] = (client, announced)
            }
            return true
        }
        logger.debug("rate limited", metadata: ["client": "\(client)", "path": "\(request.path.prefix(200))"])
        let body = BodyRegion(copying: Array("\(refusal.reason)\n".utf8))
        connection.respond(
            stream, status: 429,
            headers: [("retry-after", "\(refusal.retryAfter)"), ("content-type", "text/plain"), ("content-length", "\(body.count)")],
            body: body)
        return false
    }

    /// The node a connection's certificate identity (`QUICConnection.peerIdentity`) names: its
    /// key id (hex; its mesh id), which the identity carries only for a node's certificate
    /// (`NodeCertificate`; so never with a role), else nil.
    static func node(_ peerIdentity: String) -> String? {
        CertificateIdentity(encoded: peerIdentity).flatMap { $0.roles.isEmpty && !$0.key.isEmpty ? $0.key : nil }
    }

    /// Whether a connection's certificate identity is a node's.
    static func isNode(_ peerIdentity: String) -> Bool { node(peerIdentity) != nil }

    /// Settles an upload's charge against the body bytes it sent (called when its request or
    /// stream ends).
    func meterEnded(_ stream: HTTPStream) {
        guard let m = unmetered.removeValue(forKey: stream) else { return }
        rates?.settle(m.client, charged: m.charged, received: stream.bytesReceived, now: monotonicNow())
    }
}
