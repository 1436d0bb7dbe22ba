"""The configuration from STOQ's original description, as an operator writes it
(Tests/fixtures/operator-node.toml, issue #17): `stoq config check` passes it, and a node
starts from it, serves, and says plainly what waits for the mesh."""
import json
import signal
import subprocess
import types

from conftest import ROOT, need_binary, read_banner, sha256_file, stoq

FIXTURE = ROOT / "Tests" / "fixtures" / "operator-node.toml"
ROUTING = "routing: algorithm = ml_optimized, update_interval and max_hops have no effect without a mesh"
EDGE = "edge: enable_caching = true with neither edge.origin nor [mesh]"


def test_config_check_passes_it_with_notices():
    r = stoq("config", "check", FIXTURE)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"{FIXTURE}: valid"
    assert [l.split(":", 1)[0] for l in lines[1:]] == ["notice", "notice"]
    assert lines[1].startswith(f"notice: {ROUTING}") and lines[2].startswith(f"notice: {EDGE}")
    doc = json.loads(stoq("config", "check", FIXTURE, "--json").stdout)
    assert doc["valid"] is True and doc["errors"] == [] and len(doc["notices"]) == 2


def test_node_starts_from_it_and_serves(tmp_path):
    # The file names no directories: the node keeps its state under ./stoq-data.
    objects = tmp_path / "stoq-data" / "objects"
    objects.mkdir(parents=True)
    (objects / "a.bin").write_bytes(bytes(range(256)) * 4096)
    log = open(tmp_path / "node.log", "w+")
    node = types.SimpleNamespace(log=log, proc=subprocess.Popen(
        [str(need_binary("stoq-node")), "--config", str(FIXTURE)], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=log, text=True))
    try:
        read_banner(node)
        out = tmp_path / "a.out"
        r = stoq("get", "https://[::1]:8443/objects/a.bin", "--ca", node.cert, "-o", out)
        assert r.returncode == 0, r.stderr
        assert sha256_file(out) == sha256_file(objects / "a.bin")
    finally:
        node.proc.send_signal(signal.SIGTERM)
        code = node.proc.wait(timeout=15)
    log.seek(0)
    text = log.read()
    assert code == 0, text[-2000:]
    assert text.count(ROUTING) == 1 and text.count(EDGE) == 1, text[-2000:]
    # No origin: no edge cache was opened.
    assert not (tmp_path / "stoq-data" / "content" / "edge").exists()
