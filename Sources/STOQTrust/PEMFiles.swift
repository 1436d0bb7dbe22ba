import Crypto
import Foundation
import STOQCore
import SwiftASN1
import X509
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Reading and writing the PEM files TrustChain keeps on disk.
public enum PEMFiles {
    /// A P-256 private key from PEM (PKCS#8 or SEC1). SEC1 keys whose private scalar is not
    /// exactly 32 bytes are taken too: GnuTLS's certtool writes it as an integer, 33 bytes with
    /// a leading zero whenever its top bit is set (half its keys), which swift-crypto refuses
    /// (RFC 5915 wants 32). The one parser of P-256 key files (tokens, mesh adverts, the log).
    public static func p256PrivateKey(pem: String) throws -> P256.Signing.PrivateKey {
        do { return try P256.Signing.PrivateKey(pemRepresentation: pem) } catch {
            guard let doc = try? PEMDocument(pemString: pem), doc.discriminator == "EC PRIVATE KEY",
                let scalar = try? sec1Scalar(doc.derBytes)
            else { throw error }
            var bytes = scalar.drop { $0 == 0 }
            if bytes.count < 32 { bytes = ArraySlice(repeating: 0, count: 32 - bytes.count) + bytes }
            return try P256.Signing.PrivateKey(rawRepresentation: bytes)
        }
    }

    /// The privateKey octets of an RFC 5915 ECPrivateKey.
    private static func sec1Scalar(_ der: [UInt8]) throws -> [UInt8] {
        try DER.sequence(try DER.parse(der), identifier: .sequence) { nodes in
            _ = try Int(derEncoded: &nodes)
            let key = try ASN1OctetString(derEncoded: &nodes)
            while nodes.next() != nil {}
            return Array(key.bytes)
        }
    }

    /// Every certificate in a PEM file, in file order (a chain file is leaf first).
    public static func readCertificates(_ path: String) throws -> [Certificate] {
        let text = try readText(path)
        let docs: [PEMDocument]
        do { docs = try PEMDocument.parseMultiple(pemString: text) } catch {
            throw TrustError(.invalidPEM, "\(path): not PEM (\(error))")
        }
        var certs: [Certificate] = []
        for doc in docs where doc.discriminator == Certificate.defaultPEMDiscriminator {
            do { certs.append(try Certificate(pemDocument: doc)) } catch {
                throw TrustError(.invalidPEM, "\(path): certificate \(certs.count + 1) does not parse (\(error))")
            }
        }
        guard !certs.isEmpty else { throw TrustError(.invalidPEM, "\(path): no CERTIFICATE block") }
        return certs
    }

    /// The DER of every CERTIFICATE block in a PEM file, in file order, unparsed: what
    /// `PeerVerifier.verify(derChain:)` takes, so a certificate swift-certificates refuses to
    /// parse (an RSA-1024 key) still gets a verdict, exactly as in the handshake.
    public static func readCertificateDER(_ path: String) throws -> [[UInt8]] {
        let text = try readText(path)
        let docs: [PEMDocument]
        do { docs = try PEMDocument.parseMultiple(pemString: text) } catch {
            throw TrustError(.invalidPEM, "\(path): not PEM (\(error))")
        }
        let ders = docs.filter { $0.discriminator == Certificate.defaultPEMDiscriminator }.map(\.derBytes)
        guard !ders.isEmpty else { throw TrustError(.invalidPEM, "\(path): no CERTIFICATE block") }
        return ders
    }

    /// The system's trusted roots (Debian's and Fedora's bundle paths), for a client given no
    /// CA file. A root swift-certificates cannot parse is skipped: it could never anchor a
    /// chain STOQ accepts.
    public static func systemRoots() throws -> [Certificate] {
        let paths = ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"]
        guard let path = paths.first(where: { FileManager.default.fileExists(atPath: $0) }) else {
            throw TrustError(.missingFile, "no system trust store (looked for \(paths.joined(separator: ", "))); give a CA file")
        }
        let roots = try readCertificateDER(path).compactMap { try? Certificate(derEncoded: $0) }
        guard !roots.isEmpty else { throw TrustError(.invalidPEM, "\(path): no usable certificate") }
        return roots
    }

    /// The PEM text of `certificates`, one block each, in order.
    public static func pem(_ certificates: [Certificate]) throws -> String {
        try certificates.map { try $0.serializeAsPEM().pemString + "\n" }.joined()
    }

    /// The certificate signing request in a PEM file.
    public static func readCSR(_ path: String) throws -> CertificateSigningRequest {
        do { return try CertificateSigningRequest(pemEncoded: try readText(path)) } catch let e as TrustError {
            throw e
        } catch {
            throw TrustError(.invalidPEM, "\(path): not a PEM certificate signing request (\(error))")
        }
    }

    /// Revoked serial numbers from a text file (`revoked.txt`): one hex serial per line (colons
    /// and spaces allowed, `#` starts a comment), the form `stoq trust show` prints. This is the
    /// one parser of that file (the node, the ACME server, `stoq trust verify`): a line that is
    /// not a serial is refused with the file and line, never skipped, because a skipped line is
    /// a revocation silently not enforced. With `missingIsEmpty`, an absent file (nothing
    /// revoked yet) is an empty list.
    public static func readSerials(_ path: String, missingIsEmpty: Bool = false) throws -> Set<Certificate.SerialNumber> {
        var serials = Set<Certificate.SerialNumber>()
        if missingIsEmpty && !FileManager.default.fileExists(atPath: path) { return serials }
        for (n, raw) in try readText(path).split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            let hex = line.filter { $0 != ":" && !$0.isWhitespace }
            if hex.isEmpty { continue }
            guard let bytes = Hex.decode(hex) else {
                throw TrustError(.invalidPEM, "\(path):\(n + 1): \(line) is not a hex serial number")
            }
            serials.insert(Certificate.SerialNumber(bytes: bytes))
        }
        return serials
    }

    static func readText(_ path: String) throws -> String {
        guard FileManager.default.fileExists(atPath: path) else {
            throw TrustError(.missingFile, "\(path): no such file")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw TrustError(.io, "\(path): cannot be read")
        }
        return String(decoding: data, as: UTF8.self)
    }

    /// Writes `text` to `path` atomically (temporary file, fsync, rename, directory fsync) with `mode`; keys get
    /// 0600 from the moment the temporary file exists, never a wider window. The temporary
    /// file is made new: one left by a crash (with whatever mode it had), or a link planted in
    /// its place, is removed first, never written through.
    public static func writeFile(_ text: String, to path: String, mode: mode_t) throws {
        let tmp = path + ".tmp"
        unlink(tmp)
        let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode)
        guard fd >= 0 else { throw TrustError(.io, "\(tmp): \(String(cString: strerror(errno)))") }
        guard writeAll(fd, Array(text.utf8)) else {
            let e = String(cString: strerror(errno))
            close(fd); unlink(tmp)
            throw TrustError(.io, "\(tmp): \(e)")
        }
        // The umask may have narrowed `mode`; set it exactly.
        let ok = fchmod(fd, mode) == 0 && fsync(fd) == 0
        close(fd)
        guard ok, rename(tmp, path) == 0 else {
            unlink(tmp)
            throw TrustError(.io, "\(path): \(String(cString: strerror(errno)))")
        }
        try syncDirectory(of: path)
    }

    /// Replaces several files that must change together (a certificate chain and its key) as
    /// nearly at once as POSIX allows, in steps that leave the set recoverable wherever they
    /// stop (`ReplaceStep`), all named `<path>.<kind>-<tag>` beside each target:
    /// 1. every new file is written to `.tmp-<tag>` and fsync'd, so that a full disk or a
    ///    failed write changes nothing;
    /// 2. every old file is hard-linked aside as `.old-<tag>` (no data blocks needed), or its
    ///    absence marked by an empty `.absent-<tag>`, and the directory fsync'd;
    /// 3. each temporary is renamed over its target, in order, and the directory fsync'd;
    /// 4. the copies and marks are removed.
    /// A failure rolls the set back (`recoverReplacement`'s rule), so an error never leaves a
    /// new key beside an old certificate; a crash leaves the files for `recoverReplacement`,
    /// which the next open runs. `rename` is a seam for tests to make one fail; `stop`, to stop
    /// as a crash would after a step (it throws `ReplaceStopped` and cleans nothing up).
    package static func replaceFiles(
        _ files: [(text: String, path: String, mode: mode_t)],
        rename: ((String, String) -> Int32)? = nil,
        stop: ((ReplaceStep) -> Bool)? = nil
    ) throws {
        let rename = rename ?? posixRename
        let tag = "\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let paths = files.map(\.path)
        func error(_ path: String, _ what: String) -> TrustError {
            TrustError(.io, "\(path): \(what): \(String(cString: strerror(errno)))")
        }
        func step(_ s: ReplaceStep) throws { if stop?(s) == true { throw ReplaceStopped(step: s) } }
        do {
            for (i, f) in files.enumerated() {
                let tmp = f.path + ReplaceKind.temporary.infix + tag
                let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, f.mode)
                guard fd >= 0 else { throw error(tmp, "cannot create") }
                // The umask may have narrowed `mode`; set it exactly.
                let ok = writeAll(fd, Array(f.text.utf8)) && fchmod(fd, f.mode) == 0 && fsync(fd) == 0
                let e = errno
                close(fd)
                errno = e
                guard ok else { throw error(tmp, "cannot write") }
                try step(.wroteTemporary(i))
            }
            for (i, f) in files.enumerated() {
                if link(f.path, f.path + ReplaceKind.old.infix + tag) != 0 {
                    guard errno == ENOENT else { throw error(f.path, "cannot keep the old file aside") }
                    // Nothing to put back: rolling back is removing the new one.
                    let mark = f.path + ReplaceKind.absent.infix + tag
                    let fd = open(mark, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
                    guard fd >= 0 else { throw error(mark, "cannot create") }
                    close(fd)
                }
                try step(.keptOld(i))
            }
            try syncDirectories(of: paths)
            try step(.staged)
        } catch let e as ReplaceStopped {
            throw e
        } catch {
            _ = try? settle(paths, tag: tag)
            throw error
        }
        for (i, f) in files.enumerated() {
            if rename(f.path + ReplaceKind.temporary.infix + tag, f.path) == 0 {
                try step(.renamed(i))
                continue
            }
            let failure = error(f.path, "cannot replace")
            // Temporaries are left (this one's at least): `settle` rolls back.
            _ = try? settle(paths, tag: tag)
            throw TrustError(
                failure.code,
                "\(failure.message); the \(i) file(s) already replaced were put back, so the old set stays in use")
        }
        try syncDirectories(of: paths)
        try step(.synced)
        for (i, path) in paths.enumerated() {
            unlink(path + ReplaceKind.old.infix + tag)
            unlink(path + ReplaceKind.absent.infix + tag)
            try step(.removedOld(i))
        }
    }

    /// A step of `replaceFiles` after which a test's `stop` may stop it, as a crash would.
    package enum ReplaceStep: Hashable, Sendable {
        /// File `i`'s new text is in its temporary, fsync'd.
        case wroteTemporary(Int)
        /// File `i`'s old version is linked aside (or its absence marked).
        case keptOld(Int)
        /// Every temporary and copy is durable (the directory fsync'd); no target changed yet.
        case staged
        /// File `i`'s temporary was renamed over it.
        case renamed(Int)
        /// Every rename is durable.
        case synced
        /// File `i`'s old copy (or mark) is removed.
        case removedOld(Int)
    }

    /// What `replaceFiles` throws when its `stop` hook stopped it: nothing is cleaned up.
    package struct ReplaceStopped: Error, Equatable {
        package let step: ReplaceStep
        package init(step: ReplaceStep) { self.step = step }
    }

    /// The files a replacement keeps beside each target, `<path><infix><tag>`.
    enum ReplaceKind: CaseIterable {
        case temporary, old, absent
        var infix: String {
            switch self {
            case .temporary: ".tmp-"
            case .old: ".old-"
            case .absent: ".absent-"
            }
        }
    }

    /// What `recoverReplacement` found of one interrupted replacement and did with it.
    package struct ReplaceRecovery: Equatable, Sendable, CustomStringConvertible {
        /// The files replaced together.
        package var paths: [String]
        /// The replacement's tag (`<pid>-<random>`).
        package var tag: String
        /// Every new file had been renamed in (the new set stays); false: rolled back (the old set stays).
        package var completed: Bool
        /// The files it left, by path, as found.
        package var leftovers: [String]
        package var description: String {
            func names(_ ps: [String]) -> String { ps.map { ($0 as NSString).lastPathComponent }.joined(separator: ", ") }
            return completed
                ? "replacing \(names(paths)) was cut short once every new file was in place: the new set stays; removed \(names(leftovers))"
                : "replacing \(names(paths)) was cut short before every new file was in place: the old set is back; cleared \(names(leftovers))"
        }
    }

    /// Finishes every replacement of `paths` (a `replaceFiles` set, in the same order) that a
    /// crash interrupted, so that the set is whole again: the old one or the new one, never a
    /// mix. The rule, which holds after a stop at any step and again after a stop in the middle
    /// of applying it: while any temporary of a replacement is left, not every file was renamed
    /// in, so it is rolled back (each old copy renamed back, each file marked absent before
    /// removed, then the temporaries removed, last); with none left, every rename happened, and
    /// the old copies and marks are removed. Returns what it found and did, one entry per
    /// replacement (none: nothing was left), for the caller to log.
    package static func recoverReplacement(of paths: [String]) throws -> [ReplaceRecovery] {
        var tags = Set<String>()
        var found: [String: [String]] = [:]
        for path in paths {
            let dir = (path as NSString).deletingLastPathComponent, base = (path as NSString).lastPathComponent
            let names: [String]
            do { names = try FileManager.default.contentsOfDirectory(atPath: dir.isEmpty ? "." : dir) } catch {
                if !FileManager.default.fileExists(atPath: dir.isEmpty ? "." : dir) { continue }
                throw TrustError(.io, "\(dir): cannot be listed (\(error))")
            }
            for name in names.sorted() {
                for kind in ReplaceKind.allCases where name.hasPrefix(base + kind.infix) {
                    let tag = String(name.dropFirst(base.count + kind.infix.count))
                    tags.insert(tag)
                    found[tag, default: []].append((dir.isEmpty ? "" : dir + "/") + name)
                }
            }
        }
        return try tags.sorted().map { tag in
            ReplaceRecovery(paths: paths, tag: tag, completed: try settle(paths, tag: tag), leftovers: found[tag] ?? [])
        }
    }

    /// Brings the replacement `tag` of `paths` to an end by `recoverReplacement`'s rule;
    /// returns whether it had completed (true) or was rolled back.
    private static func settle(_ paths: [String], tag: String) throws -> Bool {
        func exists(_ p: String) -> Bool {
            var st = stat()
            return lstat(p, &st) == 0
        }
        func gone(_ p: String) throws {
            guard unlink(p) == 0 || errno == ENOENT else {
                throw TrustError(.io, "\(p): cannot be removed: \(String(cString: strerror(errno)))")
            }
        }
        let temporaries = paths.map { $0 + ReplaceKind.temporary.infix + tag }
        let completed = !temporaries.contains(where: exists)
        if !completed {
            for path in paths {
                let old = path + ReplaceKind.old.infix + tag, absent = path + ReplaceKind.absent.infix + tag
                if exists(old) {
                    guard posixRename(old, path) == 0 else {
                        throw TrustError(.io, "\(old): cannot be put back: \(String(cString: strerror(errno)))")
                    }
                    // A copy still linked to the file itself (not replaced yet): renaming one
                    // link over another leaves both.
                    try gone(old)
                }
                if exists(absent) {
                    try gone(path)
                    try gone(absent)
                }
            }
            // Durable before the temporaries go: without them the rule would read "completed".
            try syncDirectories(of: paths)
            for t in temporaries { try gone(t) }
        } else {
            for path in paths {
                try gone(path + ReplaceKind.old.infix + tag)
                try gone(path + ReplaceKind.absent.infix + tag)
            }
        }
        try syncDirectories(of: paths)
        return completed
    }

    /// `syncDirectory` for each distinct directory of `paths`.
    static func syncDirectories(of paths: [String]) throws {
        var seen = Set<String>()
        for p in paths where seen.insert((p as NSString).deletingLastPathComponent).inserted { try syncDirectory(of: p) }
    }

    /// A rename or a new file is durable only once its directory is fsync'd.
    static func syncDirectory(of path: String) throws {
        let dir = (path as NSString).deletingLastPathComponent
        let dfd = open(dir.isEmpty ? "." : dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard dfd >= 0, fsync(dfd) == 0 else {
            let e = TrustError(.io, "\(dir): cannot fsync the directory: \(String(cString: strerror(errno)))")
            if dfd >= 0 { close(dfd) }
            throw e
        }
        close(dfd)
    }

    /// Appends `serial` as a line of the revocation list at `path` (`readSerials` reads it),
    /// durably; a new file starts with `header` (a comment). Appended, not rewritten: serials an
    /// operator added by hand, and their comments, stay. A line the file left open is closed
    /// first, and one cut short (a full disk) is taken back: it would not parse, or name
    /// another serial.
    public static func appendSerial(_ serial: String, to path: String, header: String) throws(TrustError) {
        let fd = open(path, O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw TrustError(.io, "\(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        var last: UInt8 = 0x0a
        guard fstat(fd, &st) == 0, st.st_size == 0 || pread(fd, &last, 1, off_t(st.st_size - 1)) == 1 else {
            throw TrustError(.io, "\(path): \(String(cString: strerror(errno)))")
        }
        var text = st.st_size == 0 ? header + "\n" : ""
        if last != 0x0a { text += "\n" }
        guard writeAll(fd, Array((text + serial + "\n").utf8)), fsync(fd) == 0 else {
            let e = TrustError(.io, "\(path): \(String(cString: strerror(errno)))")
            _ = ftruncate(fd, st.st_size)
            throw e
        }
    }

    /// Writes all of `bytes` to `fd`, again after EINTR; false (errno set) on failure.
    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var done = 0
        while done < bytes.count {
            let r = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + done, $0.count - done) }
            if r < 0 && errno == EINTR { continue }
            guard r > 0 else { return false }
            done += r
        }
        return true
    }
}

/// `rename(2)`, under a name `PEMFiles.replaceFiles`'s parameter does not hide.
private func posixRename(_ from: String, _ to: String) -> Int32 { rename(from, to) }
