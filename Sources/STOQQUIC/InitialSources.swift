import STOQCore

/// Where a server's v1 Initials without a token came from since it was last asked, by /64:
/// how many the endpoint used (answered or accepted) and how many it withheld because its
/// stateless reply budget was spent. Withheld ones were read, copied and parsed for nothing:
/// what a worker's datapath may shed (`InitialShedding` in STOQWorker).
public struct InitialReport: Sendable, Equatable {
    /// One /64 (`IPv6Address.prefix64`) and its counts.
    public struct Source: Sendable, Equatable {
        public var prefix: UInt64
        public var used: UInt64
        public var withheld: UInt64
        public init(prefix: UInt64, used: UInt64, withheld: UInt64) {
            (self.prefix, self.used, self.withheld) = (prefix, used, withheld)
        }
    }
    /// All of them, from anywhere.
    public var used: UInt64 = 0
    public var withheld: UInt64 = 0
    /// The /64s that had the most withheld (none without), most first.
    public var busiest: [Source] = []
    public init(used: UInt64 = 0, withheld: UInt64 = 0, busiest: [Source] = []) {
        (self.used, self.withheld, self.busiest) = (used, withheld, busiest)
    }
}

/// The counts behind `InitialReport`, in a fixed table of one slot per hash of the /64, like
/// `ReplyBudget`'s: counting a flood allocates nothing. A prefix whose slot another holds is
/// counted in the totals only.
struct InitialSources {
    static let slots = 1024
    private var table = [(prefix: UInt64, used: UInt32, withheld: UInt32)](repeating: (0, 0, 0), count: slots)
    private var used: UInt64 = 0, withheld: UInt64 = 0

    mutating func note(from peer: IPv6Address, withheld held: Bool) {
        if held { withheld &+= 1 } else { used &+= 1 }
        let prefix = peer.prefix64
        let i = Int(truncatingIfNeeded: (prefix &* 0x9E37_79B9_7F4A_7C15) >> 54) & (Self.slots - 1)
        if table[i].prefix != prefix {
            guard table[i].used == 0 && table[i].withheld == 0 else { return }
            table[i].prefix = prefix
        }
        if held { table[i].withheld &+= 1 } else { table[i].used &+= 1 }
    }

    /// The counts so far, with the `limit` busiest /64s, and a fresh start.
    mutating func take(limit: Int) -> InitialReport {
        var report = InitialReport(used: used, withheld: withheld)
        if withheld > 0 {
            for s in table where s.withheld > 0 {
                let source = InitialReport.Source(prefix: s.prefix, used: UInt64(s.used), withheld: UInt64(s.withheld))
                if report.busiest.count < limit {
                    report.busiest.append(source)
                } else if let least = report.busiest.indices.min(by: { report.busiest[$0].withheld < report.busiest[$1].withheld }),
                    report.busiest[least].withheld < source.withheld
                {
                    report.busiest[least] = source
                }
            }
            report.busiest.sort { $0.withheld > $1.withheld }
        }
        if used > 0 || withheld > 0 {
            for i in table.indices { table[i] = (0, 0, 0) }
        }
        (used, withheld) = (0, 0)
        return report
    }
}
