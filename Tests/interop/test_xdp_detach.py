"""Detaching the XDP program under a running AF_XDP node, or attaching it again: its workers
move to io_uring on the same address and port, and a transfer in progress completes."""
import json
import subprocess
import time

import pytest

from conftest import need_binary, part_file, run, sha256_file
from xdp_testbed import BIG, PORT, ROOT, VA, XDPNode, in_a, in_b, needs_root, testbed  # noqa: F401 (fixture)

pytestmark = needs_root


@pytest.mark.parametrize("change", ["detach", "attach again"])
def test_detach_during_a_transfer_moves_to_io_uring(testbed, tmp_path, change):
    """Runs last in the module: detaches the program under a 256 MiB download, or attaches it
    again (new maps, in which the node's sockets are not: it saw a program still there and
    stayed on AF_XDP, deaf)."""
    work, digests = testbed
    r = run(in_a(ROOT / "scripts/xdp-attach", VA, "--mode", "native", "--ports", PORT))
    assert r.returncode == 0, r.stderr
    node = XDPNode(work, "native")
    try:
        out = tmp_path / "big.bin"
        get = subprocess.Popen(in_b(need_binary("stoq"), "get", node.url("big.bin"), "-o", out, "--ca", node.cert,
                                    "--json", "--timeout", "120"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        # Detach once the transfer is under way.
        deadline = time.time() + 30
        while time.time() < deadline and (not out.exists() and part_file(out) is None):
            time.sleep(0.05)
        time.sleep(0.3)
        if change == "detach":
            r = run(in_a(ROOT / "scripts/xdp-attach", "--detach", VA))
        else:
            r = run(in_a(ROOT / "scripts/xdp-attach", VA, "--mode", "native", "--ports", PORT))
        assert r.returncode == 0, r.stderr
        stdout, stderr = get.communicate(timeout=180)
        assert get.returncode == 0, stderr[-2000:]
        assert json.loads(stdout)["bytes"] == BIG
        assert sha256_file(out) == digests["big.bin"]
        deadline = time.time() + 5
        while "moved to io_uring" not in node.text() and time.time() < deadline:
            time.sleep(0.1)
        assert "moved to io_uring" in node.text(), node.text()[-2000:]
        # New connections are served too, now over io_uring.
        r = run(in_b(need_binary("stoq"), "get", node.url("small.bin"), "--ca", node.cert, "--json"), timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["sha256"] == digests["small.bin"]
    finally:
        assert node.stop() == 0, node.text()[-2000:]
        run(in_a(ROOT / "scripts/xdp-attach", "--detach", VA))
