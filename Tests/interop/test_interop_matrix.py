"""The QUIC interop runner's cases (Tests/interop/interop_matrix.py), shortened: each case once with
STOQ as the server and once as the client, against ngtcp2 or aioquic in turn (the full matrix,
every peer and full-size files: scripts/interop-matrix). Each checks what the runner checks:
files byte-identical, handshakes counted in the server's capture, and the case's packet-level
condition read from the captures with the keys both ends logged."""
import os

import pytest

import interop_matrix as m

PEERS = ["ngtcp2", "aioquic"]


def peer(name, i, pair):
    """The other peer for case `name`: alternating from case to case, but not one known to
    fail the case itself (m.KNOWN_PEER_FAILURES) while the other can play it."""
    order = [PEERS[i % 2], PEERS[(i + 1) % 2]]
    return next((p for p in order if pair(p) not in m.KNOWN_PEER_FAILURES), order[0])


# Every case, STOQ in each role.
PARAMS = []
for i, name in enumerate(m.CASES):
    c = peer(name, i, lambda p: (name, "stoq", p))
    s = peer(name, i + 1, lambda p: (name, p, "stoq"))
    PARAMS.append(pytest.param(name, "stoq", c, id=f"{name}-stoq-serves-{c}"))
    PARAMS.append(pytest.param(name, s, "stoq", id=f"{name}-stoq-fetches-from-{s}"))


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the interop matrix needs root: network namespaces, ip6tables, dumpcap")
    for t in ("tshark", "dumpcap", "ip6tables-legacy", "tc", "gtlsclient", "gtlsserver"):
        try:
            m.tool(t)
        except RuntimeError as e:
            pytest.fail(str(e))
    for exe in ("stoq", "stoq-node"):
        if not (m.bin_dir() / exe).exists():
            pytest.skip(f"{exe} not built in {m.bin_dir()}: run `swift build` first (scripts/test does)")
    tb = m.Testbed(tmp_path_factory.mktemp("matrix"), prefix="iqt")
    tb.up()
    yield tb
    tb.reset()
    tb.down()


@pytest.mark.parametrize("case,server,client", PARAMS)
def test_interop_case(testbed, case, server, client):
    c = m.shortened(m.CASES[case])
    known = m.KNOWN_STOQ_FAILURES.get((case, server, client))
    res = m.run_case(testbed, c, server, client, testbed.work / case / f"{server}-{client}")
    if res.status == "not-implemented":
        pytest.skip(f"not implemented: {res.reason}")
    if res.status == "skip":
        pytest.skip(res.reason)
    if known:
        # A STOQ failure reported and not fixed yet: it must still fail (strict), the way it did.
        assert res.status == "fail", f"{case} {server}/{client} passes now: remove it from KNOWN_STOQ_FAILURES"
        pytest.xfail(f"{known} (now: {res.reason})")
    assert res.status == "pass", f"{res.reason} (captures, keys, logs: {res.dir})"


def test_migration_check_needs_the_client_to_move_and_stay():
    """check_migration on made-up traces: it passes only when the offered preferred address got
    the client's 1-RTT packets to the end and answered them (each other trace names what is
    missing)."""
    srv, pa, cli = m.SERVER_ADDR, m.PREFERRED_ADDR, m.CLIENT_ADDR
    offer = m.QuicPacket(2, "", "", 0, 0, 100, {"tls.quic.parameter.preferred_address.ipv6address": pa})
    one_rtt = lambda: m.QuicPacket(-1, "", "", 0, 0, 50, {})

    def dgram(src, dst, *pkts):
        return m.Datagram(src, dst, m.PORT if src != cli else 50000, m.PORT if dst != cli else 50000, 0, 100,
                          list(pkts))

    class T:
        def __init__(self, client):
            self.client = client

    moved = [dgram(srv, cli, offer), dgram(cli, srv, one_rtt()), dgram(cli, pa, one_rtt()), dgram(pa, cli, one_rtt())]
    assert m.check_migration(None, T(moved)) is None
    assert "offer no preferred_address" in m.check_migration(None, T(moved[1:]))
    assert "no 1-RTT packet to the preferred address" in m.check_migration(None, T(moved[:2]))
    assert "moved back" in m.check_migration(None, T(moved + [dgram(cli, srv, one_rtt())]))
    assert "never answered" in m.check_migration(None, T(moved[:3]))
