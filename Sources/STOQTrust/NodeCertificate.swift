import X509

/// What makes a certificate a mesh node's, the one rule for who signs adverts, whose probe
/// answers make a neighbour, and whose connections count as a node's (unlimited mesh paths,
/// adverts queued by the node's key). A node's certificate grants no access role (a user's
/// client certificate, issued under the same roots, carries its roles) and may authenticate a
/// server, as every node does; a certificate without serverAuth (clientAuth only) is a
/// client's. An advert's chain is also verified as a client's (`Node.advertVerifier`, as a
/// neighbour connecting with mutual TLS is), so a node that signs adverts needs clientAuth
/// too: `stoq trust issue` with a name or address, the embedded CA and STOQ's ACME server give
/// both; a public ACME CA may give serverAuth alone.
public enum NodeCertificate {
    /// What the SAN URI of every access role starts with (`urn:stoq:role:writer`).
    public static let roleURIPrefix = "urn:stoq:role:"

    /// Why `leaf` is not a node's certificate; nil when it is one.
    public static func refusal(_ leaf: Certificate) -> String? {
        let uris: [String]
        do {
            uris = try CertificateSummary.uris(leaf)
        } catch {
            return "the certificate's subjectAltName does not parse (\(error))"
        }
        if let role = uris.first(where: { $0.hasPrefix(roleURIPrefix) }) {
            return "the certificate grants an access role (\(role)): a user's, not a node's"
        }
        do {
            if let usages = try leaf.extensions.extendedKeyUsage, !usages.contains(.serverAuth), !usages.contains(.any) {
                let named = usages.map(\.description).joined(separator: ", ")
                return "the certificate allows no serverAuth (\(named.isEmpty ? "no usage" : named + " only")): a client's, not a node's"
            }
        } catch {
            return "the certificate's extendedKeyUsage does not parse (\(error))"
        }
        return nil
    }
}
