"""Hot reload: a changed config file (or SIGHUP) applies mutual-TLS rules and the log level
to a running node, names the keys that need a restart, and an invalid file changes nothing
while the node keeps serving."""
import json
import pathlib
import re
import signal
import ssl
import time
import urllib.error
import urllib.request

import pytest

from conftest import Node, need_binary, random_file, run, sha256_file, stoq


@pytest.fixture
def node(tmp_path):
    n = Node(tmp_path, workers=1)
    n.add_object("a.bin", 50_000)
    yield n
    assert n.stop() == 0


def log_text(n):
    n.log.flush()
    return pathlib.Path(n.log.name).read_text()


def wait_for(n, pattern, seconds=8):
    deadline = time.time() + seconds
    while time.time() < deadline:
        m = re.search(pattern, log_text(n))
        if m:
            return m
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} never appeared in the node's log:\n{log_text(n)[-2000:]}")


def get(n, *extra):
    return stoq("get", n.url("a.bin"), "--ca", n.cert, "--json", "--timeout", "10", *extra)


def test_a_changed_file_applies_live_and_names_what_needs_a_restart(node, tmp_path):
    assert get(node).returncode == 0
    cfg = node.config.read_text()
    cfg = cfg.replace("workers = 1\n", 'workers = 2\nclient_auth = "required"\n')
    cfg += '[log]\nlevel = "debug"\n'
    node.config.write_text(cfg)
    m = wait_for(node, r"applied=(\S+) restart_needed=(\S*) .*reloaded")
    assert set(m.group(1).split(",")) == {"network.client_auth", "log.level"}
    assert m.group(2) == "network"                     # workers: a restart
    r = get(node)                                       # no client certificate now: refused
    assert r.returncode != 0
    wait_for(node, r"client certificate refused: none was presented")
    # A client certificate from the node's CA is accepted; debug logging is on.
    ca = pathlib.Path(node.cert).parent
    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    assert stoq("trust", "issue", "--dir", ca, "--dns", "client.example", "--out", cert, "--key-out", key).returncode == 0
    assert get(node, "--cert", cert, "--key", key).returncode == 0
    wait_for(node, r"debug stoq-node: .*connection closed")


def test_a_tls_key_that_needs_a_restart_is_named_as_written(node):
    """tls.early_data lives in the QUIC settings: a change to it was reported as
    `restart_needed=network`, a key the operator had not touched."""
    node.config.write_text(node.config.read_text() + '[tls]\nearly_data = false\n')
    m = wait_for(node, r"applied=(\S*) restart_needed=(\S*) .*reloaded")
    assert m.group(2) == "tls", m.group(0)


def test_an_edit_announced_by_sighup_is_read_once(node):
    """The file watcher saw the edit a SIGHUP had already applied and reloaded it a second
    time ("config file changed: … unchanged", or the restart list again)."""
    node.config.write_text(node.config.read_text() + '[log]\nlevel = "debug"\n')
    node.proc.send_signal(signal.SIGHUP)
    wait_for(node, r"SIGHUP: reloaded")
    time.sleep(4.5)  # two turns of the watcher
    reads = re.findall(r"(SIGHUP|config file changed): (reloaded|\S+ unchanged)", log_text(node))
    assert reads == [("SIGHUP", "reloaded")], reads


def test_sighup_with_an_invalid_file_keeps_the_running_configuration(node):
    node.config.write_text(node.config.read_text().replace("workers = 1", "workers = -3"))
    node.proc.send_signal(signal.SIGHUP)
    wait_for(node, r"is invalid, keeping the running configuration")
    assert "network.workers" in log_text(node)
    assert get(node).returncode == 0


def test_a_file_the_config_names_that_does_not_load_is_named_with_its_reason(node, tmp_path):
    """The config parses and the file it names is there, but is no key: the refusal does not
    call the config invalid, it names the file that did not load and why."""
    notakey = tmp_path / "partner-key.pem"
    notakey.write_text("not a key\n")
    node.config.write_text(node.config.read_text() + f'[access]\ntoken_keys = ["{notakey}"]\n')
    node.proc.send_signal(signal.SIGHUP)
    m = wait_for(node, r"SIGHUP: (\S+) (.*), keeping the running configuration:\n(.*)")
    assert m.groups() == (str(node.config), "could not be applied", f"access.token_keys: {notakey}: not a P-256 public key in PEM")
    assert get(node).returncode == 0


def test_a_trust_change_reaches_the_edges_origin_without_a_restart(tmp_path):
    """An edge verifies its origin with [trust] as it is now: a reload that changes the bundle
    applies to the origin's connection too, both ways (it used to wait for a restart, and
    said so)."""
    origin = Node(tmp_path / "origin", workers=1)
    edge = None
    try:
        digests = {}
        for name, seed in (("a.bin", 1), ("b.bin", 2)):
            digests[name] = sha256_file(random_file(tmp_path / name, 300_000, seed))
            r = stoq("put", tmp_path / name, origin.url(name), "--ca", origin.cert)
            assert r.returncode == 0, r.stderr
        edge = Node(tmp_path / "edge", workers=1,
                    extra=f'[edge]\nenable_caching = true\norigin = "https://[::1]:{origin.port}"\n')
        base = edge.config.read_text()

        def via_edge(name):
            return stoq("get", edge.url(name), "-o", tmp_path / f"{name}.out", "--ca", edge.cert, "--timeout", "20")

        def reload(bundle, count):
            edge.config.write_text(base + f'[trust]\nbundle = "{bundle}"\n')
            edge.proc.send_signal(signal.SIGHUP)
            deadline = time.time() + 8
            while len(re.findall(r"applied=(\S+) restart_needed=(\S*) .*reloaded", log_text(edge))) < count:
                assert time.time() < deadline, log_text(edge)[-2000:]
                time.sleep(0.2)
            applied, restart = re.findall(r"applied=(\S+) restart_needed=(\S*) .*reloaded", log_text(edge))[-1]
            assert "trust" in applied.split(",") and restart == "", (applied, restart)
            time.sleep(1.2)  # past the edge's hold on an upstream that just failed

        # No bundle: the system's roots, which do not know the origin's CA.
        r = via_edge("a.bin")
        assert r.returncode == 1 and "HTTP 502" in r.stderr and "certificate" in r.stderr, r.stderr
        reload(origin.cert, 1)
        r = via_edge("a.bin")
        assert r.returncode == 0, r.stderr
        assert sha256_file(tmp_path / "a.bin.out") == digests["a.bin"]
        # Back to a bundle without the origin's CA: the connection verified under the old one
        # goes with it.
        reload(edge.cert, 2)
        r = via_edge("b.bin")
        assert r.returncode == 1 and "HTTP 502" in r.stderr and "certificate" in r.stderr, r.stderr
        assert "mesh neighbours are verified with the old one" not in log_text(edge)
    finally:
        if edge:
            assert edge.stop() == 0
        assert origin.stop() == 0


def test_a_second_node_on_a_running_nodes_data_dir_changes_nothing(node, tmp_path):
    """Refused before it writes anything: it used to issue itself a certificate over the running
    node's (which kept serving its own), log it, and remove uploads in progress, before the
    content store's lock stopped it."""
    cert = pathlib.Path(node.workdir / "data" / "identity" / "cert.pem")
    before = cert.read_bytes()
    r = run([need_binary("stoq-node"), "--config", node.config], timeout=60)
    assert r.returncode != 0
    assert f"node.data_dir {node.workdir}/data is in use by another stoq-node" in r.stderr, r.stderr
    assert cert.read_bytes() == before
    assert get(node).returncode == 0


def test_a_revocation_refuses_its_certificate_without_a_restart(tmp_path):
    """A serial added to data_dir/trust/revoked.txt (where `stoq trust serve`'s revocations go)
    refuses its certificate from the next handshake, on QUIC and on the admin API's mutual TLS
    alike, once the node sees the file change or gets SIGHUP. The list was read once, at start:
    SIGHUP logged "unchanged" and the revoked client kept its access until a restart."""
    n = Node(tmp_path, workers=1, extra='client_auth = "required"\n[admin]\nlisten = "[::1]:0"\nauth = "mtls"')
    try:
        n.add_object("a.bin", 50_000)
        ca = pathlib.Path(n.cert).parent
        certs = {}
        for name in ("alice", "bob", "carol", "prometheus"):
            cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
            r = stoq("trust", "issue", "--dir", ca, "--dns", f"{name}.example", "--out", cert, "--key-out", key)
            assert r.returncode == 0, r.stderr
            certs[name] = (cert, key)

        def admin(name):
            ctx = ssl.create_default_context(cafile=n.cert)
            ctx.check_hostname = False
            ctx.load_cert_chain(*certs[name])
            with urllib.request.urlopen(n.admin, timeout=10, context=ctx) as r:
                return r.read().decode()

        def refused_total():
            return sum(int(v) for v in re.findall(
                r"^stoq_tls_peer_certificates_refused_total\{[^}]*\} (\d+)$", admin("prometheus"), re.M))

        def revoke(name):
            serial = json.loads(stoq("trust", "show", certs[name][0], "--json").stdout)["certificates"][0]["serial"]
            with open(ca / "revoked.txt", "a") as f:
                f.write(serial + "\n")

        def refused(name, before):
            r = get(n, "--cert", certs[name][0], "--key", certs[name][1])
            assert r.returncode != 0 and "TLS alert 42" in r.stderr, r.stderr   # bad_certificate
            wait_for(n, rf"client certificate refused: revoked: leaf CN={name}.example serial ")
            deadline = time.time() + 10                  # workers publish counters every second
            while refused_total() != before + 1:
                assert time.time() < deadline, refused_total()
                time.sleep(0.2)
            with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
                admin(name)

        for name in ("alice", "bob"):
            assert get(n, "--cert", certs[name][0], "--key", certs[name][1]).returncode == 0
            assert "stoq_quic_connections" in admin(name)
        # SIGHUP: the serial is read at once (the watcher may see the file first: one reload).
        before = refused_total()
        revoke("alice")
        n.proc.send_signal(signal.SIGHUP)
        wait_for(n, r"applied=trust\.revocations restart_needed= .*(SIGHUP|revoked\.txt changed): reloaded")
        refused("alice", before)
        assert get(n, "--cert", certs["bob"][0], "--key", certs["bob"][1]).returncode == 0
        # No signal: the node sees the file change by itself.
        before = refused_total()
        revoke("bob")
        wait_for(n, r"applied=trust\.revocations restart_needed= .*revoked\.txt changed: reloaded")
        refused("bob", before)
        # The serials are not the config file's: they apply while it is invalid too.
        n.config.write_text(n.config.read_text().replace("workers = 1", "workers = -3"))
        wait_for(n, r"config file changed: \S+ is invalid, keeping the running configuration")
        before = refused_total()
        revoke("carol")
        wait_for(n, r"applied=trust\.revocations .*revoked\.txt changed: revoked serials reloaded")
        refused("carol", before)
    finally:
        assert n.stop() == 0


def test_a_refused_reload_shows_on_metrics_until_one_applies(tmp_path):
    """A refused reload was a log line only, which automation does not read: now it is counted
    (stoq_config_reload_failures_total) and stoq_config_last_reload_successful stays 0 until a
    reload applies (the node also tries it again by itself, every 30 s)."""
    n = Node(tmp_path, workers=1, extra='[admin]\nlisten = "[::1]:0"')
    try:
        def metric(name):
            with urllib.request.urlopen(n.admin, timeout=10) as r:
                m = re.search(rf"^{name} (\d+)$", r.read().decode(), re.M)
            assert m, f"{name} not in /metrics"
            return int(m.group(1))

        started = metric("stoq_config_last_reload_success_timestamp_seconds")
        assert started > 0 and metric("stoq_config_last_reload_successful") == 1
        assert metric("stoq_config_reload_failures_total") == 0
        good = n.config.read_text()
        n.config.write_text(good.replace("workers = 1", "workers = -3"))
        wait_for(n, r"config file changed: \S+ is invalid, keeping the running configuration")
        assert metric("stoq_config_reload_failures_total") == 1
        assert metric("stoq_config_last_reload_successful") == 0
        assert metric("stoq_config_last_reload_success_timestamp_seconds") == started
        while int(time.time()) <= started:               # a second on: a timestamp of its own
            time.sleep(0.05)
        n.config.write_text(good)
        wait_for(n, r"config file changed: \S+ unchanged")
        assert metric("stoq_config_last_reload_successful") == 1
        assert metric("stoq_config_last_reload_success_timestamp_seconds") > started
        assert metric("stoq_config_reload_failures_total") == 1
    finally:
        assert n.stop() == 0
