"""A node that advertises a preferred address, and a client whose own address changes
mid-transfer (issue 15).

Two network namespaces over a veth: the node's side carries ADDR_A and ADDR_B, the client's
side CLIENT_ADDR. The node listens on [::] and advertises ADDR_B as QUIC's preferred_address;
the client dials ADDR_A, and after the handshake moves to ADDR_B (path validation) for the
rest of the transfer. What the node received on ADDR_B is seen twice: its own counter
(stoq_quic_preferred_address_datagrams_total) and an ip6tables rule counting UDP to ADDR_B.

Then the client's address changes under a transfer, two ways: a NAT in the client's namespace
rewrites its source port (an ip6tables SNAT rule, and the flow's conntrack entry dropped so the
next packet takes it: a NAT rebinding), and the client's address is replaced by another one
(the old one removed: the client must move itself). The node's link is slowed with a token
bucket (tbf, not netem) so the change lands mid-transfer. Needs root; skipped without.
"""
import json
import os
import subprocess
import time
import urllib.request

import pytest

from conftest import need_binary, part_file, read_banner, run, sha256_file, stop_node, veth_namespaces

NODE_NS, CLIENT_NS = "stoq-pa-node", "stoq-pa-client"
NODE_IF, CLIENT_IF = "veth-pa-n", "veth-pa-c"
ADDR_A, ADDR_B = "fd00:5708::1", "fd00:5708::2"
CLIENT_ADDR, CLIENT_ADDR2 = "fd00:5708::3", "fd00:5708::4"
PORT = 4433
SMALL = (1 << 20) + 3
BIG = (24 << 20) + 11  # about 2 s through the 100 Mbit/s bucket: room to change an address
NAT_PORT = 50000

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces): SKIPPED")


def in_node(*cmd):
    return ["ip", "netns", "exec", NODE_NS, *[str(c) for c in cmd]]


def in_client(*cmd):
    return ["ip", "netns", "exec", CLIENT_NS, *[str(c) for c in cmd]]


def must(cmd):
    r = run(cmd)
    assert r.returncode == 0, f"{cmd}: {r.stderr}"
    return r


def node_counters(node, names):
    """The node's /metrics (its admin API listens in the node's namespace), summed over workers."""
    code = ("import re,sys,urllib.request;t=urllib.request.urlopen(sys.argv[1],timeout=10).read().decode();"
            "print(' '.join(str(sum(int(v) for v in re.findall('^'+n+r'{[^}]*} (\\d+)$',t,re.M))) for n in sys.argv[2:]))")
    r = must(in_node("python3", "-c", code, node.admin, *names))
    return dict(zip(names, (int(v) for v in r.stdout.split())))


def settled_counters(node, names):
    """Workers publish counters about once a second: two equal readings 1.2 s apart."""
    last = node_counters(node, names)
    for _ in range(15):
        time.sleep(1.2)
        now = node_counters(node, names)
        if now == last:
            return now
        last = now
    return last


def udp_packets_to_b():
    r = must(in_node("ip6tables", "-L", "INPUT", "-v", "-n", "-x"))
    for line in r.stdout.splitlines():
        if ADDR_B in line and "udp" in line:
            return int(line.split()[0])
    raise AssertionError(f"no counting rule for {ADDR_B}: {r.stdout}")


@pytest.fixture(scope="module")
def pa_node(tmp_path_factory):
    veth_namespaces(NODE_NS, NODE_IF, [ADDR_A, ADDR_B], CLIENT_NS, CLIENT_IF, CLIENT_ADDR)
    try:
        must(in_node("ip6tables", "-A", "INPUT", "-d", ADDR_B, "-p", "udp", "--dport", PORT))
        work = tmp_path_factory.mktemp("prefaddr")
        objects = work / "objects"
        objects.mkdir()
        for name, size in (("small.bin", SMALL), ("small2.bin", SMALL + 1), ("big.bin", BIG)):
            with open(objects / name, "wb") as f:
                f.write(os.urandom(size))
        cfg = work / "node.toml"
        cfg.write_text(
            f'[node]\ndata_dir = "{work}/data"\n[network]\nlisten_addr = "[::]:{PORT}"\n'
            f'preferred_address = "[{ADDR_B}]:{PORT}"\ndatapath = "io_uring"\nworkers = 2\n'
            f'[storage]\npath = "{objects}"\ncontent_path = "{work}/content"\n'
            f'[admin]\nlisten = "[::1]:0"\n')

        class N:
            pass

        node = N()
        node.work = work
        node.log = open(work / "node.log", "w+")
        node.proc = subprocess.Popen(in_node(need_binary("stoq-node"), "--config", cfg), stdout=subprocess.PIPE,
                                     stderr=node.log, text=True)
        read_banner(node)
    except BaseException:
        for ns in (NODE_NS, CLIENT_NS):
            run(["ip", "netns", "del", ns])
        raise
    node.digest = {n: sha256_file(objects / n) for n in ("small.bin", "small2.bin", "big.bin")}
    yield node
    code = stop_node(node.proc)
    for ns in (NODE_NS, CLIENT_NS):
        run(["ip", "netns", "del", ns])
    assert code == 0, f"stoq-node did not exit cleanly on SIGTERM (exit {code})"


def url(addr, name):
    return f"https://[{addr}]:{PORT}/objects/{name}"


COUNTERS = ["stoq_quic_preferred_address_datagrams_total", "stoq_quic_path_validations_total",
            "stoq_quic_connections_closed_total"]


def test_client_moves_to_the_preferred_address(pa_node, tmp_path):
    before, to_b = settled_counters(pa_node, COUNTERS), udp_packets_to_b()
    out = tmp_path / "small.bin"
    r = run(in_client(need_binary("stoq"), "get", url(ADDR_A, "small.bin"), "-o", out, "--ca", pa_node.cert,
                      "--json", "--timeout", 30))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["status"] == 200 and res["bytes"] == SMALL
    assert res["preferred_address"] == "used", res
    assert res["served_from"] == f"[{ADDR_B}]:{PORT}", res
    assert sha256_file(out) == pa_node.digest["small.bin"]
    after = settled_counters(pa_node, COUNTERS)
    moved = after["stoq_quic_preferred_address_datagrams_total"] - before["stoq_quic_preferred_address_datagrams_total"]
    # How many depends on how much of the body was still to come when the path validated.
    assert moved >= 1, (before, after)
    assert after["stoq_quic_path_validations_total"] > before["stoq_quic_path_validations_total"], (before, after)
    # The kernel saw them too (GRO may have merged a few datagrams into one packet before it counted).
    seen = udp_packets_to_b() - to_b
    assert seen >= 1, f"ip6tables counted {seen} UDP packets to {ADDR_B}"
    print(f"datagrams the node received on {ADDR_B}: {moved}; ip6tables counted {seen} packets")


def test_several_urls_all_served_from_the_preferred_address(pa_node, tmp_path):
    before = settled_counters(pa_node, COUNTERS)
    out = tmp_path / "many"
    out.mkdir()
    r = run(in_client(need_binary("stoq"), "get", url(ADDR_A, "small.bin"), url(ADDR_A, "small2.bin"), "-o", out,
                      "--ca", pa_node.cert, "--json", "--timeout", 30))
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["handshakes"] == 1, rep
    # The first request may be answered before the move (it is sent with the handshake's end).
    assert {x["preferred_address"] for x in rep["results"]} <= {"used", "validating"}, rep
    assert rep["results"][-1]["preferred_address"] == "used", rep
    assert sha256_file(out / "small.bin") == pa_node.digest["small.bin"]
    assert sha256_file(out / "small2.bin") == pa_node.digest["small2.bin"]
    after = settled_counters(pa_node, COUNTERS)
    assert after["stoq_quic_preferred_address_datagrams_total"] > before["stoq_quic_preferred_address_datagrams_total"]


@pytest.fixture
def slow_link():
    """100 Mbit/s out of the node (a token bucket, no delay or loss): BIG takes about 2 s."""
    must(in_node("tc", "qdisc", "add", "dev", NODE_IF, "root", "tbf", "rate", "100mbit", "burst", "64kb",
                 "latency", "500ms"))
    yield
    run(in_node("tc", "qdisc", "del", "dev", NODE_IF, "root"))


def start_big_get(node, out):
    proc = subprocess.Popen(
        in_client(need_binary("stoq"), "get", url(ADDR_A, "big.bin"), "-o", out, "--ca", node.cert, "--json",
                  "--timeout", 60), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    # Mid-transfer: a quarter of the body has landed.
    while time.time() < deadline and proc.poll() is None:
        part = part_file(out)
        if part and part.stat().st_size >= BIG // 4:
            return proc
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"the transfer never got a quarter in: {proc.communicate()}")


def finish(proc, node, out):
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 0, stderr[-4000:]
    res = json.loads(stdout)
    assert res["status"] == 200 and res["bytes"] == BIG, res
    assert sha256_file(out) == node.digest["big.bin"]
    return res


def snat(port, op="-A"):
    return ["ip6tables", "-t", "nat", op, "POSTROUTING", "-p", "udp", "--dport", PORT, "-j", "SNAT",
            "--to-source", f"[{CLIENT_ADDR}]:{port}"]


def snat_packets(port):
    """New flows the SNAT rule to `port` translated (a nat rule sees each flow's first packet)."""
    r = must(in_client("ip6tables", "-t", "nat", "-L", "POSTROUTING", "-v", "-n", "-x"))
    return sum(int(l.split()[0]) for l in r.stdout.splitlines() if f"]:{port}" in l)


def test_transfer_survives_a_nat_rebinding(pa_node, slow_link, tmp_path):
    """The client sits behind a NAT (its source port rewritten to NAT_PORT) that forgets the
    flow mid-transfer and maps it anew, to NAT_PORT + 1: the node sees the client's port
    change and must follow it (RFC 9000 §9.3), the client noticing nothing."""
    before = settled_counters(pa_node, COUNTERS)
    out = tmp_path / "big.bin"
    try:
        must(in_client(*snat(NAT_PORT)))
        proc = start_big_get(pa_node, out)
        # The NAT's new mapping: the rule changes and the flow's conntrack entry goes, so the
        # client's next packet is mapped anew. (The node's packets still address NAT_PORT, so
        # they cannot claim the client's own port for the new entry: no clash.)
        must(in_client(*snat(NAT_PORT + 1, "-I")))
        must(in_client(*snat(NAT_PORT, "-D")))
        run(in_client("conntrack", "-D", "-f", "ipv6", "-p", "udp"))
        size_at_rebind = part_file(out).stat().st_size
        res = finish(proc, pa_node, out)
        assert size_at_rebind < BIG, "the transfer ended before the rebinding"
        rebound = snat_packets(NAT_PORT + 1)
        assert rebound >= 1, "no client packet took the new mapping"
    finally:
        run(in_client(*snat(NAT_PORT, "-D")))
        run(in_client(*snat(NAT_PORT + 1, "-D")))
        run(in_client("conntrack", "-D", "-f", "ipv6", "-p", "udp"))
    after = settled_counters(pa_node, COUNTERS)
    # The node validated the client's new port and carried on there.
    validated = after["stoq_quic_path_validations_total"] - before["stoq_quic_path_validations_total"]
    assert validated >= 1, (before, after)
    print(f"rebinding from port {NAT_PORT} to {NAT_PORT + 1} after {size_at_rebind} of {BIG} bytes; "
          f"node path validations +{validated}; {res['seconds']:.2f} s")


def test_transfer_survives_the_client_address_changing(pa_node, slow_link, tmp_path):
    before = settled_counters(pa_node, COUNTERS)
    out = tmp_path / "big.bin"
    proc = start_big_get(pa_node, out)
    try:
        must(in_client("ip", "addr", "add", f"{CLIENT_ADDR2}/64", "dev", CLIENT_IF, "nodad"))
        must(in_client("ip", "addr", "del", f"{CLIENT_ADDR}/64", "dev", CLIENT_IF))
        size_at_change = part_file(out).stat().st_size
        res = finish(proc, pa_node, out)
    finally:
        run(in_client("ip", "addr", "add", f"{CLIENT_ADDR}/64", "dev", CLIENT_IF, "nodad"))
        run(in_client("ip", "addr", "del", f"{CLIENT_ADDR2}/64", "dev", CLIENT_IF))
    assert size_at_change < BIG, "the transfer ended before the address changed"
    assert res["local_migrations"] >= 1, res
    after = settled_counters(pa_node, COUNTERS)
    validated = after["stoq_quic_path_validations_total"] - before["stoq_quic_path_validations_total"]
    assert validated >= 1, (before, after)
    print(f"address changed after {size_at_change} of {BIG} bytes; client moved {res['local_migrations']}x; "
          f"node path validations +{validated}; {res['seconds']:.2f} s")
