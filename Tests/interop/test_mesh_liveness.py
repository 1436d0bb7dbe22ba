"""Neighbour liveness on real links: a lossy link (3 % each way, through the testbed's NFQUEUE
impairer: more than the 1 % it must survive) stays up with its loss measured, and a cut link is declared down and comes back when
restored (docs/mesh.md "Neighbours: liveness and link metrics")."""
import json
import os
import time

import pytest

from conftest import bin_dir, need_binary
from test_mesh_testbed import mesh, state, testbed, topology  # noqa: F401  (state and testbed are fixtures)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the mesh testbed needs root (network namespaces)")


def neighbours(state, n):
    r = mesh("exec", n, need_binary("stoq"), "mesh", "status", "http://[::1]:9180", "--json", state=state, check=False)
    if r.returncode != 0:
        return {}
    return {x["url"]: x for x in json.loads(r.stdout)["neighbours"]}


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    pytest.fail(f"{what}: not within {timeout} s")


def test_a_lossy_link_does_not_flap_and_a_cut_is_seen(state, tmp_path):
    topo = topology(tmp_path, "a,b,rate_mbit,delay_ms,loss_pct\n1,2,100,2,3\n")
    mesh("up", "--topology", topo, state=state)
    url1, url2 = "https://[fd00:57::1]:4433", "https://[fd00:57::2]:4433"
    wait_for(lambda: neighbours(state, 1).get(url2, {}).get("state") == "up"
             and neighbours(state, 2).get(url1, {}).get("state") == "up", 30, "both ends up")
    # 20 s of probes every 100 ms: about 200 each way, some 6 % of them lost on the way and
    # retransmitted by QUIC (3 % each direction): late answers, counted as losses.
    time.sleep(20)
    a, b = neighbours(state, 1)[url2], neighbours(state, 2)[url1]
    print(f"after 20 s at 3 % loss: node 1 sees {a['probes_answered']}/{a['probes_sent']} answered, "
          f"loss {a['loss']:.3f}, downs {a['downs']}; node 2 {b['probes_answered']}/{b['probes_sent']}, downs {b['downs']}")
    assert a["state"] == "up" and b["state"] == "up"
    assert a["downs"] == 0 and b["downs"] == 0, "a lossy link flapped"
    assert a["probes_sent"] >= 150
    assert 0 < a["loss"] < 0.3 and 0 < b["loss"] < 0.3, "the probes saw no loss: is the impairer on?"

    cut = time.monotonic()
    mesh("link", 1, 2, "down", state=state)
    wait_for(lambda: neighbours(state, 1).get(url2, {}).get("state") == "down", 30, "node 1 sees node 2 down")
    print(f"cut: node 1 declared node 2 down after {time.monotonic() - cut:.2f} s (mesh.down_after 600 ms)")
    assert neighbours(state, 1)[url2]["downs"] == 1
    mesh("link", 1, 2, "up", state=state)
    back = time.monotonic()
    wait_for(lambda: neighbours(state, 1).get(url2, {}).get("state") == "up"
             and neighbours(state, 2).get(url1, {}).get("state") == "up", 30, "both ends up again")
    print(f"restored: both ends up again after {time.monotonic() - back:.2f} s")
    assert neighbours(state, 1)[url2]["ups"] >= 1
