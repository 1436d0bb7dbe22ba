import STOQCore
import Testing
@testable import STOQConfig

/// `[admin]`: the admin API refuses to be reachable beyond loopback without authentication.
@Suite struct AdminConfigTests {
    func errors(_ text: String) -> [ConfigError] {
        do {
            _ = try ConfigLoader.parse(text, source: "node.toml")
            return []
        } catch { return error.errors }
    }

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
