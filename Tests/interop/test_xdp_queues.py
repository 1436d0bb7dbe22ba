"""The node binds the queues `ethtool -L` made active, not the ones the device was allocated:
on the testbed's veth (2 allocated) cut to 1 channel, AF_XDP on queue 1 failed with EINVAL
and the node did not start. And a node told to bind fewer queues than are active says that
datagrams hashed to the others go to the kernel."""
import json

import pytest

from conftest import need_binary, run
from xdp_testbed import B, PORT, ROOT, VA, XDPNode, in_a, in_b, needs_root, testbed  # noqa: F401 (fixture)

pytestmark = needs_root


def channels(rx, tx=None):
    """Sets the node's end of the veth to `rx` receive and `tx` (default: as many) transmit
    channels, and the peer's to the mirror image (first: veth refuses fewer rx channels than its
    peer has tx channels while XDP is on)."""
    tx = rx if tx is None else tx
    for ns, dev, r_, t_ in ((B, "veth-b", tx, rx), ("stoq-a", VA, rx, tx)):
        r = run(["ip", "netns", "exec", ns, "ethtool", "-L", dev, "rx", str(r_), "tx", str(t_)])
        assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("rx,tx", [(1, 1), (1, 2)], ids=["one-channel", "more-tx-than-rx"])
def test_binds_the_active_queues_only(testbed, rx, tx):
    """A socket binds each receive queue: with 1 rx and 2 tx channels the kernel would let one
    bind queue 1 too, where nothing ever arrives (and zero-copy drivers refuse it)."""
    work, digests = testbed
    run(in_a(ROOT / "scripts/xdp-attach", "--detach", VA))
    channels(rx, tx)
    node = None
    try:
        r = run(in_a(ROOT / "scripts/xdp-attach", VA, "--mode", "native", "--ports", PORT))
        assert r.returncode == 0, r.stderr
        node = XDPNode(work, "native")
        assert f"datapath af_xdp: {VA}, 1 queue(s)" in node.text(), node.text()[-2000:]
        r = run(in_b(need_binary("stoq"), "get", node.url("small.bin"), "--ca", node.cert, "--json"), timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout)["sha256"] == digests["small.bin"]
    finally:
        if node:
            assert node.stop() == 0, node.text()[-2000:]
        run(in_a(ROOT / "scripts/xdp-attach", "--detach", VA))
        channels(2)


def test_fewer_queues_than_active_is_said(testbed):
    work, _ = testbed
    r = run(in_a(ROOT / "scripts/xdp-attach", VA, "--mode", "native", "--ports", PORT))
    assert r.returncode == 0, r.stderr
    node = XDPNode(work, "native", network="queues = 1\n")
    try:
        log = node.text()
        assert f"datapath af_xdp: {VA}, 1 queue(s)" in log, log[-2000:]
        assert (f"network.queues = 1 but {VA} has 2 active queues: datagrams hashed to queue 1 go to the kernel"
                in log), log[-2000:]
    finally:
        assert node.stop() == 0, node.text()[-2000:]
        run(in_a(ROOT / "scripts/xdp-attach", "--detach", VA))
