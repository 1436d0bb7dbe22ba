import Foundation
import Testing

@testable import STOQRouting

/// Two parallel relays between S and C; `fast` carries `fastMbit`, `slow` 10 Mbit/s.
private func twoPaths(fastMbit: Double = 100, slowMbit: Double = 10) -> MeshSimTopology {
    MeshSimTopology(edges: [
        MeshSimEdge(a: "S", b: "fast", latencyMs: 5, rateMbit: fastMbit, lossPercent: 0),
        MeshSimEdge(a: "S", b: "slow", latencyMs: 20, rateMbit: slowMbit, lossPercent: 0),
        MeshSimEdge(a: "fast", b: "C", latencyMs: 0.5, rateMbit: 1000, lossPercent: 0),
        MeshSimEdge(a: "slow", b: "C", latencyMs: 0.5, rateMbit: 1000, lossPercent: 0),
    ])
}

private func pantheonFile() throws -> MeshSimTopology {
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    return try MeshSimTopology.load(path: root.appendingPathComponent("Benchmarks/topologies/pantheon5.csv").path)
}

private func learner(seed: UInt64 = 7) -> LearnerScheduler {
    var s = LearnerSettings()
    s.seed = seed
    return LearnerScheduler(settings: s)
}

@Suite struct MultipathSimulatorTests {
    @Test func sameSeedGivesIdenticalResults() throws {
        let s = try #require(MeshSimScenarios.pantheon(try pantheonFile(), variant: "degrade", seed: 42))
        let a = MeshSimRunner.run(s, seed: 42, algorithm: "ml") { _ in learner() }
        let b = MeshSimRunner.run(s, seed: 42, algorithm: "ml") { _ in learner() }
        #expect(a.completion == b.completion)
        #expect(a.routeBytes == b.routeBytes)
        #expect(a.events == b.events)
        #expect(a.hedges == b.hedges)
        let c = MeshSimRunner.run(s, seed: 43, algorithm: "ml") { _ in learner() }
        #expect(c.completion != a.completion)
    }

    @Test func learnerLeavesARouteDegradedMidTransfer() throws {
        // One long transfer (256 chunks of 64 KiB); the fast path drops to 1 Mbit/s at 1 s.
        var net = MeshSimNetwork.from(twoPaths(), defaultRate: { _ in 1 })
        net.change("S", "fast", at: 1.0, rateMbit: 1, lossPercent: 0)
        let s = net.index(of: "S")!, c = net.index(of: "C")!
        let routes = net.disjointRoutes(from: s, to: c, k: 2, maxHops: 3)
        #expect(routes.count == 2)
        let fast = routes.firstIndex { net.names[$0[1]] == "fast" }!
        let chunks = Array(repeating: 64 << 10, count: 256)
        let scenario = MeshSimScenario(
            name: "t", summary: "", network: net, routes: routes,
            transfers: [MeshSimTransferSpec(start: 0, client: c, routes: [0, 1], chunkBytes: chunks)],
            horizon: 60)
        // Record, in dispatch order, the route of every chunk request after the change.
        final class Recorder: MultipathChunkScheduler {
            let inner = learner()
            var before: [Int] = [], after: [Int] = []
            var name: String { inner.name }
            func update(candidates: [MultipathCandidate], now: Double) { inner.update(candidates: candidates, now: now) }
            func choose(
                transfer: MultipathTransferID, bytes: Int, backlog: Int, among: [MultipathRouteID]?,
                excluding: MultipathRouteID?, now: Double
            ) -> MultipathRouteID? {
                inner.choose(transfer: transfer, bytes: bytes, backlog: backlog, among: among, excluding: excluding, now: now)
            }
            func dispatched(transfer: MultipathTransferID, route: MultipathRouteID, bytes: Int, now: Double) {
                if now >= 1.0 { after.append(route.rawValue) } else { before.append(route.rawValue) }
                inner.dispatched(transfer: transfer, route: route, bytes: bytes, now: now)
            }
            func completed(_ c: MultipathCompletion, now: Double) { inner.completed(c, now: now) }
            func expectedDuration(route: MultipathRouteID, bytes: Int, now: Double) -> Double {
                inner.expectedDuration(route: route, bytes: bytes, now: now)
            }
            func expectedSpread(route: MultipathRouteID, bytes: Int, now: Double) -> Double {
                inner.expectedSpread(route: route, bytes: bytes, now: now)
            }
            func estimates(now: Double) -> [MultipathRouteEstimate] { inner.estimates(now: now) }
            func forgetWithdrawn() { inner.forgetWithdrawn() }
        }
        let rec = Recorder()
        let result = MeshSimRunner.run(scenario, seed: 1, algorithm: "ml") { _ in rec }
        #expect(result.incomplete == 0)
        // Before the change the fast route carried most requests; within 16 requests after it,
        // the learner has cut it to at most 20 % of what follows. Not to zero: at 1 Mbit/s against
        // 10 the route is still worth ~9 % of the chunks whose completion it can beat (ECF).
        #expect(rec.before.count > 50)
        #expect(Double(rec.before.filter { $0 == fast }.count) >= 0.8 * Double(rec.before.count))
        #expect(rec.after.count > 40)
        let late = rec.after.dropFirst(16)
        let onFast = late.filter { $0 == fast }.count
        #expect(Double(onFast) <= 0.2 * Double(late.count), "fast route still got \(onFast) of \(late.count): \(rec.after)")
    }

    @Test func anAdvertThatMovesTwofoldDropsTheEvidence() {
        // 40 chunks taught the learner that route 1 delivers 1 MB in 1 s; then the link state
        // says it carries 8 MB/s. A 1.5x move keeps the evidence; the 8x move drops it, so the
        // estimate moves towards the advert at once, where a learner that keeps its evidence
        // stays near what it measured until that decays.
        let id = MultipathRouteID(1)
        func taught(advertChange: Double) -> LearnerScheduler {
            var settings = LearnerSettings()
            settings.advertChange = advertChange
            let l = LearnerScheduler(settings: settings)
            l.update(candidates: [MultipathCandidate(id: id, features: MultipathRouteFeatures(rttMean: 0.01, deliveryRate: 1e6))], now: 0)
            for k in 0..<40 {
                let t = Double(k)
                l.dispatched(transfer: 0, route: id, bytes: 1_000_000, now: t)
                l.completed(
                    MultipathCompletion(route: id, transfer: 0, bytes: 1_000_000, requestedAt: t, endedAt: t + 1, outcome: .delivered),
                    now: t + 1)
            }
            return l
        }
        func advertise(_ l: LearnerScheduler, _ rate: Double) {
            l.update(candidates: [MultipathCandidate(id: id, features: MultipathRouteFeatures(rttMean: 0.01, deliveryRate: rate))], now: 41)
        }
        let l = taught(advertChange: 2), keeps = taught(advertChange: .infinity)
        let changes = l.detectedChanges
        advertise(l, 1.5e6)
        #expect(l.detectedChanges == changes)
        #expect(l.estimates(now: 41)[0].rate < 1.5e6)
        advertise(l, 8e6)
        advertise(keeps, 8e6)
        #expect(l.detectedChanges == changes + 1)
        let dropped = l.estimates(now: 41)[0].rate, kept = keeps.estimates(now: 41)[0].rate
        #expect(kept < 1.2e6 && dropped > 1.5 * kept, "dropped \(dropped), kept \(kept)")
    }

    @Test func fiftyTransfersDoNotHerd() throws {
        let s = try #require(MeshSimScenarios.pantheon(try pantheonFile(), variant: "herding", seed: 1))
        #expect(s.transfers.count == 50)
        let ml = MeshSimRunner.run(s, seed: 1, algorithm: "ml_optimized") { _ in learner() }
        let cmp = MeshSimComparison(
            scenario: s.name, summary: s.summary, routeCapacity: MeshSimRunner.routeCapacities(s),
            results: [ml], oracleSplit: "", oracleCandidates: 0, p99Floor: 0)
        #expect(ml.incomplete == 0)
        // Bytes per route within 0.15 (total variation) of the routes' capacity shares, and no
        // route above 1.5x its capacity share plus 2 points.
        #expect(cmp.loadSkew("ml_optimized") <= 0.15)
        let total = Double(ml.routeBytes.reduce(0, +)), cap = cmp.routeCapacity.reduce(0, +)
        for i in ml.routeBytes.indices {
            #expect(Double(ml.routeBytes[i]) / total <= 1.5 * cmp.routeCapacity[i] / cap + 0.02)
        }
    }
}

@Suite struct MultipathFloorTests {
    /// Transfers of `mib` MiB from S to C over both relays of `twoPaths`, starting at `starts`.
    private func scenario(_ net: MeshSimNetwork, starts: [Double], mib: Int = 4) -> MeshSimScenario {
        let routes = net.disjointRoutes(from: net.index(of: "S")!, to: net.index(of: "C")!, k: 2, maxHops: 2)
        let chunks = MeshSimScenarios.chunkList(objectBytes: mib << 20, chunkBytes: 256 << 10)
        let transfers = starts.map {
            MeshSimTransferSpec(start: $0, client: net.index(of: "C")!, routes: Array(routes.indices), chunkBytes: chunks)
        }
        return MeshSimScenario(name: "floor", summary: "", network: net, routes: routes, transfers: transfers, horizon: 100)
    }

    @Test func aLoneTransferTakesItsBytesOverBothRoutes() {
        let net = MeshSimNetwork.from(twoPaths(), defaultRate: { _ in 0 })
        // Two transfers far apart: p99 of two is the slower, each alone on 110 Mbit/s.
        let s = scenario(net, starts: [1, 50])
        let alone = Double(4 << 20) / (110 * 125_000)
        #expect(abs(MeshSimFloor.quantile(s) - alone) <= MeshSimCapacity.step + 1e-9)
    }

    @Test func aBurstDrainsAllItsBytesBeforeTheLastFinishes() {
        let net = MeshSimNetwork.from(twoPaths(), defaultRate: { _ in 0 })
        // Ten transfers 10 ms apart: the last cannot end before all 40 MiB went over 110 Mbit/s
        // from the first start, counted from the last start.
        let starts = (0..<10).map { 1 + 0.01 * Double($0) }
        let s = scenario(net, starts: starts)
        let expected = Double(10 * (4 << 20)) / (110 * 125_000) - 0.09
        #expect(abs(MeshSimFloor.quantile(s) - expected) <= MeshSimCapacity.step + 1e-9)
    }

    @Test func aDegradedRouteAndAFailedRelayLowerTheCapacity() {
        var net = MeshSimNetwork.from(twoPaths(), defaultRate: { _ in 0 })
        net.change("S", "fast", at: 5, rateMbit: 10, lossPercent: 0)
        let degraded = scenario(net, starts: [10])
        let expected = Double(4 << 20) / (20 * 125_000)
        #expect(abs(MeshSimFloor.quantile(degraded) - expected) <= MeshSimCapacity.step + 1e-9)
        var failed = MeshSimNetwork.from(twoPaths(), defaultRate: { _ in 0 })
        failed.fail("fast", from: 5)
        let alone = Double(4 << 20) / (10 * 125_000)
        #expect(abs(MeshSimFloor.quantile(scenario(failed, starts: [10])) - alone) <= MeshSimCapacity.step + 1e-9)
    }

    @Test func noSchedulerBeatsTheFloor() throws {
        for variant in ["stable", "degrade", "node_failure", "herding"] {
            let s = try #require(MeshSimScenarios.pantheon(try pantheonFile(), variant: variant, seed: 3))
            let floor = MeshSimFloor.quantile(s)
            #expect(floor > 0, "\(variant)")
            let runs = [
                MeshSimRunner.run(s, seed: 3, algorithm: "ml_optimized") { _ in learner() },
                MeshSimRunner.run(s, seed: 3, algorithm: "min_rtt") { _ in MinRTTScheduler() },
            ]
            for r in runs { #expect(r.quantile(0.99) >= floor, "\(variant) \(r.algorithm): p99 \(r.quantile(0.99)) < \(floor)") }
        }
    }
}

@Suite struct MultipathBaselineTests {
    private func candidates() -> [MultipathCandidate] {
        [
            MultipathCandidate(id: MultipathRouteID(1), features: MultipathRouteFeatures(rttMean: 0.050, deliveryRate: 10e6)),
            MultipathCandidate(id: MultipathRouteID(2), features: MultipathRouteFeatures(rttMean: 0.010, deliveryRate: 1e6)),
            MultipathCandidate(id: MultipathRouteID(3), features: MultipathRouteFeatures(rttMean: 0.030, deliveryRate: 5e6)),
        ]
    }

    @Test func minRTTFillsTheLowestRTTWindowFirst() {
        let s = MinRTTScheduler()
        s.update(candidates: candidates(), now: 0)
        // Route 2's window: max(2, 2·1e6·0.01/65536 → 1) = 2 chunks; then route 3.
        var picks: [Int] = []
        for _ in 0..<3 {
            let r = s.choose(transfer: 0, bytes: 65536, backlog: 65536, among: nil, excluding: nil, now: 0)!
            s.dispatched(transfer: 0, route: r, bytes: 65536, now: 0)
            picks.append(r.rawValue)
        }
        #expect(picks == [2, 2, 3])
        #expect(s.choose(transfer: 0, bytes: 65536, backlog: 0, among: nil, excluding: MultipathRouteID(3), now: 0)?.rawValue == 1)
    }

    @Test func roundRobinTakesTurns() {
        let s = RoundRobinScheduler()
        s.update(candidates: candidates(), now: 0)
        var picks: [Int] = []
        for _ in 0..<3 {
            let r = s.choose(transfer: 0, bytes: 1000, backlog: 1000, among: nil, excluding: nil, now: 0)!
            s.dispatched(transfer: 0, route: r, bytes: 1000, now: 0)
            picks.append(r.rawValue)
        }
        #expect(picks == [1, 2, 3])
    }

    @Test func bestSingleUsesOnlyTheFastestRoute() {
        let s = BestSingleScheduler()
        s.update(candidates: candidates(), now: 0)
        #expect(s.choose(transfer: 0, bytes: 1000, backlog: 1000, among: nil, excluding: nil, now: 0)?.rawValue == 1)
        #expect(
            s.choose(
                transfer: 0, bytes: 1000, backlog: 1000, among: [MultipathRouteID(2), MultipathRouteID(3)],
                excluding: nil, now: 0)?.rawValue == 3)
    }

    @Test func fixedSplitFollowsItsWeights() {
        let s = FixedSplitScheduler(weights: [MultipathRouteID(1): 3, MultipathRouteID(2): 1])
        s.update(candidates: candidates(), now: 0)
        var count = [0, 0, 0, 0]
        for _ in 0..<40 {
            let r = s.choose(transfer: 0, bytes: 1000, backlog: 1000, among: nil, excluding: nil, now: 0)!
            count[r.rawValue] += 1
        }
        #expect(count == [0, 30, 10, 0])
    }

    @Test func withdrawnRoutesAreNeverChosen() {
        let s = learner()
        s.update(candidates: candidates(), now: 0)
        s.update(candidates: [candidates()[1]], now: 1)
        for _ in 0..<20 {
            #expect(s.choose(transfer: 0, bytes: 1000, backlog: 1000, among: nil, excluding: nil, now: 1)?.rawValue == 2)
        }
    }

    @Test func withdrawnRoutesAreForgottenOnceNothingIsInFlight() {
        let s = learner()
        let all = candidates()
        s.update(candidates: all, now: 0)
        // Route 3 learns something; route 2 has a chunk in flight when both others go.
        let r2 = MultipathRouteID(2), r3 = MultipathRouteID(3)
        for k in 0..<10 {
            let t = Double(k)
            s.dispatched(transfer: 1, route: r3, bytes: 1_000_000, now: t)
            s.completed(MultipathCompletion(route: r3, transfer: 1, bytes: 1_000_000, requestedAt: t, endedAt: t + 0.5, outcome: .delivered), now: t + 0.5)
        }
        s.dispatched(transfer: 2, route: r2, bytes: 1000, now: 10)
        s.update(candidates: [all[2]], now: 10)
        let learnt = s.estimates(now: 10).first { $0.route == r3 }!
        s.forgetWithdrawn()
        #expect(s.estimates(now: 10).map(\.route) == [r2, r3])
        let kept = s.estimates(now: 10).first { $0.route == r3 }!
        #expect(kept.rate == learnt.rate && kept.evidence == learnt.evidence && kept.evidence > 0)
        s.completed(MultipathCompletion(route: r2, transfer: 2, bytes: 1000, requestedAt: 10, endedAt: 11, outcome: .delivered), now: 11)
        s.forgetWithdrawn()
        #expect(s.estimates(now: 11).map(\.route) == [r3])
        #expect(s.choose(transfer: 3, bytes: 1000, backlog: 1000, among: nil, excluding: nil, now: 11) == r3)
        // Route 1 comes back as new: no evidence, and it is chosen again.
        s.update(candidates: [all[0], all[2]], now: 12)
        #expect(s.estimates(now: 12).map(\.route) == [r3, MultipathRouteID(1)])
        #expect(s.estimates(now: 12).last?.evidence == 0)
        #expect(s.choose(transfer: 3, bytes: 1000, backlog: 1000, among: [MultipathRouteID(1)], excluding: nil, now: 12) == MultipathRouteID(1))
    }

    @Test func hedgeGoesElsewhereOnceWithinBudget() {
        // A chunk on a route that never answers is hedged once on the other route, and the
        // transfer completes; the budget (5 % + one chunk to start) allows only that one.
        let s = MinRTTScheduler()
        s.update(candidates: Array(candidates().prefix(2)), now: 0)
        let budget = MultipathHedgeBudget(fraction: 0.05, initial: 1000)
        var t = MultipathTransfer(id: 0, chunkBytes: [1000], budget: budget)
        let first = t.poll(now: 0, scheduler: s)
        #expect(first.map(\.route.rawValue) == [2])
        let deadline = t.nextDeadline!
        let hedge = t.poll(now: deadline, scheduler: s)
        #expect(hedge.count == 1 && hedge[0].isHedge && hedge[0].route.rawValue == 1)
        let cancelled = t.receive(request: hedge[0].request, verified: true, now: deadline + 0.01, scheduler: s)
        #expect(cancelled.map(\.request) == [first[0].request])
        #expect(t.isComplete && t.hedges == 1)
    }
}

@Suite struct MeshSimInputTests {
    @Test func edgeListParses() throws {
        let t = try MeshSimTopology.parseEdgeList("a,b,latency_ms\n# comment\nx,y,1.5\ny,z,2,50,0.1\n")
        #expect(t.edges.count == 2)
        #expect(t.edges[1] == MeshSimEdge(a: "y", b: "z", latencyMs: 2, rateMbit: 50, lossPercent: 0.1))
    }

    @Test(
        arguments: [
            ("x,y\n", MeshSimInputError.Code.fieldCount, 1),
            ("x,y,1\nx,y,abc\n", .notANumber, 2),
            ("x,y,-1\n", .outOfRange, 1),
            ("x,x,1\n", .selfLoop, 1),
            ("x,y,1,0,0\n", .outOfRange, 1),
            ("x,y,1,10,100\n", .outOfRange, 1),
            ("x,y,1,10\n", .fieldCount, 1),
            ("# nothing\n", .empty, nil),
        ] as [(String, MeshSimInputError.Code, Int?)])
    func edgeListRefuses(text: String, code: MeshSimInputError.Code, line: Int?) {
        #expect {
            try MeshSimTopology.parseEdgeList(text, source: "t.csv")
        } throws: { e in
            guard let e = e as? MeshSimInputError else { return false }
            return e.code == code && e.line == line && !e.reason.isEmpty
        }
    }

    @Test func matrixParsesAndRefuses() throws {
        let t = try MeshSimTopology.parseLatencyMatrix(Data(#"{"b-a": 5, "a-b": 4, "a-c": 7.5}"#.utf8))
        #expect(t.edges.map(\.latencyMs) == [4, 7.5])
        let cases: [(String, MeshSimInputError.Code)] = [
            (#"[1,2]"#, .badJSON), (#"{"ab": 1}"#, .badKey), (#"{"a-a": 1}"#, .selfLoop),
            (#"{"a-b": "x"}"#, .notANumber), (#"{"a-b": -1}"#, .outOfRange), ("{}", .empty), ("{", .badJSON),
        ]
        for (json, code) in cases {
            #expect {
                try MeshSimTopology.parseLatencyMatrix(Data(json.utf8))
            } throws: { ($0 as? MeshSimInputError)?.code == code }
        }
    }

    @Test func traceParsesAndReplaysInALoop() throws {
        let tr = try MeshSimTrace.parse("0\n0\n5\n10\n")
        #expect(tr.period == 10)
        #expect(tr.firstIndex(atOrAfter: 0.006) == 3)
        #expect(tr.time(4) == 0.010)  // next loop starts at 10 ms
        #expect(tr.meanRate(from: 0, to: 1) == Double(400 * 1500))
    }

    @Test(
        arguments: [
            ("0\n5\n3\n", MeshSimInputError.Code.notMonotonic, 3),
            ("0\nx\n", .notANumber, 2),
            ("0\n-1\n", .outOfRange, 2),
            ("0\n0\n", .zeroDuration, nil),
            ("\n", .empty, nil),
        ] as [(String, MeshSimInputError.Code, Int?)])
    func traceRefuses(text: String, code: MeshSimInputError.Code, line: Int?) {
        #expect {
            try MeshSimTrace.parse(text, name: "t.down")
        } throws: { e in
            guard let e = e as? MeshSimInputError else { return false }
            return e.code == code && e.line == line
        }
    }

    @Test func randomIsSeededAndPortable() {
        var a = MultipathRandom(seed: 1), b = MultipathRandom(seed: 1), c = MultipathRandom(seed: 2)
        let xa = (0..<4).map { _ in a.next() }
        #expect(xa == (0..<4).map { _ in b.next() })
        #expect(xa != (0..<4).map { _ in c.next() })
    }
}
