import STOQCore
import Testing
@testable import STOQRouting

@Suite struct LinkStateDatabaseTests {
    let link = AdvertisedLink(peer: 2, metrics: LinkMetrics(rttMs: 5))

    @Test func olderAndEqualSequencesAreRefusedByName() throws {
        var db = LinkStateDatabase()
        try db.apply(LinkStateAdvert(origin: 1, sequence: 5, links: [link]), now: 0)
        #expect(throws: LinkStateError.self) { try db.apply(LinkStateAdvert(origin: 1, sequence: 4, links: []), now: 1) }
        do {
            try db.apply(LinkStateAdvert(origin: 1, sequence: 4, links: []), now: 1)
            Issue.record("stale advert accepted")
        } catch {
            #expect(error.code == .stale)
        }
        do {
            try db.apply(LinkStateAdvert(origin: 1, sequence: 5, links: []), now: 1)
            Issue.record("duplicate advert accepted")
        } catch {
            #expect(error.code == .duplicate)
        }
        #expect(db.refused[.stale] == 2)
        #expect(db.refused[.duplicate] == 1)
        #expect(db.accepted == 1)
        // The refused adverts changed nothing.
        #expect(db.links(from: 1) == [link])
        let changes = try db.apply(LinkStateAdvert(origin: 1, sequence: 6, links: []), now: 2)
        #expect(changes == [LinkChange(from: 1, to: 2, old: link.metrics, new: nil)])
        #expect(db.links(from: 1).isEmpty)
    }

    @Test(arguments: [
        ([AdvertisedLink(peer: 1, metrics: LinkMetrics(rttMs: 1))], "itself"),
        ([AdvertisedLink(peer: 2, metrics: LinkMetrics(rttMs: 1)), AdvertisedLink(peer: 2, metrics: LinkMetrics(rttMs: 2))], "twice"),
        ([AdvertisedLink(peer: 2, metrics: LinkMetrics(rttMs: .nan))], "rtt_ms"),
        ([AdvertisedLink(peer: 2, metrics: LinkMetrics(rttMs: -1))], "rtt_ms"),
        ([AdvertisedLink(peer: 2, metrics: LinkMetrics(rttMs: 1, lossRate: 1))], "loss_rate"),
        ([AdvertisedLink(peer: 2, metrics: LinkMetrics(rttMs: 1, load: 1.5))], "load"),
    ])
    func malformedAdvertsAreRefused(links: [AdvertisedLink], mentions: String) {
        var db = LinkStateDatabase()
        do {
            try db.apply(LinkStateAdvert(origin: 1, sequence: 1, links: links), now: 0)
            Issue.record("malformed advert accepted")
        } catch {
            #expect(error.code == .malformed)
            #expect(error.message.contains(mentions))
        }
        #expect(db.refused[.malformed] == 1)
        #expect(db.origins.isEmpty)
    }

    @Test func oversizedAdvertIsRefused() {
        var db = LinkStateDatabase(maxLinksPerAdvert: 2)
        let links = (2...4).map { AdvertisedLink(peer: NodeID(UInt64($0)), metrics: LinkMetrics(rttMs: 1)) }
        #expect(throws: LinkStateError(.oversized, "advert from n1 has 3 links, more than the 2 allowed")) {
            try db.apply(LinkStateAdvert(origin: 1, sequence: 1, links: links), now: 0)
        }
        #expect(db.refused[.oversized] == 1)
    }

    @Test func advertsExpireAndTheirSequenceIsRemembered() throws {
        var db = LinkStateDatabase(maxAge: 10 * Nanos.second)
        try db.apply(LinkStateAdvert(origin: 1, sequence: 7, links: [link]), now: 0)
        try db.apply(LinkStateAdvert(origin: 3, sequence: 1, links: [AdvertisedLink(peer: 1, metrics: LinkMetrics(rttMs: 1))]), now: 5 * Nanos.second)
        #expect(db.expire(now: 10 * Nanos.second).origins.isEmpty)  // exactly maxAge old: still valid
        let (gone, changes, _) = db.expire(now: 10 * Nanos.second + 1)
        #expect(gone == [1])
        #expect(changes == [LinkChange(from: 1, to: 2, old: link.metrics, new: nil)])
        #expect(db.links(from: 1).isEmpty)
        #expect(db.links(from: 3).count == 1)
        #expect(db.linkCount == 1)
        // A delayed copy of the expired advert is still stale; a newer one brings the links back.
        #expect(throws: LinkStateError.self) { try db.apply(LinkStateAdvert(origin: 1, sequence: 7, links: [link]), now: 11 * Nanos.second) }
        let back = try db.apply(LinkStateAdvert(origin: 1, sequence: 8, links: [link]), now: 12 * Nanos.second)
        #expect(back == [LinkChange(from: 1, to: 2, old: nil, new: link.metrics)])
    }

    /// An advert lives as long as its origin says, whatever this node's own interval: a node
    /// that refreshes every 10 min (its adverts live 30) is not dropped 15 s after each advert
    /// by a neighbour whose own adverts live 15 s, nor is a short-lived one kept past its end.
    @Test func anAdvertLivesItsOriginsLifetime() throws {
        var db = LinkStateDatabase(maxAge: 15 * Nanos.second)
        try db.apply(LinkStateAdvert(origin: 1, sequence: 1, links: [link], lifetime: 1_800 * Nanos.second), now: 0)
        try db.apply(LinkStateAdvert(origin: 3, sequence: 1, links: [link], lifetime: 5 * Nanos.second), now: 0)
        #expect(db.expire(now: 6 * Nanos.second).origins == [3])
        #expect(db.expire(now: 16 * Nanos.second).origins.isEmpty)
        #expect(db.links(from: 1) == [link])
        #expect(db.expire(now: 1_800 * Nanos.second + 1).origins == [1])
    }

    /// An expired origin is forgotten `forgetAfter` after its last advert arrived (not before,
    /// nor while its own longer lifetime runs): then a lower sequence, from an origin whose
    /// clock went back, is taken.
    @Test func expiredOriginsAreForgottenAfterForgetAfter() throws {
        var db = LinkStateDatabase(maxAge: 10 * Nanos.second, forgetAfter: 60 * Nanos.second)
        try db.apply(LinkStateAdvert(origin: 1, sequence: 700, links: [link]), now: 0)
        try db.apply(LinkStateAdvert(origin: 3, sequence: 9, links: [link], lifetime: 100 * Nanos.second), now: 0)
        #expect(db.expire(now: 11 * Nanos.second) == (origins: [1], changes: [LinkChange(from: 1, to: 2, old: link.metrics, new: nil)], forgotten: []))
        #expect(db.expire(now: 60 * Nanos.second).forgotten.isEmpty)
        #expect(throws: LinkStateError.self) { try db.apply(LinkStateAdvert(origin: 1, sequence: 5, links: [link]), now: 60 * Nanos.second) }
        let later = db.expire(now: 60 * Nanos.second + 1)
        #expect(later.forgotten == [1] && later.origins.isEmpty)
        #expect(db.origins[1] == nil && db.origins[3]?.live == true)
        try db.apply(LinkStateAdvert(origin: 1, sequence: 5, links: [link]), now: 61 * Nanos.second)
        #expect(db.links(from: 1) == [link])
        // 3's own lifetime outlasts forgetAfter: expired and forgotten together, past it.
        #expect(db.expire(now: 100 * Nanos.second).forgotten.isEmpty)
        let end = db.expire(now: 100 * Nanos.second + 1)
        #expect(end.origins == [3] && end.forgotten == [3] && end.changes.count == 1)
        #expect(db.origins.keys.sorted() == [1])
    }
}
