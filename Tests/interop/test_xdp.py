"""The AF_XDP datapath end to end on the testbed (two network namespaces over a
two-queue veth): the real XDP program attached by scripts/xdp-attach in native and
in generic (skb) mode, stoq-node on AF_XDP sockets, clients in the other namespace."""
import json
import os
import re
import subprocess
import time

import pytest

from conftest import need_binary, run, settled, sha256_file
from xdp_testbed import (A, ADDR_A, ADDR_B, B, BIG, IPV4_A, IPV4_B, PORT, ROOT, VA, counters, in_a, in_b, needs_root,
                         testbed, xdp_node)  # noqa: F401 (fixtures)

pytestmark = needs_root


def test_node_reports_af_xdp_and_mode(xdp_node):
    log = xdp_node.text()
    assert f"datapath af_xdp: {VA}, 2 queue(s), XDP {xdp_node.mode}" in log, log[-2000:]
    assert "copy mode" in log  # veth has no zero-copy


def test_status_names_the_counters_and_bad_ports_change_nothing(xdp_node):
    """--status names each counter as bpf/stoq_kern_user.h does (shed_initial was shown as
    worker_0, each worker one further on); --ports out of range, too many or none exit 2
    before the attached program is touched (70000 was taken as 4464, a 17th port failed with
    the program attached, none attached a program that steered nothing)."""
    r = run(in_a(ROOT / "scripts/xdp-attach", "--status", VA))
    assert r.returncode == 0, r.stderr
    shown = re.findall(r"^    (\w+): \d+$", r.stdout, re.M)
    assert shown[:13] == ["redirected", "passed_not_ip", "passed_not_udp", "passed_other_port", "passed_ipv4",
                          "passed_no_socket", "passed_truncated", "passed_ext_limit", "passed_fragment",
                          "steered_by_cid", "shed_initial", "passed_other_address", "worker_0"], r.stdout
    program = re.search(r"id (\d+)", r.stdout).group(1)
    # One who may not read the pinned counters is told so, not shown a row of zeros.
    r = run(in_a("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                 ROOT / "scripts/xdp-attach", "--status", VA))
    assert r.returncode == 1 and "xdp-attach: " in r.stderr and ": 0\n" not in r.stdout, (r.stdout, r.stderr)
    for ports, said in (("70000", "70000 is not a port"), ("", "give 1 to 16 ports"),
                        (",".join(str(5000 + i) for i in range(17)), "give 1 to 16 ports")):
        r = run(in_a(ROOT / "scripts/xdp-attach", VA, "--ports", ports))
        assert r.returncode == 2 and said in r.stderr, (ports, r.stderr)
    # Steering by CID cannot work with the node's one socket per queue: refused, by the script
    # and the CLI, before anything is touched.
    r = run(in_a(ROOT / "scripts/xdp-attach", VA, "--ports", PORT, "--workers", "2"))
    assert r.returncode == 2 and "steering by CID cannot work with stoq-node" in r.stderr, r.stderr
    r = run(in_a(need_binary("stoq"), "xdp", "attach", VA, "--workers", "2"))
    assert r.returncode != 0 and "steering by CID cannot work with stoq-node" in r.stderr, r.stderr
    r = run(in_a(ROOT / "scripts/xdp-attach", "--status", VA))
    assert re.search(r"id (\d+)", r.stdout).group(1) == program
    r = run(in_b(need_binary("stoq"), "get", xdp_node.url("small.bin"), "--ca", xdp_node.cert, "--json"), timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["sha256"] == xdp_node.digests["small.bin"], r.stderr


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


def udp6_checksum_errors():
    r = run(in_b("cat", "/proc/net/snmp6"))
    assert r.returncode == 0, r.stderr
    return int(re.search(r"^Udp6InCsumErrors\s+(\d+)$", r.stdout, re.M).group(1))


def test_checksums_left_to_the_kernel_come_out_right(xdp_node, tmp_path):
    """On Linux 6.8+ the node asks, through AF_XDP TX metadata, for each datagram's UDP
    checksum to be completed by the NIC or the kernel. Over veth such a packet crosses
    unsummed and is trusted, so this turns the server veth's tx checksum offload off: the
    kernel then completes every checksum in software, and the client's kernel checks each
    (a wrong one is dropped and counted in Udp6InCsumErrors)."""
    release = tuple(int(p) for p in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())
    if release < (6, 8):
        pytest.skip(f"SKIPPED: kernel {os.uname().release} has no AF_XDP TX metadata (6.8+), so the node sums checksums itself")
    assert "tx checksum: offloaded" in xdp_node.text()
    assert run(in_a("ethtool", "-K", VA, "tx", "off")).returncode == 0
    try:
        before = udp6_checksum_errors()
        out = tmp_path / "big.bin"
        r = run(in_b(need_binary("stoq"), "get", xdp_node.url("big.bin"), "-o", out, "--ca", xdp_node.cert), timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert sha256_file(out) == xdp_node.digests["big.bin"]
        assert udp6_checksum_errors() == before
    finally:
        run(in_a("ethtool", "-K", VA, "tx", "on"))


def test_ipv4_to_the_port_passes_to_the_kernel(xdp_node):
    """IPv4 to the node's port goes to the kernel (another service may use IPv4 on that port;
    it used to be dropped for the whole interface), and the IPv6-only node never sees it."""
    run(["ip", "-n", A, "addr", "replace", f"{IPV4_A}/24", "dev", VA])
    run(["ip", "-n", B, "addr", "replace", f"{IPV4_B}/24", "dev", "veth-b"])
    before = counters()["passed_ipv4"]
    code = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"for i in range(50): s.sendto(bytes([0xc0]) + bytes(1199), ('{IPV4_A}', {PORT}))\n")
    r = run(in_b("python3", "-c", code))
    assert r.returncode == 0, r.stderr
    # veth hands the datagrams to the other side's NAPI, which runs the XDP program when it
    # gets to them: wait until all 50 are counted (then no more than 50 may be).
    deadline = time.monotonic() + 20
    while (passed := counters()["passed_ipv4"] - before) < 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert passed == 50
    # … and the node still serves IPv6 clients.
    r = run(in_b(need_binary("stoq"), "get", xdp_node.url("small.bin"), "--ca", xdp_node.cert, "--json"), timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sha256"] == xdp_node.digests["small.bin"]


def test_the_port_at_another_address_stays_the_kernels(xdp_node):
    """The node listens on one address (listen_addr = [ADDR_A]:PORT): a datagram to its port at
    another address of the interface goes to the kernel, where another service answers it,
    and is counted as passed_other_address; the node (which used to take and answer any
    address's) never sees it, and still serves its own address."""
    other = "fd00:5704::3"
    assert run(["ip", "-n", A, "addr", "replace", f"{other}/64", "dev", VA, "nodad"]).returncode == 0
    echo = subprocess.Popen(in_a("python3", "-c",
                                 "import socket\n"
                                 "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
                                 f"s.bind(('{other}', {PORT})); print('bound', flush=True)\n"
                                 "for _ in range(20):\n"
                                 "    data, peer = s.recvfrom(2048); s.sendto(b'kernel:' + data, peer)\n"),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout.readline().strip() == "bound"
        before = counters()
        code = ("import socket\ns = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\ns.settimeout(5)\n"
                f"for i in range(20):\n    s.sendto(bytes([0x40, i]) + bytes(38), ('{other}', {PORT}))\n"
                "    data, _ = s.recvfrom(2048); assert data == b'kernel:' + bytes([0x40, i]) + bytes(38), data\n"
                "print('answered')\n")
        r = run(in_b("python3", "-c", code), timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == "answered", r.stderr
        after = counters()
        assert after["passed_other_address"] - before["passed_other_address"] == 20, (before, after)
    finally:
        echo.kill()
        echo.wait()
        run(["ip", "-n", A, "addr", "del", f"{other}/64", "dev", VA])
    r = run(in_b(need_binary("stoq"), "get", xdp_node.url("small.bin"), "--ca", xdp_node.cert, "--json"), timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sha256"] == xdp_node.digests["small.bin"]


def metric_sum(node, name):
    """`name` summed over the node's workers, from its admin API (in the node's namespace)."""
    r = run(in_a("python3", "-c", f"import urllib.request; print(urllib.request.urlopen('{node.admin}').read().decode())"))
    assert r.returncode == 0, r.stderr
    return sum(int(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\d+)$", r.stdout, re.M))


# Sends from the client namespace: 30 datagrams whose UDP checksum is wrong and 10 whose
# checksum is zero (IPv6 forbids it), through a raw socket (the kernel leaves the header
# as written), then malformed and truncated QUIC through an ordinary socket.
BAD_DATAGRAMS = r"""
import os, socket, struct, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def csum(data):
    data += bytes(len(data) % 2)
    s = sum(struct.unpack(f">{len(data) // 2}H", data))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
raw = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP)
for i in range(40):
    payload = bytes([0xC0]) + struct.pack(">I", 1) + bytes([8]) + os.urandom(8) + bytes([0]) + os.urandom(1181)
    length = 8 + len(payload)
    pseudo = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + struct.pack(">IxxxB", length, 17)
    right = csum(pseudo + struct.pack(">HHHH", 40000, port, length, 0) + payload) or 0xFFFF
    check = 0 if i >= 30 else (right ^ 0x5A5A) or 1
    raw.sendto(struct.pack(">HHHH", 40000, port, length, check) + payload, (dst, 0))
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.connect((dst, port))
for n in [1, 2, 5, 6, 7, 20, 100, 1199]:
    s.send(os.urandom(n))
initial = bytes([0xC0]) + struct.pack(">I", 1) + bytes([8]) + os.urandom(8) + bytes([0]) + os.urandom(30)
for cut in range(1, len(initial)):
    s.send(initial[:cut])
"""


def test_bad_datagrams_are_dropped_and_counted(xdp_node):
    """The AF_XDP engine checks every UDP checksum itself (the kernel never saw these
    frames): wrong and zero ones are dropped and counted; malformed QUIC is dropped by the
    endpoint; the node keeps serving."""
    dropped = metric_sum(xdp_node, "stoq_datapath_rx_dropped_total")
    malformed = metric_sum(xdp_node, "stoq_quic_dropped_malformed_total")
    r = run(in_b("python3", "-c", BAD_DATAGRAMS, ADDR_B, ADDR_A, str(PORT)))
    assert r.returncode == 0, r.stderr
    deadline = time.time() + 10  # workers publish their counters about once a second
    while metric_sum(xdp_node, "stoq_datapath_rx_dropped_total") - dropped < 40 and time.time() < deadline:
        time.sleep(0.2)
    assert metric_sum(xdp_node, "stoq_datapath_rx_dropped_total") - dropped == 40
    assert metric_sum(xdp_node, "stoq_quic_dropped_malformed_total") > malformed
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
        assert f'stoq_xdp_frames{{worker="{w}",place="kernel_rx"}} 8192' in r.stdout


def handoff_counters(node):
    r = run(in_a("python3", "-c", f"import urllib.request; print(urllib.request.urlopen('{node.admin}').read().decode())"))
    assert r.returncode == 0, r.stderr
    found = {}
    for kind in ("sent", "received", "dropped"):
        for w in (0, 1):
            m = re.search(rf'^stoq_worker_handoff_{kind}_total{{worker="{w}"}} (\d+)$', r.stdout, re.M)
            assert m, r.stdout[-3000:]
            found[(kind, w)] = int(m.group(1))
    return found


def test_a_client_moving_to_another_queue_keeps_its_connection(xdp_node, tmp_path):
    """A connection lives on the worker that took its first Initial. Here the client starts
    on CPU 0, whose packets XPS puts on veth queue 0 (worker 0's AF_XDP socket), and moves
    to CPU 1 mid-transfer, so its packets arrive on queue 1 (worker 1) — as after a NIC
    re-hash or a migration. Worker 1 hands them to worker 0 by the CID's worker byte
    instead of answering with a stateless reset, and the download completes intact."""
    if xdp_node.mode != "native":
        pytest.skip("SKIPPED in generic mode: veth records no receive queue on the skb, so generic XDP "
                    "sees every frame on queue 0 and a client cannot change queues")
    xps = [f"/sys/class/net/veth-b/queues/tx-{q}/xps_cpus" for q in (0, 1)]
    r = run(in_b("sh", "-c", f"cat {xps[0]} {xps[1]}; echo 1 > {xps[0]}; echo 2 > {xps[1]}"))
    assert r.returncode == 0, r.stderr
    saved = r.stdout.split()
    try:
        # Workers publish their counters about once a second: start from a reading that has
        # stopped moving, so nothing an earlier test did lands in the difference.
        before = settled(lambda: handoff_counters(xdp_node))
        queue0 = counters()["worker_0"]
        out = tmp_path / "big.bin"
        client = subprocess.Popen(in_b("taskset", "-c", "0", need_binary("stoq"), "get", xdp_node.url("big.bin"),
                                       "-o", out, "--ca", xdp_node.cert, "--json"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Move once the transfer is under way on queue 0 (the XDP program counts per queue).
        deadline = time.time() + 10
        while time.time() < deadline and counters()["worker_0"] - queue0 < 300:
            time.sleep(0.02)
        moved = run(["taskset", "-a", "-p", "-c", "1", str(client.pid)])
        assert moved.returncode == 0, moved.stderr
        stdout, stderr = client.communicate(timeout=300)
        assert client.returncode == 0, stderr[-2000:]
        assert json.loads(stdout)["bytes"] == BIG
        assert sha256_file(out) == xdp_node.digests["big.bin"]
        # Workers publish their counters about once a second, each on its own clock: wait until
        # two readings 1.2 s apart agree, so every handoff sent has been published as received.
        after = settled(lambda: handoff_counters(xdp_node))
        sent = {w: after[("sent", w)] - before[("sent", w)] for w in (0, 1)}
        received = {w: after[("received", w)] - before[("received", w)] for w in (0, 1)}
        # One worker owns the connection (the one whose queue took the first Initial); after
        # the move the other receives the client's packets and passes every one of them on.
        assert sent[0] + sent[1] > 100 and min(sent.values()) == 0, (sent, received, counters())
        assert received[0] == sent[1] and received[1] == sent[0], (sent, received)
        assert all(after[("dropped", w)] == before[("dropped", w)] for w in (0, 1))
    finally:
        run(in_b("sh", "-c", f"echo {saved[0]} > {xps[0]}; echo {saved[1]} > {xps[1]}"))
