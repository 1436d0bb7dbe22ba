"""The admin API of a real node: /metrics in Prometheus text format and /status as JSON,
with counters that move when the node works, over TCP on IPv6 only."""
import http.server
import json
import pathlib
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import Node, stoq


@pytest.fixture(scope="module")
def admin_node(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("admin"), workers=2, extra='[admin]\nlisten = "[::1]:0"')
    n.add_object("a.bin", 3 << 20)
    yield n
    assert n.stop() == 0


def fetch(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("content-type"), r.read().decode()


def sample(text, name, **labels):
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}{{{re.escape(sel)}}} (\d+)$" if sel else rf"^{name} (\d+)$", text, re.M)
    assert m, f"{name}{{{sel}}} not in /metrics"
    return int(m.group(1))


def total(text, name):
    return sum(int(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\d+)$", text, re.M))


def test_metrics_move_with_traffic(admin_node):
    assert admin_node.admin and admin_node.admin.startswith("http://[::1]:")
    status, ctype, before = fetch(admin_node.admin)
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    assert "# TYPE stoq_quic_datagrams_received_total counter" in before
    assert sample(before, "stoq_datapath_info", worker=0, backend="io_uring", features="gso,gro,ecn,multishot") == 1
    r = stoq("get", admin_node.url("a.bin"), "--ca", admin_node.cert, "--json")
    assert r.returncode == 0, r.stderr
    time.sleep(2.2)  # workers publish about once a second
    _, _, after = fetch(admin_node.admin)
    assert total(after, "stoq_quic_connections_accepted_total") >= total(before, "stoq_quic_connections_accepted_total") + 1
    assert total(after, "stoq_datapath_tx_bytes_total") - total(before, "stoq_datapath_tx_bytes_total") >= 3 << 20
    assert total(after, "stoq_http_requests_total") >= 1
    assert sample(after, "stoq_tls_certificates_issued_total") == 1
    assert sample(after, "stoq_tls_renewal_failures_total") == 0
    assert sample(after, "stoq_tls_certificate_not_after_seconds") > time.time() + 3600


def test_status_is_json_and_unknown_paths_are_404(admin_node):
    status, ctype, body = fetch(admin_node.admin.replace("/metrics", "/status"))
    assert status == 200 and ctype == "application/json"
    doc = json.loads(body)
    assert [w["worker"] for w in doc["workers"]] == [0, 1]
    assert all(w["backend"] == "io_uring" for w in doc["workers"])
    assert "store" in doc
    with pytest.raises(urllib.error.HTTPError) as e:
        fetch(admin_node.admin.replace("/metrics", "/nope"))
    assert e.value.code == 404


def test_stoq_status_reads_the_admin_api(admin_node):
    r = stoq("status", admin_node.admin)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("worker  datapath")
    assert len([l for l in lines if re.match(r"^\s+\d+\s+io_uring", l)]) == 2
    assert lines[-1].startswith("store: ")
    r = stoq("status", admin_node.admin, "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)["workers"]) == 2
    r = stoq("status", "http://127.0.0.1:9")
    assert r.returncode == 2 and "IPv6 only" in r.stderr


def test_promtool_accepts_metrics(admin_node):
    """The whole exposition of a real node passes `promtool check metrics` (Debian
    `prometheus`, scripts/install-deps); MeshMetricsTests does the same with the mesh
    families present."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool not installed: run scripts/install-deps"
    _, _, text = fetch(admin_node.admin)
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


def test_stoq_mesh_on_a_node_without_mesh(admin_node):
    for sub in (["status"], ["routes"], ["path", "abcd"]):
        r = stoq("mesh", sub[0], admin_node.admin, *sub[1:])
        assert r.returncode == 1, r.stdout
        assert r.stderr == "stoq: this node runs no mesh ([mesh] peers or discovery not configured)\n"
    r = stoq("mesh", "status", "http://127.0.0.1:9")
    assert r.returncode == 2 and "IPv6 only" in r.stderr


class _Fixture(http.server.BaseHTTPRequestHandler):
    """/status as a mesh node renders it: Tests/fixtures/mesh-status.json (MeshMetricsTests
    checks that STOQAdmin renders exactly that)."""
    body = (pathlib.Path(__file__).parent.parent / "fixtures" / "mesh-status.json").read_bytes()

    def do_GET(self):
        if self.path != "/status":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


class _V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def test_stoq_mesh_commands_read_the_mesh_object():
    server = _V6Server(("::1", 0), _Fixture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    admin = f"http://[::1]:{server.server_address[1]}"
    try:
        r = stoq("mesh", "status", admin)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("node a1b2c3d4e5f60718")
        assert re.search(r"^https://\[fd00:1::2\]:4433\s+9c4e7f10b2d3a5c6\s+up\s+yes\s+1\.25\s", r.stdout, re.M)
        assert "refused bad_signature 1, stale 2" in r.stdout
        r = stoq("mesh", "routes", admin)
        assert r.returncode == 0 and len(r.stdout.splitlines()) == 4, r.stderr
        r = stoq("mesh", "path", admin, "7d1e5a")
        assert r.returncode == 0 and "backup: 3 hops, cost 9.75" in r.stdout, r.stderr
        r = stoq("mesh", "path", admin, "7d1e")
        assert r.returncode == 1 and "is ambiguous: 7d1e5a9b2c3f4a6b, 7d1e00ff4422aa11" in r.stderr
        r = stoq("mesh", "path", admin, "ffff")
        assert r.returncode == 1 and "no route to ffff: known destinations: " in r.stderr
        r = stoq("mesh", "routes", admin, "--json")
        assert r.returncode == 0 and [x["hops"] for x in json.loads(r.stdout)] == [1, 2, 3]
        r = stoq("mesh", "path", admin, "7d1e00", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["backup_path"] is None
        r = stoq("mesh", "status", admin, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["max_hops"] == 4
    finally:
        server.shutdown()
