// Runs the multipath scenarios on the simulated mesh and prints, side by side, ml_optimized
// and the baselines (the driver behind scripts/bench-multipath). Output depends only on the
// inputs and the seed; `--decide-bench` (wall-clock ns per decision) is separate for that reason.
//
// usage: stoq-mesh-sim [--json] [--seed N] [--scenario NAME]... [--pantheon FILE]
//                      [--trace FILE]... [--leios FILE] [--topology FILE]...
//        stoq-mesh-sim --decide-bench [--routes N]
//        stoq-mesh-sim --explain ALGORITHM [--scenario NAME]...   (where the slowest transfers lost time)
import Foundation
import STOQRouting

func die(_ message: String) -> Never {
    FileHandle.standardError.write(Data("stoq-mesh-sim: \(message)\n".utf8))
    exit(2)
}

var json = false
var seed: UInt64 = 1
var wanted: [String] = []
var pantheonPath = "Benchmarks/topologies/pantheon5.csv"
var tracePaths: [String] = []
var leiosPath: String?
var topologyPaths: [String] = []
var decideBench = false
var benchRoutes = 8
var explain: String?
var args = CommandLine.arguments.dropFirst()
@MainActor func value(_ flag: String) -> String {
    guard let v = args.popFirst() else { die("\(flag) needs a value") }
    return v
}
while let a = args.popFirst() {
    switch a {
    case "--json": json = true
    case "--seed": guard let s = UInt64(value(a)) else { die("--seed needs an unsigned integer") }; seed = s
    case "--scenario": wanted.append(value(a))
    case "--pantheon": pantheonPath = value(a)
    case "--trace": tracePaths.append(value(a))
    case "--leios": leiosPath = value(a)
    case "--topology": topologyPaths.append(value(a))
    case "--decide-bench": decideBench = true
    case "--explain": explain = value(a)
    case "--routes": guard let n = Int(value(a)), n > 0 else { die("--routes needs a positive integer") }; benchRoutes = n
    case "-h", "--help":
        print(
            "usage: stoq-mesh-sim [--json] [--seed N] [--scenario NAME]... [--pantheon FILE] [--trace FILE]... "
                + "[--leios FILE] [--topology FILE]...\n       stoq-mesh-sim --decide-bench [--routes N]")
        exit(0)
    default: die("unknown argument \(a)")
    }
}

if decideBench {
    // Decisions of a warmed-up learner over N routes with some load in flight.
    let learner = LearnerScheduler()
    var cands: [MultipathCandidate] = []
    for i in 0..<benchRoutes {
        cands.append(
            MultipathCandidate(
                id: MultipathRouteID(i),
                features: MultipathRouteFeatures(
                    rttMean: 0.01 + 0.01 * Double(i), deliveryRate: 1e6 * Double(1 + i), hopCount: 1 + i % 3)))
    }
    learner.update(candidates: cands, now: 0)
    var now = 0.0
    for k in 0..<2000 {
        let r = learner.choose(transfer: k % 4, bytes: 262_144, backlog: 262_144, among: nil, excluding: nil, now: now) ?? MultipathRouteID(0)
        learner.dispatched(transfer: k % 4, route: r, bytes: 262_144, now: now)
        learner.completed(
            MultipathCompletion(
                route: r, transfer: k % 4, bytes: 262_144, requestedAt: now,
                endedAt: now + 0.02, outcome: .delivered), now: now + 0.02)
        now += 0.001
    }
    let n = 1_000_000
    var sink = 0
    let t0 = DispatchTime.now().uptimeNanoseconds
    for k in 0..<n { sink &+= (learner.choose(transfer: k & 3, bytes: 262_144, backlog: 262_144, among: nil, excluding: nil, now: now)?.rawValue ?? 0) }
    let choose = Double(DispatchTime.now().uptimeNanoseconds - t0) / Double(n)
    let m = 200_000
    let t1 = DispatchTime.now().uptimeNanoseconds
    for k in 0..<m {
        let r = MultipathRouteID(k % benchRoutes)
        learner.dispatched(transfer: 0, route: r, bytes: 262_144, now: now)
        learner.completed(
            MultipathCompletion(
                route: r, transfer: 0, bytes: 262_144, requestedAt: now, endedAt: now + 0.02,
                outcome: .delivered), now: now + 0.02)
        now += 1e-5
    }
    let update = Double(DispatchTime.now().uptimeNanoseconds - t1) / Double(m)
    // The held-back path: every route past its late-binding horizon and 50 transfers waiting,
    // so each decision runs the ECF comparison over the node's queue.
    for i in 0..<benchRoutes { learner.dispatched(transfer: 1000, route: MultipathRouteID(i), bytes: 64 << 20, now: now) }
    for k in 0..<50 { _ = learner.choose(transfer: k, bytes: 262_144, backlog: 4 << 20, among: nil, excluding: nil, now: now) }
    let t2 = DispatchTime.now().uptimeNanoseconds
    for k in 0..<n { sink &+= (learner.choose(transfer: k % 50, bytes: 262_144, backlog: 4 << 20, among: nil, excluding: nil, now: now)?.rawValue ?? 0) }
    let held = Double(DispatchTime.now().uptimeNanoseconds - t2) / Double(n)
    print(
        String(
            format:
                "ml_optimized decision over %d routes: %.0f ns; all routes full, 50 transfers waiting: %.0f ns; dispatch+completion update: %.0f ns (sink %d)",
            benchRoutes, choose, held, update, sink & 1))
    exit(0)
}

// Scenarios, in a fixed order.
var scenarios: [MeshSimScenario] = []
@MainActor func want(_ name: String) -> Bool { wanted.isEmpty || wanted.contains(name) }
do {
    let pantheonNeeded = ["stable", "degrade", "node_failure", "herding"].contains(where: want)
    if pantheonNeeded {
        let topo = try MeshSimTopology.load(path: pantheonPath)
        for v in ["stable", "degrade", "node_failure", "herding"] where want(v) {
            guard let s = MeshSimScenarios.pantheon(topo, variant: v, seed: seed) else {
                die("\(pantheonPath): needs nodes S and C joined by at least one route")
            }
            scenarios.append(s)
        }
    }
    if want("cellular") && !tracePaths.isEmpty {
        let traces = try tracePaths.map { path throws(MeshSimInputError) in try MeshSimTrace.load(path: path) }
        scenarios.append(MeshSimScenarios.cellular(traces: traces, seed: seed)!)
    } else if wanted.contains("cellular") {
        die("scenario cellular needs --trace FILE (Mahimahi format)")
    }
    if let leiosPath, want("leios1k") {
        let topo = try MeshSimTopology.load(path: leiosPath)
        guard let s = MeshSimScenarios.graph(topo, name: "leios1k", maxNodes: 1000, clients: 20, seed: seed) else {
            die("\(leiosPath): too small for a graph scenario")
        }
        scenarios.append(s)
    }
    for path in topologyPaths {
        let name = ((path as NSString).lastPathComponent as NSString).deletingPathExtension
        guard want(name) || want("topology") else { continue }
        let topo = try MeshSimTopology.load(path: path)
        guard let s = MeshSimScenarios.graph(topo, name: name, maxNodes: 1000, clients: 10, seed: seed) else {
            die("\(path): too small for a graph scenario")
        }
        scenarios.append(s)
    }
} catch {
    die("\(error)")
}
if scenarios.isEmpty { die("no scenario selected (names: stable degrade node_failure herding cellular leios1k, or a --topology file's name)") }

/// Records every request a scheduler sees, per transfer, so `--explain` can show where the
/// slowest transfers lost their time (diagnosis of the tail, not part of the benchmark).
final class ExplainingScheduler: MultipathChunkScheduler {
    struct Request {
        var route: MultipathRouteID
        var at: Double
        var expect: Double
        var isHedge: Bool
        var end = -1.0
        var outcome: MultipathCompletion.Outcome?
    }
    let inner: any MultipathChunkScheduler
    var requests: [MultipathTransferID: [Request]] = [:]
    /// Decisions that returned nil (the chunk was held back) per transfer.
    var held: [MultipathTransferID: Int] = [:]
    private var lastWasHedge = false
    init(_ inner: any MultipathChunkScheduler) { self.inner = inner }
    var name: String { inner.name }
    func update(candidates: [MultipathCandidate], now: Double) { inner.update(candidates: candidates, now: now) }
    func choose(
        transfer: MultipathTransferID, bytes: Int, backlog: Int, among: [MultipathRouteID]?,
        excluding: MultipathRouteID?, now: Double
    ) -> MultipathRouteID? {
        let r = inner.choose(transfer: transfer, bytes: bytes, backlog: backlog, among: among, excluding: excluding, now: now)
        lastWasHedge = excluding != nil
        if r == nil && excluding == nil { held[transfer, default: 0] += 1 }
        return r
    }
    func dispatched(transfer: MultipathTransferID, route: MultipathRouteID, bytes: Int, now: Double) {
        let e = inner.expectedDuration(route: route, bytes: bytes, now: now)
        requests[transfer, default: []].append(Request(route: route, at: now, expect: e, isHedge: lastWasHedge))
        lastWasHedge = false
        inner.dispatched(transfer: transfer, route: route, bytes: bytes, now: now)
    }
    func completed(_ c: MultipathCompletion, now: Double) {
        if let k = requests[c.transfer]?.firstIndex(where: { $0.route == c.route && $0.at == c.requestedAt && $0.outcome == nil }) {
            requests[c.transfer]![k].end = c.endedAt
            requests[c.transfer]![k].outcome = c.outcome
        }
        inner.completed(c, now: now)
    }
    func expectedDuration(route: MultipathRouteID, bytes: Int, now: Double) -> Double {
        inner.expectedDuration(route: route, bytes: bytes, now: now)
    }
    func expectedSpread(route: MultipathRouteID, bytes: Int, now: Double) -> Double {
        inner.expectedSpread(route: route, bytes: bytes, now: now)
    }
    func estimates(now: Double) -> [MultipathRouteEstimate] { inner.estimates(now: now) }
    func forgetWithdrawn() { inner.forgetWithdrawn() }
}

@MainActor func makeScheduler(_ algorithm: String, client: Int) -> any MultipathChunkScheduler {
    switch algorithm {
    case "min_rtt": return MinRTTScheduler()
    case "round_robin": return RoundRobinScheduler()
    case "best_single": return BestSingleScheduler()
    default:
        var st = LearnerSettings()
        st.seed = seed &+ UInt64(client) &* 0x9E37_79B9
        return LearnerScheduler(settings: st)
    }
}

if let explain {
    for s in scenarios {
        var recorders: [ExplainingScheduler] = []
        let r = MeshSimRunner.run(s, seed: seed, algorithm: explain) { client in
            let x = ExplainingScheduler(makeScheduler(explain, client: client))
            recorders.append(x)
            return x
        }
        print("== \(s.name) \(explain): p99 \(String(format: "%.3f", r.quantile(0.99))) s; the five slowest transfers")
        let slow = r.completion.indices.sorted { r.completion[$0] > r.completion[$1] }.prefix(5)
        for t in slow {
            let start = s.transfers[t].start
            guard let reqs = recorders.lazy.compactMap({ $0.requests[t] }).first else { continue }
            let held = recorders.lazy.compactMap({ $0.held[t] }).first ?? 0
            var perRoute: [MultipathRouteID: Int] = [:]
            for q in reqs where !q.isHedge { perRoute[q.route, default: 0] += 1 }
            let routes = perRoute.keys.sorted().map { "\($0)×\(perRoute[$0]!)" }.joined(separator: " ")
            print(
                String(
                    format: "  transfer %d: start %.2f, took %.3f s; %d requests (%@), %d hedges, %d failed, %d cancelled, %d held decisions",
                    t, start, r.completion[t], reqs.count, routes, reqs.filter(\.isHedge).count,
                    reqs.filter { $0.outcome == .failed }.count, reqs.filter { $0.outcome == .cancelled }.count, held))
            // The requests that ended last: the ones the object waited for.
            for q in reqs.sorted(by: { ($0.end < 0 ? .infinity : $0.end) > ($1.end < 0 ? .infinity : $1.end) }).prefix(4) {
                print(
                    String(
                        format: "    %@%@ sent +%.3f took %.3f (expected %.3f) %@", q.route.description, q.isHedge ? " hedge" : "",
                        q.at - start, q.end < 0 ? -1 : q.end - q.at, q.expect,
                        q.outcome.map { "\($0)" } ?? "unanswered"))
            }
        }
    }
    exit(0)
}

let algorithms = ["ml_optimized", "min_rtt", "round_robin", "best_single", "oracle"]
var comparisons: [MeshSimComparison] = []
for s in scenarios { comparisons.append(MeshSimComparison.run(s, seed: seed)) }

func f(_ x: Double, _ d: Int = 3) -> String { String(format: "%.\(d)f", x) }
func pct(_ x: Double) -> String { String(format: "%+.1f%%", 100 * x) }

if json {
    // One object keyed by algorithm; pooled figures over every scenario's transfers, then the
    // per-scenario detail.
    var out = "{"
    for (ai, a) in algorithms.enumerated() {
        var all: [Double] = [], goods: [Double] = [], mean = 0.0, oracleMean = 0.0
        for c in comparisons {
            guard let r = c.result(a), let o = c.result("oracle") else { continue }
            all += r.completion
            goods += r.goodput
            mean += r.completion.reduce(0, +)
            oracleMean += o.completion.reduce(0, +)
        }
        out +=
            "\(ai == 0 ? "" : ",")\n  \"\(a)\": {\"p50_s\": \(f(MeshSimResult.quantile(all, 0.5), 4)), \"p99_s\": \(f(MeshSimResult.quantile(all, 0.99), 4)), "
        out +=
            "\"goodput_mbit\": \(f(goods.reduce(0, +) / Double(max(1, goods.count)) / 1e6, 3)), \"regret\": \(f(oracleMean > 0 ? (mean - oracleMean) / oracleMean : 0, 4)), "
        out += "\"scenarios\": {"
        for (ci, c) in comparisons.enumerated() {
            guard let r = c.result(a) else { continue }
            out += "\(ci == 0 ? "" : ", ")\"\(c.scenario)\": {\"p50_s\": \(f(r.quantile(0.5), 4)), \"p99_s\": \(f(r.quantile(0.99), 4)), "
            out += "\"mean_s\": \(f(r.mean, 4)), \"goodput_mbit\": \(f(r.meanGoodputMbit, 3)), \"regret\": \(f(c.regret(a), 4)), "
            out += "\"load_skew\": \(f(c.loadSkew(a), 4)), \"transfers\": \(r.completion.count), \"incomplete\": \(r.incomplete), "
            out += "\"hedges\": \(r.hedges), \"retries\": \(r.retries), \"route_bytes\": [\(r.routeBytes.map(String.init).joined(separator: ","))]"
            out += ", \"p99_floor_s\": \(f(c.p99Floor, 4))"
            out += "}"
        }
        out += "}}"
    }
    out += "\n}"
    print(out)
    exit(0)
}

for c in comparisons {
    print("== \(c.scenario): \(c.summary)")
    print("   route capacity (true mean, Mbit/s): " + c.routeCapacity.map { f($0 * 8 / 1e6, 1) }.joined(separator: " "))
    print("   oracle = best of \(c.oracleCandidates) fixed splits: \(c.oracleSplit)")
    print(
        "   "
            + ["algorithm", "p50_s", "p99_s", "mean_s", "goodput_Mbit", "regret", "load_skew", "hedges", "retries", "incomplete"]
            .enumerated().map {
                $0.offset == 0
                    ? $0.element.padding(toLength: 13, withPad: " ", startingAt: 0)
                    : String(repeating: " ", count: max(0, 13 - $0.element.count)) + $0.element
            }.joined())
    for a in algorithms {
        guard let r = c.result(a) else { continue }
        let cols = [
            f(r.quantile(0.5)), f(r.quantile(0.99)), f(r.mean), f(r.meanGoodputMbit, 2), pct(c.regret(a)),
            f(c.loadSkew(a), 3), "\(r.hedges)", "\(r.retries)", "\(r.incomplete)/\(r.completion.count)",
        ]
        print(
            "   " + a.padding(toLength: 13, withPad: " ", startingAt: 0)
                + cols.map { String(repeating: " ", count: max(0, 13 - $0.count)) + $0 }.joined())
    }
    if let ml = c.result("ml_optimized"), let m = c.result("min_rtt"), c.p99Floor > 0 {
        // Said next to the comparison: how far any scheduler can beat another at the p99 is
        // how far that one is above this floor.
        print(
            "   floor: no scheduler's p99 can be below \(f(c.p99Floor)) s (arrivals over the routes' capacity); "
                + "ml_optimized is \(pct(ml.quantile(0.99) / c.p99Floor - 1)) above it, min_rtt \(pct(m.quantile(0.99) / c.p99Floor - 1))")
    }
    if let ml = c.result("ml_optimized") {
        for b in ["min_rtt", "round_robin", "best_single"] {
            guard let r = c.result(b) else { continue }
            print(
                "   ml_optimized vs \(b.padding(toLength: 11, withPad: " ", startingAt: 0)): p99 "
                    + pct(ml.quantile(0.99) / r.quantile(0.99) - 1) + ", goodput " + pct(ml.meanGoodputMbit / r.meanGoodputMbit - 1))
        }
        let total = Double(max(1, ml.routeBytes.reduce(0, +)))
        let cap = c.routeCapacity.reduce(0, +)
        if c.routeCapacity.count <= 12 {
            print(
                "   load share ml_optimized (capacity share): "
                    + ml.routeBytes.indices.map {
                        "r\($0) \(f(100 * Double(ml.routeBytes[$0]) / total, 1))% (\(f(100 * c.routeCapacity[$0] / cap, 1))%)"
                    }.joined(separator: ", "))
            print(
                "   learner's view at the last arrival (stoq mesh routes): "
                    + ml.estimates.map {
                        "\($0.route) \(f($0.rate * 8 / 1e6, 1)) Mbit/s, \(f($0.latency * 1000, 0)) ms, share \(f(100 * $0.chunkShare, 0))%"
                    }.joined(separator: "; "))
        }
    }
    print("")
}
