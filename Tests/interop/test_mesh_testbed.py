"""scripts/mesh, the mesh testbed: namespaces and links from a topology file, the NFQUEUE
impairer's delay and loss, silent link cuts, nodes that serve, and bad topology files refused
by line and field. The mesh's own behaviour (membership, routes, relayed fetches) is tested
elsewhere; this is the ground it stands on."""
import json
import os
import pathlib
import re
import signal
import subprocess
import time

import pytest

from conftest import ROOT, bin_dir, need_binary, sha256_file

MESH = ROOT / "scripts" / "mesh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the mesh testbed needs root (network namespaces)")


def mesh(*args, state, check=True, timeout=120):
    env = dict(os.environ, STOQ_MESH_STATE=str(state), STOQ_BIN_DIR=str(bin_dir()))
    r = subprocess.run([str(MESH), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert r.returncode == 0, f"scripts/mesh {' '.join(map(str, args))}: {r.stdout}\n{r.stderr}"
    return r


@pytest.fixture
def state(tmp_path):
    s = tmp_path / "mesh"
    yield s
    mesh("down", state=s, check=False)


def topology(tmp_path, text, name="t.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def ping(state, n, addr, count, interval="0.01"):
    r = mesh("exec", n, "ping", "-6", "-q", "-c", count, "-i", interval, "-W", "1", addr, state=state, check=False,
             timeout=60)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", r.stdout)
    assert m, r.stdout + r.stderr
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/", r.stdout)
    return int(m.group(1)), int(m.group(2)), (float(rtt.group(1)) if rtt else None)


def impairer_stats(state, dev):
    """The counters the impairer of one link direction prints on SIGUSR1."""
    log = state / f"impair-{dev}.log"
    before = log.read_text().count('"event":"stats"')
    os.kill(int((state / f"impair-{dev}.pid").read_text()), signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [l for l in log.read_text().splitlines() if '"event":"stats"' in l]
        if len(lines) > before:
            return json.loads(lines[-1])
        time.sleep(0.05)
    raise AssertionError(f"no stats from the impairer of {dev}: {log.read_text()}")


def test_delay_and_loss_are_applied_per_direction(tmp_path, state):
    need_binary("stoq-node")
    t = topology(tmp_path, "a,b,rate_mbit,delay_ms,loss_pct\n1,2,100,10,20\n")
    mesh("up", "--topology", t, state=state)
    sent, received, rtt_min = ping(state, 1, "fd00:57::2", 400)
    # Each direction holds every datagram 10 ms: no round trip can be shorter than 20 ms.
    assert rtt_min is not None and rtt_min >= 20.0, rtt_min
    a, b = impairer_stats(state, "m1-2"), impairer_stats(state, "m2-1")
    # 20 % loss per direction: the impairers dropped about that share of what they saw, and
    # ping lost about 1 - 0.8 * 0.8 = 36 % (bounds are 6 standard deviations wide).
    for s in (a, b):
        assert s["seen"] > 0 and 0.12 < s["dropped"] / s["seen"] < 0.28, s
    assert 0.25 < 1 - received / sent < 0.47, (sent, received)
    assert a["passed"] + a["dropped"] + a["held"] == a["seen"], a


def test_a_cut_link_drops_silently_and_comes_back(tmp_path, state):
    need_binary("stoq-node")
    t = topology(tmp_path, "a,b,rate_mbit,delay_ms,loss_pct\n1,2,0,0,0\n2,3,0,0,0\n")
    mesh("up", "--topology", t, state=state)
    assert ping(state, 2, "fd00:57::3", 5)[1] == 5
    mesh("link", 3, 2, "down", state=state)
    assert ping(state, 2, "fd00:57::3", 5, interval="0.05")[1] == 0
    assert ping(state, 2, "fd00:57::1", 5)[1] == 5, "cutting 2-3 must not touch 1-2"
    assert "(down)" in mesh("status", state=state).stdout
    mesh("link", 2, 3, "up", state=state)
    assert ping(state, 2, "fd00:57::3", 5)[1] == 5
    # Only neighbours are reachable directly: node 1 has no route to node 3.
    r = mesh("exec", 1, "ping", "-6", "-c", 1, "fd00:57::3", state=state, check=False)
    assert r.returncode != 0 and "Network is unreachable" in r.stderr, r.stderr


def test_nodes_serve_with_the_shared_trust_root(tmp_path, state):
    need_binary("stoq-node")
    t = ROOT / "config" / "mesh" / "line5.csv"
    mesh("up", "--topology", t, state=state)
    st = json.loads(mesh("status", "--json", state=state).stdout)
    assert [n["node"] for n in st["nodes"]] == [1, 2, 3, 4, 5] and all(n["running"] for n in st["nodes"])
    assert st["nodes"][2]["neighbours"] == [2, 4]
    src = tmp_path / "obj"
    src.write_bytes(os.urandom(3 << 20))
    ca = mesh("ca", state=state).stdout.strip()
    url1 = mesh("url", 1, state=state).stdout.strip()
    assert url1 == "https://[fd00:57::1]:4433"
    mesh("exec", 1, "stoq", "put", "--ca", ca, src, f"{url1}/objects/x", state=state)
    out = tmp_path / "out"
    # Node 2, a neighbour, fetches from node 1 directly over their link, verifying node 1's
    # certificate against the mesh's root.
    mesh("exec", 2, "stoq", "get", "--ca", ca, f"{url1}/objects/x", "-o", out, state=state)
    assert sha256_file(out) == sha256_file(src)


def test_mesh_keys_reach_every_node_and_a_refused_one_leaves_nothing(tmp_path, state):
    need_binary("stoq-node")
    t = topology(tmp_path, "a,b,rate_mbit,delay_ms,loss_pct\n1,2,0,0,0\n")
    r = mesh("up", "--topology", t, "--mesh", "no_such_key=1", state=state, check=False)
    assert r.returncode == 1 and "mesh.no_such_key = 1: unknown key" in r.stderr, r.stderr
    # Nothing half-built is left: the same state and namespaces come up at once.
    mesh("up", "--topology", t, "--mesh", "down_after=250ms", "--mesh", "probe_interval=50ms", state=state)
    for n in (1, 2):
        cfg = (state / f"node{n}" / "node.toml").read_text()
        assert 'down_after = "250ms"\nprobe_interval = "50ms"\n' in cfg, cfg


@pytest.mark.parametrize("text,error", [
    ("a,b,rate\n1,2,3\n", "the first line must be the header a,b,rate_mbit,delay_ms,loss_pct"),
    ("a,b,rate_mbit,delay_ms,loss_pct\n1,1,10,1,0\n", "line 2: a link from node 1 to itself"),
    ("a,b,rate_mbit,delay_ms,loss_pct\n1,2,10,1,0\n2,1,10,1,0\n", "line 3: a second link between 2 and 1"),
    ("a,b,rate_mbit,delay_ms,loss_pct\n1,2,fast,1,0\n", "line 2: rate_mbit = 'fast' is not a number"),
    ("a,b,rate_mbit,delay_ms,loss_pct\n1,2,10,1,100\n", "line 2: loss_pct = 100 is out of range"),
    ("a,b,rate_mbit,delay_ms,loss_pct\n1,3,10,1,0\n", "nodes must be numbered 1..N without gaps"),
    ("a,b,rate_mbit,delay_ms,loss_pct\n1,2,10,1\n", "line 2: 4 fields, expected 5"),
])
def test_a_bad_topology_is_refused_by_line_and_field(tmp_path, state, text, error):
    r = mesh("up", "--topology", topology(tmp_path, text), state=state, check=False)
    assert r.returncode == 1 and error in r.stderr, r.stderr
    assert not (state / "mesh.json").exists()
