import STOQCore
import Testing
@testable import STOQConfig

/// `[admin]`: the admin API refuses to be reachable beyond loopback without authentication.
@Suite struct AdminConfigTests {
    func errors(_ text: String) -> [ConfigError] { configErrors(text, source: "node.toml") }

    @Test(arguments: ["[::]:9090", "[2001:db8::10]:9464", "[::2]:9464"])
    func aNonLoopbackAddressWithoutAuthIsRefused(_ listen: String) throws {
        let e = errors("[admin]\nlisten = \"\(listen)\"\n")
        #expect(e.count == 1)
        #expect(e.first?.key == "admin.listen")
        #expect(e.first?.code == .unsafe)
        #expect(e.first?.description == "admin.listen = \"\(listen)\" is not loopback: set admin.auth = \"token\" or \"mtls\"")
        // Explicitly "none" is the same refusal.
        #expect(errors("[admin]\nlisten = \"\(listen)\"\nauth = \"none\"\n").first?.code == .unsafe)
    }

    /// Admin mTLS checks clients against the node's CA or `trust.bundle`: with neither (a
    /// certificate of the operator's, no bundle) it would refuse every scraper. Refused by name.
    @Test func mTLSWithoutTheNodesCANeedsABundle() throws {
        let cert = "[tls]\ncert_file = \"/etc/stoq/cert.pem\"\nkey_file = \"/etc/stoq/key.pem\"\n"
        let e = errors(cert + "[admin]\nlisten = \"[::]:9464\"\nauth = \"mtls\"\n")
        #expect(e.map(\.key) == ["trust.bundle"])
        #expect(e.first?.description.contains("when admin.auth = \"mtls\"; the node does not run its own CA") == true, "\(e)")
        #expect(errors(cert + "[admin]\nlisten = \"[::]:9464\"\nauth = \"mtls\"\n[trust]\nbundle = \"/etc/stoq/roots.pem\"\n").isEmpty)
        #expect(errors("[admin]\nlisten = \"[::]:9464\"\nauth = \"mtls\"\n").isEmpty, "the node's own CA verifies them")
    }

    @Test func theWholeMessageNamesTheFile() throws {
        #expect(throws: ConfigErrors.self) { try ConfigLoader.parse("[admin]\nlisten = \"[::]:9090\"\n", source: "node.toml") }
        do {
            _ = try ConfigLoader.parse("[admin]\nlisten = \"[::]:9090\"\n", source: "node.toml")
        } catch {
            #expect(error.description == "node.toml: admin.listen = \"[::]:9090\" is not loopback: set admin.auth = \"token\" or \"mtls\"")
            #expect(error.code == .invalid)
        }
    }

    @Test func loopbackNeedsNothing() throws {
        let c = try ConfigLoader.parse("[admin]\nlisten = \"[::1]:0\"\n")
        #expect(c.admin.listen == IPv6Endpoint(address: .loopback, port: 0))
        #expect(c.admin.auth == .none)
        // Off needs nothing either.
        #expect(try ConfigLoader.parse("[admin]\nlisten = \"\"\n").admin.listen == nil)
    }

    @Test func tokenOrMTLSAllowsAnyAddress() throws {
        let t = try ConfigLoader.parse("[admin]\nlisten = \"[::]:9090\"\nauth = \"token\"\ntoken_file = \"/etc/stoq/admin-token\"\n")
        #expect(t.admin.auth == .token && t.admin.tokenFile == "/etc/stoq/admin-token")
        #expect(try ConfigLoader.parse("[admin]\nlisten = \"[::]:9090\"\nauth = \"mtls\"\n").admin.auth == .mtls)
    }

    /// A token is an admin-role access token; `token_file` only adds a fixed secret.
    @Test func tokenNeedsNoFileAndAuthIsOneOfThree() throws {
        let c = try ConfigLoader.parse("[admin]\nlisten = \"[::]:9090\"\nauth = \"token\"\n")
        #expect(c.admin.auth == .token && c.admin.tokenFile.isEmpty)
        #expect(
            errors("[admin]\nauth = \"password\"\n").first?.description == "admin.auth = \"password\": bad value; expected one of \"none\", \"token\", \"mtls\""
        )
    }
}
