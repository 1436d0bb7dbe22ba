import Synchronization

/// A value any thread reads and one (a reload, say) replaces whole.
public final class Replaceable<Value: Sendable>: Sendable {
    private let value: Mutex<Value>

    /// Holds `initial`.
    public init(_ initial: Value) { value = Mutex(initial) }

    /// The value now.
    public var current: Value { value.withLock { $0 } }

    /// Puts `new` in its place.
    public func replace(_ new: Value) { value.withLock { $0 = new } }
}
