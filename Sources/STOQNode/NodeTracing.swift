import Logging
import OTel
import STOQConfig
import STOQCore
import STOQTracing
import ServiceLifecycle
import Tracing

/// `[tracing]` made real: swift-otel's tracer with its OTLP/HTTP (protobuf) exporter and batch
/// span processor, configured from the node's config alone (only the `OTEL_*` environment
/// variables swift-otel itself reads can override it). Only traces: the node's logs and metrics
/// keep their own backends, and the global `InstrumentationSystem` is left alone: the tracer is
/// handed to the workers and the edge fetcher, which is also how they know tracing is on.
public struct NodeTracing: Sendable {
    /// The tracer the node's parts use; nil when tracing is off.
    public let tracer: RequestTracer?
    /// The exporter's background work (batching, export, flush at shutdown): put it in the
    /// daemon's `ServiceGroup` before the node, so that it stops after the node and exports the
    /// spans of the last requests. Nil when tracing is off.
    public let service: (any Service)?

    /// Off: no tracer, no service.
    public static let off = NodeTracing(tracer: nil, service: nil)

    init(tracer: RequestTracer?, service: (any Service)?) {
        (self.tracer, self.service) = (tracer, service)
    }

    /// The tracer `config` asks for (off when `enabled` is false).
    public init(_ config: NodeConfig.Tracing, logger: Logger) throws(NodeError) {
        guard config.enabled else {
            self = .off
            return
        }
        var c = OTel.Configuration.default
        c.serviceName = config.serviceName
        // swift-otel's warnings ("Failed to export batch.") name no endpoint: its logger does.
        var diagnostics = logger
        diagnostics[metadataKey: "otlp_endpoint"] = "\(config.endpoint)"
        c.diagnosticLogger = .custom(diagnostics)
        c.diagnosticLogLevel = .warning
        c.propagators = [.traceContext]
        c.logs.enabled = false
        c.metrics.enabled = false
        c.traces.enabled = true
        c.traces.exporter = .otlp
        c.traces.otlpExporter.endpoint = config.endpoint
        c.traces.otlpExporter.protocol = .httpProtobuf
        c.traces.batchSpanProcessor.scheduleDelay = .nanoseconds(Int64(config.exportInterval))
        // A collector that is down or slow must not hold the node up: an export (and the flush
        // at shutdown, which a Kubernetes grace period or systemd's stop timeout bounds) gives
        // up after 5 s, dropping that batch; the default is 30 s.
        c.traces.batchSpanProcessor.exportTimeout = .seconds(5)
        c.traces.otlpExporter.timeout = .seconds(5)
        guard let sampler = type(of: c.traces.sampler).parentBasedTraceIDRatio(ratio: config.sampleRatio)
        else { throw NodeError(.config, "tracing.sample_ratio \(config.sampleRatio): not a ratio from 0 to 1") }
        c.traces.sampler = sampler
        do {
            let backend = try OTel.makeTracingBackend(configuration: c)
            tracer = RequestTracer(backend.factory)
            service = backend.service
        } catch {
            throw NodeError(.config, "tracing: cannot start the OTLP exporter for \(config.endpoint): \(error)")
        }
        logger.info(
            "tracing on",
            metadata: [
                "endpoint": "\(config.endpoint)", "service_name": "\(config.serviceName)",
                "sample_ratio": "\(config.sampleRatio)", "export_interval_ms": "\(config.exportInterval / 1_000_000)",
            ])
    }
}
