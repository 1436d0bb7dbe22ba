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
    /// nearly at once as POSIX allows: every new file is written to a temporary beside its
    /// target and fsync'd first, so that a full disk or a failed write changes nothing; then
    /// each is renamed over its target in order, and the directory fsync'd so the renames
    /// survive a power cut. A rename that fails puts back the files already replaced (the old
    /// ones were hard-linked aside, which needs no data blocks), so an error never leaves a new
    /// key beside an old certificate. `rename` is a seam for tests to make one fail.
    package static func replaceFiles(
        _ files: [(text: String, path: String, mode: mode_t)],
        rename: ((String, String) -> Int32)? = nil
    ) throws {
        let rename = rename ?? posixRename
        let tag = "\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        var temps: [String] = []
        var asides: [String?] = []
        func error(_ path: String, _ what: String) -> TrustError {
            TrustError(.io, "\(path): \(what): \(String(cString: strerror(errno)))")
        }
        defer {
            for t in temps { unlink(t) }
            for case let a? in asides { unlink(a) }
        }
        for f in files {
            let tmp = f.path + ".tmp-" + tag
            let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, f.mode)
            guard fd >= 0 else { throw error(tmp, "cannot create") }
            temps.append(tmp)
            // The umask may have narrowed `mode`; set it exactly.
            let ok = writeAll(fd, Array(f.text.utf8)) && fchmod(fd, f.mode) == 0 && fsync(fd) == 0
            let e = errno
            close(fd)
            errno = e
            guard ok else { throw error(tmp, "cannot write") }
        }
        for f in files {
            let aside = f.path + ".old-" + tag
            if link(f.path, aside) == 0 {
                asides.append(aside)
            } else if errno == ENOENT {
                asides.append(nil)  // nothing to put back: restoring is removing the new one
            } else {
                throw error(f.path, "cannot keep the old file aside")
            }
        }
        for (i, f) in files.enumerated() {
            if rename(temps[i], f.path) == 0 { continue }
            let failure = error(f.path, "cannot replace")
            for j in 0..<i {
                if let a = asides[j] { _ = posixRename(a, files[j].path) } else { unlink(files[j].path) }
            }
            try? syncDirectory(of: f.path)
            throw TrustError(
                failure.code,
                "\(failure.message); the \(i) file(s) already replaced were put back, so the old set stays in use")
        }
        temps = []
        try syncDirectory(of: files[0].path)
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
