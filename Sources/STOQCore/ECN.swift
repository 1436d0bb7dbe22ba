/// The two ECN bits of the IP header (RFC 3168), passed between datapath and QUIC untouched.
public enum ECN: UInt8, Sendable {
    case notECT = 0
    case ect1 = 1
    case ect0 = 2
    case ce = 3

    /// The codepoint in the low two bits of `bits` (every value of two bits is one).
    @inline(__always)
    public init(lowBitsOf bits: UInt8) {
        switch bits & 3 {
        case 0: self = .notECT
        case 1: self = .ect1
        case 2: self = .ect0
        default: self = .ce
        }
    }
}
