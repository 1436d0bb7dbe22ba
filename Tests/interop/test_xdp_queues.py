"""The node binds the queues `ethtool -L` made active, not the ones the device was allocated:
on the testbed's veth (2 allocated) cut to 1 channel, AF_XDP on queue 1 failed with EINVAL
and the node did not start. And a node told to bind fewer queues than are active says that
datagrams hashed to the others go to the kernel."""
import json

from conftest import need_binary, run
from xdp_testbed import B, PORT, ROOT, VA, XDPNode, in_a, in_b, needs_root, testbed  # noqa: F401 (fixture)

pytestmark = needs_root


def channels(n):
    """Sets both ends of the veth to `n` rx and tx channels (the peer first: veth refuses fewer
    rx channels than its peer has tx channels while XDP is on)."""
    for ns, dev in ((B, "veth-b"), ("stoq-a", VA)):
        r = run(["ip", "netns", "exec", ns, "ethtool", "-L", dev, "rx", str(n), "tx", str(n)])
        assert r.returncode == 0, r.stderr


def test_binds_the_active_queues_only(testbed):
    work, digests = testbed
    run(in_a(ROOT / "scripts/xdp-attach", "--detach", VA))
    channels(1)
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
