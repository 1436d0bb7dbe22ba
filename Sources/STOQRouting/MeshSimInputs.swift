// Input formats of the mesh simulator (docs/multipath.md "Input formats"): an edge list, a
// full latency matrix as JSON, and Mahimahi capacity traces. Parsers refuse bad input with a
// named reason and the line it is on, never a silent default.

import Foundation

/// Why a simulator input was refused.
public struct MeshSimInputError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The kind of problem; extensible.
    public struct Code: RawRepresentable, Hashable, Sendable {
        public var rawValue: String
        public init(rawValue: String) { self.rawValue = rawValue }
        /// The file has no data lines.
        public static let empty = Code(rawValue: "empty")
        /// A line has too few or too many fields.
        public static let fieldCount = Code(rawValue: "field_count")
        /// A field is not a number.
        public static let notANumber = Code(rawValue: "not_a_number")
        /// A number is outside what the field allows (negative latency, loss ≥ 100 %, …).
        public static let outOfRange = Code(rawValue: "out_of_range")
        /// An edge from a node to itself.
        public static let selfLoop = Code(rawValue: "self_loop")
        /// Trace timestamps go backwards.
        public static let notMonotonic = Code(rawValue: "not_monotonic")
        /// A trace whose last timestamp is 0 cannot be replayed in a loop.
        public static let zeroDuration = Code(rawValue: "zero_duration")
        /// A matrix key is not `i-j`.
        public static let badKey = Code(rawValue: "bad_key")
        /// The JSON is not one object of numbers.
        public static let badJSON = Code(rawValue: "bad_json")
        /// A file could not be read.
        public static let unreadable = Code(rawValue: "unreadable")
    }
    /// The kind of problem.
    public var code: Code
    /// The input's name (file path) and 1-based line, when there is one.
    public var source: String
    public var line: Int?
    /// A human sentence naming the offending value.
    public var reason: String

    public var description: String {
        "\(source)\(line.map { ":\($0)" } ?? ""): \(code.rawValue): \(reason)"
    }
}

/// One undirected link of a topology file. Missing rate and loss mean "use the scenario's
/// default" (documented there).
public struct MeshSimEdge: Sendable, Equatable {
    public var a: String
    public var b: String
    /// One-way propagation latency, milliseconds.
    public var latencyMs: Double
    /// Bottleneck rate in Mbit/s, if given.
    public var rateMbit: Double?
    /// Random loss in percent, if given.
    public var lossPercent: Double?
}

/// A topology: named nodes and undirected edges, in file order (names are sorted only where
/// the format has no order, the JSON matrix).
public struct MeshSimTopology: Sendable {
    public var edges: [MeshSimEdge]
    public init(edges: [MeshSimEdge]) { self.edges = edges }

    /// Parses `a,b,latency_ms[,rate_mbit,loss_pct]`, one edge per line. Blank lines and lines
    /// starting with `#` are skipped; a first line whose third field is not a number is a header.
    public static func parseEdgeList(_ text: String, source: String = "edges") throws(MeshSimInputError) -> MeshSimTopology {
        var edges: [MeshSimEdge] = []
        var lineNo = 0
        var sawData = false
        for raw in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNo += 1
            let line = raw.trimmingCharacters(in: .whitespacesAndNewlines)
            if line.isEmpty || line.hasPrefix("#") { continue }
            let f = line.split(separator: ",", omittingEmptySubsequences: false).map {
                $0.trimmingCharacters(in: .whitespaces)
            }
            if !sawData && f.count >= 3 && Double(f[2]) == nil { sawData = true; continue }  // header
            sawData = true
            func fail(_ c: MeshSimInputError.Code, _ r: String) -> MeshSimInputError {
                MeshSimInputError(code: c, source: source, line: lineNo, reason: r)
            }
            guard f.count == 3 || f.count == 5 else {
                throw fail(.fieldCount, "expected a,b,latency_ms or a,b,latency_ms,rate_mbit,loss_pct; got \(f.count) fields")
            }
            guard !f[0].isEmpty, !f[1].isEmpty else { throw fail(.fieldCount, "empty node name") }
            guard f[0] != f[1] else { throw fail(.selfLoop, "edge from \(f[0]) to itself") }
            guard let lat = Double(f[2]), lat.isFinite else { throw fail(.notANumber, "latency_ms '\(f[2])' is not a number") }
            guard lat >= 0 else { throw fail(.outOfRange, "latency_ms \(f[2]) is negative") }
            var edge = MeshSimEdge(a: f[0], b: f[1], latencyMs: lat)
            if f.count == 5 {
                guard let rate = Double(f[3]), rate.isFinite else {
                    throw fail(.notANumber, "rate_mbit '\(f[3])' is not a number")
                }
                guard rate > 0 else { throw fail(.outOfRange, "rate_mbit \(f[3]) must be > 0") }
                guard let loss = Double(f[4]), loss.isFinite else {
                    throw fail(.notANumber, "loss_pct '\(f[4])' is not a number")
                }
                guard loss >= 0 && loss < 100 else { throw fail(.outOfRange, "loss_pct \(f[4]) must be in [0, 100)") }
                edge.rateMbit = rate
                edge.lossPercent = loss
            }
            edges.append(edge)
        }
        guard !edges.isEmpty else {
            throw MeshSimInputError(code: .empty, source: source, line: nil, reason: "no edges")
        }
        return MeshSimTopology(edges: edges)
    }

    /// Parses a full latency matrix `{"i-j": ms, …}` (one-way ms; names must not contain `-`).
    /// Both `i-j` and `j-i` may be present; the first in sorted key order wins.
    public static func parseLatencyMatrix(_ data: Data, source: String = "matrix") throws(MeshSimInputError) -> MeshSimTopology {
        let object: Any
        do { object = try JSONSerialization.jsonObject(with: data) } catch {
            throw MeshSimInputError(code: .badJSON, source: source, line: nil, reason: "not JSON: \(error.localizedDescription)")
        }
        guard let dict = object as? [String: Any] else {
            throw MeshSimInputError(code: .badJSON, source: source, line: nil, reason: "top level is not an object")
        }
        guard !dict.isEmpty else { throw MeshSimInputError(code: .empty, source: source, line: nil, reason: "no pairs") }
        var seen = Set<String>()
        var edges: [MeshSimEdge] = []
        for key in dict.keys.sorted() {
            let parts = key.split(separator: "-", omittingEmptySubsequences: false)
            guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
                throw MeshSimInputError(code: .badKey, source: source, line: nil, reason: "key '\(key)' is not i-j")
            }
            guard parts[0] != parts[1] else {
                throw MeshSimInputError(code: .selfLoop, source: source, line: nil, reason: "key '\(key)' joins a node to itself")
            }
            guard let n = dict[key] as? NSNumber, !(dict[key] is Bool), n.doubleValue.isFinite else {
                throw MeshSimInputError(code: .notANumber, source: source, line: nil, reason: "value of '\(key)' is not a number")
            }
            guard n.doubleValue >= 0 else {
                throw MeshSimInputError(code: .outOfRange, source: source, line: nil, reason: "latency of '\(key)' is negative")
            }
            let a = String(parts[0]), b = String(parts[1])
            let canon = a < b ? "\(a)\u{0}\(b)" : "\(b)\u{0}\(a)"
            if seen.insert(canon).inserted { edges.append(MeshSimEdge(a: a, b: b, latencyMs: n.doubleValue)) }
        }
        return MeshSimTopology(edges: edges)
    }

    /// Reads a topology file: `.json` is a latency matrix, anything else an edge list.
    public static func load(path: String) throws(MeshSimInputError) -> MeshSimTopology {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw MeshSimInputError(code: .unreadable, source: path, line: nil, reason: "cannot read the file")
        }
        if path.hasSuffix(".json") { return try parseLatencyMatrix(data, source: path) }
        guard let text = String(data: data, encoding: .utf8) else {
            throw MeshSimInputError(code: .unreadable, source: path, line: nil, reason: "not UTF-8 text")
        }
        return try parseEdgeList(text, source: path)
    }
}

/// A Mahimahi capacity trace: each line a millisecond timestamp at which one 1500-byte packet
/// may cross (repeated when several may). Replayed in a loop whose period is the last timestamp,
/// as Mahimahi's link shell does.
public struct MeshSimTrace: Sendable, Equatable {
    /// Delivery opportunities, milliseconds, non-decreasing.
    public let times: [Int]
    /// Loop period, milliseconds (the last timestamp).
    public let period: Int
    /// The trace's name (file name), for reports.
    public let name: String

    /// Bytes one opportunity carries.
    public static let packetBytes = 1500

    /// Parses a trace.
    public static func parse(_ text: String, name: String = "trace") throws(MeshSimInputError) -> MeshSimTrace {
        var times: [Int] = []
        var lineNo = 0
        for raw in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNo += 1
            let line = raw.trimmingCharacters(in: .whitespacesAndNewlines)
            if line.isEmpty { continue }
            guard let t = Int(line) else {
                throw MeshSimInputError(code: .notANumber, source: name, line: lineNo, reason: "'\(line)' is not an integer ms timestamp")
            }
            guard t >= 0 else { throw MeshSimInputError(code: .outOfRange, source: name, line: lineNo, reason: "timestamp \(t) is negative") }
            if let last = times.last, t < last {
                throw MeshSimInputError(code: .notMonotonic, source: name, line: lineNo, reason: "timestamp \(t) is before \(last)")
            }
            times.append(t)
        }
        guard let last = times.last else { throw MeshSimInputError(code: .empty, source: name, line: nil, reason: "no timestamps") }
        guard last > 0 else {
            throw MeshSimInputError(code: .zeroDuration, source: name, line: nil, reason: "last timestamp is 0, nothing to loop")
        }
        return MeshSimTrace(times: times, period: last, name: name)
    }

    /// Reads a trace file.
    public static func load(path: String) throws(MeshSimInputError) -> MeshSimTrace {
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
            throw MeshSimInputError(code: .unreadable, source: path, line: nil, reason: "cannot read the file")
        }
        return try parse(text, name: (path as NSString).lastPathComponent)
    }

    init(times: [Int], period: Int, name: String) {
        self.times = times
        self.period = period
        self.name = name
    }

    /// Time (seconds) of the opportunity with absolute index m (counting across loops).
    @inline(__always) func time(_ m: Int) -> Double {
        let (q, r) = m.quotientAndRemainder(dividingBy: times.count)
        return Double(q * period + times[r]) / 1000
    }

    /// Absolute index of the first opportunity at or after t seconds.
    func firstIndex(atOrAfter t: Double) -> Int {
        let ms = Int((t * 1000).rounded(.up))
        let (q, r) = max(ms, 0).quotientAndRemainder(dividingBy: period)
        var lo = 0, hi = times.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if times[mid] < r { lo = mid + 1 } else { hi = mid }
        }
        return q * times.count + lo
    }

    /// Mean capacity over [from, to) seconds, bytes per second.
    func meanRate(from: Double, to: Double) -> Double {
        guard to > from else { return 0 }
        let n = firstIndex(atOrAfter: to) - firstIndex(atOrAfter: from)
        return Double(n * Self.packetBytes) / (to - from)
    }
}
