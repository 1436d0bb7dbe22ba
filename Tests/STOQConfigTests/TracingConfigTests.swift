import Testing
@testable import STOQConfig

/// `[tracing]`: off by default, every key validated with an error naming key, value and what is
/// allowed.
@Suite struct TracingConfigTests {
    func errors(_ text: String) -> [ConfigError] { configErrors(text) }

    @Test func offByDefault() {
        let t = NodeConfig.default.tracing
        #expect(!t.enabled)
        #expect(t.endpoint == "http://[::1]:4318/v1/traces" && t.serviceName == "stoq-node")
        #expect(t.sampleRatio == 1.0 && t.exportInterval == 5_000_000_000)
    }

    @Test func readsEveryKey() throws {
        let t = try ConfigLoader.parse(
            """
            [tracing]
            enabled = true
            endpoint = "https://otel-collector.observability.svc:4318/v1/traces"
            service_name = "edge-fra1"
            sample_ratio = 0.25
            export_interval = "200ms"
            """
        ).tracing
        #expect(t.enabled && t.endpoint == "https://otel-collector.observability.svc:4318/v1/traces")
        #expect(t.serviceName == "edge-fra1" && t.sampleRatio == 0.25 && t.exportInterval == 200_000_000)
        #expect(try ConfigLoader.parse("[tracing]\nsample_ratio = 0").tracing.sampleRatio == 0)
        #expect(try ConfigLoader.parse("[tracing]\nendpoint = \"http://[2001:db8::7]/v1/traces\"").tracing.endpoint == "http://[2001:db8::7]/v1/traces")
    }

    @Test func badValuesNameKeyValueAndWhatIsAllowed() {
        let ratio = errors("[tracing]\nsample_ratio = 1.5")
        #expect(ratio.map(\.key) == ["tracing.sample_ratio"])
        #expect(ratio.first?.code == .outOfRange && ratio.first?.value == "1.5")
        #expect(ratio.first?.allowed == "a number from 0.0 to 1.0, the share of new traces recorded")
        #expect(errors("[tracing]\nsample_ratio = \"half\"").first?.code == .badType)
        #expect(errors("[tracing]\nenabled = \"yes\"").map(\.key) == ["tracing.enabled"])
        #expect(errors("[tracing]\nservice_name = \"\"").map(\.key) == ["tracing.service_name"])
        #expect(errors("[tracing]\nexport_interval = \"1ms\"").first?.code == .outOfRange)
        #expect(errors("[tracing]\nflush = true").first?.code == .unknownKey)

        func endpoint(_ url: String) -> ConfigError? { errors("[tracing]\nendpoint = \"\(url)\"").first }
        #expect(endpoint("grpc://[::1]:4317")?.allowed.hasSuffix("the scheme must be http:// or https://") == true)
        #expect(endpoint("http://[::1]:4318")?.allowed.hasSuffix("the path is missing (an OTLP/HTTP collector takes traces at /v1/traces)") == true)
        #expect(endpoint("http://127.0.0.1:4318/v1/traces")?.code == .ipv4NotSupported)
        #expect(endpoint("http://[::ffff:192.0.2.1]:4318/v1/traces")?.code == .ipv4NotSupported)
        #expect(endpoint("http://[::1]:0/v1/traces")?.allowed.hasSuffix("the port must be 1-65535") == true)
        #expect(endpoint("http://[::1:4318/v1/traces")?.allowed.hasSuffix("an IPv6 address needs its closing ]") == true)
        #expect(endpoint("http://[zz::1]:4318/v1/traces")?.allowed.hasSuffix("zz::1 is not an IPv6 address") == true)
        #expect(endpoint("http://[::1]:4318/v1/traces")?.value == nil)
        #expect(endpoint("http://[::1]:4318/v1/traces") == nil)
        #expect(endpoint("http:///v1/traces")?.key == "tracing.endpoint")
        // A port with no host was "IPv4 addresses are not supported".
        for url in ["http://:4318/v1/traces", "http://[]:4318/v1/traces"] {
            #expect(endpoint(url)?.code == .badValue, "\(url)")
            #expect(endpoint(url)?.allowed.hasSuffix(" — no host") == true, "\(url)")
        }
    }
}
