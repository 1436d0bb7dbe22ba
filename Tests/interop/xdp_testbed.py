"""Shared by the AF_XDP end-to-end tests: the testbed, on the testbed (two network namespaces over a
two-queue veth): the real XDP program attached by scripts/xdp-attach in native and
in generic (skb) mode, stoq-node on AF_XDP sockets, and clients in the other
namespace. Needs root (namespaces, bpf()); skipped, loudly, without it."""
import json
import os
import re
import signal
import subprocess

import pytest

from conftest import ROOT, need_binary, read_banner, run, sha256_file

A, B, VA = "stoq-a", "stoq-b", "veth-a"
ADDR_A, ADDR_B = "fd00:5704::1", "fd00:5704::2"
IPV4_A, IPV4_B = "192.0.2.1", "192.0.2.2"  # TEST-NET-1, only on the testbed's own veth
PORT = 4433
BIG = 256 << 20

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="AF_XDP tests need root (namespaces, bpf()): SKIPPED")


def in_a(*cmd):
    """Runs in stoq-a's network namespace but the root mount namespace (unlike
    `ip netns exec`), so the maps xdp-attach pins under /sys/fs/bpf stay visible."""
    return ["nsenter", f"--net=/run/netns/{A}", *[str(c) for c in cmd]]


def in_b(*cmd):
    return ["ip", "netns", "exec", B, *[str(c) for c in cmd]]


def counters():
    """The XDP program's counters, as `stoq xdp status --json` reads them from the pinned map."""
    r = run(in_a(need_binary("stoq"), "xdp", "status", VA, "--json"))
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["mode"] in ("native", "skb", "multi"), status
    return status["counters"]


class XDPNode:
    def __init__(self, workdir, mode, workers=0, network=""):
        """`network`: more [network] lines."""
        self.workdir = workdir
        self.mode = mode
        cfg = workdir / f"node-{mode}.toml"
        cfg.write_text(
            f'[node]\ndata_dir = "{workdir}/data"\n[network]\nlisten_addr = "[{ADDR_A}]:{PORT}"\n'
            f'datapath = "af_xdp"\ninterface = "{VA}"\nxdp_mode = "{mode}"\nworkers = {workers}\n{network}'
            f'[storage]\npath = "{workdir}/objects"\ncontent_path = "{workdir}/content"\n'
            f'[admin]\nlisten = "[::1]:0"\n')
        self.logpath = workdir / f"node-{mode}.log"
        self.log = open(self.logpath, "w+")
        self.proc = subprocess.Popen(in_a(need_binary("stoq-node"), "--config", cfg, "--log-level", "info"),
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        read_banner(self)

    def text(self):
        self.log.flush()
        return self.logpath.read_text()

    def url(self, name):
        return f"https://[{ADDR_A}]:{PORT}/objects/{name}"

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -999


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    for tool in ("nsenter", "bpftool", "gtlsclient"):
        if not subprocess.run(["which", tool], capture_output=True).returncode == 0:
            pytest.fail(f"{tool} missing: scripts/install-deps installs it")
    r = run([ROOT / "scripts/testbed", "up", "--xdp", "--queues", "2"])
    assert r.returncode == 0, r.stderr
    work = tmp_path_factory.mktemp("xdp")
    (work / "objects").mkdir()
    digests = {}
    for name, size in (("big.bin", BIG), ("small.bin", 65536)):
        with open(work / "objects" / name, "wb") as f:
            left = size
            while left:
                n = min(left, 1 << 22)
                f.write(os.urandom(n))
                left -= n
        digests[name] = sha256_file(work / "objects" / name)
    yield work, digests
    run(in_a(ROOT / "scripts/xdp-attach", "--detach", VA))
    run([ROOT / "scripts/testbed", "down"])


@pytest.fixture(scope="module", params=["native", "skb"])
def xdp_node(request, testbed):
    work, digests = testbed
    # native through libxdp's dispatcher, skb as the program alone (bpftool): both attach paths.
    extra = ["--no-dispatcher"] if request.param == "skb" else []
    r = run(in_a(ROOT / "scripts/xdp-attach", VA, "--mode", request.param, "--ports", PORT, *extra))
    assert r.returncode == 0, r.stderr
    assert ("single program" in r.stdout) == (request.param == "skb"), r.stdout
    node = XDPNode(work, request.param)
    node.digests = digests
    yield node
    code = node.stop()
    log = node.text()
    assert code == 0, f"stoq-node did not exit cleanly (exit {code}): {log[-2000:]}"
    # Every UMEM frame is back where it started: none held, none lost in flight.
    stops = re.findall(r"^.*worker \d+ stopped$", log, re.M)
    assert len(stops) == 2, log[-3000:]
    for line in stops:
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        assert fields["datapath"] == "af_xdp", line
        assert fields["frames_held"] == "0", line
        assert fields["frames_tx_in_flight"] == "0", line
        # The one transmit slot a worker keeps lent between turns is the only one out.
        assert int(fields["frames_tx_reserved"]) in (0, int(fields["frames_per_slot"])), line
        total = int(fields["frames_total"])
        assert int(fields["frames_kernel_rx"]) + int(fields["frames_tx_free"]) + int(fields["frames_tx_reserved"]) == total, line
        assert int(fields["frames_kernel_rx"]) == 8192, line  # the whole fill ring is back with the kernel
    run(in_a(ROOT / "scripts/xdp-attach", "--detach", VA))


