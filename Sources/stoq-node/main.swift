import ArgumentParser
import Foundation
import Logging
import STOQConfig
import STOQNode

/// The STOQ daemon.
@main
struct StoqNode: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stoq-node",
        abstract: "Run a STOQ node: QUIC + HTTP/3 over IPv6, one pinned worker per core.",
        discussion: """
            Example: stoq-node --config config/node.toml
            Without --config the embedded default runs: [::]:4433, data under ./stoq-data.
            SIGTERM/SIGINT close every connection gracefully and exit 0.
            """)

    @Option(help: "TOML configuration file (see config/node.toml).")
    var config: String?

    @Option(help: "trace, debug, info, notice, warning, error or critical (overrides log.level).")
    var logLevel: String?

    func run() throws {
        let cfg: NodeConfig
        if let config {
            do { cfg = try ConfigLoader.load(path: config) } catch {
                FileHandle.standardError.write(Data("stoq-node: invalid configuration\n\(error)\n".utf8))
                throw ExitCode(2)
            }
        } else {
            cfg = .default
        }
        let levelText = logLevel ?? cfg.log.level
        guard let level = Logger.Level(rawValue: levelText) else {
            FileHandle.standardError.write(Data("stoq-node: --log-level \(levelText): expected trace, debug, info, notice, warning, error or critical\n".utf8))
            throw ExitCode(2)
        }
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let logger = Logger(label: "stoq-node")
        let node = Node(config: cfg, logger: logger)
        signal(SIGTERM, SIG_IGN)
        signal(SIGINT, SIG_IGN)
        signal(SIGHUP, SIG_IGN)
        let stopSignals = [SIGTERM, SIGINT].map { sig in
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler {
                logger.notice("signal \(sig): draining connections and stopping")
                node.stop()
            }
            s.resume()
            return s
        }
        let hup = DispatchSource.makeSignalSource(signal: SIGHUP, queue: .global())
        hup.setEventHandler {
            guard let path = config else { return logger.notice("SIGHUP: no config file to reload") }
            do {
                let fresh = try ConfigLoader.load(path: path)
                if fresh == cfg { logger.notice("SIGHUP: \(path) unchanged") } else {
                    logger.warning("SIGHUP: \(path) changed; live reload of these keys is not implemented yet — restart to apply")
                }
            } catch { logger.error("SIGHUP: \(path) is invalid, keeping the running configuration:\n\(error)") }
        }
        hup.resume()
        do { try node.start() } catch {
            FileHandle.standardError.write(Data("stoq-node: \(error)\n".utf8))
            throw ExitCode(1)
        }
        print("trust: \(URL(fileURLWithPath: node.certificatePath).standardizedFileURL.path)")
        print("certificate: \(URL(fileURLWithPath: node.servingCertificatePath).standardizedFileURL.path)")
        if let admin = node.adminAddress { print("admin: http://\(admin)/metrics") }
        print("listening: \(node.listenAddress)")
        fflush(nil)
        node.wait()
        withExtendedLifetime(stopSignals) {}
        withExtendedLifetime(hup) {}
        logger.notice("stopped")
    }
}
