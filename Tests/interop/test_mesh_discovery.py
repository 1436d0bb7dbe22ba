"""Mesh membership at the node level, with each discovery backend: static `peers`, DNS (a real
dnsmasq answering AAAA records) and etcd (a real etcd-server 3.4), all started by
`scripts/mesh up --discovery …` in the testbed's service namespace. Each test brings up a
three-node triangle (every node linked to every other, so every member is reachable) and waits,
bounded, for what a node shows on its admin API (`stoq mesh status --json`): its neighbours
and their state, and the discovery backend's counters. The backends themselves are unit-tested
against the same daemons in Tests/STOQMeshTests; this is the node that runs them."""
import json
import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import need_binary, random_file, sha256_file
from test_mesh_testbed import mesh, state, testbed  # noqa: F401  (state and testbed are fixtures)

TRIANGLE = "a,b,rate_mbit,delay_ms,loss_pct\n1,2,0,0,0\n2,3,0,0,0\n1,3,0,0,0\n"
ADMIN = "http://[::1]:9180"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the mesh testbed needs root (network namespaces)")


def need_daemon(*names):
    """A missing daemon fails the test: skipping would leave the backend unproven."""
    for name, package in names:
        if not (shutil.which(name) or os.path.exists(f"/usr/sbin/{name}")):
            pytest.fail(f"{name} is missing: apt-get install -y {package} (scripts/install-deps does)")




def up(tmp_path, state, discovery, *extra):
    need_binary("stoq-node")
    t = tmp_path / "triangle.csv"
    t.write_text(TRIANGLE)
    mesh("up", "--topology", t, "--discovery", discovery, *extra, state=state)


def status(state, n):
    """Node N's mesh status, or None while its admin API does not answer."""
    r = mesh("exec", n, "stoq", "mesh", "status", ADMIN, "--json", state=state, check=False, timeout=30)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout)


def addr(n):
    return f"fd00:57::{n:x}"


def neighbours(st):
    """Neighbours by node number (from their address), with their state."""
    out = {}
    for nb in st["neighbours"]:
        m = re.search(r"\[fd00:57::([0-9a-f]+)\]", nb["url"])
        assert m, nb["url"]
        out[int(m.group(1), 16)] = nb["state"]
    return out


def wait_for(state, what, condition, nodes=(1, 2, 3), timeout=30):
    """Polls the nodes' statuses until `condition(n, status)` holds for every one of `nodes`;
    fails naming `what` with the last statuses seen."""
    deadline = time.monotonic() + timeout
    last = {}
    while True:
        last = {n: status(state, n) for n in nodes}
        if all(s is not None and condition(n, s) for n, s in last.items()):
            return last
        if time.monotonic() > deadline:
            brief = {n: s and {"neighbours": neighbours(s), "discovery": s["discovery"],
                               "counters": s["discovery_counters"]} for n, s in last.items()}
            pytest.fail(f"within {timeout} s: {what}; last seen: {json.dumps(brief, indent=1)}")
        time.sleep(0.3)


def all_others_up(n, st, members=(1, 2, 3)):
    return neighbours(st) == {m: "up" for m in members if m != n}


def object_crosses_the_mesh(tmp_path, state, name, src_node=1, dst_node=3):
    """A few MB put (chunked) at one node and fetched with a plain GET at another, which does
    not have it and must find it through the mesh: byte-identical, and a node served it as a
    relay."""
    src = random_file(tmp_path / f"{name}.src", (3 << 20) + 4099, seed=len(name))
    ca = mesh("ca", state=state).stdout.strip()
    url = lambda n: mesh("url", n, state=state).stdout.strip() + f"/objects/{name}"
    served_before = sum(status(state, n)["counters"]["relay_served"] for n in (1, 2, 3))
    mesh("exec", src_node, "stoq", "put", "--chunked", "--ca", ca, src, url(src_node), state=state)
    out = tmp_path / f"{name}.out"
    mesh("exec", dst_node, "stoq", "get", "--ca", ca, url(dst_node), "-o", out, state=state)
    assert sha256_file(out) == sha256_file(src)
    served = sum(status(state, n)["counters"]["relay_served"] for n in (1, 2, 3))
    assert served > served_before, "the object reached the other node without a relayed request"


def test_static_peers_are_neighbours_and_carry_an_object(tmp_path, state):
    up(tmp_path, state, "static")
    st = wait_for(state, "every node sees the other two up", all_others_up)
    for n, s in st.items():
        assert s["discovery"] == "static" and s["discovery_counters"]["updates"] == 1, s["discovery_counters"]
        assert s["discovery_counters"]["members"] == 2
    object_crosses_the_mesh(tmp_path, state, "static-obj")


def test_dns_members_are_neighbours_and_leave_with_their_record(tmp_path, state):
    need_daemon(("dnsmasq", "dnsmasq-base"))
    up(tmp_path, state, "dns")
    st = wait_for(state, "every node resolves mesh.stoq.test and sees the other two up", all_others_up)
    for n, s in st.items():
        c = s["discovery_counters"]
        # The AAAA answer lists all three nodes; each drops itself.
        assert s["discovery"] == "dns" and c["updates"] >= 1 and c["members"] == 3, c
        assert c["registrations"] == 0 and not c["refused"], c
    object_crosses_the_mesh(tmp_path, state, "dns-obj")

    # Node 3's record leaves the answer (hosts file rewritten, dnsmasq SIGHUP): within a few
    # re-resolutions (dns_interval 1 s) nodes 1 and 2 no longer list it.
    mesh("discovery", "leave", 3, state=state)
    left = time.monotonic()
    st = wait_for(state, "nodes 1 and 2 drop node 3 once its AAAA record is gone",
                  lambda n, s: all_others_up(n, s, members=(1, 2)) and s["discovery_counters"]["members"] == 2,
                  nodes=(1, 2), timeout=15)
    assert all(s["discovery_counters"]["updates"] >= 2 for s in st.values())
    print(f"dns: node 3 left nodes 1 and 2's neighbours {time.monotonic() - left:.1f} s after its record went")

    # And comes back when the record does.
    mesh("discovery", "join", 3, state=state)
    wait_for(state, "nodes 1 and 2 see node 3 up again once its record is back", all_others_up, nodes=(1, 2), timeout=15)


def running(pid):
    """Whether pid runs (a zombie nobody reaped yet does not)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def etcd_keys(state):
    r = mesh("etcdctl", "get", "--prefix", "/stoq/mesh/", state=state)
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    return {k: json.loads(v) for k, v in zip(lines[0::2], lines[1::2])}


def test_etcd_registers_every_node_and_a_killed_node_leaves_after_its_lease(tmp_path, state):
    need_daemon(("etcd", "etcd-server"), ("etcdctl", "etcd-client"))
    up(tmp_path, state, "etcd")
    st = wait_for(state, "every node registers and sees the other two up",
                  lambda n, s: all_others_up(n, s) and s["discovery_counters"]["registrations"] >= 1)
    ids = {n: s["node"] for n, s in st.items()}
    for s in st.values():
        c = s["discovery_counters"]
        assert s["discovery"] == "etcd" and c["updates"] >= 1 and c["members"] == 3 and c["failures"] == 0, c
    # Each node's record, under its node id, names its address (etcdctl, not the node, says so).
    keys = etcd_keys(state)
    assert keys == {f"/stoq/mesh/{ids[n]}": {"url": f"https://[{addr(n)}]:4433", "node_id": ids[n]} for n in (1, 2, 3)}
    object_crosses_the_mesh(tmp_path, state, "etcd-obj")

    # A crash: nobody revokes node 3's lease, so its key goes when the 3 s TTL runs out, and
    # the watch tells nodes 1 and 2.
    killed = time.monotonic()
    mesh("node", 3, "kill", state=state)
    deadline = killed + 20
    while f"/stoq/mesh/{ids[3]}" in etcd_keys(state):
        assert time.monotonic() < deadline, "node 3's key outlived its lease by far"
        time.sleep(0.3)
    print(f"etcd: node 3's key vanished {time.monotonic() - killed:.1f} s after SIGKILL (lease TTL 3 s)")
    wait_for(state, "nodes 1 and 2 drop node 3 once its key is gone",
             lambda n, s: all_others_up(n, s, members=(1, 2)) and s["discovery_counters"]["members"] == 2,
             nodes=(1, 2), timeout=15)

    # Restarted, it registers again (same key: same node key) and everyone sees everyone up.
    mesh("node", 3, "start", state=state)
    started = time.monotonic()
    st = wait_for(state, "node 3 registers again and all three see each other up",
                  lambda n, s: all_others_up(n, s) and s["discovery_counters"]["registrations"] >= 1)
    assert st[3]["node"] == ids[3]
    print(f"etcd: restarted node 3 up at all three {time.monotonic() - started:.1f} s after it served again")
    assert set(etcd_keys(state)) == {f"/stoq/mesh/{ids[n]}" for n in (1, 2, 3)}

    # A clean stop revokes the lease on the way out: the key is gone when the process is, not
    # a TTL later.
    mesh("node", 2, "stop", state=state)
    log = (state / "node2" / "node.log").read_text()
    assert re.search(r"mesh discovery \(etcd\): stopped; lease \d+ revoked", log), log[-2000:]
    assert set(etcd_keys(state)) == {f"/stoq/mesh/{ids[n]}" for n in (1, 3)}


def test_etcd_unreachable_at_start_then_the_nodes_register(tmp_path, state):
    need_daemon(("etcd", "etcd-server"), ("etcdctl", "etcd-client"))
    up(tmp_path, state, "etcd", "--discovery-down")
    # The nodes started without etcd and serve.
    src = random_file(tmp_path / "alone.src", 70000, seed=7)
    ca = mesh("ca", state=state).stdout.strip()
    url1 = mesh("url", 1, state=state).stdout.strip() + "/objects/alone"
    mesh("exec", 1, "stoq", "put", "--ca", ca, src, url1, state=state)
    out = tmp_path / "alone.out"
    mesh("exec", 1, "stoq", "get", "--ca", ca, url1, "-o", out, state=state)
    assert sha256_file(out) == sha256_file(src)
    st = wait_for(state, "every node counts failed attempts to reach etcd",
                  lambda n, s: s["discovery_counters"]["failures"] >= 1)
    for s in st.values():
        c = s["discovery_counters"]
        assert c["registrations"] == 0 and c["members"] == 0 and s["neighbours"] == [], c
        assert c["last_error"].startswith("unreachable: etcd http://[fd00:57:ff::1]:2379"), c["last_error"]

    mesh("discovery", "start", state=state)
    st = wait_for(state, "once etcd is up every node registers, recovers and sees the other two up",
                  lambda n, s: all_others_up(n, s) and s["discovery_counters"]["registrations"] >= 1
                  and s["discovery_counters"]["recoveries"] >= 1)
    assert len(etcd_keys(state)) == 3

    # `down` stops what `up` started: the nodes, etcd, and every namespace.
    pids = [int(f.read_text()) for f in state.glob("**/*.pid")]
    assert len(pids) == 4, pids
    mesh("down", state=state)
    assert not [pid for pid in pids if running(pid)]
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not re.search(r"^stoq-m(\d+|svc)\b", names, re.M), names
