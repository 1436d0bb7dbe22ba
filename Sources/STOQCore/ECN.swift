/// The two ECN bits of the IP header (RFC 3168), passed between datapath and QUIC untouched.
public enum ECN: UInt8, Sendable {
    case notECT = 0
    case ect1 = 1
    case ect0 = 2
    case ce = 3
}
