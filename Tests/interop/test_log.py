"""The node's certificate transparency log, audited from outside with `stoq trust audit`:
every certificate the node's CA issues is in the log, tree heads are signed, and a later
head is consistent with an earlier one; a tampered head or a certificate not in the log
fail the audit, naming the check."""
import json
import pathlib
import time

import pytest

from conftest import Node, run, stoq


@pytest.fixture(scope="module")
def logged_node(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("log"), workers=1, extra='[trust]\ncert_lifetime = "12s"')
    yield n
    assert n.stop() == 0


def audit(node, *args):
    return stoq("trust", "audit", f"https://[::1]:{node.port}", "--ca", node.cert, "--json", *args)


def test_log_grows_consistently_and_includes_each_certificate(logged_node, tmp_path):
    n = logged_node
    data = pathlib.Path(n.cert).parent          # data/trust
    first_cert = tmp_path / "first.pem"
    first_cert.write_text(pathlib.Path(n.identity_cert).read_text())
    sth1 = tmp_path / "sth1.json"
    r = audit(n, "--include", first_cert, "--save", sth1)
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    assert first["tree head signature"] and first[f"{first_cert} included"] and first["tree_size"] >= 1
    # Wait for a rotation: the new certificate is logged too, and the log only grew.
    deadline = time.time() + 20
    while time.time() < deadline and pathlib.Path(n.identity_cert).read_text() == first_cert.read_text():
        time.sleep(0.5)
    time.sleep(0.5)
    # The operator publishes the log's public key; here it comes from the key file itself.
    pub = tmp_path / "log-key.pub.pem"
    assert run(["openssl", "pkey", "-in", data / "log-key.pem", "-pubout", "-out", pub]).returncode == 0
    r = audit(n, "--previous", sth1, "--include", n.identity_cert, "--log-key", pub)
    assert r.returncode == 0, r.stderr
    second = json.loads(r.stdout)
    assert second["tree_size"] > first["tree_size"]
    assert second[f"consistent with {sth1}"] and second[f"{n.identity_cert} included"]
    assert second["log_key_from"].endswith("log-key.pub.pem")


def test_a_tampered_head_or_a_foreign_certificate_fails(logged_node, tmp_path):
    n = logged_node
    sth = tmp_path / "sth.json"
    assert audit(n, "--save", sth).returncode == 0
    head = json.loads(sth.read_text())
    head["root_hash"] = "00" * 32
    sth.write_text(json.dumps(head))
    r = audit(n, "--previous", sth)
    assert r.returncode == 1 and f"audit failed: consistent with {sth}" in r.stderr
    assert stoq("trust", "init", "--dir", tmp_path / "ca").returncode == 0
    foreign = tmp_path / "foreign.pem"
    assert stoq("trust", "issue", "--dir", tmp_path / "ca", "--dns", "x.example", "--out", foreign,
                "--key-out", tmp_path / "foreign.key").returncode == 0
    r = audit(n, "--include", foreign)
    assert r.returncode == 1 and "HTTP 404" in r.stderr


def test_bad_audit_inputs_are_named(logged_node, tmp_path):
    """A missing or damaged --previous, and the log's private key as --log-key (which `trust
    verify` and the node accept): the option named, exit 2; the private key file works."""
    n = logged_node
    r = audit(n, "--previous", tmp_path / "nope.json")
    assert r.returncode == 2 and f"--previous {tmp_path}/nope.json: cannot read the file" in r.stderr, r.stderr
    (tmp_path / "garbage.json").write_text("-----BEGIN CERTIFICATE-----\n")
    r = audit(n, "--previous", tmp_path / "garbage.json")
    assert r.returncode == 2 and "--previous" in r.stderr and "not a tree head saved by --save" in r.stderr, r.stderr
    r = audit(n, "--log-key", pathlib.Path(n.cert).parent / "log-key.pem")
    assert r.returncode == 0, r.stderr
    r = audit(n, "--log-key", tmp_path / "garbage.json")
    assert r.returncode == 2 and "--log-key" in r.stderr and "not a P-256 log key" in r.stderr, r.stderr
