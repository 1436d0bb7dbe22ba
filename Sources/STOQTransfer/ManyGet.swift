import Foundation
import STOQCore
import STOQQUIC

/// One URL's outcome in `STOQClient.getMany`.
public struct ManyGetResult: Sendable, Codable {
    public var url: String
    /// The response's status; nil when none came (`failure` says why).
    public var status: Int?
    /// Body bytes received.
    public var bytes: UInt64
    /// SHA-256 of a 2xx body, hex ("" otherwise, or when not verified).
    public var sha256: String
    /// Why there was no complete answer: the connection's fate, a reset stream, or an answer
    /// that is not the whole object asked for (a 206 to a GET without Range).
    public var failure: String?
    /// What became of the server's preferred address on the connection that answered it
    /// ("none", "used", "failed"); nil without an answer.
    public var preferredAddress: String? = nil
}

/// What `STOQClient.getMany` did: every URL's outcome, in the order given, and what it cost.
public struct ManyGetReport: Sendable, Codable {
    public var results: [ManyGetResult]
    /// Handshakes completed (one per server reached), and how many resumed a kept session.
    public var handshakes: Int
    public var resumed: Int
    /// Connections whose GETs went in 0-RTT and the server took them, and those whose 0-RTT
    /// the server refused (their GETs were sent again after the handshake).
    public var earlyDataAccepted: Int
    public var earlyDataRejected: Int
    public var seconds: Double
    /// Times a connection moved to a new local address because this host's went away.
    public var localMigrations: Int = 0
}

extension STOQClient {
    /// Downloads several URLs, each into its file descriptor (-1 discards), over one
    /// connection per server with up to `maxInFlight` requests at once on it (curl-like reuse:
    /// several objects cost one handshake). `headers(url)` go with each request (a
    /// credential, trace context). Every URL gets a result; a failure of one does not stop the
    /// others. With `sessionCache`, each server's kept session is offered and its new one kept,
    /// and (unless `earlyData` is false) the GETs go in 0-RTT where the server's parameters were.
    /// With `keyUpdate` each connection starts one TLS key update once its handshake is confirmed.
    /// With `verify` each 2xx body is hashed (`sha256`), and a whole body that is not the
    /// object its SHA-256 ETag names fails. A GET without `Range` answered with a part of the
    /// object (206) or another 2xx than 200 fails too (`wholeObjectRefusal`).
    public static func getMany(
        _ urls: [STOQURL], into fds: [Int32], trust: ClientTrust, datapath: ClientDatapath, verify: Bool = true, timeout: Double = 300,
        connectTimeout: Double? = nil,
        headers: (STOQURL) -> [(String, String)] = { _ in [] }, sessionCache: SessionCache? = nil, earlyData: Bool = true,
        keyUpdate: Bool = false, maxInFlight: Int = 64
    ) throws(ClientError) -> ManyGetReport {
        precondition(urls.count == fds.count, "one file descriptor per URL")
        let pool = try ConnectionPool(
            trust: trust, datapath: datapath, connectTimeout: UInt64(min(timeout, connectTimeout ?? 30) * 1e9),
            handshakeTimeout: connectTimeout, keepAlive: transferKeepAlive, updatesKeys: keyUpdate)
        pool.sessionCache = sessionCache
        pool.earlyData = earlyData
        var closed = false
        defer { if !closed { pool.close() } }
        let start = monotonicNow(), deadline = start + UInt64(timeout * 1e9)
        var results = urls.map { ManyGetResult(url: "\($0)", status: nil, bytes: 0, sha256: "", failure: nil) }
        var next = 0, inFlight = 0
        // A GET without Range asks for the whole object: only that is a success.
        var whole = [Bool](repeating: true, count: urls.count)
        while next < urls.count || inFlight > 0 {
            while next < urls.count && inFlight < maxInFlight {
                let u = urls[next], h = headers(u)
                whole[next] = asksForWholeObject(h)
                pool.submit(to: u, "GET", u.path, headers: h, sinkFD: fds[next], tag: next, hash: verify)
                next += 1
                inFlight += 1
            }
            let now = monotonicNow()
            guard now < deadline else {
                for i in results.indices where results[i].status == nil && results[i].failure == nil {
                    results[i].failure = "timed out after \(timeout) s"
                }
                break
            }
            for d in try pool.drive(forNanoseconds: min(deadline - now, 100_000_000)) {
                inFlight -= 1
                results[d.tag].status = d.status
                results[d.tag].bytes = d.received
                results[d.tag].preferredAddress = d.preferredAddress
                results[d.tag].sha256 = d.sha256.map(Hex.encode) ?? ""
                if let f = d.failure {
                    results[d.tag].failure = f
                } else if d.errorCode != H3Error.noError {
                    results[d.tag].failure = "stream reset (\(H3Error.Code(rawValue: d.errorCode).resetReason)) after \(d.received) bytes"
                } else if whole[d.tag], let status = d.status, let why = wholeObjectRefusal(status: status, received: d.received) {
                    results[d.tag].failure = why
                }
            }
        }
        let seconds = Double(monotonicNow() - start) / 1e9
        pool.close()
        closed = true
        return ManyGetReport(
            results: results, handshakes: pool.handshakes, resumed: pool.resumed, earlyDataAccepted: pool.earlyAccepted,
            earlyDataRejected: pool.earlyRejected, seconds: seconds, localMigrations: pool.rig.localMigrations)
    }
}
