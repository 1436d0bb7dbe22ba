import STOQEdge
import STOQMesh
import STOQQUIC
import STOQStore
import STOQTransfer

/// The mesh's requests, answered on the worker: probes from the snapshot, adverts handed to
/// the mesh thread, relays served from the store or passed on through the edge fetcher.
extension ContentService {
    func meshRequest(_ path: String, _ request: HTTPRequest, _ stream: HTTPStream, _ connection: QUICConnection) {
        guard let mesh else { return fail(stream, connection, 404, "this node runs no mesh ([mesh] is not configured)") }
        switch path {
        case MeshWire.probePath:
            guard request.method == "GET" else { return notAllowed(stream, connection, "GET") }
            let answer = mesh.probeAnswer()
            connection.respond(
                stream, status: 200, headers: [("content-type", "text/plain"), ("content-length", "\(answer.count)")],
                body: BodyRegion(copying: answer))
        case MeshWire.advertPath:
            guard request.method == "PUT" else { return notAllowed(stream, connection, "PUT") }
            if let n = request.contentLength, n > SignedAdvert.maxSize {
                mesh.countRefusedAdvert("oversized", "a PUT of \(n) bytes; at most \(SignedAdvert.maxSize)")
            }
            begin(.advert, limit: UInt64(SignedAdvert.maxSize), request, stream, connection)
        default:
            relay(path, mesh, request, stream, connection)
        }
    }

    /// `GET /_stoq/relay/<holder>/<hops>/…`: from this node's store when it has the resource
    /// (whoever the holder), else from the next hop towards the holder, if `max_hops` allows.
    /// An object asked for whole (`…/objects/<name>`, after the holder had no manifest of it)
    /// is served as a client's `GET /objects/<name>` would be here (`serveOwnObject`), or
    /// fetched whole from the next hop, cut into this node's cache and served from it.
    private func relay(_ path: String, _ mesh: MeshService, _ request: HTTPRequest, _ stream: HTTPStream, _ connection: QUICConnection) {
        guard request.method == "GET" || request.method == "HEAD" else { return notAllowed(stream, connection, "GET, HEAD") }
        guard let (holder, hops, resourcePath) = MeshWire.parseRelay(path) else {
            return fail(
                stream, connection, 400,
                "bad relay path \(path.prefix(200)): expected /_stoq/relay/<64 hex>/<hops>/chunks/<sha256>, …/manifests/<name> or …/objects/<name>")
        }
        let head = request.method == "HEAD"
        let isHolder = holder == mesh.identity.hex
        if resourcePath.hasPrefix("/chunks/") {
            guard let id = ChunkID(hex: resourcePath.dropFirst("/chunks/".count)) else {
                return fail(stream, connection, 400, "bad chunk id in \(path.prefix(200)): expected 64 hex digits")
            }
            if isHolder || (try? index.chunks.has(id)) == true {
                mesh.countRelay(.served, hops: hops)
                return serveChunk(id, head: head, stream, connection)
            }
            guard let edge = forwarding(mesh, holder: holder, hops: hops, stream, connection) else { return }
            serveEdgeChunk(
                edge, id, head: head, afresh: request.noCache, stream, connection, hint: RelayHint(holder: holder, hops: hops, via: request.via))
        } else if resourcePath.hasPrefix("/objects/") {
            let name = String(resourcePath.dropFirst("/objects/".count))
            do { try ObjectIndex.validateName(name) } catch { return fail(stream, connection, 400, "\(error)") }
            if serveOwnObject?(name, request, stream, connection) == true { return mesh.countRelay(.served, hops: hops) }
            if isHolder { return fail(stream, connection, 404, "no object \(name) at node \(mesh.identity)") }
            guard forwarding(mesh, holder: holder, hops: hops, stream, connection) != nil else { return }
            serveEdgeObject(name, request, stream, connection, hint: RelayHint(holder: holder, hops: hops, via: request.via, whole: true))
        } else {
            let name = String(resourcePath.dropFirst("/manifests/".count))
            do { try ObjectIndex.validateName(name) } catch { return fail(stream, connection, 400, "\(error)") }
            if isHolder, let plainCuts, servePlainCut(plainCuts, name, head: head, stream, connection) {
                return mesh.countRelay(.served, hops: hops)
            }
            if isHolder || hasObject(name) {
                mesh.countRelay(.served, hops: hops)
                return serveManifest(name, head: head, stream, connection)
            }
            guard let edge = forwarding(mesh, holder: holder, hops: hops, stream, connection) else { return }
            serveEdgeManifest(
                edge, name, head: head, revalidate: request.noCache, stream, connection, hint: RelayHint(holder: holder, hops: hops, via: request.via))
        }
    }

    /// The edge fetcher to pass a relay on with, or nil having refused it: one more hop would
    /// exceed `routing.max_hops` (508, counted), or the node fetches nothing.
    private func forwarding(_ mesh: MeshService, holder: String, hops: Int, _ stream: HTTPStream, _ connection: QUICConnection) -> EdgeCache? {
        let maxHops = mesh.settings.maxHops
        guard hops < maxHops else {
            mesh.countRelay(.refusedMaxHops, hops: hops)
            fail(
                stream, connection, 508,
                "mesh: a request for node \(holder.prefix(16)) that took \(hops) hops cannot go further: routing.max_hops is \(maxHops)")
            return nil
        }
        guard let edge else {
            fail(stream, connection, 502, "mesh: this node does not relay (no edge cache)")
            return nil
        }
        mesh.countRelay(.forwarded, hops: hops)
        return edge
    }
}
