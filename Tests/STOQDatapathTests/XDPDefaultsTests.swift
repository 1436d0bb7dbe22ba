#if AFXDP
import STOQDatapathXDP
import STOQQUIC
import Testing

/// Defaults the AF_XDP engine (C, `CSTOQXDP.h`) shares with the QUIC endpoint (Swift), which
/// cannot see each other (STOQQUIC never imports a datapath): checked to agree here.
@Suite struct XDPDefaultsTests {
    /// A socket's neighbour table holds, by default, the connections a worker keeps at
    /// `network.max_connections`' default: STOQ_XSK_DEFAULT_NEIGHBOUR_PEERS (XDPOptions'
    /// default) is `QUICSettings.maxConnections`' default, and the engine's 0 means it too.
    @Test func theNeighbourTableIsSizedForTheDefaultMaxConnections() {
        let options = XDPOptions(interface: "veth-a")
        #expect(options.neighbourPeers == QUICSettings().maxConnections)
        var zero = options
        zero.neighbourPeers = 0
        #expect(zero.neighbourTableSlots == options.neighbourTableSlots)
    }
}
#endif
