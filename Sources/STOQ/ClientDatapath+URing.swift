import STOQCore
import STOQDatapathURing
import STOQTransfer

extension ClientDatapath {
    /// The library's (and the `stoq` CLI's) one choice of backend for a client: io_uring UDP,
    /// because it works on any interface (loopback, veth, any NIC) without an XDP program or
    /// root, and a client sends one connection's worth of datagrams, which AF_XDP would not
    /// speed up. Pass another `ClientDatapath` to STOQTransfer's functions to use another.
    public static let ioUring = ClientDatapath {
        try URingDatapathQueue(bind: IPv6Endpoint(address: .any, port: 0))
    }
}
