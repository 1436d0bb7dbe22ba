"""One trace through mesh relays (the testbed's namespaces, a line 1-2-3 where node 3 has no
link to node 1): `stoq get --trace` at node 3 for an object put at node 1 is relayed by node 2,
and every hop's spans land in one OTLP receiver (run in the testbed's service namespace, which
every node reaches): node 3's upstream span → node 2's relay server span → node 2's upstream
span → node 1's server span."""
import os
import pathlib
import subprocess
import sys
import time

import pytest

from conftest import random_file, sha256_file
from test_mesh_testbed import Mesh, mesh, state, testbed  # noqa: F401  (state and testbed are fixtures)

pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2",
                    reason="opentelemetry-proto is missing: run scripts/install-deps")
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the mesh testbed needs root (network namespaces)")

HERE = pathlib.Path(__file__).resolve().parent
LINE3 = "a,b,rate_mbit,delay_ms,loss_pct\n1,2,0,0,0\n2,3,0,0,0\n"
SVC = "fd00:57:ff::1"  # scripts/mesh: the service namespace's address, routed from every node


def spans_in(path, trace_id):
    import json
    if not path.exists():
        return []
    return [s for s in map(json.loads, path.read_text().splitlines()) if s["trace_id"] == trace_id]


def test_a_trace_follows_a_relayed_fetch_hop_by_hop(tmp_path, state):
    topo = tmp_path / "line3.csv"
    topo.write_text(LINE3)
    extras = []
    for n in (1, 2, 3):
        f = tmp_path / f"tracing{n}.toml"
        f.write_text(f'[tracing]\nenabled = true\nendpoint = "http://[{SVC}]:4318/v1/traces"\n'
                     f'service_name = "node{n}"\nexport_interval = "100ms"\n')
        extras += ["--extra", f"{n}:{f}"]
    # dns discovery brings the service namespace (and dnsmasq, which the mesh then uses).
    mesh("up", "--topology", topo, "--discovery", "dns", *extras, state=state)
    out = tmp_path / "spans.jsonl"
    receiver = subprocess.Popen(["ip", "netns", "exec", "stoq-msvc", sys.executable, HERE / "otlp_receiver.py", SVC, "4318", out],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout.readline().strip() == "listening", receiver.stderr.read()
        m = Mesh(state)
        m.converge([(3, 1), (1, 3)])
        src = random_file(tmp_path / "m.bin", (2 << 20) + 5, seed=29)
        m.run(1, "stoq", "put", "--chunked", "--ca", m.ca, src, f"{m.urls[1]}/objects/relayed")
        r = m.run(3, "stoq", "get", "--trace", "--ca", m.ca, f"{m.urls[3]}/objects/relayed", "-o", tmp_path / "m.out")
        assert sha256_file(tmp_path / "m.out") == sha256_file(src)
        trace_id = r.stderr.split("trace: ", 1)[1].split()[0]

        def chain():
            spans = spans_in(out, trace_id)
            by_id = {s["span_id"]: s for s in spans}
            hops = []
            for s in spans:
                if s["service"] != "node1" or s["kind"] != "server":
                    continue
                up2 = by_id.get(s["parent_span_id"])          # node 2's upstream span
                srv2 = up2 and by_id.get(up2["parent_span_id"])  # node 2's relay server span
                up3 = srv2 and by_id.get(srv2["parent_span_id"])  # node 3's upstream span
                srv3 = up3 and by_id.get(up3["parent_span_id"])  # node 3's server span
                if srv3:
                    hops.append((srv3, up3, srv2, up2, s))
            return hops

        deadline = time.monotonic() + 30
        while not (hops := chain()):
            if time.monotonic() > deadline:
                pytest.fail(f"no node3 → node2 → node1 chain in trace {trace_id}: {spans_in(out, trace_id)[:20]}")
            time.sleep(0.3)
        srv3, up3, srv2, up2, srv1 = hops[0]
        assert (srv3["service"], srv3["kind"], srv3["attributes"]["url.path"]) == ("node3", "server", "/objects/relayed")
        assert (up3["service"], up3["kind"]) == ("node3", "client")
        assert (srv2["service"], srv2["kind"]) == ("node2", "server")
        assert srv2["attributes"]["url.path"].startswith("/_stoq/relay/") and srv2["attributes"]["url.path"] == up3["attributes"]["url.path"]
        assert (up2["service"], up2["kind"]) == ("node2", "client")
        assert srv1["attributes"]["url.path"] == up2["attributes"]["url.path"]
        assert all(s["attributes"]["http.response.status_code"] == 200 for s in (srv3, up3, srv2, up2, srv1))
    finally:
        receiver.kill()
        receiver.wait()
