import Crypto
import STOQChunking

/// One object: its name, its manifest (opaque bytes here; the chunking module defines
/// them), the ordered chunk ids it references, and who wrote it.
///
/// On disk (`objects/<name>`), version 1: the 8 magic bytes `STOQOBJ1`, the chunk count
/// (u32 big-endian), the manifest length (u64 big-endian), the 32-byte chunk ids, the
/// manifest, then SHA-256 of everything before it. Version 2 (`STOQOBJ2`) adds the owner:
/// after the manifest length an owner length (u16 big-endian), and after the manifest the
/// owner's UTF-8 bytes. A record without an owner is still written as version 1, so a store
/// that never had owners stays readable by older nodes; both versions are read. Records are
/// replaced atomically, so a torn record is never visible; the checksum is for damage at
/// rest, which must not make garbage collection drop chunks an object still needs.
public struct ObjectRecord: Sendable, Equatable {
    /// The object's name: one path segment of `[A-Za-z0-9._-]`, not starting with a dot.
    public var name: String
    /// The manifest, as given to `putObject`.
    public var manifest: [UInt8]
    /// The chunks, in order.
    public var chunkIDs: [ChunkID]
    /// The identity that wrote the object (`token:…`, `cert:…`, `addr:…/64`), "" when
    /// unknown (a record written before owners were kept). At most `maxOwnerLength` bytes.
    public var owner: String

    /// The longest owner kept, in UTF-8 bytes (longer ones are cut).
    public static let maxOwnerLength = 1024

    /// A record.
    public init(name: String, manifest: [UInt8], chunkIDs: [ChunkID], owner: String = "") {
        self.name = name
        self.manifest = manifest
        self.chunkIDs = chunkIDs
        self.owner = owner
    }

    /// The most chunk ids a record lists: as many as a manifest may (`Manifest.maxChunkCount`).
    static let maxChunkCount = Manifest.maxChunkCount
    /// The longest manifest a record holds: one listing `maxChunkCount` chunks.
    static let maxManifestSize = Manifest.headerSize + Manifest.entrySize * maxChunkCount
    /// The largest record (version 2, every field at its most): a bigger file is damage, refused
    /// before it is read.
    static let maxEncodedSize = headerSize + 2 + 32 * maxChunkCount + maxManifestSize + maxOwnerLength + 32

    static let magic: [UInt8] = Array("STOQOBJ1".utf8)
    static let magicV2: [UInt8] = Array("STOQOBJ2".utf8)
    private static let headerSize = 8 + 4 + 8

    func encoded() -> [UInt8] {
        let ownerBytes = Array(owner.utf8.prefix(Self.maxOwnerLength))
        var out = ownerBytes.isEmpty ? Self.magic : Self.magicV2
        out.reserveCapacity(Self.headerSize + 2 + 32 * chunkIDs.count + manifest.count + ownerBytes.count + 32)
        let n = UInt32(chunkIDs.count), m = UInt64(manifest.count)
        for s in stride(from: 24, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: n >> UInt32(s))) }
        for s in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: m >> UInt64(s))) }
        if !ownerBytes.isEmpty { out += [UInt8(ownerBytes.count >> 8), UInt8(ownerBytes.count & 0xff)] }
        for id in chunkIDs { out.append(contentsOf: id.bytes) }
        out.append(contentsOf: manifest)
        out.append(contentsOf: ownerBytes)
        out.append(contentsOf: SHA256.hash(data: out))
        return out
    }

    /// Parses a record read from `path` (for messages); `.corruptRecord` says what is wrong.
    init(decoding b: [UInt8], name: String, path: String) throws {
        func bad(_ why: String) -> StoreError { StoreError(.corruptRecord, "object record \(path) is damaged: \(why)") }
        guard b.count >= Self.headerSize + 32 else { throw bad("\(b.count) bytes is shorter than any record") }
        let v2 = Array(b[0..<8]) == Self.magicV2
        guard v2 || Array(b[0..<8]) == Self.magic else { throw bad("it does not start with STOQOBJ1 or STOQOBJ2") }
        let n = b[8..<12].reduce(0) { $0 << 8 | Int($1) }
        let m = b[12..<20].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        let body = b.count - 32
        let header = Self.headerSize + (v2 ? 2 : 0)
        guard body >= header else { throw bad("\(b.count) bytes is shorter than a version 2 record") }
        let o = v2 ? Int(b[20]) << 8 | Int(b[21]) : 0
        guard n <= Self.maxChunkCount else { throw bad("it lists \(n) chunk ids, more than any object may have (\(Self.maxChunkCount))") }
        guard m <= UInt64(Self.maxManifestSize) else {
            throw bad("its manifest is \(m) bytes, longer than any manifest may be (\(Self.maxManifestSize) bytes)")
        }
        guard o <= Self.maxOwnerLength else { throw bad("its owner is \(o) bytes, longer than any owner kept (\(Self.maxOwnerLength) bytes)") }
        guard m <= UInt64(body), header + 32 * n + Int(m) + o == body else {
            throw bad("\(n) chunk ids, a \(m)-byte manifest and a \(o)-byte owner do not fill \(b.count) bytes")
        }
        let sum = Array(SHA256.hash(data: b[0..<body]))
        guard sum == Array(b[body...]) else { throw bad("checksum mismatch") }
        var ids: [ChunkID] = []
        ids.reserveCapacity(n)
        var at = header
        for _ in 0..<n {
            ids.append(ChunkID(bytes: b[at..<(at + 32)])!)
            at += 32
        }
        let manifestEnd = at + Int(m)
        self.init(
            name: name, manifest: Array(b[at..<manifestEnd]), chunkIDs: ids,
            owner: String(decoding: b[manifestEnd..<body], as: UTF8.self))
    }
}
