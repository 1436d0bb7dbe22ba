import STOQAccess
import STOQCore
import Testing

@Suite struct AccessPolicyTests {
    let anon = AccessPrincipal.anonymous(IPv6Address("2001:db8:1:2:aaaa:bbbb:cccc:dddd")!)

    func token(_ role: AccessRole, _ prefixes: [String], _ methods: [String]) -> AccessPrincipal {
        .token(AccessClaims(subject: "alice", issuedAt: 0, expires: 1, role: role, scope: AccessScope(prefixes: prefixes, methods: methods)))
    }

    @Test func identities() {
        #expect(anon.identity == "addr:2001:db8:1:2::/64")
        #expect(token(.writer, ["/"], ["*"]).identity == "token:alice")
        #expect(AccessPrincipal.certificate(CertificateIdentity(subject: "bob", roles: [.reader])).identity == "cert:bob")
    }

    @Test func writesNeedACredentialByDefault() {
        let p = AccessPolicy()
        for (m, path) in [("PUT", "/objects/x"), ("DELETE", "/objects/x"), ("PUT", "/chunks/ab"), ("PUT", "/manifests/x"), ("POST", "/_stoq/missing")] {
            #expect(p.decide(method: m, path: path, principal: anon).status == 401, "\(m) \(path)")
        }
        #expect(p.decide(method: "GET", path: "/objects/x", principal: anon).allowed)
        #expect(p.decide(method: "HEAD", path: "/chunks/ab", principal: anon).allowed)
        // Adverts are signed by their origin node.
        #expect(p.decide(method: "PUT", path: "/_stoq/mesh/advert", principal: anon).allowed)
        #expect(AccessPolicy(write: .public).decide(method: "PUT", path: "/objects/x", principal: anon).allowed)
    }

    @Test func tokenScopeLimitsPrefixesMethodsAndRole() {
        let p = AccessPolicy()
        let a = token(.writer, ["/objects/a-"], ["PUT", "DELETE"])
        #expect(p.decide(method: "PUT", path: "/objects/a-x", principal: a).allowed)
        #expect(p.decide(method: "DELETE", path: "/objects/a-x", principal: a).allowed)
        #expect(p.decide(method: "PUT", path: "/objects/b-x", principal: a) == .forbidden("token for /objects/a- may not write /objects/b-x"))
        #expect(p.decide(method: "PUT", path: "/manifests/a-x", principal: a).allowed)
        #expect(p.decide(method: "PUT", path: "/manifests/b-x", principal: a).status == 403)
        // Chunks name no object; the missing-chunks query is part of a PUT.
        #expect(p.decide(method: "PUT", path: "/chunks/00ff", principal: a).allowed)
        #expect(p.decide(method: "POST", path: "/_stoq/missing", principal: a).allowed)
        let putOnly = token(.writer, ["/"], ["PUT"])
        #expect(p.decide(method: "DELETE", path: "/objects/x", principal: putOnly) == .forbidden("token for alice may not DELETE (it allows PUT)"))
        let reader = token(.reader, ["/"], ["*"])
        #expect(p.decide(method: "PUT", path: "/objects/x", principal: reader) == .forbidden("token for alice has role reader, which may not write /objects/x"))
        #expect(p.decide(method: "PUT", path: "/anything", principal: token(.admin, ["/nothing/"], ["GET"])).allowed)
    }

    @Test func certificateRoles() {
        let p = AccessPolicy()
        let reader = AccessPrincipal.certificate(CertificateIdentity(subject: "r", roles: [.reader]))
        let writer = AccessPrincipal.certificate(CertificateIdentity(subject: "w", roles: [.reader, .writer]))
        let none = AccessPrincipal.certificate(CertificateIdentity(subject: "n", roles: []))
        #expect(p.decide(method: "PUT", path: "/objects/x", principal: reader) == .forbidden("certificate r has role reader, which may not write /objects/x"))
        #expect(p.decide(method: "PUT", path: "/objects/x", principal: none).status == 403)
        #expect(p.decide(method: "PUT", path: "/objects/x", principal: writer).allowed)
        // The encoded form the TLS layer carries.
        let id = CertificateIdentity(subject: "CN=a|b", roles: [.writer, .admin], key: "0a1b")
        #expect(id.encoded == "writer,admin|0a1b|CN=a|b")
        #expect(CertificateIdentity(encoded: id.encoded) == id)
        #expect(CertificateIdentity(encoded: "|") == nil && CertificateIdentity(encoded: "") == nil)
        #expect(CertificateIdentity.role(fromURI: "urn:stoq:role:writer") == .writer)
        #expect(CertificateIdentity.role(fromURI: "urn:stoq:role:root") == nil)
        #expect(CertificateIdentity.role(fromURI: "https://example/") == nil)
    }

    @Test func readRulesLongestPrefixWins() {
        let p = AccessPolicy(read: ["/objects/private-": .token, "/objects/private-open-": .public, "/objects/staff-": .certificate])
        #expect(p.readRule(for: "/objects/x") == .public)
        #expect(p.readRule(for: "/objects/private-x") == .token)
        #expect(p.readRule(for: "/objects/private-open-x") == .public)
        #expect(p.readRule(for: "/manifests/private-x") == .token)
        #expect(p.readRule(for: "/_stoq/relay/n1/2/manifests/private-x") == .token)
        #expect(p.decide(method: "GET", path: "/objects/private-x", principal: anon).status == 401)
        #expect(p.decide(method: "GET", path: "/objects/private-open-x", principal: anon).allowed)
        #expect(p.decide(method: "GET", path: "/objects/private-x", principal: token(.reader, ["/objects/private-"], ["GET"])).allowed)
        #expect(p.decide(method: "HEAD", path: "/objects/private-x", principal: token(.reader, ["/objects/private-"], ["GET"])).allowed)
        #expect(p.decide(method: "GET", path: "/objects/private-x", principal: token(.reader, ["/objects/other-"], ["GET"])).status == 403)
        #expect(p.decide(method: "GET", path: "/objects/private-x", principal: token(.writer, ["/"], ["PUT"])).status == 403)
        let cert = AccessPrincipal.certificate(CertificateIdentity(subject: "s", roles: [.reader]))
        #expect(p.decide(method: "GET", path: "/objects/private-x", principal: cert).status == 403)
        #expect(p.decide(method: "GET", path: "/objects/staff-x", principal: cert).allowed)
        #expect(p.decide(method: "GET", path: "/objects/staff-x", principal: anon).status == 401)
        #expect(p.decide(method: "GET", path: "/objects/staff-x", principal: token(.admin, ["/"], ["*"])).allowed)
    }
}
