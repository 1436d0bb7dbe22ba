import Foundation
import Logging
import STOQCache
import STOQChunking
import STOQStore

/// The manifests an edge cache holds: one file each under `<root>/manifests`, least
/// recently used out first, within a byte budget of their own that the chunks' S3-FIFO does
/// not use, so that `edge.cache_size` bounds chunks and manifests together. Not thread-safe:
/// the edge cache calls it under its lock (file writes are the caller's, outside it).
struct EdgeManifests {
    struct Entry {
        var bytes: [UInt8]
        /// Unix time (seconds) until which it is fresh.
        var expires: Double
        /// Cut here from the upstream's plain object: its chunks are nowhere upstream, so it
        /// is good only while the cache holds every one of them.
        var plain = false
        /// What it takes on disk (and from the budget): the file, header included.
        var size: UInt64 { UInt64(EdgeManifests.headerLength + bytes.count) }
    }

    /// Cached manifest file: `STOQEM1\0` (`STOQEP1\0` when cut here from a plain object),
    /// expiry (Unix ms, UInt64 LE), the manifest bytes.
    static let magic = Array("STOQEM1\0".utf8)
    static let plainMagic = Array("STOQEP1\0".utf8)
    static let headerLength = 16
    /// The share of `edge.cache_size` manifests may take: a sixteenth. A 1 GiB object's
    /// manifest is ~140 KB, so a 10 GiB cache keeps ~4000 of them.
    static func budget(of capacity: UInt64) -> UInt64 { capacity / 16 }

    let dir: String
    private var lru: LRU<String>
    private var entries: [String: Entry] = [:]

    var usedBytes: UInt64 { lru.usedBytes }
    var count: Int { entries.count }
    var capacity: UInt64 { lru.capacity }

    /// Manifests evicted while loading (the budget shrank since they were saved).
    private(set) var evictedOnLoad = 0

    /// Loads the manifests saved under `dir`, oldest file first, so that the most recently
    /// written are the last to go; what does not fit the budget (or does not parse) is
    /// deleted.
    init(dir: String, capacity: UInt64, logger: Logger) throws {
        self.dir = dir
        lru = LRU(capacity: capacity)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        var found: [(name: String, modified: Date, entry: Entry)] = []
        for name in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] {
            let path = dir + "/" + name
            if name.hasPrefix(CacheIndexFile.tempPrefix) { unlink(path); continue }
            guard (try? ObjectIndex.validateName(name)) != nil, let bytes = try? CacheIndexFile.read(path),
                let entry = Self.decode(bytes)
            else {
                logger.warning("edge cache: dropping unreadable cached manifest \(path)")
                unlink(path)
                continue
            }
            let modified = (try? FileManager.default.attributesOfItem(atPath: path)[.modificationDate] as? Date) ?? nil
            found.append((name, modified ?? .distantPast, entry))
        }
        for f in found.sorted(by: { $0.modified < $1.modified }) {
            let r = insert(f.name, f.entry)
            for n in r.evicted { unlink(path(n)) }
            if !r.kept { unlink(path(f.name)) }
            evictedOnLoad += r.evicted.count + (r.kept ? 0 : 1)
        }
    }

    /// The manifest of `name`, counted as a use.
    mutating func get(_ name: String) -> Entry? {
        guard let e = entries[name] else { return nil }
        lru.touch(name)
        return e
    }

    /// Keeps `entry` as the manifest of `name` (replacing one held), evicting the least
    /// recently used to make room. Returns the names evicted — their files are the caller's
    /// to delete — and whether it was kept (false: larger than the whole budget; its file
    /// is then the caller's to delete too).
    mutating func insert(_ name: String, _ entry: Entry) -> (kept: Bool, evicted: [String]) {
        remove(name)
        var evicted: [String] = []
        let kept = lru.insert(name, size: entry.size) { evicted.append($0) }
        for n in evicted { entries[n] = nil }
        if kept { entries[name] = entry }
        return (kept, evicted)
    }

    /// The manifest of `name`, not counted as a use.
    func peek(_ name: String) -> Entry? { entries[name] }

    /// The manifests cut here from plain objects.
    var plainEntries: [(name: String, entry: Entry)] { entries.filter { $0.value.plain }.map { ($0.key, $0.value) } }

    mutating func remove(_ name: String) {
        entries[name] = nil
        lru.remove(name)
    }

    func path(_ name: String) -> String { dir + "/" + name }

    static func encode(_ e: Entry) -> [UInt8] {
        var out = e.plain ? plainMagic : magic
        let ms = UInt64(min(max(0, e.expires * 1000), 0x1p62))
        for i in 0..<8 { out.append(UInt8(truncatingIfNeeded: ms >> (8 * i))) }
        return out + e.bytes
    }

    static func decode(_ bytes: [UInt8]) -> Entry? {
        guard bytes.count >= headerLength, [magic, plainMagic].contains(Array(bytes[0..<8])),
            (try? Manifest(decoding: Array(bytes[headerLength...]))) != nil
        else { return nil }
        let ms = (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[8 + $1]) << (8 * $1) }
        return Entry(bytes: Array(bytes[headerLength...]), expires: Double(ms) / 1000, plain: Array(bytes[0..<8]) == plainMagic)
    }
}
