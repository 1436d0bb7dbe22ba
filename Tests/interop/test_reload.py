"""Hot reload: a changed config file (or SIGHUP) applies mutual-TLS rules and the log level
to a running node, names the keys that need a restart, and an invalid file changes nothing
while the node keeps serving."""
import pathlib
import re
import signal
import time

import pytest

from conftest import Node, need_binary, run, stoq


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


def test_sighup_with_an_invalid_file_keeps_the_running_configuration(node):
    node.config.write_text(node.config.read_text().replace("workers = 1", "workers = -3"))
    node.proc.send_signal(signal.SIGHUP)
    wait_for(node, r"is invalid, keeping the running configuration")
    assert "network.workers" in log_text(node)
    assert get(node).returncode == 0


def test_a_trust_change_says_what_waits_for_a_restart_on_an_edge(tmp_path):
    """An edge verifies its origin with the [trust] it started with: a reload that changes
    trust applies it to clients and says the origin's part waits (it said "applied" only)."""
    n = Node(tmp_path, workers=1, extra='[edge]\nenable_caching = true\norigin = "https://[::1]:9"\n')
    try:
        bundle = tmp_path / "bundle.pem"
        bundle.write_text(pathlib.Path(n.cert).read_text())
        n.config.write_text(n.config.read_text() + f'[trust]\nbundle = "{bundle}"\n')
        n.proc.send_signal(signal.SIGHUP)
        m = wait_for(n, r"applied=(\S+) restart_needed=(\S*) .*reloaded")
        assert "trust" in m.group(1).split(",") and "trust" in m.group(2).split(","), m.group(0)
        wait_for(n, r"mesh neighbours are verified with the old one until a restart")
    finally:
        assert n.stop() == 0


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
