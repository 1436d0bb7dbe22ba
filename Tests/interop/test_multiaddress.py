"""A node with the default `listen_addr = "[::]:PORT"` on a host with two IPv6 addresses
(issue 15): every client must get its answers from the address it wrote to.

Two network namespaces over a veth: the node's side carries two addresses in one /64, the
client's side one. Bound to [::], a reply's source is whatever the kernel picks by route
(here always the same one of the two), so without IPV6_PKTINFO on send every handshake to
the other address fails. Each address is fetched by our client and by two implementations
nobody here wrote (ngtcp2's gtlsclient, aioquic). Needs root (namespaces); skipped without.
"""
import json
import os
import pathlib
import signal
import shutil
import subprocess
import sys

import pytest

from conftest import need_binary, read_banner, run, sha256_file, stop_node, veth_namespaces

HERE = pathlib.Path(__file__).resolve().parent
NODE_NS, CLIENT_NS = "stoq-mh-node", "stoq-mh-client"
NODE_IF, CLIENT_IF = "veth-mh-n", "veth-mh-c"
# Both on the node. For the client's ::3 the kernel's source address selection prefers ::2
# (longest matching prefix, RFC 6724 rule 8), so ::1 is the one a [::] socket gets wrong.
ADDRS = ["fd00:5706::1", "fd00:5706::2"]
CLIENT_ADDR = "fd00:5706::3"
PORT = 4433
SIZE = (1 << 20) + 7

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces): SKIPPED")


def in_node(*cmd):
    return ["ip", "netns", "exec", NODE_NS, *[str(c) for c in cmd]]


def in_client(*cmd):
    return ["ip", "netns", "exec", CLIENT_NS, *[str(c) for c in cmd]]


def attempt(cmd, timeout=60):
    """`run`, but a client that hangs (no reply it accepts ever arrives) is a failed attempt
    with its output, not an error of the test."""
    try:
        return run(cmd, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return subprocess.CompletedProcess(cmd, -1, out, f"timed out after {timeout}s\n{err}")


def teardown_namespaces():
    for ns in (NODE_NS, CLIENT_NS):
        run(["ip", "netns", "del", ns])


@pytest.fixture(scope="module")
def two_address_node(tmp_path_factory):
    veth_namespaces(NODE_NS, NODE_IF, ADDRS, CLIENT_NS, CLIENT_IF, CLIENT_ADDR)

    work = tmp_path_factory.mktemp("multiaddress")
    objects = work / "objects"
    objects.mkdir()
    with open(objects / "obj.bin", "wb") as f:
        f.write(os.urandom(SIZE))
    cfg = work / "node.toml"
    # listen_addr as config/node.toml ships it; io_uring is what "auto" picks without an interface.
    cfg.write_text(
        f'[node]\ndata_dir = "{work}/data"\n[network]\nlisten_addr = "[::]:{PORT}"\n'
        f'datapath = "io_uring"\nworkers = 2\n'
        f'[storage]\npath = "{objects}"\ncontent_path = "{work}/content"\n')

    class N:
        pass

    node = N()
    node.log = open(work / "node.log", "w+")
    node.proc = subprocess.Popen(in_node(need_binary("stoq-node"), "--config", cfg), stdout=subprocess.PIPE,
                                 stderr=node.log, text=True)
    try:
        read_banner(node)
    except BaseException:
        teardown_namespaces()
        raise
    node.digest = sha256_file(objects / "obj.bin")
    yield node
    code = stop_node(node.proc)
    teardown_namespaces()
    assert code == 0, f"stoq-node did not exit cleanly on SIGTERM (exit {code})"


def url(addr):
    return f"https://[{addr}]:{PORT}/objects/obj.bin"


def test_the_kernel_would_answer_from_the_other_address(two_address_node):
    """The premise: for the client, a [::] socket's replies leave from ADDRS[1], so a client
    of ADDRS[0] only succeeds if the node names the source itself."""
    r = run(in_node("ip", "-6", "route", "get", CLIENT_ADDR))
    assert r.returncode == 0, r.stderr
    assert f"src {ADDRS[1]}" in r.stdout, r.stdout


@pytest.mark.parametrize("addr", ADDRS)
def test_stoq_get_from_each_address(two_address_node, addr, tmp_path):
    out = tmp_path / "obj.bin"
    r = attempt(in_client(need_binary("stoq"), "get", url(addr), "-o", out, "--ca", two_address_node.cert, "--json",
                          "--timeout", 20))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["status"] == 200 and res["bytes"] == SIZE
    assert sha256_file(out) == two_address_node.digest


@pytest.mark.parametrize("addr", ADDRS)
def test_gtlsclient_from_each_address(two_address_node, addr, tmp_path):
    if not shutil.which("gtlsclient"):
        pytest.fail("gtlsclient missing: scripts/install-deps installs ngtcp2-client")
    r = attempt(in_client("gtlsclient", "--exit-on-all-streams-close", "-q", "--handshake-timeout=10s",
                          f"--download={tmp_path}", addr, PORT, url(addr)))
    # gtlsclient exits 0 when its handshake times out: what it saved is the verdict.
    assert r.returncode == 0 and (tmp_path / "obj.bin").exists(), f"gtlsclient saved nothing (exit {r.returncode})"
    assert sha256_file(tmp_path / "obj.bin") == two_address_node.digest


@pytest.mark.parametrize("addr", ADDRS)
def test_aioquic_from_each_address(two_address_node, addr, tmp_path):
    out = tmp_path / "obj.bin"
    r = attempt(in_client(sys.executable, HERE / "h3client.py", url(addr), "--ca", two_address_node.cert,
                          "--out", out), timeout=30)
    assert r.returncode == 0, (r.stdout[-1000:], r.stderr[-2000:])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["status"] == 200 and res["bytes"] == SIZE
    assert sha256_file(out) == two_address_node.digest
