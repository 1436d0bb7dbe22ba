import ArgumentParser
import Foundation
import STOQ
import STOQChunking
import STOQConfig

// Top-level entry rather than @main: with more than one file in the target, SwiftPM
// compiles main.swift as top-level code, where @main is not allowed. The call goes through
// an async function because at top level `Stoq.main()` resolves to ParsableCommand's
// synchronous overload, which refuses to run async subcommands (`trust verify`).
func runStoq() async { await Stoq.main() }
await runStoq()

/// The operator CLI.
struct Stoq: AsyncParsableCommand {  // async because `trust verify` awaits swift-certificates' Verifier
    static let configuration = CommandConfiguration(
        commandName: "stoq",
        abstract: "STOQ command-line client and operator tool.",
        version: STOQVersion.line,
        subcommands: [
            Get.self, Put.self, BenchCommand.self, ConfigCommand.self, ChunkCommand.self, TrustCommand.self,
            XDPCommand.self, StatusCommand.self, MeshCommand.self, EdgeCommand.self,
        ])

    /// The exit status of a command line refused as given: an unknown or malformed option, or
    /// flags that do not go together. ArgumentParser's own is EX_USAGE (64); STOQ's is 2, as
    /// for the refusals the commands make themselves (`fail(code: 2)`), `stoq config check` and
    /// stoq-node's invalid configuration. docs/api.md lists every status.
    static let usageExitCode: Int32 = 2

    /// `AsyncParsableCommand.main`, but a refused command line exits `usageExitCode`, with
    /// ArgumentParser's message and usage as before.
    static func main() async {
        do {
            var command = try parseAsRoot()
            if var command = command as? any AsyncParsableCommand { try await command.run() } else { try command.run() }
        } catch {
            guard exitCode(for: error) == .validationFailure else { exit(withError: error) }
            FileHandle.standardError.write(Data((fullMessage(for: error) + "\n").utf8))
            Foundation.exit(usageExitCode)
        }
    }
}

struct TrustOptions: ParsableArguments {
    @Option(help: "PEM certificate(s) to trust, e.g. the root.pem a node prints as 'trust:'.")
    var ca: String?
    @Flag(help: "Do not verify the server's certificate (only for experiments).")
    var insecure = false
    @Option(help: "Certificate chain (PEM) to present when the node asks for one (mutual TLS).")
    var cert: String?
    @Option(help: "The key of --cert (PEM).")
    var key: String?
    @Flag(
        name: .customLong("require-transparency"),
        help: "Refuse a server certificate without a valid embedded SCT from a --log-key log.")
    var requireTransparency = false
    @Option(name: .customLong("log-key"), help: "A trusted transparency log's public key (PEM; repeatable).")
    var logKeys: [String] = []
    @Option(
        help: ArgumentHelp(
            "Offer only these TLS cipher suites, in this order (comma-separated).",
            discussion:
                "AES-128-GCM, AES-256-GCM, CHACHA20-POLY1305 and AES-128-CCM, or their IANA names (TLS_CHACHA20_POLY1305_SHA256 ...). Default: all four, AES-128-GCM first."
        ))
    var cipherSuites: String?
    var trust: ClientTrust {
        ClientTrust(
            caFile: ca, insecure: insecure, certificateFile: cert, keyFile: key,
            transparencyLogs: requireTransparency ? logKeys : [],
            cipherSuites: cipherSuites.map { $0.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) } })
    }

    func validate() throws {
        if requireTransparency && logKeys.isEmpty { throw ValidationError("--require-transparency needs at least one --log-key") }
    }
}

extension CongestionControl: ExpressibleByArgument {}

/// Checks a flag given in seconds: finite, above zero (or at it, with `orZero`), and at most a
/// year, so that it converts to the nanoseconds the clocks count in.
func checkSeconds(_ flag: String, _ value: Double?, orZero: Bool = false) throws {
    guard let value else { return }
    let year = 365.0 * 86_400
    guard value.isFinite, orZero ? value >= 0 : value > 0, value <= year else {
        throw ValidationError("\(flag) \(value): expected seconds \(orZero ? "≥" : ">") 0, at most \(Int(year)) (a year)")
    }
}

func fail(_ message: String, code: Int32 = 1) -> ExitCode {
    FileHandle.standardError.write(Data("stoq: \(message)\n".utf8))
    return ExitCode(code)
}

func printJSON(_ r: TransferResult) {
    var obj: [String: Any] = ["status": r.status, "bytes": r.bytes, "seconds": r.seconds, "gbps": r.gbps, "sha256": r.sha256]
    if let resumed = r.resumed { obj["resumed"] = resumed }
    if let early = r.earlyData { obj["early_data"] = early.rawValue }
    if let first = r.firstByteSeconds { obj["first_byte_seconds"] = first }
    if let preferred = r.preferredAddress { obj["preferred_address"] = preferred }
    if let servedFrom = r.servedFrom { obj["served_from"] = servedFrom }
    if let moves = r.localMigrations { obj["local_migrations"] = moves }
    if let suite = r.cipherSuite { obj["cipher_suite"] = suite }
    if let updates = r.keyUpdates { obj["key_updates"] = updates }
    let data = try! JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys])
    print(String(decoding: data, as: UTF8.self))
}

/// A kept session that cannot be used costs only its resumption: say why, and go on.
@Sendable func warnSessionCache(_ message: String) {
    FileHandle.standardError.write(Data("stoq: \(message)\n".utf8))
}

struct Get: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Download objects over HTTP/3.",
        discussion: """
            Example: stoq get https://[::1]:4433/objects/a.bin -o a.bin --ca stoq-data/trust/root.pem

            Several URLs are fetched over one connection per server, their requests in flight \
            together (one handshake, as curl does): -O names each file after the last segment of \
            its path, in the current directory; -o DIR, in DIR. Each file is written to \
            NAME.XXXXXX.part and renamed once its body is complete; a URL that fails leaves nothing, the others \
            are kept, and the exit status is 1.
            Example: stoq get https://[::1]:4433/objects/a.bin https://[::1]:4433/objects/b.bin -o out/ --ca root.pem
            """)

    @Argument(help: "https://[ipv6]:port/objects/<name> (one or more)") var urls: [String]
    @Option(name: .shortAndLong, help: "Write the body here (- for standard output; default: discard); with several URLs, a directory.")
    var output: String?
    @Flag(name: .customShort("O"), help: "Write each body to a file named after its URL's last path segment.")
    var remoteName = false
    @OptionGroup var trust: TrustOptions
    @OptionGroup var credential: CredentialOptions
    @Flag(help: "Print one JSON object with status, bytes, seconds, gbps and the body's sha256.") var json = false
    @Flag(
        help: ArgumentHelp(
            "Neither hash the body nor check it against the object's ETag.",
            discussion:
                "A STOQ node tags an object with its content's SHA-256. A body that is kept (-o, -O) or reported (--json, the summary on a terminal) is hashed as it arrives, and a whole one (200) that is not the object its ETag names fails (exit 1, the file is not kept); a body discarded silently is not hashed. Hashing costs the client about 0.7 CPU seconds per GiB (SHA-256 runs at ~1.5 GB/s with SHA-NI): a client bound by one core downloads up to a third faster without it (scripts/bench-throughput, row v)."
        ))
    var noVerify = false
    @Option(help: "Give up after this many seconds.") var timeout: Double = 300
    @Option(help: "Give up on a server whose handshake has not completed after this many seconds (lossy links need more).")
    var connectTimeout: Double = 10
    @Option(help: "Congestion control of this end: reno, cubic, bbr or bbr2 (it paces what this end sends).")
    var cc: CongestionControl = QUICSettings().congestionControl
    @Flag(
        help:
            "Fetch the object's manifest, then its chunks in parallel, each verified and written in place; resumes an interrupted download (needs -o). An object with no manifest there is fetched whole."
    )
    var chunked = false
    @Option(help: "Chunk requests in flight with --chunked.") var concurrency = 16
    @Option(
        help: ArgumentHelp(
            "Log when body bytes arrive: one line \"SECONDS BYTES\" (CLOCK_MONOTONIC seconds, bytes so far) each time the count grows.",
            discussion: "For benchmarks that time pauses at the client (scripts/bench-routing's failover)."))
    var progressLog: String?
    @Option(
        help: ArgumentHelp(
            "Write the connection's qlog into this directory (made if missing) as <odcid>.client.sqlog.",
            discussion: "JSON-SEQ, as ngtcp2 writes it; qvis (https://qvis.quictools.info) loads it. Not with --chunked."))
    var qlogDir: String?
    @OptionGroup var tracing: TraceOptions
    @Flag(
        help: ArgumentHelp(
            "Neither resume a kept TLS session nor keep the server's new one.",
            discussion: "Sessions are kept per server in $XDG_CACHE_HOME/stoq (or ~/.cache/stoq), mode 0600; never with --insecure or a client certificate."))
    var noSessionCache = false
    @Flag(
        help: ArgumentHelp(
            "Resume a kept session, but send the GETs only once the handshake completed (no 0-RTT).",
            discussion:
                "By default a GET to a server whose session and 0-RTT parameters are kept goes in 0-RTT, a round trip sooner; a server that refuses it gets the GET again after the handshake."
        ))
    var noEarlyData = false
    @Flag(
        help: ArgumentHelp(
            "Start one TLS key update as soon as the handshake is confirmed.",
            discussion: "RFC 9001 §6: both ends then send under new keys; for testing a server's key update."))
    var keyUpdate = false

    /// `-o`, with the names of standard output (`/dev/stdout` and its links) taken as `-`:
    /// through its link, a temp file would be renamed over the file standard output goes to,
    /// dropping what was written there before.
    var destination: String? {
        output.map { Self.isStandardOutput($0) ? "-" : $0 }
    }

    /// Whether `path` names standard output: one of its names, or the regular file it goes to
    /// (through a link of the user's own, say).
    static func isStandardOutput(_ path: String) -> Bool {
        if ["/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"].contains(path) { return true }
        var named = stat(), out = stat()
        return fstat(STDOUT_FILENO, &out) == 0 && (out.st_mode & S_IFMT) == S_IFREG && stat(path, &named) == 0
            && (named.st_dev, named.st_ino) == (out.st_dev, out.st_ino)
    }

    func validate() throws {
        let output = destination
        if urls.isEmpty { throw ValidationError("give at least one URL") }
        if !(connectTimeout > 0 && connectTimeout <= 600) { throw ValidationError("--connect-timeout: give 0 < seconds ≤ 600") }
        try checkSeconds("--timeout", timeout)
        if !(1...1024).contains(concurrency) { throw ValidationError("--concurrency: give 1 to 1024 chunk requests in flight") }
        if remoteName && output != nil { throw ValidationError("-O names the files itself: not with -o") }
        if output == "-" {
            if json {
                throw ValidationError("-o \(self.output ?? "-") writes the body to standard output, where --json prints: give one of them")
            }
            if chunked { throw ValidationError("--chunked writes chunks in place: give -o FILE, not -") }
            if urls.count > 1 { throw ValidationError("-o - takes one URL's body") }
        }
        if urls.count > 1 || remoteName {
            if chunked { throw ValidationError("--chunked fetches one object: not with several URLs or -O") }
            if qlogDir != nil { throw ValidationError("--qlog-dir logs one transfer: not with several URLs or -O") }
            if progressLog != nil { throw ValidationError("--progress-log times one transfer: not with several URLs or -O") }
        }
    }

    func run() throws {
        var isDirectory: ObjCBool = false
        let intoDirectory = output.map { FileManager.default.fileExists(atPath: $0, isDirectory: &isDirectory) } == true && isDirectory.boolValue
        if urls.count > 1 || remoteName || intoDirectory && !chunked {
            return try runMany()
        }
        let url = urls[0]
        let u: STOQURL
        do { u = try STOQURL(url) } catch { throw fail("<url>: \(error)", code: 2) }
        var output = destination
        if chunked, intoDirectory, let directory = output {
            // -o DIR names the file after the URL's last segment, as for a plain download.
            output = directory + "/" + (try Self.fileName(u))
        }
        if let qlogDir {
            guard !chunked else { throw fail("--qlog-dir logs one connection; --chunked uses a pool of them: not supported together", code: 2) }
            do { try FileManager.default.createDirectory(atPath: qlogDir, withIntermediateDirectories: true) } catch {
                throw fail("--qlog-dir \(qlogDir): \(error.localizedDescription)", code: 2)
            }
        }
        let traceHeaders = try tracing.headers() + credential.headers(for: u)
        if chunked {
            guard let given = output, given != "-" else { throw fail("--chunked writes chunks in place: give -o FILE", code: 2) }
            // Through a link, to what it names (the file is renamed into place at the end).
            let output = PartFile.resolvingLinks(given)
            var st = stat()
            if stat(output, &st) == 0 && (st.st_mode & S_IFMT) != S_IFREG {
                throw fail("--chunked resumes into a regular file and renames it into place; \(output) is not one", code: 2)
            }
            do {
                let r = try STOQClient.getChunked(
                    u, output: output, trust: trust.trust, datapath: .ioUring, concurrency: concurrency, timeout: timeout,
                    headers: traceHeaders)
                if json {
                    printCodable(r)
                } else {
                    FileHandle.standardError.write(
                        Data(
                            "\(human(Double(r.totalBytes))) in \(r.chunks) chunks: \(r.chunksFetched) fetched (\(human(Double(r.bytesFetched)))), \(r.chunksReused) already here; sha256 \(r.sha256)\n"
                                .utf8))
                }
                return
            } catch  where error.code == .noManifest {
                // A plain file at a node that does not cut it (chunking.cut_plain_files = false).
                // The whole body goes to a part file of its own: FILE.part, an earlier chunked
                // download's, is left to resume.
                FileHandle.standardError.write(Data("stoq: \(error); getting the object whole instead\n".utf8))
            } catch {
                throw fail("\(error)")
            }
        }
        var fd: Int32 = -1
        var temp: PartFile?, target = output
        // -o - into a file: the body goes where standard output is now (after what is written
        // there already), and standard output is left after it, as any writer would.
        var stdoutAt: off_t = -1
        if output == "-" {
            fd = dup(STDOUT_FILENO)
            guard fd >= 0 else { throw fail("-o -: standard output: \(String(cString: strerror(errno)))") }
            var st = stat()
            if fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG { stdoutAt = lseek(fd, 0, SEEK_CUR) }
        } else if let output {
            var st = stat()
            if stat(output, &st) == 0 && (st.st_mode & S_IFMT) != S_IFREG {
                // A device or a pipe (/dev/null, a FIFO, through any link): written in place; a
                // temp file renamed over it would replace the device with a file.
                fd = open(output, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
                guard fd >= 0 else { throw fail("-o \(output): \(String(cString: strerror(errno)))") }
            } else {
                // Through a link, to what it names: a temp file renamed over the link itself
                // would replace the link.
                target = PartFile.resolvingLinks(output)
                temp = try PartFile.create(for: target!)
                fd = temp!.fd
            }
        }
        let tty = isatty(STDERR_FILENO) == 1 && !json
        let start = Date()
        var log: ProgressLog?
        if let progressLog {
            log = ProgressLog(path: progressLog)
            guard log != nil else {
                let e = String(cString: strerror(errno))
                if fd >= 0 { close(fd) }
                temp?.discard()
                throw fail("--progress-log \(progressLog): \(e)", code: 2)
            }
        }
        defer { log?.close() }
        let result: TransferResult
        do {
            result = try STOQClient.get(
                u, into: fd, at: UInt64(max(stdoutAt, 0)), trust: trust.trust, datapath: .ioUring, hash: !noVerify && (output != nil || json || tty),
                timeout: timeout,
                connectTimeout: connectTimeout,
                congestionControl: cc, qlogDirectory: qlogDir, headers: traceHeaders,
                // A session proves the server once; one kept from an unverified run must not
                // stand in for verification later.
                // Nor with a client certificate: a session resumed without one would present it.
                sessionCache: noSessionCache || trust.insecure || trust.cert != nil
                    ? nil : SessionCache(directory: SessionCache.defaultDirectory, trust: trust.trust, warn: warnSessionCache),
                earlyData: !noEarlyData, keyUpdate: keyUpdate,
                progressInterval: log == nil ? 100_000_000 : 0
            ) { got, total in
                log?.record(got)
                guard tty, log == nil || log!.dueForDisplay() else { return }
                let line = progressLine(got: got, total: total, seconds: Date().timeIntervalSince(start))
                FileHandle.standardError.write(Data(line.utf8))
            }
        } catch {
            if fd >= 0 { close(fd); temp?.discard() }
            throw fail("\(error)")
        }
        if tty { FileHandle.standardError.write(Data("\n".utf8)) }
        if fd >= 0 {
            // Closed once the part file is placed: placing it flushes it through `fd`.
            defer { close(fd) }
            if stdoutAt >= 0, result.status / 100 == 2 { lseek(fd, stdoutAt + off_t(result.bytes), SEEK_SET) }
            if let temp {
                if result.status / 100 == 2 { try temp.place(at: target!) } else { temp.discard() }
            }
        }
        if json { printJSON(result) }
        guard result.status / 100 == 2 else { throw fail("\(u): HTTP \(result.status)\(result.message.map { ": \($0)" } ?? "")") }
        if !json && !tty { return }
        if !json {
            FileHandle.standardError.write(
                Data(
                    String(
                        format: "%@ in %.2fs (%.2f Gbps)%@\n",
                        human(Double(result.bytes)), result.seconds, result.gbps, result.sha256.isEmpty ? "" : ", sha256 \(result.sha256)"
                    ).utf8))
        }
    }

    /// The file -O or -o DIR writes `u`'s body to: its path's last segment.
    static func fileName(_ u: STOQURL) throws -> String {
        let name = String(u.path.prefix { $0 != "?" }.split(separator: "/").last ?? "")
        guard !name.isEmpty, name != ".", name != ".." else { throw fail("\(u): no file name in its path for -O / -o DIR", code: 2) }
        return name
    }

    /// Several URLs (or -O, or -o DIR): one connection per server, files renamed into place
    /// when whole.
    func runMany() throws {
        var parsed: [STOQURL] = []
        for text in urls {
            do { parsed.append(try STOQURL(text)) } catch { throw fail("\(text): \(error)", code: 2) }
        }
        let directory = remoteName ? "." : output
        var names: [String?] = []
        if let directory {
            var seen = Set<String>()
            for u in parsed {
                let name = try Self.fileName(u)
                guard seen.insert(name).inserted else { throw fail("\(u): two URLs would both write \(name)", code: 2) }
                names.append(directory + "/" + name)
            }
            do { try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) } catch {
                throw fail("-o \(directory): \(error.localizedDescription)", code: 2)
            }
        } else {
            names = parsed.map { _ in nil }
        }
        // Every request's headers first: one that cannot be made (a bad traceparent, a missing
        // token file) stops the run before any file is made or any request goes out without it.
        var headersFor: [String: [(String, String)]] = [:]
        for u in parsed where headersFor[u.description] == nil {
            do { headersFor[u.description] = try tracing.headers() + credential.headers(for: u) } catch { throw fail("\(error)", code: 2) }
        }
        var parts: [PartFile?] = []
        defer { for p in parts { if let p { close(p.fd) } } }
        for name in names {
            guard let name else { parts.append(nil); continue }
            do { parts.append(try PartFile.create(for: name)) } catch {
                for p in parts { p?.discard() }
                throw error
            }
        }
        let fds = parts.map { $0?.fd ?? -1 }
        let report: ManyGetReport
        do {
            report = try STOQClient.getMany(
                parsed, into: fds, trust: trust.trust, datapath: .ioUring, verify: !noVerify && (directory != nil || json), timeout: timeout,
                connectTimeout: connectTimeout,
                headers: { u in headersFor[u.description] ?? [] },
                sessionCache: noSessionCache || trust.insecure || trust.cert != nil
                    ? nil : SessionCache(directory: SessionCache.defaultDirectory, trust: trust.trust, warn: warnSessionCache),
                earlyData: !noEarlyData, keyUpdate: keyUpdate)
        } catch {
            for p in parts { p?.discard() }
            throw fail("\(error)")
        }
        var failed = 0
        for (i, r) in report.results.enumerated() {
            var ok = r.failure == nil && (r.status ?? 0) / 100 == 2
            var placed: String?
            if let name = names[i], let part = parts[i] {
                if ok, let why = part.rename(to: name) {
                    ok = false
                    placed = "cannot put the body in place at \(name) (from \(part.path)): \(why)"
                }
                if !ok { part.discard() }
            }
            if !ok {
                failed += 1
                let why = placed ?? r.failure ?? "HTTP \(r.status ?? 0)"
                FileHandle.standardError.write(Data("stoq: \(r.url): \(why)\n".utf8))
            } else if !json {
                print("\(names[i] ?? r.url): \(r.bytes) bytes, sha256 \(r.sha256)")
            }
        }
        if json { printCodable(report) }
        if failed > 0 { throw ExitCode(1) }
    }
}

/// `stoq get --progress-log`: the times body bytes arrived, written in batches so that logging
/// every turn of the event loop costs no syscall per packet.
final class ProgressLog {
    let fd: Int32
    var text = "# stoq get: CLOCK_MONOTONIC seconds, body bytes received so far\n"
    var last: UInt64 = .max
    var lastFlush = monotonicNow()
    var lastDisplay: UInt64 = 0

    /// Nil when `path` cannot be opened (errno says why).
    init?(path: String) {
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return nil }
    }

    func record(_ bytes: UInt64) {
        let now = monotonicNow()
        if bytes != last {
            last = bytes
            text += String(format: "%llu.%06llu %llu\n", now / 1_000_000_000, now % 1_000_000_000 / 1_000, bytes)
        }
        // Flushed every 100 ms, so that a benchmark can follow the file while the transfer runs.
        if now - lastFlush >= 100_000_000 { flush(); lastFlush = now }
    }

    /// Whether the terminal's progress line is due (every 100 ms, as without the log).
    func dueForDisplay() -> Bool {
        let now = monotonicNow()
        guard now - lastDisplay >= 100_000_000 else { return false }
        lastDisplay = now
        return true
    }

    func flush() {
        guard !text.isEmpty else { return }
        _ = text.utf8.withContiguousStorageIfAvailable { write(fd, $0.baseAddress, $0.count) }
        text = ""
    }

    func close() {
        flush()
        Glibc.close(fd)
    }
}

struct Put: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Upload a file as an object (stored atomically by the node).",
        discussion: """
            Writes need a credential (docs/access.md): --token, --token-file or $STOQ_TOKEN; to a node \
            on this machine, the operator token a node started here wrote (./stoq-data/access/operator.token) \
            is used when none is given.

            FILE - reads standard input to its end and sends it as it comes, without a \
            content-length (a pipe: tar c dir | stoq put - URL).

            Example: stoq put a.bin https://[::1]:4433/objects/a.bin --ca stoq-data/trust/root.pem
            """)

    @Argument(help: "The file to upload (- for standard input).") var file: String
    @Argument(help: "https://[ipv6]:port/objects/<name>") var url: String
    @OptionGroup var trust: TrustOptions
    @OptionGroup var credential: CredentialOptions
    @Flag(help: "Print one JSON object.") var json = false
    @Flag(help: "Chunk the file, ask the node which chunks it lacks, send only those, then the manifest.")
    var chunked = false
    @OptionGroup var chunking: ChunkingOptions
    @Option(help: "Chunk uploads in flight with --chunked.") var concurrency = 16
    @Option(help: "Congestion control of the upload: reno, cubic, bbr or bbr2.") var cc: CongestionControl = QUICSettings().congestionControl
    @Option(help: "Give up after this many seconds (default: 300; with --chunked, 600).") var timeout: Double?
    @OptionGroup var tracing: TraceOptions

    func validate() throws {
        if !(1...1024).contains(concurrency) { throw ValidationError("--concurrency: give 1 to 1024 chunk uploads in flight") }
        try checkSeconds("--timeout", timeout)
    }

    func run() throws {
        let u: STOQURL
        do { u = try STOQURL(url) } catch { throw fail("<url>: \(error)", code: 2) }
        let traceHeaders = try tracing.headers() + credential.headers(for: u)
        if chunked {
            guard file != "-" else { throw fail("--chunked cuts a file it can read again: give a FILE, not -", code: 2) }
            let parameters = try chunking.parameters()
            let r: ChunkedPutResult
            do {
                r = try STOQClient.putChunked(
                    file: file, to: u, parameters: parameters, trust: trust.trust, datapath: .ioUring,
                    concurrency: concurrency, timeout: timeout ?? 600, headers: traceHeaders)
            } catch { throw fail("\(error)") }
            if json {
                printCodable(r)
            } else {
                let had = r.chunks - r.chunksSent
                let sent = "sent \(r.chunksSent) (\(human(Double(r.bytesSent))))"
                let rest = had == 0 ? "" : had == r.chunks ? "; the node had them all" : ", the node had the other \(had)"
                FileHandle.standardError.write(
                    Data("\(human(Double(r.totalBytes))) in \(r.chunks) chunks: \(sent)\(rest)\n".utf8))
            }
            return
        }
        let r: TransferResult
        // On a terminal, the body's progress as the node acknowledges it (as `get` shows its).
        let tty = isatty(STDERR_FILENO) == 1 && !json
        let start = Date()
        let progress: ((UInt64, UInt64?) -> Void)? =
            tty
            ? { sent, total in
                FileHandle.standardError.write(Data(progressLine(got: sent, total: total, seconds: Date().timeIntervalSince(start)).utf8))
            } : nil
        do {
            r =
                file == "-"
                ? try STOQClient.put(
                    reading: STDIN_FILENO, to: u, trust: trust.trust, datapath: .ioUring, timeout: timeout ?? 300, congestionControl: cc,
                    headers: traceHeaders, progress: progress)
                : try STOQClient.put(
                    file: file, to: u, trust: trust.trust, datapath: .ioUring, timeout: timeout ?? 300, congestionControl: cc,
                    headers: traceHeaders, progress: progress)
        } catch {
            if tty { FileHandle.standardError.write(Data("\n".utf8)) }
            throw fail("\(error)")
        }
        if tty { FileHandle.standardError.write(Data("\n".utf8)) }
        if json { printJSON(r) }
        guard r.status / 100 == 2 else { throw fail("\(u): HTTP \(r.status)\(r.message.map { ": \($0)" } ?? "")") }
    }
}

struct ConfigCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "config", abstract: "Configuration tools.", subcommands: [Check.self])

    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Validate a node configuration file; exit 2 with every error if it is invalid.",
            discussion: "Example: stoq config check config/node.toml")
        @Argument(help: "The TOML file.") var file: String
        @Flag(help: "Print {\"valid\": …, \"errors\": […]}.") var json = false
        @Flag(
            help: ArgumentHelp(
                "Check the values only, not that the files they name are there.",
                discussion: "For a configuration checked away from the host that runs it (a Kubernetes ConfigMap whose files are mounted Secrets)."))
        var skipFiles = false

        func run() throws {
            do {
                let cfg = try ConfigLoader.load(path: file, files: !skipFiles)
                if json {
                    let data = try! JSONSerialization.data(
                        withJSONObject: ["valid": true, "errors": [String](), "notices": cfg.notices],
                        options: [.sortedKeys])
                    print(String(decoding: data, as: UTF8.self))
                } else {
                    print("\(file): valid")
                    for line in cfg.notices { print("notice: \(line)") }
                }
            } catch {
                if json {
                    let errs = error.errors.map { ["key": $0.key, "value": $0.value, "allowed": $0.allowed, "message": $0.description] }
                    let data = try! JSONSerialization.data(withJSONObject: ["valid": false, "errors": errs], options: [.sortedKeys])
                    print(String(decoding: data, as: UTF8.self))
                } else {
                    FileHandle.standardError.write(Data("\(error)\n".utf8))
                }
                throw ExitCode(2)
            }
        }
    }
}

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Load a node: many connections × streams of GETs; prints goodput, requests/s, latency p50/p99.",
        discussion: """
            Goodput (default): --connections (≤ 10000) each keep --streams GETs in flight for --duration s.
              stoq bench https://[::1]:4433/objects/1m.bin --connections 4 --streams 8 --duration 10 --ca stoq-data/trust/root.pem
            Connection load (--rate or --hold): --connections (≤ 1000000) handshakes at --rate per second, each
            connection then held --hold s, idle (--streams 0, the default here) or sending --streams GETs every
            --interval s; reports handshakes established and failed by reason, and handshake and request latency.
              stoq bench https://[::1]:4433/objects/1k.bin --connections 20000 --rate 2000 --hold 30 --ca …
            Exit status: 0 when the node answered a request 2xx (goodput) or a connection was established
            (connection load), whatever failed beside it (the report counts it); 1 when none was, or the run
            could not start; 2 for a bad URL.
            """)

    @Argument(help: "https://[ipv6]:port/objects/<name>") var url: String
    @Option(help: "Concurrent connections.") var connections = 1
    @Option(help: "Concurrent requests per connection (connection load: GETs per connection each --interval; default 0).")
    var streams: Int?
    @Option(help: "Run this many seconds (default 10 unless --bytes is given).") var duration: Double?
    @Option(help: "Stop after this many body bytes.") var bytes: UInt64?
    @Option(help: "Connection load: new handshakes per second (default: as fast as they complete).") var rate: Double?
    @Option(help: "Connection load: seconds every connection stays open once established.") var hold: Double?
    @Option(help: "Connection load: seconds between one connection's rounds of --streams GETs.") var interval = 1.0
    @Option(help: "Connection load: threads, each with its own socket and endpoint (default: the CPUs this process may use).")
    var threads: Int?
    @Option(
        help: """
            Connection load: a held connection sends a PING after this many seconds without traffic; keep it \
            below the node's idle_timeout (default \(Int(LoadPlan.defaultKeepAlive)), for the default 30 s).
            """)
    var keepAlive: Double?
    @OptionGroup var trust: TrustOptions
    @Flag(help: "Print one JSON object.") var json = false

    var loadMode: Bool { rate != nil || hold != nil }

    func validate() throws {
        if loadMode {
            guard (1...1_000_000).contains(connections) else { throw ValidationError("--connections \(connections): expected 1…1000000") }
            if let streams, !(0...256).contains(streams) { throw ValidationError("--streams \(streams): expected 0…256") }
            if let rate, !(rate > 0 && rate <= 10_000_000) {
                throw ValidationError("--rate \(rate): expected handshakes per second > 0, at most 10000000")
            }
            try checkSeconds("--hold", hold, orZero: true)
            try checkSeconds("--interval", interval)
            if let threads, !(1...256).contains(threads) { throw ValidationError("--threads \(threads): expected 1…256") }
            try checkSeconds("--keep-alive", keepAlive)
            guard duration == nil, bytes == nil else {
                throw ValidationError("--duration and --bytes measure goodput; with --rate or --hold, the load runs for --hold")
            }
            return
        }
        guard connections >= 1, connections <= 10_000 else {
            throw ValidationError("--connections \(connections): expected 1…10000 (up to 1000000 with --rate or --hold)")
        }
        if let streams, !(1...256).contains(streams) { throw ValidationError("--streams \(streams): expected 1…256") }
        try checkSeconds("--duration", duration)
        guard threads == nil else { throw ValidationError("--threads applies to connection load (--rate or --hold)") }
        guard keepAlive == nil else { throw ValidationError("--keep-alive applies to connection load (--rate or --hold)") }
    }

    func run() throws {
        let u: STOQURL
        do { u = try STOQURL(url) } catch { throw fail("<url>: \(error)", code: 2) }
        if loadMode { return try runLoad(u) }
        let r: BenchResult
        do {
            r = try STOQClient.bench(
                u, connections: connections, streams: streams ?? 1,
                duration: duration ?? (bytes == nil ? 10 : nil), bytes: bytes, trust: trust.trust, datapath: .ioUring)
        } catch { throw fail("\(error)") }
        if json { printCodable(r) } else { printText(r) }
        if let why = r.failure { throw fail(why) }
    }

    private func printText(_ r: BenchResult) {
        print(
            String(
                format: "%d connection(s) × %d stream(s): %d requests (%d failed) in %.2fs",
                r.connections, r.streams, r.requests, r.failed, r.seconds))
        print(
            String(
                format: "goodput %.2f Gbps, %.0f requests/s, latency p50 %.2f ms, p99 %.2f ms",
                r.gbps, r.requestsPerSecond, r.latencyP50Ms, r.latencyP99Ms))
        if r.connections > 1 {
            print(
                String(
                    format: "in the first %.2fs: %.2f Gbps; fairness (Jain) %.3f, least-served connection %.2f of the mean",
                    r.windowSeconds, r.windowGbps, r.fairness, r.minShare))
        }
        if r.peakInFlight < r.connections * r.streams {
            print("at most \(r.peakInFlight) requests were in flight at once: the server's stream limit held the rest back")
        }
        if let why = r.endedEarly { print("ended early: a connection closed: \(why)") }
        if let why = r.firstFailure { print("first failure: \(why)") }
    }

    private func runLoad(_ u: STOQURL) throws {
        var plan = LoadPlan(
            connections: connections, rate: rate, hold: hold ?? 0, streams: streams ?? 0, interval: interval,
            threads: threads ?? max(1, Worker.availableCPUs))
        if let keepAlive { plan.keepAlive = keepAlive }
        let r: LoadResult
        do { r = try STOQClient.load(u, plan: plan, trust: trust.trust, datapath: .ioUring) } catch { throw fail("\(error)") }
        if json { printCodable(r) } else { printText(r) }
        if let why = r.failure { throw fail(why) }
    }

    private func printText(_ r: LoadResult) {
        let failed = r.failed.values.reduce(0, +), lost = r.lost.values.reduce(0, +)
        print(
            String(
                format: "%d connection(s) from %d thread(s): %d established, %d failed; at most %d open at once",
                r.connections, r.threads, r.established, failed, r.peakOpen))
        for (reason, n) in r.failed.sorted(by: { $0.value > $1.value }) { print("  failed \(n): \(reason)") }
        print(
            String(
                format: "handshakes: %.0f/s over %.2f s, latency p50 %.2f ms, p99 %.2f ms",
                r.handshakesPerSecond, r.rampSeconds, r.handshakeP50Ms, r.handshakeP99Ms))
        print(
            String(
                format: "held %.1f s: %d lost; %d requests (%d failed), latency p50 %.2f ms, p99 %.2f ms",
                r.holdSeconds, lost, r.requests, r.requestsFailed, r.requestP50Ms, r.requestP99Ms))
        for (reason, n) in r.lost.sorted(by: { $0.value > $1.value }) { print("  lost \(n): \(reason)") }
    }
}


/// `stoq chunk`: cuts a file the way a node would store it and prints the chunks.
struct ChunkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "chunk",
        abstract: "Cut a file into content-defined (or fixed-size) chunks; print offset, length and SHA-256 of each, and the throughput.",
        discussion: """
            Example: stoq chunk big.iso --min 64KB --avg 256KB --max 1MB
                     stoq chunk big.iso --json --summary --no-hash     # cut search alone, for benchmarks
                     stoq chunk big.iso --manifest big.iso.manifest    # also write the binary manifest
            """)

    @Argument(help: "The file to chunk.") var file: String
    @OptionGroup var chunking: ChunkingOptions
    @Flag(help: "Find the cut points only, without SHA-256 (ids print as zeros): measures the cut search.") var noHash = false
    @Flag(help: "Print the totals only, not every chunk.") var summary = false
    @Option(help: "Write the binary manifest (computes the whole-file SHA-256 too) to this path.") var manifest: String?
    @Option(help: "Bytes per read(2), e.g. 4MB.") var readSize = "4MB"
    @Flag(help: "Benchmarks: read the whole file into memory first (untimed) and time the chunking of memory alone.") var inMemory = false
    @Flag(help: "Print one JSON object.") var json = false

    func run() throws {
        let parameters = try chunking.parameters()
        let readBytes = try ChunkingOptions.size("read-size", readSize)
        if noHash && manifest != nil { throw ValidationError("--manifest needs the chunk ids: drop --no-hash") }

        let fd = open(file, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw fail("\(file): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        _ = posix_fadvise(fd, 0, 0, Int32(POSIX_FADV_SEQUENTIAL))

        var chunks = [Chunk]()
        var bytes: UInt64 = 0
        var objectDigest: ContentDigest?
        let clock = ContinuousClock()
        var started = clock.now
        var cpuStarted = cpuSeconds()
        if inMemory {
            // For benchmarks: the file is read first, untimed, so the figure is the cut loop
            // (and SHA-256) over memory, without read(2)'s copy.
            var whole = [UInt8]()
            do {
                var source = FileDescriptorSource(fd: fd)
                var piece = [UInt8](repeating: 0, count: 1 << 22)
                while true {
                    let n = try piece.withUnsafeMutableBytes { try source.read(into: $0) }
                    if n == 0 { break }
                    whole.append(contentsOf: piece[0..<n])
                }
            } catch { throw fail("\(file): \(error)") }
            started = clock.now
            cpuStarted = cpuSeconds()
            whole.withUnsafeBytes { region in
                let chunker = Chunker(parameters)
                if noHash {
                    var offset: UInt64 = 0
                    chunks = chunker.chunkLengths(of: region).map { len in
                        defer { offset += UInt64(len) }
                        return Chunk(offset: offset, length: len, id: .zero)
                    }
                } else {
                    chunks = chunker.chunks(of: region)
                }
                if manifest != nil { objectDigest = .sha256(region) }
            }
            bytes = UInt64(whole.count)
        } else {
            let chunker = StreamingChunker(
                source: FileDescriptorSource(fd: fd), parameters: parameters,
                readSize: readBytes, digestObject: manifest != nil)
            do {
                if noHash {
                    while let c = try chunker.nextBoundary() { chunks.append(c) }
                } else {
                    while let c = try chunker.next() { chunks.append(c) }
                }
            } catch { throw fail("\(file): \(error)") }
            bytes = chunker.bytesConsumed
            objectDigest = chunker.objectDigest
        }
        let elapsed = clock.now - started
        let cpu = cpuSeconds() - cpuStarted
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) * 1e-18
        let gbps = seconds > 0 ? Double(bytes) / seconds / 1e9 : 0
        // Per core: on a shared machine wall time includes waiting for a CPU, CPU time does not.
        let gbpsCPU = cpu > 0 ? Double(bytes) / cpu / 1e9 : 0

        if let manifest {
            let m: Manifest
            do {
                m = try Manifest(
                    totalLength: bytes, digest: objectDigest!, parameters: parameters,
                    chunks: chunks.map { Manifest.Entry(id: $0.id, length: UInt32($0.length)) })
            } catch { throw fail("\(file): \(error)") }
            guard FileManager.default.createFile(atPath: manifest, contents: Data(m.encode())) else {
                throw fail("--manifest \(manifest): cannot write")
            }
        }

        let unique = Set(chunks.map(\.id)).count
        if json {
            var obj: [String: Any] = [
                "file": file, "algorithm": parameters.algorithm.description,
                "min": parameters.minSize, "avg": parameters.avgSize, "max": parameters.maxSize,
                "bytes": bytes, "count": chunks.count, "seconds": seconds, "gbps": gbps, "hashed": !noHash,
                "cpu_seconds": cpu, "gbps_cpu": gbpsCPU, "in_memory": inMemory,
            ]
            if !noHash { obj["unique"] = unique }
            if let d = objectDigest { obj["sha256"] = d.hex }
            if !summary {
                obj["chunks"] = chunks.map { ["offset": $0.offset, "length": $0.length, "id": $0.id.hex] as [String: Any] }
            }
            let data = try JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys, .withoutEscapingSlashes])
            print(String(decoding: data, as: UTF8.self))
            return
        }
        if !summary {
            var out = ""
            out.reserveCapacity(chunks.count * 90)
            for c in chunks { out += "\(c.offset)\t\(c.length)\t\(c.id.hex)\n" }
            FileHandle.standardOutput.write(Data(out.utf8))
        }
        let mean = chunks.isEmpty ? 0 : Double(bytes) / Double(chunks.count)
        print(
            String(
                format: "%@: %llu bytes, %d chunks (%@), mean %@, %@ %.3fs: %.2f GB/s (%.2f GB/s per CPU second)",
                file, bytes, chunks.count, parameters.description, human(mean),
                noHash ? "cut search" : "cut + SHA-256", seconds, gbps, gbpsCPU))
    }
}

/// User + system CPU seconds of this process.
func cpuSeconds() -> Double {
    var r = rusage()
    getrusage(RUSAGE_SELF.rawValue, &r)  // Glibc imports the who-enum as a type of its own
    return Double(r.ru_utime.tv_sec + r.ru_stime.tv_sec) + Double(r.ru_utime.tv_usec + r.ru_stime.tv_usec) * 1e-6
}

/// How files are cut into chunks (`stoq chunk`, `stoq put --chunked`).
struct ChunkingOptions: ParsableArguments {
    @Option(help: "content_aware or fixed (fixed-size chunks of --avg bytes).") var algorithm = "content_aware"
    @Option(help: "Minimum chunk size, e.g. 64KB.") var min = "64KB"
    @Option(help: "Average chunk size, a power of two, e.g. 256KB.") var avg = "256KB"
    @Option(help: "Maximum chunk size, e.g. 1MB.") var max = "1MB"

    static func size(_ flag: String, _ text: String) throws -> Int {
        guard let v = Units.size(text), v > 0, v <= UInt64(Int32.max) else {
            throw ValidationError("--\(flag) \(text): expected a size such as 64KB, 256KB, 1MB")
        }
        return Int(v)
    }

    func parameters() throws -> ChunkingParameters {
        guard let alg = ChunkingAlgorithm(name: algorithm) else {
            throw ValidationError("--algorithm \(algorithm): expected content_aware or fixed")
        }
        do {
            return try ChunkingParameters(
                algorithm: alg, minSize: try Self.size("min", min),
                avgSize: try Self.size("avg", avg), maxSize: try Self.size("max", max))
        } catch let e as ChunkingParameterError {
            throw ValidationError("--min/--avg/--max: \(e.message)")
        }
    }
}

/// One JSON object with snake_case keys.
func printCodable(_ value: some Encodable) {
    let enc = JSONEncoder()
    enc.keyEncodingStrategy = .convertToSnakeCase
    enc.outputFormatting = [.sortedKeys]
    print(String(decoding: (try? enc.encode(value)) ?? Data("{}".utf8), as: UTF8.self))
}
