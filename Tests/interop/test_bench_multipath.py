"""scripts/bench-multipath --testbed on config/mesh/diamond4.csv: the JSON it prints has every
scheduler's figures and the shift time, and a node fetching through the mesh with
`routing.algorithm = "ml_optimized"` shows the learner's routes, both next hops used. Figures
are checked for presence (numbers > 0), never against time thresholds: the machine is shared."""
import json
import os
import subprocess
import time

import pytest

from conftest import ROOT, bin_dir, need_binary, sha256_file

MESH = ROOT / "scripts" / "mesh"
BENCH = ROOT / "scripts" / "bench-multipath-testbed"
DIAMOND = ROOT / "config" / "mesh" / "diamond4.csv"
SCHEDULERS = ("single_route", "best_single", "round_robin", "min_rtt", "ml_optimized")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the mesh testbed needs root (network namespaces)")


def env(state):
    return dict(os.environ, STOQ_MESH_STATE=str(state), STOQ_BIN_DIR=str(bin_dir()))


def mesh(*args, state, timeout=120):
    r = subprocess.run([str(MESH), *map(str, args)], capture_output=True, text=True, env=env(state), timeout=timeout)
    assert r.returncode == 0, f"scripts/mesh {' '.join(map(str, args))}: {r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture
def state(tmp_path):
    s = tmp_path / "mesh"
    yield s
    subprocess.run([str(MESH), "down"], capture_output=True, env=env(s))


def test_quick_bench_prints_every_scheduler_and_the_shift(tmp_path):
    need_binary("stoq-node")
    need_binary("stoq")
    r = subprocess.run([str(BENCH), "--quick", "--json"], capture_output=True, text=True,
                       env=env(tmp_path / "bench"), timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in SCHEDULERS:
        assert key in out, (key, list(out))
        for field in ("p50_s", "goodput_mbit", "ratio_vs_single"):
            v = out[key][field]
            assert isinstance(v, (int, float)) and v > 0, (key, field, v)
    # Every multipath configuration dispatched chunks on the learner's routes: shares sum to 1.
    for key in SCHEDULERS[1:]:
        shares = out[key]["route_shares"]
        assert set(shares) <= {"via_node2", "via_node3"} and shares, (key, shares)
        assert abs(sum(shares.values()) - 1) < 1e-9, (key, shares)
    assert out["single_route"]["route_shares"] == {}
    assert out["single_route"]["ratio_vs_single"] == 1
    shift = out["ml_optimized"]["shift_s"]
    assert isinstance(shift, (int, float)) and shift > 0, shift
    run = out["ml_optimized"]["shift_runs"][0]
    assert run["via_node2"] + run["via_node3"] > 0, run


def test_learner_routes_use_both_next_hops(tmp_path, state):
    need_binary("stoq-node")
    stoq = need_binary("stoq")
    extra = tmp_path / "ml.toml"
    extra.write_text('[routing]\nalgorithm = "ml_optimized"\nmultipath_scheduler = "ml_optimized"\n')
    mesh("up", "--topology", DIAMOND, "--extra", f"4:{extra}", state=state)
    ca = state / "ca" / "root.pem"
    body = tmp_path / "obj"
    body.write_bytes(os.urandom(24 << 20))

    def at(n, *cmd, timeout=180):
        return subprocess.run(["nsenter", f"--net=/run/netns/stoq-m{n}", *map(str, cmd)], capture_output=True,
                              text=True, timeout=timeout)

    # As node 1's operator (writes need a credential, docs/access.md).
    token = state / "node1" / "data" / "access" / "operator.token"
    r = at(1, stoq, "put", "--ca", ca, "--token-file", token, body, "https://[fd00:57::1]:4433/objects/mp")
    assert r.returncode == 0, r.stderr
    # Node 4 learns its two routes to node 1 (through 2, through 3) from adverts: wait for the
    # two-hop route with its backup before fetching, or the learner has one route to pick.
    one = json.loads(at(1, stoq, "mesh", "status", "http://[::1]:9180", "--json", timeout=30).stdout)["node"]
    deadline = time.monotonic() + 60
    while True:
        s = json.loads(at(4, stoq, "mesh", "status", "http://[::1]:9180", "--json", timeout=30).stdout or "{}")
        if any(x["destination"] == one and x.get("backup_path") for x in s.get("routes", [])):
            break
        assert time.monotonic() < deadline, s.get("routes")
        time.sleep(0.3)
    out = tmp_path / "got"
    r = at(4, stoq, "get", "--ca", ca, "https://[fd00:57::4]:4433/objects/mp", "-o", out)
    assert r.returncode == 0, r.stderr
    assert sha256_file(out) == sha256_file(body)
    r = at(4, stoq, "mesh", "status", "http://[::1]:9180", "--json", timeout=30)
    assert r.returncode == 0, r.stderr
    routes = json.loads(r.stdout)["multipath"]
    used = {x["next_hop"] for x in routes if x["dispatched_chunks"] > 0}
    assert len(used) == 2, routes
    assert sum(x["delivered_bytes"] for x in routes) > 0, routes
    for x in routes:
        assert x["rate_bytes_per_second"] > 0 and x["evidence"] > 0, x
    # The text table shows the same routes.
    r = at(4, stoq, "mesh", "routes", "http://[::1]:9180", timeout=30)
    assert "ml_optimized: routes to holders" in r.stdout and "chunks sent" in r.stdout, r.stdout


def test_link_rate_replaces_the_shaping_of_both_directions(tmp_path, state):
    need_binary("stoq-node")
    mesh("up", "--topology", DIAMOND, state=state)
    assert "rate 10 Mbit/s" in mesh("link", 2, 4, "rate", 10, state=state)
    for n, dev in ((2, "m2-4"), (4, "m4-2")):
        r = subprocess.run(["nsenter", f"--net=/run/netns/stoq-m{n}", "tc", "qdisc", "show", "dev", dev],
                           capture_output=True, text=True)
        assert "tbf" in r.stdout and "rate 10Mbit" in r.stdout, r.stdout
    links = json.loads(mesh("status", "--json", state=state))["links"]
    assert [l["rate_mbit"] for l in links if {l["a"], l["b"]} == {2, 4}] == [10]
    mesh("link", 2, 4, "rate", 0, state=state)
    r = subprocess.run(["nsenter", "--net=/run/netns/stoq-m2", "tc", "qdisc", "show", "dev", "m2-4"],
                       capture_output=True, text=True)
    assert "tbf" not in r.stdout, r.stdout
