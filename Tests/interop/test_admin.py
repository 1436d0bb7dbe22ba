"""The admin API of a real node: /metrics in Prometheus text format and /status as JSON,
with counters that move when the node works, over TCP on IPv6 only."""
import http.client
import http.server
import json
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import Node, need_binary, run, settled, stoq


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
    # The version and the libraries the node runs: the packages installed here, as --version says.
    libs = {lib: run(["pkg-config", "--modversion", pkg]).stdout.strip()
            for lib, pkg in (("ngtcp2", "libngtcp2"), ("nghttp3", "libnghttp3"), ("gnutls", "gnutls"))}
    line = run([need_binary("stoq-node"), "--version"]).stdout.strip()
    version = line.split()[0]
    assert line == f"{version} (ngtcp2 {libs['ngtcp2']}, nghttp3 {libs['nghttp3']}, GnuTLS {libs['gnutls']})"
    assert re.fullmatch(r"\d+\.\d+\.\d+", version) and run([need_binary("stoq"), "--version"]).stdout.strip() == line
    assert sample(before, "stoq_build_info", version=version, **libs) == 1
    assert sample(before, "stoq_datapath_info", worker=0, backend="io_uring", features="gso,gro,ecn,multishot") == 1
    r = stoq("get", admin_node.url("a.bin"), "--ca", admin_node.cert, "--json")
    assert r.returncode == 0, r.stderr

    # Each of the 2 workers publishes on its own schedule (about once a second): wait until
    # the GET shows, then until the request count stops moving, so `after` holds all of it.
    def moved(text):
        return (total(text, "stoq_quic_connections_accepted_total") >= total(before, "stoq_quic_connections_accepted_total") + 1
                and total(text, "stoq_datapath_tx_bytes_total") - total(before, "stoq_datapath_tx_bytes_total") >= 3 << 20
                and total(text, "stoq_http_requests_total") >= 1)

    deadline = time.time() + 10
    while not moved(after := fetch(admin_node.admin)[2]) and time.time() < deadline:
        time.sleep(0.2)
    assert total(after, "stoq_quic_connections_accepted_total") >= total(before, "stoq_quic_connections_accepted_total") + 1
    assert total(after, "stoq_datapath_tx_bytes_total") - total(before, "stoq_datapath_tx_bytes_total") >= 3 << 20
    assert total(after, "stoq_http_requests_total") >= 1
    requests = lambda: total(fetch(admin_node.admin)[2], "stoq_http_requests_total")
    base = settled(requests)
    # Every request counts, whichever service answers it: a stored upload (chunks, dedup on) and
    # its GETs are the content service's, and once counted nothing.
    src = admin_node.workdir / "counted.bin"
    src.write_bytes(b"x" * 300_000)
    assert stoq("put", src, admin_node.url("counted.bin"), "--ca", admin_node.cert).returncode == 0
    for _ in range(3):
        assert stoq("get", admin_node.url("counted.bin"), "--ca", admin_node.cert).returncode == 0
    deadline = time.time() + 10     # all 4 shown, then no more arriving
    while requests() - base < 4 and time.time() < deadline:
        time.sleep(0.2)
    assert settled(requests) - base == 4
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


def test_idle_admin_connections_are_bounded_per_client(tmp_path):
    """Connections are bounded before anyone is authenticated: 40 idle TCP connections from
    ::1 to a node's admin API: 32 (the most from one /64) stay open, the other 8 are closed as
    they open; the 8 refusals are counted; once some idle ones go, a scrape is served. (A
    connection that has sent no whole request 10 s after it opened is closed too:
    AdminServerTests, with the deadline shortened.)"""
    n = Node(tmp_path, workers=1, extra='[admin]\nlisten = "[::1]:0"')
    host, port = n.admin.split("//")[1].split("/")[0].rsplit(":", 1)
    idle = []
    try:
        for _ in range(40):
            s = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
            idle.append(s)
        time.sleep(1)
        closed = 0
        for s in idle:
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            except BlockingIOError:
                pass
        assert closed == 8, f"{closed} of 40 closed as they opened"
        for s in idle[:10]:
            s.close()
        deadline = time.time() + 10
        while True:  # the server hears of the closes on its own time
            try:
                text = fetch(n.admin)[2]
                break
            except (ConnectionError, urllib.error.URLError):
                assert time.time() < deadline, "no scrape served after 10 idle connections went"
                time.sleep(0.2)
        assert sample(text, "stoq_admin_connections_refused_total") >= 8
    finally:
        for s in idle:
            s.close()
        assert n.stop() == 0


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


# ---- admin.auth (issue #16, item 6) --------------------------------------------------------

NOT_LOOPBACK = 'admin.listen = "[::]:9090" is not loopback: set admin.auth = "token" or "mtls"'


def on_loopback(admin_url):
    """The banner prints the bound address ([::]); ask it on [::1]."""
    return admin_url.replace("[::]", "[::1]")


def test_a_non_loopback_admin_without_auth_refuses_to_start(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path}/data"\n[network]\nlisten_addr = "[::1]:0"\n'
                   '[admin]\nlisten = "[::]:9090"\n')
    r = run([need_binary("stoq-node"), "--config", cfg], timeout=30)
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"stoq-node: invalid configuration\n{cfg}: {NOT_LOOPBACK}\n"
    assert not (tmp_path / "data").exists()          # refused before touching anything
    r = stoq("config", "check", cfg)
    assert r.returncode != 0 and NOT_LOOPBACK in r.stdout + r.stderr


def test_a_reload_to_a_non_loopback_admin_without_auth_is_refused(tmp_path):
    n = Node(tmp_path, workers=1, extra='[admin]\nlisten = "[::1]:0"')
    try:
        n.config.write_text(n.config.read_text().replace('listen = "[::1]:0"', 'listen = "[::]:9090"'))
        n.proc.send_signal(signal.SIGHUP)
        deadline, log = time.time() + 10, ""
        while time.time() < deadline and NOT_LOOPBACK not in log:
            time.sleep(0.2)
            log = (tmp_path / "node.log").read_text()
        assert "is invalid, keeping the running configuration" in log and NOT_LOOPBACK in log, log[-2000:]
        assert fetch(n.admin)[0] == 200                  # still the loopback one
    finally:
        assert n.stop() == 0


def get_status(url, headers=None, context=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def test_token_auth_answers_401_without_the_token_and_200_with_it(tmp_path):
    token_file = tmp_path / "admin-token"
    token_file.write_text("0123456789abcdef-admin-token\n")
    n = Node(tmp_path, workers=1, extra=f'[admin]\nlisten = "[::]:0"\nauth = "token"\ntoken_file = "{token_file}"')
    try:
        assert n.admin.startswith("http://[::]:")
        url = on_loopback(n.admin)
        status, headers, body = get_status(url)
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        assert body == "no Authorization header: send Authorization: Bearer <token>\n"
        status, headers, body = get_status(url, {"Authorization": "Bearer not-the-token"})
        assert status == 401 and body == "wrong bearer token\n"
        assert get_status(url.replace("/metrics", "/status"))[0] == 401
        status, _, text = get_status(url, {"Authorization": "Bearer 0123456789abcdef-admin-token"})
        assert status == 200
        assert sample(text, "stoq_admin_refused_total") == 3
        assert "stoq_quic_datagrams_received_total" in text
        status, _, body = get_status(url.replace("/metrics", "/status"), {"Authorization": "Bearer 0123456789abcdef-admin-token"})
        assert status == 200 and "workers" in json.loads(body)
        # stoq status takes the token from STOQ_ADMIN_TOKEN_FILE, and says so when it is missing.
        base = url.removesuffix("/metrics")
        r = stoq("status", base)
        assert r.returncode == 1 and "HTTP 401: the admin API wants a bearer token" in r.stderr, r.stderr
        r = stoq("status", base, "--json", env={"STOQ_ADMIN_TOKEN_FILE": str(token_file)})
        assert r.returncode == 0 and json.loads(r.stdout)["workers"], r.stderr
        # Tokens the access check accepts do too, with the admin role only: the operator's,
        # and one issued with the node's key; a writer's is refused, naming its role.
        status, _, _ = get_status(url, {"Authorization": f"Bearer {n.token}"})
        assert status == 200
        key = tmp_path / "data" / "access" / "token-key.pem"
        for role, want in (("admin", 200), ("writer", 401)):
            r = stoq("trust", "token", "--key", key, "--subject", f"prom-{role}", "--role", role, "--lifetime", "1h")
            assert r.returncode == 0, r.stderr
            status, _, body = get_status(url, {"Authorization": f"Bearer {r.stdout.strip()}"})
            assert status == want, body
            if want == 401:
                assert body == "the token's role is writer, not admin\n"
    finally:
        assert n.stop() == 0


def test_token_auth_without_a_token_file_takes_admin_tokens(tmp_path):
    n = Node(tmp_path, workers=1, extra='[admin]\nlisten = "[::]:0"\nauth = "token"')
    try:
        url = on_loopback(n.admin)
        assert get_status(url)[0] == 401
        status, _, body = get_status(url, {"Authorization": "Bearer x.y.z"})
        assert status == 401 and body.startswith("invalid bearer token: "), body
        assert get_status(url, {"Authorization": f"Bearer {n.token}"})[0] == 200
    finally:
        assert n.stop() == 0


def test_a_missing_token_file_is_a_config_error(tmp_path):
    """Refused with every other config error (exit 2), and by `stoq config check` too."""
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path}/data"\n[network]\nlisten_addr = "[::1]:0"\nworkers = 1\n'
                   f'[storage]\npath = "{tmp_path}/objects"\ncontent_path = "{tmp_path}/content"\n'
                   f'[admin]\nlisten = "[::]:0"\nauth = "token"\ntoken_file = "{tmp_path}/nope"\n')
    for r in (run([need_binary("stoq-node"), "--config", cfg], timeout=60), stoq("config", "check", cfg)):
        assert r.returncode == 2
        assert f'admin.token_file = "{tmp_path}/nope": io; expected a readable file: no such file' in r.stderr, r.stderr


def test_mtls_auth_takes_a_certificate_from_the_nodes_ca_and_nothing_else(tmp_path):
    import ssl
    n = Node(tmp_path, workers=1, extra='[admin]\nlisten = "[::]:0"\nauth = "mtls"')
    try:
        assert n.admin.startswith("https://[::]:")
        url = on_loopback(n.admin)
        ca = pathlib.Path(n.cert).parent                   # data/trust: the node's CA
        cert, key = tmp_path / "prom.pem", tmp_path / "prom.key"
        r = stoq("trust", "issue", "--dir", ca, "--dns", "prometheus.example", "--out", cert, "--key-out", key)
        assert r.returncode == 0, r.stderr
        other = tmp_path / "other-ca"
        assert stoq("trust", "init", "--dir", other).returncode == 0
        ocert, okey = tmp_path / "stranger.pem", tmp_path / "stranger.key"
        assert stoq("trust", "issue", "--dir", other, "--dns", "x.example", "--out", ocert, "--key-out", okey).returncode == 0

        def context(chain=None, key=None):
            ctx = ssl.create_default_context(cafile=n.cert)     # the node's certificate verifies
            ctx.check_hostname = False                          # (its names: host, addresses)
            if chain:
                ctx.load_cert_chain(chain, key)
            return ctx

        status, _, text = get_status(url, context=context(cert, key))
        assert status == 200 and "stoq_quic_datagrams_received_total" in text
        # The CLI, with the same certificate from the environment (it spoke http:// only).
        admin_env = {"STOQ_ADMIN_CA": str(n.cert), "STOQ_ADMIN_CERT": str(cert), "STOQ_ADMIN_KEY": str(key)}
        r = stoq("status", url, "--json", env=admin_env)
        assert r.returncode == 0 and json.loads(r.stdout)["workers"], r.stderr
        r = stoq("status", url, env={"STOQ_ADMIN_CA": str(n.cert)})
        assert r.returncode == 2 and "STOQ_ADMIN_CERT, STOQ_ADMIN_KEY not set" in r.stderr, r.stderr
        r = stoq("status", url, env={**admin_env, "STOQ_ADMIN_CERT": str(ocert), "STOQ_ADMIN_KEY": str(okey)})
        assert r.returncode == 1 and url.removesuffix("/metrics") + "/status" in r.stderr, r.stderr
        for bad in (context(), context(ocert, okey)):
            with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
                get_status(url, context=bad)
        # Plain HTTP gets nothing either.
        with pytest.raises((ConnectionError, urllib.error.URLError, http.client.HTTPException)):
            get_status(url.replace("https://", "http://"))
        status, _, text = get_status(url, context=context(cert, key))
        assert status == 200 and sample(text, "stoq_admin_refused_total") >= 2
        assert "client certificate refused" in (tmp_path / "node.log").read_text()
        # A reload that adds the other CA to trust.bundle lets its certificates in, without a
        # restart (the admin API kept the trust of the start).
        n.config.write_text(n.config.read_text() + f'[trust]\nbundle = "{other}/root.pem"\n')
        n.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        while not re.search(r"applied=\S*trust\S* restart_needed= .*reloaded", (tmp_path / "node.log").read_text()):
            assert time.time() < deadline, (tmp_path / "node.log").read_text()[-2000:]
            time.sleep(0.2)
        status, _, _ = get_status(url, context=context(ocert, okey))
        assert status == 200
    finally:
        assert n.stop() == 0


def test_mtls_serves_the_rotated_certificate_from_the_next_connection(tmp_path):
    """The identity certificate rotates (here every ~7 s: a 20 s lifetime renewed a third
    before expiry); the admin API serves the new one without a restart."""
    import ssl
    n = Node(tmp_path, workers=1, extra='[admin]\nlisten = "[::1]:0"\nauth = "mtls"\n[trust]\ncert_lifetime = "20s"')
    try:
        ca = pathlib.Path(n.cert).parent
        cert, key = tmp_path / "prom.pem", tmp_path / "prom.key"
        assert stoq("trust", "issue", "--dir", ca, "--dns", "prometheus.example", "--out", cert, "--key-out", key).returncode == 0
        ctx = ssl.create_default_context(cafile=n.cert)
        ctx.check_hostname = False
        ctx.load_cert_chain(cert, key)
        host, port = re.match(r"https://\[(.*)\]:(\d+)", n.admin).groups()

        def served():
            with socket.create_connection((host, int(port)), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
                return tls.getpeercert(binary_form=True)

        first = served()
        deadline = time.time() + 30
        while time.time() < deadline and len(re.findall(r"certificate issued", (tmp_path / "node.log").read_text())) < 2:
            time.sleep(0.5)
        assert len(re.findall(r"certificate issued", (tmp_path / "node.log").read_text())) >= 2, "no rotation"
        second = served()
        assert second != first
        status, _, _ = get_status(n.admin, context=ctx)
        assert status == 200
    finally:
        assert n.stop() == 0
