/// One neighbour as this node sees it: is the link up, and what are its round-trip time, its
/// variance, its loss, its delivery rate and the neighbour's load.
///
/// Sans-IO like the QUIC core: the mesh service tells it what happened (a probe sent, answered or
/// given up on, an RTT sample from the QUIC connection, bytes delivered) and `now`, and asks it
/// whether the state changed. So the liveness rules are tested with a manual clock.
///
/// Loss: probes ride a QUIC connection, which retransmits what is lost, so a lost probe usually
/// comes back late rather than not at all. An answer later than srtt + 4·rttvar + `lateSlack`
/// counts as lost for the loss estimate; one that never comes counts too. But `slowerAfter`
/// late answers in a row, while the QUIC connection's RTT rose past the bound too, are a path
/// that got slower, not losses: from then on late answers are RTT samples, so the estimate
/// follows the path up instead of freezing at the old RTT while the loss estimate climbs to 1.
///
/// A probe is given up on after `Settings.probeTimeout`, or after srtt + 4·rttvar +
/// `lateSlack` of the link's estimate or of the QUIC connection's when that is longer: a path
/// slower than the floor (a satellite hop's 600 ms) still answers in time. The first RTT comes
/// from the QUIC connection the probes ride (`transportRTT`).
///
/// Liveness: a link is declared down when no probe has been answered for `downAfter`, and up
/// again after `upAfterAnswers` answers in a row. With probes every 100 ms and the default 600 ms,
/// six probes in a row must go unanswered: at 1 % loss each way that happens about once in
/// 10¹⁰ probes, so a lossy link does not flap, and a dead one is known within 0.6 s plus one RTT.
///
/// Flap damping (`FlapDamping`, RFC 2439's scheme): a link that goes down and up again and
/// again would make every node re-route back and forth each time. Each down adds to a penalty
/// that decays; past a threshold the link is suppressed — it stays down, answers or not — until
/// the penalty has decayed below the reuse threshold and the usual answers in a row have come.
/// Its metrics go on being measured meanwhile.
public struct NeighbourLink: Sendable {
    /// How fast to decide, and how surely.
    public struct Settings: Hashable, Sendable {
        /// How long without an answer before the link is down. Nanoseconds.
        public var downAfter: UInt64
        /// Answers in a row that bring a down link back.
        public var upAfterAnswers: Int
        /// The least time a probe is waited for before it counts as lost (and keeps counting as
        /// down time); longer when the RTT is (`NeighbourLink.probeTimeout`). Nanoseconds.
        public var probeTimeout: UInt64
        /// Weight of the newest probe outcome in the loss estimate (exponential moving average):
        /// 0.01 averages over about 100 probes, ten seconds at the usual interval.
        public var lossWeight: Double
        /// Weight of the newest delivery-rate sample.
        public var rateWeight: Double
        /// An answer later than srtt + 4·rttvar + this counts as a lost probe for the loss
        /// estimate (QUIC recovered it by retransmission, so it still proves the link alive, and
        /// its time is not an RTT sample, unless the path got slower: `slowerAfter`). 25 ms is
        /// QUIC's default max ACK delay.
        public var lateSlack: UInt64
        /// How a link that keeps going down is held down; nil: never (`mesh.flap_damping = false`).
        public var flapDamping: FlapDamping?

        /// Defaults: down after 600 ms of silence, up after 2 answers, probes lost after 500 ms,
        /// flaps damped with `FlapDamping`'s defaults.
        public init(
            downAfter: UInt64 = 600_000_000, upAfterAnswers: Int = 2, probeTimeout: UInt64 = 500_000_000,
            lossWeight: Double = 0.01, rateWeight: Double = 0.05, lateSlack: UInt64 = 25_000_000,
            flapDamping: FlapDamping? = FlapDamping()
        ) {
            self.lateSlack = lateSlack
            self.flapDamping = flapDamping
            self.downAfter = downAfter
            self.upAfterAnswers = upAfterAnswers
            self.probeTimeout = probeTimeout
            self.lossWeight = lossWeight
            self.rateWeight = rateWeight
        }
    }

    /// Whether the link carries traffic.
    public enum State: String, Sendable {
        /// Nothing answered yet.
        case unknown
        /// Answering.
        case up
        /// Silent for `downAfter`; stays down until `upAfterAnswers` answers in a row, and while
        /// suppressed.
        case down
    }

    /// The link's metrics, as advertised and as routes are computed on.
    public struct Metrics: Hashable, Sendable {
        /// Smoothed RTT (RFC 6298), nanoseconds; 0 before the first sample.
        public var srtt: UInt64 = 0
        /// RTT mean deviation (RFC 6298), nanoseconds.
        public var rttvar: UInt64 = 0
        /// Share of probes lost, 0...1 (moving average).
        public var loss: Double = 0
        /// Bytes per second delivered from this neighbour (moving average); 0 before a sample.
        public var deliveryRate: Double = 0
        /// The neighbour's load as it last reported it, 0...1.
        public var peerLoad: Double = 0
    }

    /// The rules.
    public let settings: Settings
    /// Current state: what routes are computed on.
    public private(set) var state: State = .unknown
    /// What the probes alone say: `state`, except while suppressed, when it may be up (answering)
    /// or go down again (each such down adds to the penalty).
    public private(set) var liveness: State = .unknown
    /// While the link is suppressed: when the penalty falls below the reuse threshold. It comes
    /// up at the first `tick` at or after this time if `upAfterAnswers` answers in a row have
    /// come by then, or at the answer that makes them.
    public private(set) var suppressedUntil: UInt64?
    /// Whether the link is held down for flapping.
    public var suppressed: Bool { suppressedUntil != nil }
    /// Downs in the current run of flapping: since the penalty was last below the reuse
    /// threshold at a down (so the run that led to a suppression, and its length, can be told).
    public private(set) var recentDowns = 0
    /// When the current run of flapping began (its first down).
    public private(set) var recentDownsSince: UInt64 = 0
    /// The penalty as of `penaltyAt`, the last down (it decays from there).
    private var lastPenalty = 0.0
    private var penaltyAt: UInt64 = 0
    /// Current metrics.
    public private(set) var metrics = Metrics()
    /// When a probe was last answered; nil before the first answer.
    public private(set) var lastAnswer: UInt64?
    /// When the link was created or last went down: silence is measured from here before any
    /// answer.
    private var since: UInt64
    private var answersInARow = 0
    /// Late answers in a row (see `slowerAfter`).
    private var lateInARow = 0
    /// Late answers in a row that mean a slower path rather than losses.
    public static let slowerAfter = 3
    /// The RTT and its variance of the QUIC connection the probes ride (`transportRTT`).
    private var transport: (srtt: UInt64, rttvar: UInt64) = (0, 0)
    /// When the newest answered probe was sent: a probe sent before it that times out now is
    /// old news (lost before the link came back) and does not break a streak of answers.
    private var newestAnsweredSentAt: UInt64 = 0
    /// Probes in flight: sequence and send time. A few at most (one per probe interval within
    /// the timeout), so a small array beats a dictionary.
    private var outstanding: [(sequence: UInt64, sentAt: UInt64)] = []

    /// A link first seen at `now`.
    public init(settings: Settings = Settings(), now: UInt64) {
        self.settings = settings
        self.since = now
    }

    /// A probe went out.
    public mutating func probeSent(sequence: UInt64, now: UInt64) {
        outstanding.append((sequence, now))
    }

    /// A probe came back. Returns the new state if it changed. An answer to a probe already
    /// given up on (or never sent) changes nothing: a duplicate or a late echo must not make a
    /// dead link look alive.
    public mutating func probeAnswered(sequence: UInt64, peerLoad: Double, now: UInt64) -> State? {
        guard let i = outstanding.firstIndex(where: { $0.sequence == sequence }) else { return nil }
        let sentAt = outstanding.remove(at: i).sentAt
        let rtt = now &- sentAt
        let late = metrics.srtt > 0 && rtt > metrics.srtt + 4 * metrics.rttvar + settings.lateSlack
        lateInARow = late ? lateInARow + 1 : 0
        // A streak of late answers is a slower path only when the QUIC connection's own RTT
        // (from ACKs, which leave retransmission delays out) rose past the bound too: probes
        // held up by a short outage come back late together, on a path as fast as before.
        let slower =
            lateInARow >= Self.slowerAfter
            && (transport.srtt == 0 || transport.srtt > metrics.srtt + 4 * metrics.rttvar + settings.lateSlack)
        if late && !slower {
            // Lost on the way and retransmitted: a loss, not a slow link.
            lossSample(lost: true)
        } else {
            rttSample(rtt)
            lossSample(lost: false)
        }
        metrics.peerLoad = min(max(peerLoad, 0), 1)
        lastAnswer = now
        newestAnsweredSentAt = max(newestAnsweredSentAt, sentAt)
        answersInARow += 1
        if liveness != .up && (liveness == .unknown || answersInARow >= settings.upAfterAnswers) {
            liveness = .up
        }
        return settle()
    }

    /// The QUIC connection's own RTT estimate (nanoseconds), from every ACK, not only probes':
    /// it seeds the link's before a probe has measured one, and bounds the probe timeout from
    /// below, so a path that got slower than the timeout is still heard.
    public mutating func transportRTT(srtt: UInt64, rttvar: UInt64) {
        guard srtt > 0 else { return }
        transport = (srtt, rttvar)
        if metrics.srtt == 0 { rttSample(srtt) }
    }

    /// How long a probe may take before it is given up on.
    public var probeTimeout: UInt64 {
        max(
            settings.probeTimeout, metrics.srtt + 4 * metrics.rttvar + settings.lateSlack,
            transport.srtt + 4 * transport.rttvar + settings.lateSlack)
    }

    /// An RTT measured elsewhere, nanoseconds.
    public mutating func rttSample(_ rtt: UInt64) {
        if metrics.srtt == 0 {
            metrics.srtt = rtt
            metrics.rttvar = rtt / 2
        } else {
            let diff = metrics.srtt > rtt ? metrics.srtt - rtt : rtt - metrics.srtt
            metrics.rttvar = (3 * metrics.rttvar + diff) / 4
            metrics.srtt = (7 * metrics.srtt + rtt) / 8
        }
    }

    /// `bytes` arrived from this neighbour over `interval` nanoseconds of transfer.
    public mutating func delivered(bytes: Int, interval: UInt64) {
        guard interval > 0, bytes > 0 else { return }
        let rate = Double(bytes) / (Double(interval) / 1e9)
        metrics.deliveryRate = metrics.deliveryRate == 0 ? rate : ema(metrics.deliveryRate, rate, settings.rateWeight)
    }

    /// Gives up on probes older than the timeout, decides whether the link went down, and ends
    /// a suppression whose time has come (the link is up at once if it has been answering).
    /// Call it at least once per probe interval. Returns the new state if it changed.
    public mutating func tick(now: UInt64) -> State? {
        let timeout = probeTimeout
        while let first = outstanding.first, now &- first.sentAt >= timeout {
            let lost = outstanding.removeFirst()
            lossSample(lost: true)
            if lost.sentAt > newestAnsweredSentAt { answersInARow = 0 }
        }
        // An ended suppression first: a down in this same tick is judged on the penalty alone.
        if let until = suppressedUntil, now >= until { suppressedUntil = nil }
        let silentSince = max(lastAnswer ?? since, since)
        if liveness != .down, now &- silentSince >= settings.downAfter {
            // A link that never answered has not flapped (it may still be starting up).
            if liveness == .up { wentDown(now: now) }
            liveness = .down
            since = now
            answersInARow = 0
        }
        return settle()
    }

    /// The flap penalty at `now` (0 with damping off).
    public func penalty(now: UInt64) -> Double {
        guard let d = settings.flapDamping else { return 0 }
        return d.decayed(lastPenalty, over: now &- penaltyAt)
    }

    /// A down of the link: adds to the penalty, and suppresses the link once it is past the
    /// threshold (again each down while suppressed: the end moves on).
    private mutating func wentDown(now: UInt64) {
        guard let d = settings.flapDamping else { return }
        let before = penalty(now: now)
        if before < d.reuseBelow {
            recentDowns = 0
            recentDownsSince = now
        }
        recentDowns += 1
        lastPenalty = d.afterDown(before)
        penaltyAt = now
        if suppressed || lastPenalty > d.suppressAbove { suppressedUntil = now + d.timeToReuse(lastPenalty) }
    }

    /// `state` from `liveness` and suppression; returns it if it changed.
    private mutating func settle() -> State? {
        let s = suppressed && liveness == .up ? .down : liveness
        guard s != state else { return nil }
        state = s
        return s
    }

    private mutating func lossSample(lost: Bool) {
        metrics.loss = ema(metrics.loss, lost ? 1 : 0, settings.lossWeight)
    }

    private func ema(_ old: Double, _ sample: Double, _ weight: Double) -> Double {
        old + weight * (sample - old)
    }
}
