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
        /// A value that is well formed but unsafe with the rest of the file; `allowed` then
        /// says what is wrong and what to set instead.
        public static let unsafe = Code(name: "unsafe")
    }
    public var code: Code
    /// Dotted key, e.g. `network.listen_addr`; empty for file-level errors.
    public var key: String
    /// The value as written.
    public var value: String
    /// What would have been accepted (for `.unsafe`: why not, and what to set instead).
    public var allowed: String

    public var description: String {
        if key.isEmpty { return allowed }
        if code == .unsafe { return "\(key) = \(value) \(allowed)" }
        return "\(key) = \(value): \(code.name); expected \(allowed)"
    }
}

/// Every error a config file has, so an operator can fix them all in one go.
///
/// The same shape as every STOQ error: its `Code` says whether the file could be read at all.
public struct ConfigErrors: Error, Sendable, CustomStringConvertible {
    /// Whether the file was read; each of `errors` carries its own `ConfigError.Code`.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// Stable name.
        public let name: String
        /// Creates a code; STOQ's own are the static members.
        public init(name: String) { self.name = name }
        /// The file could not be read (`errors` holds one `.io` error).
        public static let unreadable = Code(name: "unreadable")
        /// The file was read and breaks at least one rule (syntax, keys, values).
        public static let invalid = Code(name: "invalid")
        public var description: String { name }
    }

    /// Whether the file could be read; derived from `errors`, so it never disagrees with them.
    public var code: Code { errors.contains { $0.code == .io } ? .unreadable : .invalid }
    /// Every error, one line each, prefixed by `source`.
    public var message: String { description }
    /// Where the config came from.
    public var source: String
    /// Every error found, in file order.
    public var errors: [ConfigError]
    public var description: String {
        errors.map { "\(source): \($0)" }.joined(separator: "\n")
    }
}
