/// One thing wrong with a config file, naming the key, the value and what is allowed.
public struct ConfigError: Error, Sendable, Equatable, CustomStringConvertible {
    public struct Code: Hashable, Sendable {
        let name: String
        public static let syntax = Code(name: "syntax")
        public static let io = Code(name: "io")
        public static let unknownKey = Code(name: "unknown key")
        public static let badType = Code(name: "bad type")
        public static let badValue = Code(name: "bad value")
        public static let outOfRange = Code(name: "out of range")
        public static let ipv4NotSupported = Code(name: "IPv4 not supported")
    }
    public var code: Code
    /// Dotted key, e.g. `network.listen_addr`; empty for file-level errors.
    public var key: String
    /// The value as written.
    public var value: String
    /// What would have been accepted.
    public var allowed: String

    public var description: String {
        if key.isEmpty { return allowed }
        return "\(key) = \(value): \(code.name); expected \(allowed)"
    }
}

/// Every error a config file has, so an operator can fix them all in one go.
public struct ConfigErrors: Error, Sendable, CustomStringConvertible {
    /// Where the config came from.
    public var source: String
    public var errors: [ConfigError]
    public var description: String {
        errors.map { "\(source): \($0)" }.joined(separator: "\n")
    }
}
