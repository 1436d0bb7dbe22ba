"""The AF_XDP datapath end to end on the testbed (two network namespaces over a
two-queue veth): the real XDP program attached by scripts/xdp-attach in native and
in generic (skb) mode, stoq-node on AF_XDP sockets, clients in the other namespace."""
import json
import subprocess
import time

from conftest import need_binary, run, sha256_file
from xdp_testbed import (A, ADDR_A, B, BIG, IPV4_A, IPV4_B, PORT, VA, counters, in_a, in_b, needs_root,
                         testbed, xdp_node)  # noqa: F401 (fixtures)

pytestmark = needs_root


def test_node_reports_af_xdp_and_mode(xdp_node):
    log = xdp_node.text()
    assert f"datapath af_xdp: {VA}, 2 queue(s), XDP {xdp_node.mode}" in log, log[-2000:]
    assert "copy mode" in log  # veth has no zero-copy


def test_stoq_get_256_mib_over_af_xdp(xdp_node, tmp_path):
    before = counters()["redirected"]
    out = tmp_path / "big.bin"
    r = run(in_b(need_binary("stoq"), "get", xdp_node.url("big.bin"), "-o", out, "--ca", xdp_node.cert, "--json"),
            timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["status"] == 200 and res["bytes"] == BIG
    assert sha256_file(out) == xdp_node.digests["big.bin"]
    # The client's packets (handshake, ACKs) reached the node through the XDP program.
    assert counters()["redirected"] - before > 100


def test_gtlsclient_256_mib_over_af_xdp(xdp_node, tmp_path):
    r = run(in_b("gtlsclient", "-q", "--exit-on-all-streams-close", f"--download={tmp_path}", ADDR_A, PORT,
                 xdp_node.url("big.bin")), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sha256_file(tmp_path / "big.bin") == xdp_node.digests["big.bin"]


def test_ipv4_to_the_port_never_reaches_the_node(xdp_node):
    run(["ip", "-n", A, "addr", "replace", f"{IPV4_A}/24", "dev", VA])
    run(["ip", "-n", B, "addr", "replace", f"{IPV4_B}/24", "dev", "veth-b"])
    before = counters()["dropped_ipv4"]
    code = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"for i in range(50): s.sendto(bytes([0xc0]) + bytes(1199), ('{IPV4_A}', {PORT}))\n")
    r = run(in_b("python3", "-c", code))
    assert r.returncode == 0, r.stderr
    time.sleep(0.3)
    assert counters()["dropped_ipv4"] - before == 50
    # … and the node still serves IPv6 clients.
    r = run(in_b(need_binary("stoq"), "get", xdp_node.url("small.bin"), "--ca", xdp_node.cert, "--json"), timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sha256"] == xdp_node.digests["small.bin"]


def test_tcp_to_the_host_still_works_while_attached(xdp_node):
    server = subprocess.Popen(in_a("python3", "-c",
                                   "import socket\n"
                                   "s = socket.socket(socket.AF_INET6)\n"
                                   "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                                   f"s.bind(('{ADDR_A}', 8081)); s.listen(1)\n"
                                   "c, _ = s.accept(); data = c.recv(100)\n"
                                   "c.sendall(data[::-1]); c.close()\n"), stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        r = run(in_b("python3", "-c",
                     "import socket\n"
                     f"c = socket.create_connection(('{ADDR_A}', 8081), timeout=5)\n"
                     "c.sendall(b'stoq-xdp'); print(c.recv(100).decode())\n"), timeout=30)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "pdx-qots"
    finally:
        server.kill()
        server.wait()
    assert counters()["passed_not_udp"] > 0




def test_metrics_expose_the_af_xdp_mode_and_frames(xdp_node):
    """The admin API (in the node's namespace) says which datapath each worker got."""
    r = run(in_a("python3", "-c", f"import urllib.request; print(urllib.request.urlopen('{xdp_node.admin}').read().decode())"))
    assert r.returncode == 0, r.stderr
    for w in (0, 1):
        assert (f'stoq_datapath_info{{worker="{w}",backend="af_xdp",features="ecn",xdp_mode="{xdp_node.mode}",'
                f'zero_copy="false"}} 1') in r.stdout, r.stdout[-3000:]
        assert f'stoq_xdp_frames{{worker="{w}",place="kernel_rx"}} 2048' in r.stdout
