import Foundation
import Testing
@testable import STOQAdmin

/// The stand-in verifier for `admin.auth = "token"`: the token in `admin.token_file`.
@Suite struct AdminBearerTokenTests {
    let token = AdminBearerToken(token: "s3cret-token")

    @Test func acceptsExactlyTheTokenAsABearer() {
        #expect(token.authorize("Bearer s3cret-token") == .allow)
        #expect(token.authorize("bearer s3cret-token") == .allow)
        #expect(token.authorize("  Bearer   s3cret-token ") == .allow)
    }

    @Test(arguments: ["Bearer s3cret-toke", "Bearer s3cret-token2", "Bearer S3cret-token", "Bearer "])
    func refusesAnyOtherToken(_ header: String) {
        #expect(token.authorize(header) == .deny(header == "Bearer " ? "the Authorization header is not a Bearer token" : "wrong bearer token"))
    }

    @Test func saysWhatIsMissing() {
        #expect(token.authorize("") == .deny("no Authorization header: send Authorization: Bearer <token>"))
        #expect(token.authorize("Basic czNjcmV0") == .deny("the Authorization header is not a Bearer token"))
    }

    @Test func readsTheFileTrimmed() throws {
        let path = NSTemporaryDirectory() + "/stoq-admin-token-\(UInt64.random(in: 0...UInt64.max))"
        defer { unlink(path) }
        try "  tok-from-file\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(try AdminBearerToken(file: path).authorize("Bearer tok-from-file") == .allow)
        try "\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect { try AdminBearerToken(file: path) } throws: { "\($0)" == "admin.token_file = \"\(path)\": the file is empty" }
        #expect { try AdminBearerToken(file: path + ".missing") } throws: {
            "\($0)" == "admin.token_file = \"\(path).missing\": cannot read the file: No such file or directory"
        }
    }
}
