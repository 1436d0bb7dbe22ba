import Testing
@testable import STOQConfig

/// `log.qlog_dir` and `log.qlog_sample`.
@Suite struct QLogConfigTests {
    func errors(_ text: String) -> [String] {
        do {
            _ = try ConfigLoader.parse(text, source: "t.toml")
            return []
        } catch { return error.errors.map(\.description) }
    }

    @Test func offByDefault() {
        #expect(NodeConfig.default.log.qlogDir == "")
        #expect(NodeConfig.default.log.qlogSample == 1.0)
    }

    @Test func readsDirectoryAndSample() throws {
        let c = try ConfigLoader.parse("[log]\nqlog_dir = \"/var/log/stoq/qlog\"\nqlog_sample = 0.01\n")
        #expect(c.log.qlogDir == "/var/log/stoq/qlog")
        #expect(c.log.qlogSample == 0.01)
        #expect(c.notices.allSatisfy { !$0.hasPrefix("log:") })
        // 0 and 1 may be written as integers.
        #expect(try ConfigLoader.parse("[log]\nqlog_dir = \"q\"\nqlog_sample = 0\n").log.qlogSample == 0)
        #expect(try ConfigLoader.parse("[log]\nqlog_dir = \"q\"\nqlog_sample = 1\n").log.qlogSample == 1)
    }

    @Test func refusesBadValuesNamingTheKey() {
        let allowed = "a number from 0.0 to 1.0, the fraction of connections (0.01 = one in a hundred)"
        #expect(errors("[log]\nqlog_sample = 1.5\n") == ["log.qlog_sample = 1.5: out of range; expected \(allowed)"])
        #expect(errors("[log]\nqlog_sample = -0.1\n") == ["log.qlog_sample = -0.1: out of range; expected \(allowed)"])
        #expect(errors("[log]\nqlog_sample = 2\n") == ["log.qlog_sample = 2: out of range; expected \(allowed)"])
        #expect(errors("[log]\nqlog_sample = \"1%\"\n") == ["log.qlog_sample = \"1%\": bad type; expected \(allowed)"])
        #expect(errors("[log]\nqlog_sample = nan\n") == ["log.qlog_sample = nan: out of range; expected \(allowed)"])
        #expect(errors("[log]\nqlog_dir = 5\n") == ["log.qlog_dir = 5: bad type; expected a string"])
        #expect(errors("[log]\nqlog = \"x\"\n").first?.hasPrefix("log.qlog = \"x\": unknown key; expected one of level, qlog_dir, qlog_sample") == true)
    }

    /// A sample with qlog off is not an error (the directory may be set at the next reload), but
    /// it is said.
    @Test func sampleWithoutDirectoryIsANotice() throws {
        let c = try ConfigLoader.parse("[log]\nqlog_sample = 0.5\n")
        #expect(c.notices.contains("log: qlog_sample = 0.5 has no effect while log.qlog_dir is empty (qlog is off)"))
    }
}
