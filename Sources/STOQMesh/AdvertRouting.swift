import STOQCore
import STOQRouting

extension NodeIdentity {
    /// The id routing computes with: the identity's first 8 bytes, big-endian. Routing only
    /// needs ids stable and distinct; 64 bits of a SHA-256 are, for any mesh that fits in memory,
    /// and an advert's full identity is still checked against its signer's key before it gets here.
    public var routingID: NodeID {
        NodeID(bytes.prefix(8).reduce(0) { $0 << 8 | UInt64($1) })
    }
}

extension AdvertBody {
    /// The advert as the link-state database takes it, in routing's units (milliseconds, shares,
    /// bytes per second). Only for an advert `SignedAdvert.verify` accepted.
    public var linkState: LinkStateAdvert { linkState(nowMillis: nil) }

    /// The same, living what is left of its lifetime at `nowMillis` (this node's Unix time)
    /// rather than all of it from receipt: an advert passed on late (a neighbour's link came
    /// up, and it was sent everything held) ends where its origin said (and the clock skew
    /// allowed), not a lifetime later.
    /// Clocks may differ by `clockSkewMillis`: an origin's clock that far behind does not cut
    /// its links' lives short between its refreshes.
    public func linkState(nowMillis: UInt64?, clockSkewMillis: UInt64 = SignedAdvert.clockSkewMillis) -> LinkStateAdvert {
        var advert = linkStateWhole
        if let nowMillis {
            let end = issuedMillis &+ UInt64(lifetimeMillis) &+ clockSkewMillis
            let left = end > nowMillis ? end - nowMillis : 0
            advert.lifetime = min(UInt64(lifetimeMillis), max(left, 1)) * Nanos.millisecond
        }
        return advert
    }

    private var linkStateWhole: LinkStateAdvert {
        LinkStateAdvert(
            origin: origin.routingID, sequence: sequence,
            links: links.map { l in
                AdvertisedLink(
                    peer: l.neighbour.routingID,
                    metrics: LinkMetrics(
                        rttMs: Double(l.rttMicros) / 1_000, rttVarMs: Double(l.rttVarMicros) / 1_000,
                        lossRate: PPM.share(l.lossPPM),
                        deliveryRate: Double(l.deliveryKbps) * 1_000 / 8,
                        load: PPM.share(l.peerLoadPPM)))
            }, lifetime: UInt64(lifetimeMillis) * Nanos.millisecond)
    }
}
