import CNgtcp2
import CSTOQSystem
import STOQCore
import STOQDatapath
import STOQDatapathURing
import STOQQUIC
import STOQTestSupport
import Testing

@testable import STOQWorker

/// Shedding an Initial flood: the one rule (bpf/stoq_kern_user.h) applied by the kernel filter
/// and by the endpoint's count must agree; the policy picks what to shed from the endpoint's
/// counts; and a worker under a real flood on a real socket sheds it and stops when it ends.
@Suite(.serialized) struct InitialSheddingTests {
    /// A v1 Initial a server can only answer with Retry: long header, version 1, an 8-byte
    /// DCID, no SCID, `token`, and a Length covering the rest of 1,200 bytes.
    static func initial(token: [UInt8] = [], dcid: UInt8 = 1, version: [UInt8] = [0, 0, 0, 1]) -> [UInt8] {
        var p: [UInt8] = [0xC0] + version + [8] + [UInt8](repeating: dcid, count: 8) + [0]
        p += [UInt8(token.count)] + token
        let rest = 1200 - p.count - 2
        p += [0x40 | UInt8(rest >> 8), UInt8(rest & 0xff)]
        return p + [UInt8](repeating: 0, count: rest)
    }

    @Test func aPlanSinglesOutAsManyPrefixesAsTheKernelHeaderHolds() {
        // The XDP program's map entry and the socket filter's program are sized by it.
        #expect(InitialShedPlan.maxRules == Int(STOQ_SHED_PREFIXES))
    }

    func sheddable(_ d: [UInt8]) -> Bool { d.withUnsafeBufferPointer { stoq_pkt_sheddable_initial($0.baseAddress, $0.count) != 0 } }

    /// Sends each datagram from a second socket to `to` and returns those that arrived.
    func delivered(_ datagrams: [[UInt8]], to q: URingDatapathQueue) throws -> [[UInt8]] {
        let sender = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: 0))
        defer { sender.close() }
        var got: [[UInt8]] = []
        for d in datagrams + [[0x42, 0x42]] {  // a last one that always passes: everything before it is in
            let slot = try #require(sender.reserveTransmit())
            slot.copyBytes(from: d)
            sender.commitTransmit(length: d.count, segmentSize: d.count, to: q.localEndpoint, ecn: .notECT)
            try sender.flush()
        }
        for _ in 0..<200 where got.last != [0x42, 0x42] {  // bounded wait for the marker, not a timing assertion
            _ = try q.receive(timeoutNanoseconds: 5_000_000) { r in r.forEachDatagram { got.append(Array($0)) } }
        }
        #expect(got.last == [0x42, 0x42], "the marker never arrived")
        return got.dropLast()
    }

    @Test func theKernelFilterAndTheEndpointAgreeOnWhatIsSheddable() throws {
        // Real datagrams of an ngtcp2 handshake: the client's Initials, Handshake and 1-RTT packets.
        let identity = try TestIdentity()
        defer { identity.remove() }
        let pair = try EndpointPair(identity: identity)
        var real: [[UInt8]] = []
        pair.onServerReceive = { real.append(Array($0)) }
        let conn = try pair.connect()
        #expect(pair.run { conn.isEstablished })
        #expect(pair.run(for: 1_000_000_000) { real.contains { $0[0] & 0x80 == 0 } })
        let full = Self.initial()
        var crafted: [[UInt8]] = [
            full, Self.initial(token: [1, 2, 3, 4, 5]), Self.initial(version: [0x6b, 0x33, 0x43, 0xcf]),
            Self.initial(version: [0x1a, 0x2a, 0x3a, 0x4a]), [0xE0] + full.dropFirst(), [0x40, 1, 2, 3], [0x80],
        ]
        crafted += [1, 3, 6, 10, 15, 16, 17].map { Array(full.prefix($0)) }  // cut inside each field
        let datagrams = real + crafted
        let expectedKept = datagrams.filter { !sheddable($0) }
        #expect(datagrams.filter(sheddable).count >= 8, "a real tokenless Initial and the crafted ones")
        #expect(!sheddable(crafted[1]) && !sheddable(crafted[2]) && !sheddable(real.last!))

        let q = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: 0))
        defer { q.close() }
        let drops0 = try #require(q.kernelDrops)
        // Keep one in 2^32: in effect every sheddable datagram goes, and only those.
        #expect(try q.shedInitials(InitialShedPlan(shift: 32)))
        #expect(try delivered(datagrams, to: q) == expectedKept)
        #expect(try #require(q.kernelDrops) &- drops0 == UInt32(datagrams.count - expectedKept.count))
        // The empty plan detaches the filter: everything arrives.
        #expect(try q.shedInitials(InitialShedPlan()))
        #expect(try delivered(datagrams, to: q) == datagrams)
    }

    @Test func aRuleForOneSlash64ShedsOnlyItsInitials() throws {
        let q = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: 0))
        defer { q.close() }
        let loopback = IPv6Address.loopback.prefix64  // the sender's /64
        let flood = (1...20).map { Self.initial(dcid: UInt8($0)) }
        #expect(try q.shedInitials(InitialShedPlan(rules: [.init(prefix: loopback, shift: 32)])))
        #expect(try delivered(flood, to: q).isEmpty)
        let other = IPv6Address("fd00:5705::")!.prefix64
        #expect(try q.shedInitials(InitialShedPlan(rules: [.init(prefix: other, shift: 32)])))
        #expect(try delivered(flood, to: q) == flood)
        // Everyone else's shift applies to a /64 no rule names.
        #expect(try q.shedInitials(InitialShedPlan(rules: [.init(prefix: other, shift: 1)], shift: 32)))
        #expect(try delivered(flood, to: q).isEmpty)
    }

    @Test func thePolicyShedsAFloodFromOneSlash64AndStopsWhenItEnds() {
        let flooder = IPv6Address("fd00:5705::")!.prefix64
        var policy = InitialShedding()
        // 50,000 in a tick from one /64 whose share (1,000) was spent, and 5 from elsewhere.
        let first = policy.update(InitialReport(used: 1005, withheld: 49_000, busiest: [.init(prefix: flooder, used: 1000, withheld: 49_000)]))
        // Keep about twice what was used: 50,000 / 2,000 = 25, so one in 16.
        #expect(first == InitialShedPlan(rules: [.init(prefix: flooder, shift: 4)], shift: 0))
        // The next tick sees a sixteenth of the same flood: the same plan, nothing to change.
        #expect(policy.update(InitialReport(used: 1005, withheld: 2125, busiest: [.init(prefix: flooder, used: 1000, withheld: 2125)])) == nil)
        // The flood grows fourfold.
        #expect(
            policy.update(InitialReport(used: 1005, withheld: 11_500, busiest: [.init(prefix: flooder, used: 1000, withheld: 11_500)]))
                == InitialShedPlan(rules: [.init(prefix: flooder, shift: 6)]))
        // It ends: the rule stays for `holdTicks` - 1 quiet ticks, then nothing is shed.
        for _ in 1..<policy.holdTicks { #expect(policy.update(InitialReport(used: 12, withheld: 0)) == nil) }
        #expect(policy.update(InitialReport(used: 12, withheld: 0)) == InitialShedPlan())
        #expect(policy.update(InitialReport(used: 12, withheld: 0)) == nil)
    }

    /// A flood that dips under the floor for a tick (the flooder's rate jitters, or the worker
    /// was descheduled) is still shed with the same k: one episode, not one per dip. Before
    /// the hold, the dip ended the rule and the next tick started a new episode.
    @Test func aOneTickDipInAFloodKeepsItsRule() {
        let flooder = IPv6Address("fd00:5705::")!.prefix64
        var policy = InitialShedding()
        let flood = InitialReport(used: 1005, withheld: 49_000, busiest: [.init(prefix: flooder, used: 1000, withheld: 49_000)])
        let plan = policy.update(flood)
        #expect(plan == InitialShedPlan(rules: [.init(prefix: flooder, shift: 4)]))
        let steady = InitialReport(used: 1005, withheld: 2125, busiest: [.init(prefix: flooder, used: 1000, withheld: 2125)])
        let dip = InitialReport(used: 1005, withheld: 40, busiest: [.init(prefix: flooder, used: 1000, withheld: 40)])
        #expect(policy.update(dip) == nil)
        #expect(policy.update(steady) == nil)
        #expect(policy.update(dip) == nil)
        #expect(policy.update(dip) == nil)
        #expect(policy.update(dip) == InitialShedPlan())  // three in a row: over
        // Everyone's shift holds the same way.
        var everyone = InitialShedding()
        let thin = (1...4).map { InitialReport.Source(prefix: UInt64($0) << 32, used: 50, withheld: 100) }
        #expect(everyone.update(InitialReport(used: 10_000, withheld: 40_000, busiest: thin)) == InitialShedPlan(shift: 1))
        #expect(everyone.update(InitialReport(used: 100, withheld: 0)) == nil)
        #expect(everyone.update(InitialReport(used: 100, withheld: 0)) == nil)
        #expect(everyone.update(InitialReport(used: 100, withheld: 0)) == InitialShedPlan())
    }

    @Test func aFloodAcrossPrefixesShedsEveryonesAndASmallExcessNothing() {
        var policy = InitialShedding()
        // 40,000 withheld spread so thinly that no /64 stands out: the whole budget was spent.
        let thin = (1...4).map { InitialReport.Source(prefix: UInt64($0) << 32, used: 50, withheld: 100) }
        #expect(policy.update(InitialReport(used: 10_000, withheld: 40_000, busiest: thin)) == InitialShedPlan(shift: 1))
        var calm = InitialShedding()
        #expect(calm.update(InitialReport(used: 1000, withheld: 200, busiest: [.init(prefix: 7, used: 1000, withheld: 200)])) == nil)
    }

    /// A worker on a real socket, its reply budget 50 a second per /64, under a flood of
    /// tokenless Initials from [::1]: it starts shedding that /64, the kernel drops them,
    /// and when the flood stops the filter goes.
    @Test func aWorkerShedsAFloodOnItsSocketAndStopsAfterIt() throws {
        let identity = try TestIdentity()
        defer { identity.remove() }
        var settings = QUICSettings()
        settings.retry = true
        settings.statelessReplyRatePerPrefix = 50
        let creds = try TLSCredentials(certificateFile: identity.identity.certificatePath, keyFile: identity.identity.keyPath)
        let endpoint = QUICEndpoint(isServer: true, credentials: creds, settings: settings, workerID: 0, secret: .random())
        let queue = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: 0))
        let sender = try URingDatapathQueue(bind: IPv6Endpoint(address: .loopback, port: 0))
        defer { sender.close() }
        let worker = Worker(queue: queue, endpoint: endpoint)
        worker.tickInterval = 20_000_000
        worker.idleWait = 5_000_000
        worker.initialShedding?.minimumWithheld = 50
        // Half a second at 20 ms a tick: with the default 3 ticks (3 s at the node's 1 s tick)
        // a worker descheduled for 60 ms by a busy machine ended the episode mid-flood.
        worker.initialShedding?.holdTicks = 25
        let stop = StopFlag()
        var turns = 0, flooding = true, dropsWhenShedding: UInt64 = 0
        worker.onTurn = {
            turns += 1
            if turns > 20_000 { stop.stop() }  // a bound, not a timing assertion
            if flooding {
                for i in 0..<64 {
                    guard let slot = sender.reserveTransmit() else { break }
                    let d = Self.initial(dcid: UInt8(truncatingIfNeeded: turns &+ i))
                    slot.copyBytes(from: d)
                    sender.commitTransmit(length: d.count, segmentSize: d.count, to: queue.localEndpoint, ecn: .notECT)
                }
                try? sender.flush()
                _ = try? sender.receive(timeoutNanoseconds: 0) { _ in }  // reap sends; the Retries are not read
                if worker.shedding.prefixes == 1 && worker.shedding.kernelDrops > 0 {
                    dropsWhenShedding = worker.shedding.kernelDrops
                    flooding = false
                }
            } else if worker.shedding.prefixes == 0 {
                stop.stop()
            }
        }
        worker.run(stop: stop)
        queue.close()
        #expect(dropsWhenShedding > 0, "the kernel dropped part of the flood for the worker's socket")
        #expect(worker.shedding.episodes == 1)
        #expect(worker.shedding.prefixes == 0 && !worker.shedding.everyone, "the flood is over: nothing shed")
        let c = endpoint.counters
        #expect(c.sheddableWithheld > 0 && c.sheddableInitials > c.sheddableWithheld, "\(c)")
    }
}
