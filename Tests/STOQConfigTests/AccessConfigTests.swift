import STOQAccess
import STOQConfig
import Testing

@Suite struct AccessConfigTests {
    func errors(_ text: String) -> [String] {
        do { _ = try ConfigLoader.parse(text); return [] } catch { return error.errors.map { "\($0.key): \($0.allowed)" } }
    }

    @Test func defaultsAndAValidSection() throws {
        #expect(NodeConfig.default.access.write == .authorized)
        #expect(NodeConfig.default.access.policy.readRule(for: "/objects/x") == .public)
        let c = try ConfigLoader.parse(
            """
            [access]
            write = "public"
            read = { "/objects/private-" = "token", "/objects/staff-" = "certificate" }
            token_keys = ["other.pem"]
            """)
        #expect(c.access.write == .public)
        #expect(c.access.read == ["/": .public, "/objects/private-": .token, "/objects/staff-": .certificate])
        #expect(c.access.tokenKeys == ["other.pem"])
        #expect(c.access.policy.readRule(for: "/objects/private-1") == .token)
    }

    @Test func everyErrorNamesItsKey() {
        #expect(errors("[access]\nwrite = \"open\"") == [#"access.write: one of "authorized", "public""#])
        #expect(errors("[access]\nread = \"token\"").first?.hasPrefix("access.read: an inline table") == true)
        #expect(
            errors("[access]\nread = { \"objects\" = \"token\" }") == [
                #"access.read."objects": a path prefix starting with / as the key (e.g. "/objects/private/")"#
            ])
        #expect(errors("[access]\nread = { \"/x/\" = \"secret\" }") == [#"access.read."/x/": one of "public", "token", "certificate""#])
        #expect(errors("[access]\ntoken_keys = [\"\"]").first?.hasPrefix("access.token_keys:") == true)
        #expect(errors("[access]\nwho = 1").first?.hasPrefix("access.who:") == true)
    }
}
