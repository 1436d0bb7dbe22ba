/// The node's own HTTP paths under `/_stoq/`: one home for the modules that serve them, ask
/// for them, judge them (access policy) and name them (tracing).
public enum NodePaths {
    /// Mesh requests between nodes (`MeshWire` says what they carry).
    public static let meshPrefix = "/_stoq/mesh/"
    /// `GET`: a mesh probe.
    public static let meshProbe = meshPrefix + "probe"
    /// `PUT`: a signed mesh advert; accepted without a credential, as it carries its own.
    public static let meshAdvert = meshPrefix + "advert"
    /// `<relayPrefix><holder>/<hops>/<resource>`: a resource relayed through the mesh.
    public static let relayPrefix = "/_stoq/relay/"
    /// `POST`: which of a list of chunks the node lacks (chunked uploads).
    public static let missing = "/_stoq/missing"
    /// The transparency log's API (RFC 6962 hashing): its signed tree head, its public key
    /// (PEM), `inclusion?hash=<leaf hash hex>[&size=N]`, `consistency?first=M&second=N`.
    public static let logPrefix = "/_stoq/log/"
    public static let logTreeHead = logPrefix + "sth"
    public static let logKey = logPrefix + "key"
    public static let logInclusion = logPrefix + "inclusion"
    public static let logConsistency = logPrefix + "consistency"
}
