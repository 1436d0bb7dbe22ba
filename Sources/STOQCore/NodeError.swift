/// A node failed to start or run. Shared by the node's parts (content, edge cache,
/// certificate renewal, admin API) and its assembly, so that `stoq-node` reports every
/// start-up failure one way; the code names the area.
public struct NodeError: Error, Sendable, CustomStringConvertible {
    /// The area that failed; extensible.
    public struct Code: Hashable, Sendable {
        let name: String
        public static let storage = Code(name: "storage")
        public static let identity = Code(name: "identity")
        public static let datapath = Code(name: "datapath")
        public static let config = Code(name: "config")
    }
    /// What failed.
    public var code: Code
    /// What happened, naming the file, key or address involved.
    public var message: String
    /// An error of `code` saying `message`.
    public init(_ code: Code, _ message: String) { self.code = code; self.message = message }
    /// The message.
    public var description: String { message }
}
