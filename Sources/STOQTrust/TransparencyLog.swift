import Crypto
import Foundation
import X509
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// An append-only transparency log: entries kept in one file, a Merkle tree over them
/// (RFC 6962), proofs, and tree heads signed with the log's key.
///
/// A CA's log holds one RFC 6962 `MerkleTreeLeaf` (timestamped precert entry) per certificate,
/// appended by `addPrecertificate`, so a leaf hash is recomputable from the final certificate
/// and its SCT. Logs written before SCTs existed hold plain DER certificates (first byte 0x30,
/// never 0x00 like a `MerkleTreeLeaf`); they stay readable and provable as they are, and new
/// entries are appended after them — no migration is needed.
///
/// File format: the 8 magic bytes `STOQTLG1`, then one record per entry:
/// `u32 big-endian length || entry || SHA-256(0x00 || entry)`. The trailing leaf hash lets a
/// reload tell a complete record from a torn one. Every append is fsync'd before it returns,
/// so an entry whose index was handed out survives a crash.
///
/// On open, an incomplete last record (a crash mid-append: too short for its length, or a
/// zero-filled tail the file system left behind) is truncated and reported in `recovery`,
/// which the opener logs. A complete record whose hash fails throws `corruptRecord`, last or
/// not: a crash cannot leave one, and dropping it would hand its index to the next append,
/// forking the log under every tree head already given out.
///
/// Several processes may have the log open (a node serving its CA's log while an operator runs
/// `stoq trust issue` on the same CA): each append takes an exclusive `flock`, first reads the
/// records others appended since (so the tree stays one sequence), then writes and fsyncs its
/// own; `refresh` catches up under a shared lock before serving tree heads or proofs. Within a
/// process the log has one owner, so it is a class that is not `Sendable`.
public final class TransparencyLog {
    /// The log a CA directory keeps (`transparency.log`, signed with `log-key.pem`, which is
    /// created — mode 0600 — on first use). The ACME server and a node's own CA share it.
    /// `repaired` hears what was cut on open (a torn tail, from a crash mid-append), for the
    /// opener to say: a node logs it, the CLI prints it.
    public static func openForAuthority(caDirectory: String, repaired: (String) -> Void) throws -> TransparencyLog {
        let log = try TransparencyLog(
            path: caDirectory + "/" + TrustAuthority.FileName.transparencyLog, signingKey: try authorityLogKey(caDirectory: caDirectory))
        if let r = log.recovery { repaired("transparency log repaired on open: \(r.message)") }
        return log
    }

    /// The signing key of a CA directory's log (`log-key.pem`), created (0600, in a 0700
    /// directory) if missing. Nodes that trust their own CA's log read its public half.
    public static func authorityLogKey(caDirectory: String) throws -> P256.Signing.PrivateKey {
        let keyPath = caDirectory + "/" + TrustAuthority.FileName.logKey
        if let pem = FileManager.default.contents(atPath: keyPath) {
            do { return try PEMFiles.p256PrivateKey(pem: String(decoding: pem, as: UTF8.self)) } catch {
                throw TrustError(.invalidPEM, "\(keyPath): not a P-256 private key (\(error))")
            }
        }
        do {
            try FileManager.default.createDirectory(
                atPath: caDirectory, withIntermediateDirectories: true,
                attributes: [.posixPermissions: 0o700])
        } catch {
            throw TrustError(.io, "\(caDirectory): cannot create (\(error.localizedDescription))")
        }
        let key = P256.Signing.PrivateKey()
        try PEMFiles.writeFile(key.pemRepresentation + "\n", to: keyPath, mode: 0o600)
        return key
    }

    /// The file's first bytes.
    public static let magic: [UInt8] = Array("STOQTLG1".utf8)
    /// The largest entry a record holds: certificates are a few KiB; a bigger length read back
    /// from disk is damage, not data.
    public static let maxEntrySize = 1 << 24

    /// The log file.
    public let path: String
    /// The Merkle tree over every entry.
    public private(set) var tree = MerkleTree()
    /// Set when opening repaired the file (code `tornRecordTruncated`); nil when it was intact.
    /// The opener logs it: a cut record is an entry whose SCT may be out there unlogged.
    public private(set) var recovery: TransparencyLogError?
    private var entries: [[UInt8]] = []
    private let signingKey: P256.Signing.PrivateKey
    private var fd: Int32
    private var fileSize: Int

    /// Opens the log at `path`, creating it (mode 0600) if it does not exist, and reloads
    /// every entry. Tree heads are signed with `signingKey`.
    public init(path: String, signingKey: P256.Signing.PrivateKey) throws {
        self.path = path
        self.signingKey = signingKey
        let existed = FileManager.default.fileExists(atPath: path)
        fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw Self.ioError("open", path) }
        fileSize = 0
        do {
            try locked(LOCK_EX) { try load() }
            if !existed { try Self.syncDirectory(of: path) }
        } catch {
            close(fd)
            throw error
        }
    }

    /// Runs `body` holding `flock(operation)` on the log file.
    private func locked<T>(_ operation: Int32, _ body: () throws -> T) throws -> T {
        while flock(fd, operation) != 0 {
            guard errno == EINTR else { throw Self.ioError("flock", path) }
        }
        defer { _ = flock(fd, LOCK_UN) }
        return try body()
    }

    /// Reads the entries other processes appended since this one last looked.
    public func refresh() throws {
        try locked(LOCK_SH) { try catchUp(exclusive: false) }
    }

    deinit { close(fd) }

    /// The number of entries.
    public var size: Int { tree.size }

    /// The log's public key, which verifies its signed tree heads.
    public var publicKey: P256.Signing.PublicKey { signingKey.publicKey }

    /// The entry at `index`.
    public func entry(at index: Int) throws -> [UInt8] {
        guard index >= 0, index < entries.count else {
            throw TransparencyLogError(.invalidLeafIndex, "entry \(index) is outside 0…\(entries.count - 1)")
        }
        return entries[index]
    }

    /// Appends an entry, durably (written and fsync'd), and returns its index.
    @discardableResult
    public func append(_ entry: some DataProtocol) throws -> Int {
        let data = Array(entry)
        guard data.count <= Self.maxEntrySize else {
            throw TransparencyLogError(.entryTooLarge, "entry of \(data.count) bytes exceeds \(Self.maxEntrySize)")
        }
        let leaf = MerkleTree.leafHash(data)
        var record: [UInt8] = []
        record.reserveCapacity(4 + data.count + 32)
        let n = UInt32(data.count)
        record += [UInt8(n >> 24), UInt8(truncatingIfNeeded: n >> 16), UInt8(truncatingIfNeeded: n >> 8), UInt8(truncatingIfNeeded: n)]
        record += data
        record += leaf
        return try locked(LOCK_EX) {
            try catchUp(exclusive: true)
            do {
                try writeAll(record, at: fileSize)
                guard fsync(fd) == 0 else { throw Self.ioError("fsync", path) }
            } catch {
                // Leave no partial record behind for the next append to follow.
                _ = ftruncate(fd, off_t(fileSize))
                throw error
            }
            fileSize += record.count
            entries.append(data)
            return tree.append(leafHash: leaf)
        }
    }

    /// The log's id in SCTs: SHA-256 of its public key (DER SubjectPublicKeyInfo).
    public var logID: [UInt8] { CertificateTransparency.logID(of: signingKey.publicKey) }

    /// The precertificate flow's log side (RFC 6962 §3.1): checks that `precert` carries the
    /// critical poison and `issuer`'s signature, appends the RFC 6962 `MerkleTreeLeaf` for its
    /// precert entry (issuer key hash, TBS without the poison) durably, and returns the SCT
    /// signed over the same entry and timestamp.
    public func addPrecertificate(_ precert: Certificate, issuer: Certificate) throws -> SignedCertificateTimestamp {
        try addPrecertificate(precert, issuer: issuer, now: Date())
    }

    /// As `addPrecertificate(_:issuer:)`, timestamped `now`.
    public func addPrecertificate(_ precert: Certificate, issuer: Certificate, now: Date) throws -> SignedCertificateTimestamp {
        guard issuer.publicKey.isValidSignature(precert.signature, for: precert) else {
            throw TransparencyError(.invalidPrecertificate, "\(precert.subject): the precertificate is not signed by \(issuer.subject)")
        }
        let entry = try CertificateTransparency.entry(forPrecertificate: precert, issuer: issuer)
        let ms = UInt64(max(0, now.timeIntervalSince1970 * 1000))
        let sct = try SignedCertificateTimestamp.sign(entry: entry, timestamp: ms, key: signingKey)
        try append(CertificateTransparency.merkleTreeLeaf(timestamp: ms, entry: entry))
        return sct
    }

    /// The root hash of the first `size` entries (default: all).
    public func rootHash(size: Int? = nil) throws -> MerkleHash { try tree.rootHash(size: size) }

    /// The inclusion proof of entry `index` in the tree of `treeSize` entries (default: all).
    public func inclusionProof(index: Int, treeSize: Int? = nil) throws -> [MerkleHash] {
        try tree.inclusionProof(leafIndex: index, treeSize: treeSize)
    }

    /// The consistency proof between the trees of `oldSize` and `newSize` entries.
    public func consistencyProof(from oldSize: Int, to newSize: Int? = nil) throws -> [MerkleHash] {
        try tree.consistencyProof(from: oldSize, to: newSize)
    }

    /// A signed tree head over the whole log, timestamped `now`.
    public func signedTreeHead(now: Date = Date()) throws -> SignedTreeHead {
        let ms = UInt64(max(0, now.timeIntervalSince1970 * 1000))
        return try SignedTreeHead.sign(
            treeSize: UInt64(size), timestamp: ms, rootHash: try tree.rootHash(),
            key: signingKey)
    }

    // MARK: file handling

    /// The file's bytes from `offset` to its end.
    private func read(from offset: Int) throws -> [UInt8] {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw Self.ioError("fstat", path) }
        guard Int(st.st_size) >= offset else {
            throw TransparencyLogError(.corruptRecord, "\(path): the file shrank below \(offset) bytes while open")
        }
        var bytes = [UInt8](repeating: 0, count: Int(st.st_size) - offset)
        var got = 0
        while got < bytes.count {
            let r = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + got, $0.count - got, off_t(offset + got)) }
            if r < 0 && errno == EINTR { continue }
            guard r > 0 else { throw Self.ioError("read", path) }
            got += r
        }
        return bytes
    }

    private func load() throws {
        let bytes = try read(from: 0)
        let magic = Self.magic
        if bytes.count < magic.count {
            // New file, or a crash while the header was written.
            guard bytes.elementsEqual(magic.prefix(bytes.count)) else {
                throw TransparencyLogError(.badHeader, "\(path): not a STOQ transparency log (bad magic)")
            }
            if !bytes.isEmpty {
                recovery = TransparencyLogError(
                    .tornRecordTruncated,
                    "\(path): incomplete header (\(bytes.count) bytes) rewritten; the log is empty")
            }
            try truncate(to: 0)
            try writeAll(magic, at: 0)
            guard fsync(fd) == 0 else { throw Self.ioError("fsync", path) }
            fileSize = magic.count
            return
        }
        guard bytes.prefix(magic.count).elementsEqual(magic) else {
            throw TransparencyLogError(.badHeader, "\(path): not a STOQ transparency log (bad magic)")
        }
        fileSize = magic.count
        try catchUp(exclusive: true)
    }

    /// Parses the records after `fileSize` (appended by another process, or all of them on
    /// open). A torn last record is what a crashed appender leaves: truncated when this process
    /// holds the exclusive lock, otherwise left for the next appender.
    private func catchUp(exclusive: Bool) throws {
        let bytes = try read(from: fileSize)
        let base = fileSize
        var off = 0
        while off < bytes.count {
            let rest = bytes.count - off
            var torn = rest < 4
            var end = bytes.count
            if !torn {
                let len = Int(bytes[off]) << 24 | Int(bytes[off + 1]) << 16 | Int(bytes[off + 2]) << 8 | Int(bytes[off + 3])
                end = off + 4 + len + 32
                if len > Self.maxEntrySize {
                    throw TransparencyLogError(
                        .corruptRecord,
                        "\(path): record \(entries.count) at offset \(base + off) claims \(len) bytes, more than a record holds (\(Self.maxEntrySize)): the file is damaged; restore it from a backup, or move it aside to start a new log"
                    )
                } else if end > bytes.count {
                    torn = true  // cut short: what a crash mid-append leaves
                } else {
                    let data = Array(bytes[(off + 4)..<(off + 4 + len)])
                    let leaf = MerkleTree.leafHash(data)
                    if leaf.elementsEqual(bytes[(end - 32)..<end]) {
                        entries.append(data)
                        tree.append(leafHash: leaf)
                        off = end
                        continue
                    }
                    // Every byte of this record is there and its hash fails. A crash can only
                    // leave that with the record's end never written: its hash, and all after
                    // it, still zero (a file system that grew the file before the data landed).
                    // Anything else is damage, last record or not: dropping it would hand its
                    // index to the next append and fork the log under every saved tree head.
                    torn = bytes[(end - 32)...].allSatisfy { $0 == 0 }
                    guard torn else {
                        throw TransparencyLogError(
                            .corruptRecord,
                            "\(path): record \(entries.count) at offset \(base + off) is complete (\(len) bytes) but fails its hash: the file is damaged, not cut short by a crash; refusing to open rather than drop the entry and reuse its index. Restore the file from a backup, or move it aside to start a new log (auditors holding a tree head of this one will see the break)"
                        )
                    }
                }
            }
            guard exclusive else { break }
            recovery = TransparencyLogError(
                .tornRecordTruncated,
                "\(path): incomplete last record at offset \(base + off) (\(rest) bytes) truncated, probably a crash during append; \(entries.count) entries kept"
            )
            try truncate(to: base + off)
            break
        }
        fileSize = base + off
    }

    private func truncate(to size: Int) throws {
        guard ftruncate(fd, off_t(size)) == 0 else { throw Self.ioError("ftruncate", path) }
        guard fsync(fd) == 0 else { throw Self.ioError("fsync", path) }
    }

    private func writeAll(_ bytes: [UInt8], at offset: Int) throws {
        var done = 0
        while done < bytes.count {
            let r = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress! + done, $0.count - done, off_t(offset + done)) }
            if r < 0 && errno == EINTR { continue }
            guard r > 0 else { throw Self.ioError("write", path) }
            done += r
        }
    }

    /// A new file's directory entry is only durable once the directory itself is fsync'd.
    private static func syncDirectory(of path: String) throws {
        let dir = (path as NSString).deletingLastPathComponent
        let dfd = open(dir.isEmpty ? "." : dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard dfd >= 0 else { throw ioError("open", dir) }
        defer { close(dfd) }
        guard fsync(dfd) == 0 else { throw ioError("fsync", dir) }
    }

    private static func ioError(_ call: String, _ path: String) -> TransparencyLogError {
        TransparencyLogError(.io, "\(call) \(path): \(String(cString: strerror(errno)))")
    }
}

extension TransparencyLog: PrecertificateLog {}
