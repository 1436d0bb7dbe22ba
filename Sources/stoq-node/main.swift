import ArgumentParser
import Foundation
import Logging
import STOQConfig
import STOQNode
import STOQQUIC
import ServiceLifecycle
import UnixSignals

/// The STOQ daemon.
@main
struct StoqNode: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stoq-node",
        abstract: "Run a STOQ node: QUIC + HTTP/3 over IPv6, one pinned worker per core.",
        discussion: """
            Example: stoq-node --config config/node.toml
            Without --config the embedded default runs: [::]:4433, data under ./stoq-data.
            SIGTERM/SIGINT drain (requests under way finish, up to network.drain_timeout) and
            exit 0; SIGHUP or a changed config file reloads it.
            """,
        version: STOQVersion.line)

    @Option(help: "TOML configuration file (see config/node.toml).")
    var config: String?

    @Option(help: "trace, debug, info, notice, warning, error or critical (overrides log.level).")
    var logLevel: Logger.Level?

    /// `AsyncParsableCommand.main`, but a command line refused as given (an unknown option, a
    /// bad --log-level) exits 2 like an invalid configuration, not ArgumentParser's 64: both are
    /// the operator's to fix, and systemd's RestartPreventExitStatus=2 keeps either from
    /// restarting in a loop.
    static func main() async {
        do {
            var command = try parseAsRoot()
            if var command = command as? any AsyncParsableCommand { try await command.run() } else { try command.run() }
        } catch {
            guard exitCode(for: error) == .validationFailure else { exit(withError: error) }
            FileHandle.standardError.write(Data((fullMessage(for: error) + "\n").utf8))
            Foundation.exit(2)
        }
    }

    func run() async throws {
        let cfg: NodeConfig
        if let config {
            do { cfg = try ConfigLoader.load(path: config) } catch {
                FileHandle.standardError.write(Data("stoq-node: invalid configuration\n\(error)\n".utf8))
                throw ExitCode(2)
            }
        } else {
            cfg = .default
        }
        let levelBox = LevelBox(logLevel ?? cfg.log.level)
        LoggingSystem.bootstrap { label in ReloadableLogHandler(label: label, level: levelBox) }
        let logger = Logger(label: "stoq-node")
        if let (from, to) = OpenFiles.raiseSoftLimit() { logger.info("open files: soft limit raised from \(from) to \(to), the hard limit") }
        // [tracing]: the exporter starts before the node and, last in the group's shutdown
        // order, stops after it, flushing the spans of the last requests.
        let tracing: NodeTracing
        do { tracing = try NodeTracing(cfg.tracing, logger: logger) } catch {
            FileHandle.standardError.write(Data("stoq-node: \(error)\n".utf8))
            throw ExitCode(1)
        }
        let node = Node(config: cfg, logger: logger, tracer: tracing.tracer)
        // Until the group's own handlers are in place, these signals must not kill the process.
        for sig in [SIGTERM, SIGINT, SIGHUP] { signal(sig, SIG_IGN) }
        let hangups = await UnixSignalsSequence(trapping: .sighup)
        let configPath = config, pinnedLevel = logLevel != nil
        // One reload: whether it applied.
        @Sendable func reloadOnce(_ why: String) -> Bool {
            // A retry that fails again says so quietly: the first failure said why, and
            // stoq_config_last_reload_successful says it lasts.
            let failure: Logger.Level = why == "retry" ? .debug : .error
            // The revoked serials are not the file's: they apply whether it loads or not (or
            // there is none).
            func revocationsAlone() -> Bool {
                do {
                    if try node.reloadRevocations() { logger.notice("\(why): revoked serials reloaded", metadata: ["applied": "trust.revocations"]) }
                    return true
                } catch {
                    logger.log(level: failure, "\(why): \(error)")
                    return false
                }
            }
            guard let path = configPath else {
                logger.notice("\(why): no config file to reload")
                return revocationsAlone()
            }
            let fresh: NodeConfig
            do { fresh = try ConfigLoader.load(path: path) } catch {
                logger.log(level: failure, "\(why): \(path) is invalid, keeping the running configuration:\n\(error)")
                _ = revocationsAlone()
                return false
            }
            do {
                var report = try node.reload(fresh)
                if pinnedLevel {
                    // --log-level holds the level: the file's is not applied, so not reported either.
                    report.applied.removeAll { $0 == "log.level" }
                } else if report.applied.contains("log.level") {
                    levelBox.level = fresh.log.level
                }
                if report.applied.isEmpty && report.restartNeeded.isEmpty {
                    logger.notice("\(why): \(path) unchanged")
                } else {
                    logger.notice(
                        "\(why): reloaded \(path)",
                        metadata: [
                            "applied": "\(report.applied.joined(separator: ","))",
                            "restart_needed": "\(report.restartNeeded.joined(separator: ","))",
                        ])
                }
                return true
            } catch {
                // The file parsed: what failed is applying it (a file it names, a directory),
                // which the error names with its reason.
                logger.log(level: failure, "\(why): \(path) could not be applied, keeping the running configuration:\n\(error)")
                return false
            }
        }
        // SIGHUP, or a change to the file or to the CA's revoked serials, reloads: the node applies
        // what it can live and names what needs a restart; an invalid file changes nothing, and
        // is tried again until it loads (each try counted: stoq_config_reload_failures_total).
        let reload = ReloadService(
            hangups: hangups, watching: config, andFiles: [node.revocationListPath], ready: { node.isStarted }
        ) { why in
            let applied = reloadOnce(why)
            if applied { node.reloads.succeeded() } else { node.reloads.failed() }
            return applied
        }
        let service = NodeService(node: node) { node in
            print("trust: \(URL(fileURLWithPath: node.certificatePath).standardizedFileURL.path)")
            print("certificate: \(URL(fileURLWithPath: node.servingCertificatePath).standardizedFileURL.path)")
            print("operator token: \(URL(fileURLWithPath: node.operatorTokenPath).standardizedFileURL.path)")
            if let admin = node.adminURL { print("admin: \(admin)/metrics") }
            print("listening: \(node.listenAddress)")
            fflush(nil)
        }
        // SIGTERM/SIGINT: graceful shutdown of the group; the node drains its connections and
        // its return (or failure) ends the reload service too.
        let group = ServiceGroup(
            configuration: .init(
                services: (tracing.service.map { [.init(service: $0, serviceName: "tracing")] } ?? []) + [
                    .init(
                        service: service, successTerminationBehavior: .gracefullyShutdownGroup,
                        failureTerminationBehavior: .gracefullyShutdownGroup, serviceName: "node"),
                    .init(service: reload, serviceName: "reload"),
                ],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: Logger(label: "stoq-node.lifecycle")))
        do { try await group.run() } catch {
            FileHandle.standardError.write(Data("stoq-node: \(error)\n".utf8))
            throw ExitCode(1)
        }
        logger.notice("stopped")
    }

}

/// The log level, changeable while running (a reload).
final class LevelBox: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Logger.Level
    init(_ l: Logger.Level) { value = l }
    var level: Logger.Level {
        get { lock.withLock { value } }
        set { lock.withLock { value = newValue } }
    }
}

/// swift-log's stream handler, with its level read from a `LevelBox` so a reload can change it.
/// A level set on one logger stays that logger's: swift-otel sets its diagnostic logger (a copy
/// of the node's) to `warning`, and writing that into the shared box silenced the whole node.
struct ReloadableLogHandler: LogHandler {
    private var inner: StreamLogHandler
    private let box: LevelBox
    private var own: Logger.Level?
    init(label: String, level: LevelBox) {
        inner = StreamLogHandler.standardError(label: label)
        box = level
    }
    var logLevel: Logger.Level {
        get { own ?? box.level }
        set { own = newValue }
    }
    var metadata: Logger.Metadata {
        get { inner.metadata }
        set { inner.metadata = newValue }
    }
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { inner[metadataKey: key] }
        set { inner[metadataKey: key] = newValue }
    }
    func log(
        level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String, file: String,
        function: String, line: UInt
    ) {
        guard level >= logLevel else { return }
        inner.log(level: level, message: message, metadata: metadata, source: source, file: file, function: function, line: line)
    }
}

/// `--log-level` is parsed into its type by ArgumentParser, as `log.level` is by the config loader.
extension Logger.Level: @retroactive ExpressibleByArgument {}
