import Foundation
import Testing

@testable import STOQAdmin
import STOQContent
import STOQStore

/// The node-level families the monitoring rules (deploy/prometheus/) depend on, rendered from
/// hand-built inputs: the configured datapath next to the one in use, and a fixed
/// certificate's expiry.
@Suite struct NodeMetricsTests {
    static let expiry = Date(timeIntervalSince1970: 1_900_000_000)

    @Test func configuredDatapathAndFixedCertificateExpiry() {
        let m = NodeMetrics(
            workers: [], store: nil, certificate: nil, edge: nil,
            configuredDatapath: .init(datapath: "af_xdp", interface: "eth\"0"), fixedCertificateNotAfter: Self.expiry)
        let lines = Set(m.prometheus().split(separator: "\n").map(String.init))
        #expect(lines.contains("# TYPE stoq_datapath_configured_info gauge"))
        #expect(lines.contains(#"stoq_datapath_configured_info{datapath="af_xdp",interface="eth\"0"} 1"#))
        #expect(lines.contains("# TYPE stoq_tls_certificate_not_after_seconds gauge"))
        #expect(lines.contains("stoq_tls_certificate_not_after_seconds 1900000000"))
        // A fixed certificate is not renewed: no renewal counters that would read as "never issued".
        #expect(!m.prometheus().contains("stoq_tls_certificates_issued_total"))
    }

    @Test func renewedCertificateWinsOverTheFixedOne() {
        let renewed = NodeMetrics.Certificate(rotations: 2, failures: 1, notAfter: Date(timeIntervalSince1970: 1_800_000_000))
        let text = NodeMetrics(
            workers: [], store: nil, certificate: renewed, edge: nil, fixedCertificateNotAfter: Self.expiry
        ).prometheus()
        #expect(text.contains("\nstoq_tls_certificate_not_after_seconds 1800000000\n"))
        #expect(text.contains("\nstoq_tls_certificates_issued_total 2\n"))
        #expect(!text.contains("stoq_datapath_configured_info"))
    }

    @Test func limitsFamilies() throws {
        var gate = ObjectGate.Counters()
        (gate.storageCapRefused, gate.writerQuotaRefused, gate.preconditionFailed, gate.overwriteRefused) = (1, 2, 3, 4)
        (gate.storedBytes, gate.owners, gate.inFlightBytes, gate.inFlightUploads) = (5000, 6, 12, 13)
        (gate.digests.recorded, gate.digests.changed, gate.digests.unrecorded) = (9, 10, 11)
        let with = NodeMetrics(
            workers: [], store: nil, certificate: nil, edge: nil,
            limits: .init(gate: gate, rateLimited: 7, rateClients: 8, bodyMemory: (held: 14, limit: 1 << 30))
        ).prometheus()
        for line in [
            #"stoq_limits_quota_refused_total{kind="storage_cap"} 1"#, #"stoq_limits_quota_refused_total{kind="writer_quota"} 2"#,
            "stoq_precondition_failed_total 3", "stoq_overwrite_refused_total 4", "stoq_stored_bytes 5000",
            "stoq_limits_writers 6", "stoq_limits_rate_limited_total 7", "stoq_limits_rate_clients 8",
            #"stoq_plain_digests_total{outcome="recorded"} 9"#, #"stoq_plain_digests_total{outcome="changed"} 10"#,
            #"stoq_plain_digests_total{outcome="unrecorded"} 11"#, "stoq_limits_in_flight_bytes 12", "stoq_limits_in_flight_uploads 13",
            "stoq_limits_body_memory_bytes 14",
        ] {
            #expect(with.contains("\n\(line)\n"), "\(line)")
        }
        // /status says the same, beside the other gate numbers.
        let status = NodeMetrics(
            workers: [], store: nil, certificate: nil, edge: nil,
            limits: .init(gate: gate, rateLimited: 7, rateClients: 8, bodyMemory: (held: 14, limit: 1 << 30))
        ).json()
        let limits = (try JSONSerialization.jsonObject(with: Data(status.utf8)) as? [String: Any])?["limits"] as? [String: Any]
        #expect(limits?["in_flight_bytes"] as? Int == 12 && limits?["in_flight_uploads"] as? Int == 13)
        #expect(limits?["body_memory_held"] as? Int == 14 && limits?["body_memory_limit"] as? Int == 1 << 30)
        // Without rate limits there is no rate family that would read as "never limited".
        let without = NodeMetrics(
            workers: [], store: nil, certificate: nil, edge: nil, limits: .init(gate: gate, rateLimited: nil, rateClients: nil)
        ).prometheus()
        #expect(!without.contains("stoq_limits_rate_limited_total") && without.contains("stoq_stored_bytes 5000"))
    }

    @Test func plainCutFamiliesOnlyWhenTheNodeCuts() throws {
        let cuts = PlainCuts.Counters(cut: 3, failed: 1, chunksServed: 40, chunksStale: 2)
        let m = NodeMetrics(workers: [], store: nil, certificate: nil, edge: nil, plainCuts: cuts)
        for line in [
            "# TYPE stoq_content_plain_cuts_total counter",
            #"stoq_content_plain_cuts_total{outcome="cut"} 3"#, #"stoq_content_plain_cuts_total{outcome="failed"} 1"#,
            #"stoq_content_plain_chunks_total{outcome="served"} 40"#, #"stoq_content_plain_chunks_total{outcome="stale"} 2"#,
        ] {
            #expect(m.prometheus().contains("\n\(line)\n"), "\(line)")
        }
        let json = try #require(JSONSerialization.jsonObject(with: Data(m.json().utf8)) as? [String: Any])
        let p = try #require(json["plain_cuts"] as? [String: UInt64])
        #expect(p == ["cut": 3, "failed": 1, "chunks_served": 40, "chunks_stale": 2])
        // chunking.cut_plain_files = false: no family that would read as "never cut".
        let off = NodeMetrics(workers: [], store: nil, certificate: nil, edge: nil)
        #expect(!off.prometheus().contains("stoq_content_plain"), "\(off.prometheus().split(separator: "\n").filter { $0.contains("plain") })")
        #expect(!off.json().contains("plain_cuts"))
    }

    /// What garbage collection freed and how its runs went, on /metrics and /status.
    @Test func garbageCollectionIsCounted() throws {
        var store = StoreCounters()
        (store.chunksCollected, store.bytesCollected) = (7, 7_000_000)
        var gc = GarbageCollector.Counters()
        (gc.runs, gc.failures) = (5, 1)
        let m = NodeMetrics(workers: [], store: store, certificate: nil, edge: nil, collection: gc)
        for line in [
            "stoq_store_gc_chunks_removed_total 7", "stoq_store_gc_bytes_freed_total 7000000",
            #"stoq_store_gc_runs_total{outcome="completed"} 5"#, #"stoq_store_gc_runs_total{outcome="failed"} 1"#,
        ] {
            #expect(m.prometheus().contains("\n\(line)\n"), "\(line)")
        }
        let json = try #require(JSONSerialization.jsonObject(with: Data(m.json().utf8)) as? [String: Any])
        #expect(json["gc"] as? [String: UInt64] == ["runs": 5, "failures": 1])
        #expect((json["store"] as? [String: Any])?["gc_bytes_freed"] as? UInt64 == 7_000_000)
    }

    /// Refused reloads, whether the last applied, and when the running configuration was loaded:
    /// a refused reload was only a log line.
    @Test func configurationReloadsAreCounted() throws {
        var reloads = NodeMetrics.Reloads(lastSuccess: Date(timeIntervalSince1970: 1_800_000_000))
        (reloads.failures, reloads.lastSucceeded) = (3, false)
        let m = NodeMetrics(workers: [], store: nil, certificate: nil, edge: nil, reloads: reloads)
        for line in [
            "stoq_config_reload_failures_total 3", "stoq_config_last_reload_successful 0",
            "stoq_config_last_reload_success_timestamp_seconds 1800000000",
        ] {
            #expect(m.prometheus().contains("\n\(line)\n"), "\(line)")
        }
        let json = try #require(JSONSerialization.jsonObject(with: Data(m.json().utf8)) as? [String: Any])
        let config = try #require(json["config"] as? [String: Any])
        #expect(config["reload_failures"] as? UInt64 == 3 && config["last_reload_successful"] as? Bool == false)
        #expect(!NodeMetrics(workers: [], store: nil, certificate: nil, edge: nil).prometheus().contains("stoq_config_"))
    }
}
