import CSTOQXDP
import Glibc
import STOQDatapath

/// What `stoq xdp status` shows: how STOQ's XDP program is attached to an interface and
/// its verdict counters (summed over CPUs), read from the maps scripts/xdp-attach pinned.
public struct XDPProgramStatus: Sendable {
    /// "native", "skb", "hw", "multi" (libxdp dispatcher), or "none".
    public var mode: String
    /// The attached program's id (0: none).
    public var programID: UInt32
    /// Counter name → value, in the program's order; empty when no maps are pinned. Maps of
    /// another layout version (another build's) are refused rather than read under wrong names.
    public var counters: [(name: String, value: UInt64)]
    /// Where the maps are pinned.
    public var pinDirectory: String

    /// Reads the status of `interface` in the calling thread's network namespace.
    public static func read(interface: String, pinRoot: String = "/sys/fs/bpf/stoq") throws(DatapathError) -> XDPProgramStatus {
        var mode = [CChar](repeating: 0, count: 16)
        var id: UInt32 = 0
        let rc = stoq_xdp_query(interface, &mode, mode.count, &id)
        if rc == -ENODEV { throw DatapathError(.open, operation: "if_nametoindex", message: "no interface \(interface)") }
        if rc < 0 { throw DatapathError(.open, operation: "bpf_xdp_query", errno: -rc) }
        let dir = "\(pinRoot)/\(interface)"
        var err = [CChar](repeating: 0, count: 512)
        let abi = stoq_xdp_check_maps(dir, &err, err.count)
        if abi == -EPROTO {
            let msg = String(cBuffer: err)
            throw DatapathError(.open, engineMessage: msg)
        }
        var values = [UInt64](repeating: 0, count: 64)
        let n = stoq_xdp_read_stats(dir, &values, Int32(values.count))
        var counters: [(String, UInt64)] = []
        var name = [CChar](repeating: 0, count: 32)
        for i in 0..<max(0, Int(n)) {
            counters.append((String(cString: stoq_xdp_stat_name(Int32(i), &name, name.count)), values[i]))
        }
        return XDPProgramStatus(mode: String(cBuffer: mode), programID: id, counters: counters, pinDirectory: dir)
    }
}
