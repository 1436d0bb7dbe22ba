// Replays a request trace through STOQ's eviction policies (S3-FIFO, W-TinyLFU, LRU) and prints one JSON line per
// (policy, capacity): the driver behind scripts/bench-cache, which generates the trace
// (seeded) and feeds the same file to libCacheSim.
//
// usage: stoq-cache-sim <trace> <capacity>...
// The trace is libCacheSim's oracleGeneral binary format (packed 24-byte records: UInt32
// time, UInt64 object id, UInt32 size, Int64 next access), little-endian. Every request
// counts as size 1, so capacity counts objects and the hit ratio is the object hit ratio.
import Foundation
import STOQCache

let args = CommandLine.arguments
guard args.count >= 3, let data = FileManager.default.contents(atPath: args[1]) else {
    FileHandle.standardError.write(Data("usage: stoq-cache-sim <oracleGeneral trace> <capacity>...\n".utf8))
    exit(2)
}
let capacities = args.dropFirst(2).compactMap { UInt64($0) }
let keys: [UInt64] = {
    data.withUnsafeBytes { raw in
        (0..<raw.count / 24).map { raw.loadUnaligned(fromByteOffset: $0 * 24 + 4, as: UInt64.self).littleEndian }
    }
}()

func replay<P: CachePolicy>(_ policy: inout P, _ name: String, _ capacity: UInt64, _ keys: [UInt64]) where P.Key == UInt64 {
    var hits = 0, evictions = 0
    let t0 = DispatchTime.now().uptimeNanoseconds
    for k in keys where policy.request(k, size: 1, evicted: { _ in evictions += 1 }) { hits += 1 }
    let ns = DispatchTime.now().uptimeNanoseconds - t0
    print(
        "{\"policy\":\"\(name)\",\"capacity\":\(capacity),\"requests\":\(keys.count),\"hits\":\(hits),"
            + "\"hit_ratio\":\(Double(hits) / Double(max(1, keys.count))),\"evictions\":\(evictions),"
            + "\"ns_per_request\":\(Double(ns) / Double(max(1, keys.count)))}")
}

for c in capacities {
    var lru = LRU<UInt64>(capacity: c)
    replay(&lru, "stoq-lru", c, keys)
    var s3 = S3FIFO<UInt64>(capacity: c)
    replay(&s3, "stoq-s3fifo", c, keys)
    // The threshold libCacheSim defaults to: two hits in the small queue to reach main.
    var s3t2 = S3FIFO<UInt64>(capacity: c, promoteAfter: 2)
    replay(&s3t2, "stoq-s3fifo-t2", c, keys)
    var w = WTinyLFU<UInt64>(capacity: c, expectedEntries: Int(c))
    replay(&w, "stoq-wtinylfu", c, keys)
}
