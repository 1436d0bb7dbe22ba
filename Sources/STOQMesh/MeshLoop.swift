import CSTOQSystem
import Crypto
import Foundation
import Logging
import STOQCore
import STOQQUIC
import STOQRouting
import STOQTransfer
import STOQTrust
import X509

/// The mesh thread's state: connections, links, link-state. Owned by that thread alone.
final class MeshLoop: @unchecked Sendable {  // handed to its thread, then touched only there
    /// One neighbour: where it listens, what its link looks like, and what a probe learned.
    struct Neighbour {
        var url: STOQURL
        var link: NeighbourLink
        var id: NodeIdentity?
        var probesSent: UInt64 = 0
        var probesAnswered: UInt64 = 0
        var downs: UInt64 = 0
        var ups: UInt64 = 0
        /// When its link was last suppressed for flapping (for the notice when it is reused).
        var suppressedAt: UInt64 = 0
        /// Connection attempts that failed in a row, and when the next may start: a neighbour
        /// that refuses this node (or is refused) is not asked ten times a second.
        var failures = 0
        var retryAt: UInt64 = 0
        /// The last probe answer that was not a 200 (logged once until it changes), or 0.
        var refusedWith = 0
        /// When this node last sent it its own held advert (`returnsOwnAdvert`), and which.
        var returned: (sequence: UInt64, at: UInt64)?
    }

    /// An accepted advert as signed, its sequence, and when it was accepted here.
    struct Held {
        var bytes: [UInt8]
        var sequence: UInt64
        var at: UInt64
    }

    enum Pending {
        /// A probe to a neighbour; `sample` when it was sent on an established connection;
        /// `fd`, the small memory file its answer is written to. One per probe: two answers
        /// that end in one drive (a burst after a loss, an RTT past the probe interval) were
        /// both written at offset 0 of one file per neighbour, and one was read as the other.
        /// Closed when the probe ends, or is given up (`closeFile`).
        case probe(IPv6Endpoint, sample: Bool, fd: Int32)
        /// An advert `PUT` to a neighbour, and how many times it was sent.
        case advert(STOQURL, BodyRegion, sends: Int)
    }

    unowned let service: MeshService
    let pool: ConnectionPool
    let engine: RoutingEngine
    var logger: Logger { service.logger }
    var neighbours: [IPv6Endpoint: Neighbour] = [:]
    /// Requests out, by tag, and when each was sent.
    var pending: [Int: (what: Pending, at: UInt64)] = [:]
    /// A probe or advert unanswered this long is given up (its stream reset): a neighbour
    /// that answers some and sits on the rest does not grow the tables without end.
    static let requestDeadline = 10 * Nanos.second
    /// Adverts verified per pass of the loop (a pass is at most 20 ms of waiting): thousands a
    /// second, far past what a mesh sends, while probes keep their pace under a flood.
    static let advertsPerPass = 256
    /// And at most this long verifying them in one pass (checked every `advertBatch`): probe
    /// answers that arrive meanwhile wait in the socket until the next drive, and that wait
    /// would count in their RTT (a certificate parse, a signature and a chain check are a
    /// fraction of a millisecond each, several in a debug build).
    static let advertBudget: UInt64 = 5_000_000
    static let advertBatch = 8
    /// Digests of adverts refused by their verification (a signature, a chain, an expiry) and
    /// why, so that copies of one are refused again without it; at most this many (forgotten
    /// wholesale when full, and when the node's trust changes).
    var refusedDigests: [SHA256Digest: String] = [:]
    static let refusedDigestsBound = 4096
    var nextTag = 1
    /// Adverts a neighbour answered 503 (its queue full), sent again at `at`.
    var resends: [(at: UInt64, url: STOQURL, body: BodyRegion, sends: Int)] = []
    /// Sends of one advert to one neighbour at most (the first and two more, 1 s and 2 s
    /// after a 503): past that it waits for the origin's next refresh, like any lost one.
    static let advertSends = 3
    var identities: [NodeID: NodeIdentity] = [:]
    var counters = MeshStatus.Counters()
    var lastProbe: UInt64 = 0
    var lastAdvert: UInt64 = 0
    var advertDue = true
    var lastExpire: UInt64 = 0
    /// The member list last reported.
    var members: Set<MeshMember> = []
    var lastStatus: UInt64 = 0
    var viewDirty = true
    var lastRoutesVersion: UInt64 = .max
    var ownSequence: UInt64 = 0
    /// When a neighbour first came up, and whether `warnIfDeaf` has spoken.
    var firstUp: UInt64?
    var deafWarned = false
    /// Pairs of neighbour URLs already reported as answering with one node id.
    var duplicateWarned = Set<[String]>()
    /// The newest accepted advert of every live origin, this node's own included, as signed: a
    /// neighbour whose link comes up is sent all of them at once, so it routes on the whole
    /// database now rather than after every origin's next refresh (`routing.update_interval`).
    var held: [NodeID: Held] = [:]
    /// How many links the last advert too small for every neighbour held (warned once per count).
    var advertTrimWarned = -1
    /// Warnings that repeat (refused adverts by code, a misnamed neighbour): logged at most
    /// once per `LogThrottle.interval` each.
    var warnings = LogThrottle()


    init(service: MeshService) throws {
        self.service = service
        do {
            pool = try ConnectionPool(trust: Self.identifying(service.settings.trust), datapath: service.datapath, connectTimeout: 3 * Nanos.second)
        } catch {
            throw NodeError(.datapath, "mesh: cannot open the socket for neighbour connections: \(error)")
        }
        engine = RoutingEngine(
            algorithm: service.settings.algorithm, maxHops: service.settings.maxHops, backups: .all,
            advertMaxAge: service.settings.advertLifetime, maxLinksPerAdvert: AdvertBody.maxLinks,
            forgetAfter: SignedAdvert.replayHorizonNanos, requireTwoWay: true)
        identities[service.identity.routingID] = service.identity
        pool.credentialsFailed = { [logger = service.logger] error in
            logger.error("mesh: the renewed certificate does not load (\(error)); new neighbour connections present the old one until it does")
        }
    }

    var me: NodeIdentity { service.identity }

    /// `trust` with neighbours named by their certificate: the node id (hex) of the key in
    /// the leaf, which a probe answer's id must match; "" for a certificate that is not a
    /// node's (`NodeCertificate`), whose answers make no neighbour.
    static func identifying(_ trust: ClientTrust) -> ClientTrust {
        var t = trust
        t.identifyServer = { chain in
            guard let der = chain.first, let leaf = try? Certificate(derEncoded: der), NodeCertificate.refusal(leaf) == nil else {
                return ""
            }
            return NodeIdentity(publicKey: leaf.publicKey).hex
        }
        return t
    }

    func run() {
        while !service.stopping {
            let now = monotonicNow()
            if let set = service.takeMembers() {
                members = set
                updateMembers(now: now)
            }
            if let trust = service.takeTrust() {
                refusedDigests.removeAll()
                do {
                    try pool.retrust(Self.identifying(trust))
                    // A neighbour the old trust refused is tried again now, not after its backoff.
                    for ep in Array(neighbours.keys) { neighbours[ep]!.retryAt = 0 }
                } catch {
                    logger.error("mesh: the new [trust] does not load (\(error)); neighbours are still verified with the old one")
                }
            }
            if service.takeCredentialsRenewed() { pool.renewCredentials() }
            if now &- lastProbe >= service.settings.probeInterval {
                lastProbe = now
                probe(now: now)
            }
            let done: [ConnectionPool.Done]
            // No wait while adverts are queued: the pass after this one verifies more of them.
            let wait = service.advertsWaiting ? 0 : min(service.settings.probeInterval / 4, 20_000_000)
            do { done = try pool.drive(forNanoseconds: wait) } catch {
                if let said = warnings.allow("datapath", now: monotonicNow()) {
                    logger.error("mesh: the neighbour connections' datapath failed: \(error)\(said)")
                }
                usleep(100_000)
                continue
            }
            let t = monotonicNow()
            for d in done { finished(d, now: t) }
            for (ep, d) in service.takeDeliveries(now: t) { neighbours[ep]?.link.delivered(bytes: d.bytes, interval: d.nanos) }
            tick(now: t)
            var verified = 0
            while verified < Self.advertsPerPass {
                let batch = service.takeAdverts(limit: Self.advertBatch)
                for bytes in batch { received(bytes, now: t) }
                verified += batch.count
                if batch.count < Self.advertBatch || monotonicNow() &- t >= Self.advertBudget { break }
            }
            resend(now: t)
            if advertDue && t &- lastAdvert >= 50_000_000 || t &- lastAdvert >= service.settings.updateInterval {
                advertise(now: t)
            }
            if t &- lastExpire >= Nanos.second {
                lastExpire = t
                warnIfDeaf(now: t)
                for (tag, p) in pending where t &- p.at > Self.requestDeadline {
                    pool.cancel(tag)
                    pending[tag] = nil
                    Self.closeFile(p.what)
                }
                let (gone, forgotten) = engine.expire(now: t)
                for id in gone { held[id] = nil }
                // Claimed peers that never advertised are let go too, once they outnumber what
                // the database and the neighbours name.
                if !forgotten.isEmpty || identities.count > 2 * (engine.database.origins.count + neighbours.count) + 64 {
                    forgetIdentities()
                }
                if !gone.isEmpty || !forgotten.isEmpty { viewDirty = true }
            }
            if viewDirty { publishView() }
            if t &- lastStatus >= service.settings.probeInterval {
                lastStatus = t
                if let load = service.loadSource { service.setLoad(load()) }
                publishStatus(now: t)
            }
        }
        pool.close()
        // Nothing is written to a request's file once the pool is closed.
        for p in pending.values { Self.closeFile(p.what) }
    }

    // MARK: Members

    private func updateMembers(now: UInt64) {
        var wanted: [IPv6Endpoint: MeshMember] = [:]
        for m in members where !isMe(m) { wanted[m.url.endpoint] = m }
        for (ep, n) in neighbours where wanted[ep] == nil {
            logger.notice("mesh: \(n.url) left the member list")
            pool.drop(ep, reason: "no longer a member")
            neighbours[ep] = nil
            advertDue = true
            viewDirty = true
        }
        for (ep, m) in wanted where neighbours[ep] == nil {
            let url: STOQURL
            do { url = try STOQURL(m.url.description + "/") } catch {
                if let said = warnings.allow("member \(m.url)", now: now) {
                    logger.error("mesh: member \(m) is not a URL this node can ask (\(error)); not taken as a neighbour\(said)")
                }
                continue
            }
            var link = NeighbourLink.Settings(
                downAfter: service.settings.downAfter, flapDamping: service.settings.flapDamping ? FlapDamping() : nil)
            link.probeTimeout = min(link.probeTimeout, service.settings.downAfter)
            neighbours[ep] = Neighbour(url: url, link: NeighbourLink(settings: link, now: now), id: m.nodeID)
            logger.info("mesh: neighbour \(m)")
        }
    }

    /// Keeps the identities of this node, its neighbours and the database's origins: a mesh
    /// whose nodes come and go (a new key is a new id), or an origin that claims links to
    /// made-up peers, does not grow the table without end.
    private func forgetIdentities() {
        var keep: Set<NodeID> = [me.routingID]
        for n in neighbours.values { if let id = n.id { keep.insert(id.routingID) } }
        for id in engine.database.origins.keys { keep.insert(id) }
        identities = identities.filter { keep.contains($0.key) }
    }

    private func isMe(_ m: MeshMember) -> Bool {
        if m.nodeID == me { return true }
        return m.url.endpoint.port == service.settings.listenPort && service.settings.localAddresses.contains(m.url.endpoint.address)
    }

    // MARK: Probes

    private func probe(now: UInt64) {
        // Neighbours with a probe out, gathered once: a scan of `pending` per neighbour cost
        // members × probes out on every pass.
        var probing = Set<IPv6Endpoint>()
        for p in pending.values { if case .probe(let ep, _, _) = p.what { probing.insert(ep) } }
        for (ep, n) in neighbours {
            let connected = pool.isConnected(ep)
            if !connected && now < n.retryAt { continue }
            // Until the handshake is done, one probe at a time opens the connection; it is not
            // a sample (its time includes the handshake, and a neighbour still starting up has
            // not lost anything).
            if !connected && probing.contains(ep) { continue }
            let fd = stoq_memfd("stoq-mesh-probe")
            guard fd >= 0 else {
                let why = String(cString: strerror(errno))
                if let said = warnings.allow("probe file", now: now) {
                    logger.error("mesh: cannot make a probe answer's file (\(why)); probes wait until one can be made\(said)")
                }
                return
            }
            let tag = nextTag
            nextTag += 1
            pending[tag] = (.probe(ep, sample: connected, fd: fd), now)
            if connected {
                if let rtt = pool.rtt(ep) { neighbours[ep]!.link.transportRTT(srtt: rtt.srtt, rttvar: rtt.rttvar) }
                neighbours[ep]!.link.probeSent(sequence: UInt64(tag), now: now)
                neighbours[ep]!.probesSent += 1
            }
            // No more of an answer is written than one can be: a peer's endless body must not
            // fill the (RAM-backed) answer file.
            pool.submit(
                to: n.url, "GET", MeshWire.probePath, sinkFD: fd, limit: UInt64(MeshWire.ProbeAnswer.maxSize), tag: tag)
        }
    }

    /// Closes a probe's answer file: its request ended, was cancelled, or the pool closed (the
    /// pool writes nothing to it after any of these).
    static func closeFile(_ p: Pending) {
        if case .probe(_, _, let fd) = p { close(fd) }
    }

    private func finished(_ d: ConnectionPool.Done, now: UInt64) {
        guard let p = pending.removeValue(forKey: d.tag)?.what else { return }
        defer { Self.closeFile(p) }
        switch p {
        case .advert(let url, let body, let sends):
            if let f = d.failure { logger.debug("mesh: an advert was not delivered: \(f)") }
            if d.status == 503, sends < Self.advertSends {
                resends.append((now + Nanos.second << UInt64(sends - 1), url, body, sends + 1))
            } else if let status = d.status, status / 100 != 2, status != 503 {
                // Refused for good (its access policy, a path it does not know, its own
                // failure): said, so the neighbour's "deaf" warning is not the only trace.
                if let said = warnings.allow("advert \(status) \(url)", now: now) {
                    logger.warning("mesh: \(url) refused this node's advert with HTTP \(status)\(said)")
                }
            }
        case .probe(let ep, let sample, let fd):
            guard var n = neighbours[ep] else { return }
            if let f = d.failure {
                // Refused during its handshake (a certificate, a TLS alert, or the neighbour's
                // CONNECTION_REFUSED: its max_connections, its drain) or never connected: back
                // off, not a new handshake every probe interval at a neighbour that is full.
                let refused = d.connectionFailure == .refused
                switch d.connectionFailure {
                case .refused: counters.peersRefused += 1
                case .unreachable: counters.connectFailures += 1
                default: return
                }
                // Backoff from 100 ms, doubling to 5 s; logged once per run of failures.
                n.failures += 1
                n.retryAt = now + min(100_000_000 << UInt64(min(n.failures - 1, 6)), 5 * Nanos.second)
                if n.failures == 1 {
                    logger.warning("mesh: \(n.url) \(refused ? "refused" : "unreachable"): \(f); retrying with backoff, logged once until it works")
                }
                neighbours[ep] = n
                return
            }
            if n.failures > 0 {
                logger.notice("mesh: \(n.url) answers again after \(n.failures) failed connection attempt(s)")
                n.failures = 0
                n.retryAt = 0
                neighbours[ep] = n
            }
            let status = d.status ?? 0
            guard status == 200 else {
                // A node that runs no mesh (404), or whose access policy refuses this one (403).
                if n.refusedWith != status {
                    logger.warning("mesh: \(n.url) answered the probe with HTTP \(status); logged once until that changes")
                    n.refusedWith = status
                    neighbours[ep] = n
                }
                counters.probesRefused += 1
                return
            }
            if n.refusedWith != 0 {
                n.refusedWith = 0
                neighbours[ep] = n
            }
            if d.sinkErrno != 0, d.sinkErrno != EFBIG {
                // This node could not write the answer down (its memory): not the neighbour's doing.
                if let said = warnings.allow("answer file \(n.url)", now: now) {
                    logger.error("mesh: cannot keep \(n.url)'s probe answer: \(String(cString: strerror(d.sinkErrno)))\(said)")
                }
                return
            }
            guard d.sinkErrno == 0, d.received > 0, d.received <= MeshWire.ProbeAnswer.maxSize else {
                if let said = warnings.allow("answer size \(n.url)", now: now) {
                    logger.warning(
                        "mesh: \(n.url) answered a probe with \(d.sinkErrno == EFBIG ? "more than \(MeshWire.ProbeAnswer.maxSize)" : "\(d.received)") bytes; an answer is 1 to \(MeshWire.ProbeAnswer.maxSize)\(said)"
                    )
                }
                counters.probesRefused += 1
                return
            }
            var bytes = [UInt8](repeating: 0, count: Int(d.received))
            let read = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
            guard read == bytes.count else {
                let why = read < 0 ? String(cString: strerror(errno)) : "\(read) of \(bytes.count) bytes"
                if let said = warnings.allow("answer file \(n.url)", now: now) {
                    logger.error("mesh: cannot read \(n.url)'s probe answer back: \(why)\(said)")
                }
                return
            }
            let answer: MeshWire.ProbeAnswer
            do { answer = try MeshWire.ProbeAnswer(decoding: bytes) } catch {
                if let said = warnings.allow("bad answer \(n.url)", now: now) {
                    logger.warning("mesh: \(n.url) answered a probe with something else (\(error.code)): \(error.detail)\(said)")
                }
                counters.probesRefused += 1
                return
            }
            if d.peer.isEmpty {
                // The mesh resumes no sessions: every answer comes with the neighbour's
                // certificate, and this one is not a node's (a user's, with an access role).
                if let said = warnings.allow("not a node \(n.url)", now: now) {
                    logger.warning(
                        "mesh: \(n.url) answered a probe, but its certificate is not a node's (it grants an access role); not taken as a neighbour\(said)")
                }
                counters.probesRefused += 1
                return
            }
            if d.peer != answer.node.hex {
                // The answer names a node whose key is not the one the neighbour's certificate
                // holds: it would have this node advertise, and route to, another node's id.
                if let said = warnings.allow("misnamed \(n.url)", now: now) {
                    logger.warning(
                        "mesh: \(n.url) answered as node \(answer.node), but its certificate's key is node \(d.peer); not taken as a neighbour\(said)")
                }
                counters.probesRefused += 1
                return
            }
            if answer.node == me {
                // This node, under another address: not a neighbour.
                logger.notice("mesh: \(n.url) is this node; dropping it")
                pool.drop(ep, reason: "this node")
                neighbours[ep] = nil
                return
            }
            if n.id != answer.node {
                n.id = answer.node
                identities[answer.node.routingID] = answer.node
                viewDirty = true
                advertDue = true
            }
            if let h = held[answer.node.routingID],
                Self.returnsOwnAdvert(held: h.sequence, answered: answer.sequence, lastReturned: n.returned, now: now)
            {
                n.returned = (h.sequence, now)
                put(BodyRegion(copying: h.bytes), to: n.url)
                if let said = warnings.allow("returned \(n.url)", now: now) {
                    logger.notice(
                        "mesh: node \(answer.node) at \(n.url) last signed sequence \(answer.sequence), below the \(h.sequence) this node holds for it (its clock set back before a restart?); sent it that advert, so that it signs past it\(said)"
                    )
                }
            }
            guard sample else {
                neighbours[ep] = n
                return
            }
            n.probesAnswered += 1
            // Timed when its stream ended, not after the rest of the pass that found it.
            let answeredAt = d.endedAt > 0 ? min(d.endedAt, now) : now
            if let change = n.link.probeAnswered(sequence: UInt64(d.tag), peerLoad: PPM.share(answer.loadPPM), now: answeredAt) {
                n.ups += 1
                changed(n, change)
            }
            neighbours[ep] = n
        }
    }

    /// Neighbours whose link is down, or suspect: up, but silent for longer than
    /// `suspectAfter`. Fetches through a suspect move to another route at once (a wrong guess
    /// costs one request again); routes change only when the link is declared down.
    private var unusable = Set<IPv6Endpoint>()

    /// Three probe intervals, or the RTT's usual bound if that is longer.
    private func suspectAfter(_ n: Neighbour) -> UInt64 {
        max(3 * service.settings.probeInterval, 2 * n.link.metrics.srtt + 4 * n.link.metrics.rttvar)
    }

    private func tick(now: UInt64) {
        var nowUnusable = Set<IPv6Endpoint>()
        for (ep, n) in neighbours where n.link.state != .up || now &- (n.link.lastAnswer ?? 0) > suspectAfter(n) {
            nowUnusable.insert(ep)
        }
        if nowUnusable != unusable {
            unusable = nowUnusable
            viewDirty = true
        }
        for ep in Array(neighbours.keys) {
            let was = neighbours[ep]!.link.state
            let (wasLive, wasSuppressed) = (neighbours[ep]!.link.liveness, neighbours[ep]!.link.suppressed)
            let change = neighbours[ep]!.link.tick(now: now)
            let suppressed = neighbours[ep]!.link.suppressed
            if wasSuppressed && !suppressed { damped(ep, now: now) }
            if wasLive == .up && neighbours[ep]!.link.liveness == .down {
                // Streams to a silent neighbour would pile up: start afresh when it answers
                // again (suppressed or not).
                pool.drop(ep, reason: "the link is down")
            }
            switch change {
            case .down? where was == .unknown:
                // Never answered yet (it may still be starting): not news.
                logger.debug("mesh: \(neighbours[ep]!.url) has not answered yet")
            case .down?:
                neighbours[ep]!.downs += 1
                changed(neighbours[ep]!, .down)
            case .up?:
                // A suppression ended on a link that kept answering.
                neighbours[ep]!.ups += 1
                changed(neighbours[ep]!, .up)
            case .unknown?, nil:
                break
            }
            if suppressed && !wasSuppressed { damped(ep, now: now) }
        }
    }

    /// Says once that a neighbour's link is suppressed for flapping (and counts it), or that it
    /// no longer is.
    private func damped(_ ep: IPv6Endpoint, now: UInt64) {
        let n = neighbours[ep]!
        let link = n.link
        guard let rules = link.settings.flapDamping else { return }
        func seconds(_ nanos: UInt64) -> String { String(format: "%.1f s", Double(nanos) / 1e9) }
        if let until = link.suppressedUntil {
            counters.flapSuppressions += 1
            neighbours[ep]!.suppressedAt = now
            logger.notice(
                "mesh: link to \(name(n)) at \(n.url) is suppressed for \(seconds(until &- now)): it went down \(link.recentDowns) times in \(seconds(now &- link.recentDownsSince)) (flap penalty \(Int(link.penalty(now: now).rounded())) > \(Int(rules.suppressAbove))); it stays down until then, answering or not (mesh.flap_damping)"
            )
        } else {
            let next = link.liveness == .up ? "it has been answering, so it is up" : "it comes up after \(link.settings.upAfterAnswers) answers in a row"
            logger.notice(
                "mesh: link to \(name(n)) at \(n.url) is no longer suppressed after \(seconds(now &- n.suppressedAt)) (flap penalty < \(Int(rules.reuseBelow))): \(next)"
            )
        }
    }

    private func name(_ n: Neighbour) -> String { n.id.map { "\($0)" } ?? "?" }

    /// A node whose neighbours answer its probes but that hears no advert from anyone is
    /// listed by none of them: a node sends adverts only to its own peers (static peering
    /// must name each other on both sides, or use discovery). Said once, after three update
    /// intervals (at least 10 s) with a neighbour up.
    private func warnIfDeaf(now: UInt64) {
        guard !deafWarned, counters.advertsReceived == 0 else { return }
        guard let upSince = firstUp, now &- upSince > max(3 * service.settings.updateInterval, 10 * Nanos.second) else { return }
        deafWarned = true
        let urls = neighbours.values.filter { $0.link.state == .up }.map(\.url.description).sorted()
        logger.warning(
            "mesh: \(urls.joined(separator: ", ")) answer(s) this node's probes, but no node has sent it an advert: a node sends adverts only to the nodes in its own [mesh] peers (or found by discovery), so none of them lists this one; until one does, this node has no route, not even to them (a link counts only when both ends list it)"
        )
    }

    private func changed(_ n: Neighbour, _ state: NeighbourLink.State) {
        if state == .up && firstUp == nil { firstUp = monotonicNow() }
        logger.notice("mesh: link to \(name(n)) at \(n.url) is \(state.rawValue)")
        advertDue = true
        viewDirty = true
        if state == .up { synchronize(n) }
    }

    /// Sends a neighbour whose link just came up every advert this node holds but its own (which
    /// follows within 50 ms, listing the new link). Adverts it already has are refused as
    /// duplicates there and not forwarded further.
    private func synchronize(_ n: Neighbour) {
        let mine = me.routingID
        var sent = 0
        for (origin, h) in held where origin != mine && origin != n.id?.routingID {
            put(BodyRegion(copying: h.bytes), to: n.url)
            sent += 1
        }
        counters.advertsSynchronized += UInt64(sent)
        if sent > 0 { logger.debug("mesh: sent \(n.url) the \(sent) advert(s) this node holds") }
    }

    // MARK: Adverts

    private func advertise(now: UInt64) {
        advertDue = false
        lastAdvert = now
        let nowMillis = UInt64(Date().timeIntervalSince1970 * 1000)
        // Unix milliseconds: newer than anything a previous run of this node signed. Saturating:
        // an advert of this node's own key may have carried any sequence (see `received`).
        let (next, overflow) = ownSequence.addingReportingOverflow(1)
        ownSequence = max(overflow ? .max : next, nowMillis)
        var links: [AdvertBody.Link] = []
        // One link per neighbour id, the one of least RTT: two URLs answering as one node (a
        // node listed under two of its addresses, or an identity copied to a second node) made
        // an advert that repeats a neighbour, which no node accepts; this node then advertised
        // no link at all and fell out of every route.
        var seen: [NodeIdentity: String] = [:]
        let up = neighbours.values.filter { $0.link.state == .up }
        for n in up.sorted(by: { ($0.link.metrics.srtt, $0.url.description) < ($1.link.metrics.srtt, $1.url.description) }) {
            guard let id = n.id else { continue }
            if let first = seen[id] {
                if duplicateWarned.insert([first, n.url.description].sorted()).inserted {
                    logger.warning(
                        "mesh: \(first) and \(n.url) both answer as node \(id): one node listed twice, or one identity (key) on two nodes; advertising only the link to \(first)"
                    )
                }
                continue
            }
            seen[id] = n.url.description
            let m = n.link.metrics
            links.append(
                AdvertBody.Link(
                    neighbour: id, rttMicros: UInt32(min(m.srtt / 1_000, UInt64(UInt32.max))),
                    rttVarMicros: UInt32(min(m.rttvar / 1_000, UInt64(UInt32.max))),
                    lossPPM: PPM.from(m.loss),
                    deliveryKbps: UInt32(min(m.deliveryRate * 8 / 1_000, Double(UInt32.max))),
                    peerLoadPPM: PPM.from(m.peerLoad)))
        }
        // More neighbours than an advert holds (AdvertBody.maxLinks, and what fits in
        // SignedAdvert.maxSize beside the chain): the nearest go in, in RTT order as gathered.
        var kept = Array(links.prefix(AdvertBody.maxLinks))
        let signed: SignedAdvert
        while true {
            do {
                let body = try AdvertBody(
                    origin: me, sequence: ownSequence, issuedMillis: nowMillis,
                    lifetimeMillis: UInt32(service.settings.advertLifetime / Nanos.millisecond), loadPPM: service.ownLoadPPM,
                    links: kept.sorted { $0.neighbour < $1.neighbour })
                signed = try SignedAdvert.sign(body, chain: service.chain, key: service.settings.key)
                break
            } catch let e as AdvertError where e.code == .oversized && !kept.isEmpty {
                kept.removeLast(max(1, kept.count / 16))
            } catch {
                logger.error("mesh: cannot sign this node's advert: \(error)")
                return
            }
        }
        if kept.count < links.count, advertTrimWarned != kept.count {
            advertTrimWarned = kept.count
            logger.warning("mesh: \(links.count) neighbours are up; this node's advert holds the \(kept.count) nearest")
        }
        service.signed(sequence: ownSequence)
        held[me.routingID] = Held(bytes: signed.bytes, sequence: ownSequence, at: now)
        do { try engine.apply(signed.advert.linkState, now: now) } catch {
            logger.error("mesh: this node's own advert was refused: \(error)")
        }
        viewDirty = true
        counters.advertsOriginated += 1
        send(signed.bytes, except: nil)
    }

    private func send(_ bytes: [UInt8], except origin: NodeIdentity?) {
        let body = BodyRegion(copying: bytes)
        for n in neighbours.values where n.link.state == .up && n.id != origin {
            put(body, to: n.url)
            if origin != nil { counters.advertsForwarded += 1 }
        }
    }

    private func put(_ body: BodyRegion, to url: STOQURL, sends: Int = 1) {
        let tag = nextTag
        nextTag += 1
        pending[tag] = (.advert(url, body, sends: sends), monotonicNow())
        pool.submit(to: url, "PUT", MeshWire.advertPath, body: body, tag: tag)
    }

    /// Sends again the adverts whose time has come, to neighbours still up.
    private func resend(now: UInt64) {
        guard resends.contains(where: { $0.at <= now }) else { return }
        let up = Set(neighbours.values.filter { $0.link.state == .up }.map(\.url.endpoint))
        for r in resends where r.at <= now && up.contains(r.url.endpoint) { put(r.body, to: r.url, sends: r.sends) }
        resends.removeAll { $0.at <= now }
    }

    private func received(_ bytes: [UInt8], now: UInt64) {
        counters.advertsReceived += 1
        if let skip = unverified(bytes, now: now) {
            counters.advertsUnverified += 1
            switch skip {
            case .duplicate: counters.advertsDuplicate += 1
            case .stale(let origin, let sequence): refusedStale(origin, sequence: sequence, now: now)
            case .refused(let code):
                counters.advertsRefused[code, default: 0] += 1
                if let said = warnings.allow(code, now: now) { logger.warning("mesh: advert refused (\(code)): a copy of one refused before\(said)") }
            }
            return
        }
        let nowMillis = UInt64(Date().timeIntervalSince1970 * 1000)
        let signed: SignedAdvert
        do { signed = try SignedAdvert.verify(bytes, nowMillis: nowMillis, trusting: service.verifyChain) } catch {
            counters.advertsRefused[error.code.name, default: 0] += 1
            // It may be valid later; the rest never will be, and copies are refused unchecked.
            if error.code != .fromTheFuture {
                if refusedDigests.count >= Self.refusedDigestsBound { refusedDigests.removeAll() }
                refusedDigests[SHA256.hash(data: bytes)] = error.code.name
            }
            if let said = warnings.allow(error.code.name, now: now) { logger.warning("mesh: \(error)\(said)") }
            return
        }
        guard signed.advert.origin != me else {
            // One of this node's own, from before a restart with a clock set back: the mesh holds
            // that sequence, and would refuse every advert below it as stale. Sign past it. A
            // neighbour sends it back when a probe answer shows this node behind
            // (`returnsOwnAdvert`); flooding never does (no node sends an origin its own).
            if signed.advert.sequence > ownSequence {
                logger.notice(
                    "mesh: the mesh holds an advert of this node with sequence \(signed.advert.sequence), past its own \(ownSequence) (a clock set back?); signing past it"
                )
                ownSequence = signed.advert.sequence
                advertDue = true
            }
            counters.advertsDuplicate += 1
            return
        }
        do {
            try engine.apply(signed.advert.linkState(nowMillis: nowMillis), now: now)
        } catch {
            if error.code == .duplicate {
                counters.advertsDuplicate += 1
            } else if error.code == .stale {
                refusedStale(signed.advert.origin, sequence: signed.advert.sequence, now: now)
            } else {
                counters.advertsRefused[error.code.rawValue, default: 0] += 1
                if let said = warnings.allow(error.code.rawValue, now: now) {
                    logger.warning("mesh: advert of \(signed.advert.origin) refused: \(error)\(said)")
                }
            }
            return
        }
        counters.advertsAccepted += 1
        held[signed.advert.origin.routingID] = Held(bytes: bytes, sequence: signed.advert.sequence, at: now)
        // The origin's own identity is signed; a link's peer is only claimed, and never takes
        // the place of one already known (a peer sharing a node's 64-bit routing id would
        // otherwise hide that node from every relay addressed to it).
        identities[signed.advert.origin.routingID] = signed.advert.origin
        for l in signed.advert.links where identities[l.neighbour.routingID] == nil { identities[l.neighbour.routingID] = l.neighbour }
        viewDirty = true
        send(bytes, except: signed.advert.origin)
    }

    /// Why an advert is refused without its signature or chain being checked, or nil: a copy of
    /// the advert held for its origin, one whose sequence is not above the one held (or kept
    /// after it expired), or a copy of one refused before. None of them can change anything
    /// here, so a flood of copies costs a parse, not a signature check each. A stale one that
    /// would be logged (`refusedStale`) is verified first, so that the log names a real origin.
    enum Unverified { case duplicate, stale(NodeIdentity, UInt64), refused(String) }

    private func unverified(_ bytes: [UInt8], now: UInt64) -> Unverified? {
        if !refusedDigests.isEmpty, let code = refusedDigests[SHA256.hash(data: bytes)] { return .refused(code) }
        // A body that does not decode is verify's to name.
        guard let (body, _) = try? AdvertBody.decodeBody(bytes[...]) else { return nil }
        let origin = body.origin
        if origin == me {
            // Past this node's own sequence it must be checked: this node then signs past it.
            return body.sequence <= ownSequence ? .duplicate : nil
        }
        let h = held[origin.routingID]
        if let h, h.bytes == bytes { return .duplicate }
        guard let known = engine.database.origins[origin.routingID]?.sequence ?? h?.sequence, body.sequence <= known else { return nil }
        if body.sequence == known { return .duplicate }
        let overtaken = h.map { now &- $0.at < Self.floodOvertake } ?? false
        if !overtaken && warnings.wouldAllow(LinkStateError.Code.stale.rawValue, now: now) { return nil }
        return .stale(origin, body.sequence)
    }

    /// Counts an advert of `origin` refused as stale, and says so (at most once per
    /// `LogThrottle.interval`) unless it is a copy a newer one overtook in the flood: one this
    /// node accepted under `floodOvertake` ago. Otherwise the origin's sequence went back (its
    /// clock set back before a restart): its neighbours send it its held advert
    /// (`returnsOwnAdvert`) and it signs past it; until then, or when no node still holds one
    /// (it expired), the mesh refuses it.
    private func refusedStale(_ origin: NodeIdentity, sequence: UInt64, now: UInt64) {
        counters.advertsRefused[LinkStateError.Code.stale.rawValue, default: 0] += 1
        let h = held[origin.routingID]
        if let h, now &- h.at < Self.floodOvertake { return }
        guard let said = warnings.allow(LinkStateError.Code.stale.rawValue, now: now) else { return }
        let known = engine.database.origins[origin.routingID]?.sequence ?? h?.sequence ?? 0
        let age = h.map { String(format: "accepted %.1f s ago", Double(now &- $0.at) / 1e9) } ?? "its advert expired"
        logger.warning(
            "mesh: advert of \(origin) refused (stale): sequence \(sequence), not above the \(known) this node holds (\(age)); its sequence went back (a clock set back before a restart?), and the mesh refuses its adverts until it signs past that\(said)"
        )
    }

    /// A stale advert that arrives within this of the newer one's acceptance is taken for a copy
    /// overtaken in the flood (counted, not logged).
    static let floodOvertake = Nanos.second

    /// How soon a neighbour whose sequence is behind is sent its own advert again (the first
    /// `PUT` may be lost, or refused while its queue is full).
    static let returnInterval = Nanos.second

    /// Whether a neighbour should be sent its own advert that this node holds (`held`, its
    /// sequence) back, given the sequence its probe answer says it signed last (`answered`):
    /// when that is below the held one, its sequence went back (a restart with its clock set
    /// back) and every node refuses its adverts as stale. Seeing its own advert, it signs past
    /// it (`received`). Not before it signed once (0), and the same advert not more than once
    /// per `returnInterval`.
    static func returnsOwnAdvert(held: UInt64?, answered: UInt64, lastReturned: (sequence: UInt64, at: UInt64)?, now: UInt64) -> Bool {
        guard let held, answered > 0, held > answered else { return false }
        guard let last = lastReturned, last.sequence == held else { return true }
        return now &- last.at >= returnInterval
    }

    // MARK: Publishing

    private func publishView() {
        viewDirty = false
        let table = engine.routes(from: me.routingID)
        if table.version != lastRoutesVersion {
            lastRoutesVersion = table.version
            counters.routeComputations += 1
        }
        // A node listed under two URLs: the one its advert's link is (up, least RTT), not
        // whichever the dictionary yields last, which may be down and refused as a next hop.
        var urls: [NodeID: STOQURL] = [:]
        let ranked = neighbours.values.sorted {
            ($0.link.state == .up ? 0 : 1, $0.link.metrics.srtt, $0.url.description)
                < ($1.link.state == .up ? 0 : 1, $1.link.metrics.srtt, $1.url.description)
        }
        for n in ranked {
            if let id = n.id, urls[id.routingID] == nil { urls[id.routingID] = n.url }
        }
        let down = unusable
        var paths: [NodeID: [MeshView.PathChoice]] = [:]
        for d in table.destinations {
            guard let r = table.route(to: d) else { continue }
            paths[d] = ([r.primary] + (r.backup.map { [$0] } ?? [])).compactMap { p in
                p.nextHop.map { MeshView.PathChoice(nextHop: $0, features: features(of: p.nodes)) }
            }
        }
        service.publish(
            view: MeshView(
                me: me, routes: table, identities: identities, neighbourURLs: urls, down: down, maxHops: engine.maxHops,
                paths: paths))
    }

    /// A path's link-state metrics, combined: RTTs and variances add, losses compound, the
    /// bottleneck's delivery rate (links nothing was fetched over yet count as 10 MB/s, so that
    /// a scheduler's prior does not write them off), the busiest node's load.
    static let unmeasuredRate = 10_000_000.0

    private func features(of nodes: [NodeID]) -> MultipathRouteFeatures {
        var rtt = 0.0, variance = 0.0, delivered = 1.0, rate = Double.infinity, load = 0.0
        for (a, b) in zip(nodes, nodes.dropFirst()) {
            guard let l = engine.database.links(from: a).first(where: { $0.peer == b })?.metrics else { continue }
            rtt += l.rttMs / 1_000
            variance += (l.rttVarMs / 1_000) * (l.rttVarMs / 1_000)
            delivered *= 1 - l.lossRate
            rate = min(rate, l.deliveryRate > 0 ? l.deliveryRate : Self.unmeasuredRate)
            load = max(load, l.load)
        }
        return MultipathRouteFeatures(
            rttMean: rtt, rttVariance: variance, loss: 1 - delivered, deliveryRate: rate.isFinite ? rate : Self.unmeasuredRate,
            hopCount: nodes.count - 1, peerLoad: load)
    }

    private func publishStatus(now: UInt64) {
        let table = engine.routes(from: me.routingID)
        func name(_ id: NodeID) -> String { identities[id]?.hex ?? String(id.rawValue, radix: 16) }
        let routes = table.destinations.compactMap { d -> MeshStatus.Route? in
            guard let r = table.route(to: d) else { return nil }
            return MeshStatus.Route(
                destination: name(d), path: r.primary.nodes.map(name), cost: r.primary.cost,
                backupPath: r.backup.map { $0.nodes.map(name) }, backupCost: r.backup?.cost)
        }.sorted { $0.destination < $1.destination }
        let ns = neighbours.map { (ep, n) in
            MeshStatus.Neighbour(
                url: n.url.description.hasSuffix("/") ? String(n.url.description.dropLast()) : n.url.description,
                node: n.id?.hex ?? "", state: n.link.state.rawValue, connected: pool.isConnected(ep),
                srttMicros: n.link.metrics.srtt / 1_000, rttvarMicros: n.link.metrics.rttvar / 1_000, loss: n.link.metrics.loss,
                deliveryBytesPerSecond: n.link.metrics.deliveryRate, peerLoad: n.link.metrics.peerLoad,
                lastAnswerMillisAgo: n.link.lastAnswer.map { (now &- $0) / 1_000_000 }, probesSent: n.probesSent,
                probesAnswered: n.probesAnswered, downs: n.downs, ups: n.ups,
                suppressedMillis: n.link.suppressedUntil.map { $0 > now ? ($0 - now + 999_999) / 1_000_000 : 0 },
                flapPenalty: UInt64(n.link.penalty(now: now).rounded(.down)))
        }.sorted { $0.url < $1.url }
        let db = engine.database
        service.publish(
            status: MeshStatus(
                node: me.hex, algorithm: engine.algorithm.rawValue, maxHops: engine.maxHops,
                discovery: service.discovery.backendName, discoveryCounters: service.discovery.counters, neighbours: ns,
                routes: routes, nodesKnown: db.origins.values.filter(\.live).count, linksKnown: db.linkCount,
                counters: counters))
    }
}
