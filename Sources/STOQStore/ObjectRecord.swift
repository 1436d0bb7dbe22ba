import Crypto

/// One object: its name, its manifest (opaque bytes here; the chunking module defines
/// them) and the ordered chunk ids it references.
///
/// On disk (`objects/<name>`): the 8 magic bytes `STOQOBJ1`, the chunk count (u32
/// big-endian), the manifest length (u64 big-endian), the 32-byte chunk ids, the manifest,
/// then SHA-256 of everything before it. Records are replaced atomically, so a torn record
/// is never visible; the checksum is for damage at rest, which must not make garbage
/// collection drop chunks an object still needs.
public struct ObjectRecord: Sendable, Equatable {
    /// The object's name: one path segment of `[A-Za-z0-9._-]`, not starting with a dot.
    public var name: String
    /// The manifest, as given to `putObject`.
    public var manifest: [UInt8]
    /// The chunks, in order.
    public var chunkIDs: [ChunkID]

    /// A record.
    public init(name: String, manifest: [UInt8], chunkIDs: [ChunkID]) {
        self.name = name
        self.manifest = manifest
        self.chunkIDs = chunkIDs
    }

    static let magic: [UInt8] = Array("STOQOBJ1".utf8)
    private static let headerSize = 8 + 4 + 8

    func encoded() -> [UInt8] {
        var out = Self.magic
        out.reserveCapacity(Self.headerSize + 32 * chunkIDs.count + manifest.count + 32)
        let n = UInt32(chunkIDs.count), m = UInt64(manifest.count)
        for s in stride(from: 24, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: n >> UInt32(s))) }
        for s in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: m >> UInt64(s))) }
        for id in chunkIDs { out.append(contentsOf: id.bytes) }
        out.append(contentsOf: manifest)
        out.append(contentsOf: SHA256.hash(data: out))
        return out
    }

    /// Parses a record read from `path` (for messages); `.corruptRecord` says what is wrong.
    init(decoding b: [UInt8], name: String, path: String) throws {
        func bad(_ why: String) -> StoreError { StoreError(.corruptRecord, "object record \(path) is damaged: \(why)") }
        guard b.count >= Self.headerSize + 32 else { throw bad("\(b.count) bytes is shorter than any record") }
        guard Array(b[0..<8]) == Self.magic else { throw bad("it does not start with STOQOBJ1") }
        let n = b[8..<12].reduce(0) { $0 << 8 | Int($1) }
        let m = b[12..<20].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        let body = b.count - 32
        guard m <= UInt64(body), Self.headerSize + 32 * n + Int(m) == body else {
            throw bad("\(n) chunk ids and a \(m)-byte manifest do not fill \(b.count) bytes")
        }
        let sum = Array(SHA256.hash(data: b[0..<body]))
        guard sum == Array(b[body...]) else { throw bad("checksum mismatch") }
        var ids: [ChunkID] = []
        ids.reserveCapacity(n)
        var at = Self.headerSize
        for _ in 0..<n {
            ids.append(ChunkID(bytes: b[at..<(at + 32)])!)
            at += 32
        }
        self.init(name: name, manifest: Array(b[at..<body]), chunkIDs: ids)
    }
}
