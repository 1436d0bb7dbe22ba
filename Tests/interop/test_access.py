"""Who may write and read a node (issue 16, docs/access.md), seen from a client in another
network namespace than the node's, over a veth: writes need a credential (401 without one,
403 when it does not reach), the operator token the node made at start works from anywhere,
a token's prefix and a certificate's role limit what it may write, an expired token is
refused, a `read` rule keeps a prefix for token holders, and every decision moves the
/metrics counters by exactly one. Needs root (namespaces); skipped without.
"""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import need_binary, read_banner, run, settled, sha256_file, stop_node, veth_namespaces

HERE = pathlib.Path(__file__).resolve().parent
NODE_NS, CLIENT_NS = "stoq-acc-node", "stoq-acc-client"
NODE_IF, CLIENT_IF = "veth-acc-n", "veth-acc-c"
NODE_ADDR, CLIENT_ADDR = "fd00:5707::1", "fd00:5707::2"
PORT, ADMIN = 4433, 9464
URL = f"https://[{NODE_ADDR}]:{PORT}/objects/"
COUNTERS = ("stoq_access_refused_total", "stoq_access_allowed_writes_total", "stoq_http_uploads_stored_total")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces): SKIPPED")


def in_ns(ns, *cmd):
    return ["ip", "netns", "exec", ns, *[str(c) for c in cmd]]


def teardown_namespaces():
    for ns in (NODE_NS, CLIENT_NS):
        run(["ip", "netns", "del", ns])


class AccessNode:
    def __init__(self, work):
        self.work = work
        self.objects = work / "objects"
        self.objects.mkdir()
        cfg = work / "node.toml"
        cfg.write_text(
            f'[node]\ndata_dir = "{work}/data"\n[network]\nlisten_addr = "[{NODE_ADDR}]:{PORT}"\n'
            f'datapath = "io_uring"\nworkers = 2\nclient_auth = "optional"\n'
            f'[storage]\npath = "{self.objects}"\ncontent_path = "{work}/content"\n'
            f'[admin]\nlisten = "[::1]:{ADMIN}"\n'
            f'[access]\nread = {{ "/objects/private-" = "token" }}\n')
        self.log = open(work / "node.log", "w+")
        self.proc = subprocess.Popen(in_ns(NODE_NS, need_binary("stoq-node"), "--config", cfg),
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        read_banner(self)
        self.key = work / "data" / "access" / "token-key.pem"

    def metrics(self):
        code = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
        r = run(in_ns(NODE_NS, sys.executable, "-c", code, f"http://[::1]:{ADMIN}/metrics"))
        assert r.returncode == 0, r.stderr
        return r.stdout

    def counters(self):
        text = self.metrics()
        out = {}
        for name in COUNTERS:
            for labels, v in re.findall(rf"^{name}(\{{[^}}]*\}}) (\d+)$", text, re.M):
                status = re.search(r'status="(\d+)"', labels)
                key = f"{name}{{{status.group(1)}}}" if status else name
                out[key] = out.get(key, 0) + int(v)
        return out

    def text_log(self):
        self.log.flush()
        return (self.work / "node.log").read_text()


@pytest.fixture(scope="module")
def anode(tmp_path_factory):
    veth_namespaces(NODE_NS, NODE_IF, [NODE_ADDR], CLIENT_NS, CLIENT_IF, CLIENT_ADDR)
    try:
        node = AccessNode(tmp_path_factory.mktemp("access"))
    except BaseException:
        teardown_namespaces()
        raise
    yield node
    code = stop_node(node.proc)
    teardown_namespaces()
    assert code == 0, f"stoq-node did not exit cleanly on SIGTERM (exit {code})"


def client(*args):
    """`stoq` in the client's namespace (never the node's machine: no operator token is found)."""
    return run(in_ns(CLIENT_NS, need_binary("stoq"), *args), timeout=120)


def put(node, name, src, *cred):
    r = client("put", src, URL + name, "--ca", node.cert, "--json", *cred)
    status = json.loads(r.stdout.strip().splitlines()[-1])["status"] if r.stdout.strip() else None
    return status, r.stderr


def h3(node, method, path, *extra):
    r = run(in_ns(CLIENT_NS, sys.executable, HERE / "h3client.py", f"https://[{NODE_ADDR}]:{PORT}{path}",
                  "--ca", node.cert, "--method", method, *extra), timeout=60)
    return json.loads(r.stdout.strip().splitlines()[-1])


def token(node, *args):
    r = run([need_binary("stoq"), "trust", "token", "--key", node.key, *args])
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def stored(node, name):
    return (node.objects / name).exists() or (node.work / "content" / "objects" / name).exists()


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "body.bin"
    p.write_bytes(os.urandom(100_000))
    return p


def test_anonymous_write_is_401_and_nothing_is_stored(anode, src):
    before = settled(anode.counters)
    status, err = put(anode, "anon.bin", src)
    assert status == 401, err
    assert "needs a credential" in err
    assert not stored(anode, "anon.bin")
    res = h3(anode, "PUT", "/objects/anon2.bin", "--body", src)
    assert res["status"] == 401
    assert res["headers"]["www-authenticate"] == 'Bearer realm="stoq"'
    # The chunked protocol's writes are closed the same way.
    assert h3(anode, "POST", "/_stoq/missing", "--body", src)["status"] == 401
    assert h3(anode, "PUT", "/chunks/" + "00" * 32, "--body", src)["status"] == 401
    # Reads stay public.
    assert h3(anode, "GET", "/objects/anon.bin")["status"] == 404
    after = settled(anode.counters)
    assert after["stoq_access_refused_total{401}"] - before["stoq_access_refused_total{401}"] == 4
    assert after["stoq_access_allowed_writes_total"] == before["stoq_access_allowed_writes_total"]
    assert after["stoq_http_uploads_stored_total"] == before["stoq_http_uploads_stored_total"]
    assert f"identity=addr:fd00:5707::/64" in anode.text_log()


def test_refusals_are_counted_each_and_logged_once_in_a_while(anode, src):
    """A client sending refused requests as fast as it likes does not write the log as fast:
    each is counted, but one line per status and identity every 10 s is logged, the next one
    saying how many were held back."""
    before = settled(anode.counters)
    lines = anode.text_log().count("access refused")
    code = ("import sys, subprocess\n"
            "for i in range(int(sys.argv[1])):\n"
            "    subprocess.run(sys.argv[2:], capture_output=True)\n")
    args = [sys.executable, HERE / "h3client.py", f"https://[{NODE_ADDR}]:{PORT}/objects/flood.bin", "--ca", anode.cert,
            "--method", "DELETE"]
    r = run(in_ns(CLIENT_NS, sys.executable, "-c", code, "12", *args), timeout=120)
    assert r.returncode == 0, r.stderr
    after = settled(anode.counters)
    assert after["stoq_access_refused_total{401}"] - before["stoq_access_refused_total{401}"] == 12
    # Two workers, a line each per 10 s: at most four lines if the twelve take 20 s (before: 12).
    assert anode.text_log().count("access refused") - lines <= 4, anode.text_log()[-3000:]


def test_operator_token_writes_from_another_machine(anode, src, tmp_path):
    before = settled(anode.counters)
    status, err = put(anode, "op.bin", src, "--token-file", anode.token_file)
    assert status == 201, err
    out = tmp_path / "op.out"
    r = client("get", URL + "op.bin", "--ca", anode.cert, "-o", out)
    assert r.returncode == 0, r.stderr
    assert sha256_file(out) == sha256_file(src)
    # Chunked: the missing-chunks query and the manifest, with the token (the node has the one
    # chunk already: the plain PUT above was chunked into the store on ingest).
    r = client("put", src, URL + "op-chunked.bin", "--chunked", "--ca", anode.cert, "--token-file", anode.token_file)
    assert r.returncode == 0, r.stderr
    after = settled(anode.counters)
    assert after["stoq_access_allowed_writes_total"] - before["stoq_access_allowed_writes_total"] == 3
    assert after["stoq_access_refused_total{401}"] == before["stoq_access_refused_total{401}"]
    assert after["stoq_access_refused_total{403}"] == before["stoq_access_refused_total{403}"]


def test_token_scoped_to_a_prefix(anode, src):
    # Object names are flat (no "/"), so a prefix is a name prefix: /objects/a- covers a-x.
    t = token(anode, "--subject", "alice", "--prefix", "/objects/a-", "--methods", "PUT,DELETE", "--role", "writer",
              "--lifetime", "1h")
    before = settled(anode.counters)
    status, err = put(anode, "b-x", src, "--token", t)
    assert status == 403, err
    assert "token for /objects/a- may not write /objects/b-x" in err
    assert not stored(anode, "b-x")
    status, err = put(anode, "a-x", src, "--token", t)
    assert status == 201, err
    after = settled(anode.counters)
    assert after["stoq_access_refused_total{403}"] - before["stoq_access_refused_total{403}"] == 1
    assert after["stoq_access_allowed_writes_total"] - before["stoq_access_allowed_writes_total"] == 1
    assert after["stoq_http_uploads_stored_total"] - before["stoq_http_uploads_stored_total"] == 1
    assert "identity=token:alice" in anode.text_log()
    # A reader token may not write at all.
    r = token(anode, "--subject", "rita", "--role", "reader", "--lifetime", "1h")
    status, err = put(anode, "a-y", src, "--token", r)
    assert status == 403 and "role reader" in err


def test_expired_and_foreign_tokens_are_401(anode, src, tmp_path):
    t = token(anode, "--subject", "late", "--lifetime", "1s")
    time.sleep(2.5)
    res = h3(anode, "PUT", "/objects/late.bin", "--body", src, "--header", f"authorization: Bearer {t}")
    assert res["status"] == 401
    assert 'error="invalid_token"' in res["headers"]["www-authenticate"]
    assert "expired" in res["headers"]["www-authenticate"]
    # A key the node does not accept (made by GnuTLS's certtool, an independent tool).
    other = tmp_path / "other-key.pem"
    r = run(["certtool", "--generate-privkey", "--key-type", "ecdsa", "--curve", "secp256r1", "--no-text",
             "--outfile", other])
    assert r.returncode == 0, r.stderr
    r = run([need_binary("stoq"), "trust", "token", "--key", other, "--subject", "mallory"])
    assert r.returncode == 0, r.stderr
    status, err = put(anode, "mallory.bin", src, "--token", r.stdout.strip())
    assert status == 401 and "unknown_key" in err
    assert not stored(anode, "late.bin") and not stored(anode, "mallory.bin")


def test_certificate_roles(anode, src, tmp_path):
    ca = anode.work / "data" / "trust"
    certs = {}
    for role in ("reader", "writer"):
        out, key = tmp_path / f"{role}.pem", tmp_path / f"{role}.key"
        r = run([need_binary("stoq"), "trust", "issue", "--dir", ca, "--role", role, "--name", f"{role}-client",
                 "--out", out, "--key-out", key])
        assert r.returncode == 0, r.stderr
        certs[role] = (out, key)
    show = json.loads(run([need_binary("stoq"), "trust", "show", certs["writer"][0], "--json"]).stdout)
    # A client's certificate (roles, no DNS name or address): clientAuth only.
    assert show["certificates"][0]["extendedKeyUsage"] == ["clientAuth"], show
    before = settled(anode.counters)
    status, err = put(anode, "by-reader", src, "--cert", certs["reader"][0], "--key", certs["reader"][1])
    assert status == 403, err
    assert "certificate reader-client has role reader" in err
    status, err = put(anode, "by-writer", src, "--cert", certs["writer"][0], "--key", certs["writer"][1])
    assert status == 201, err
    after = settled(anode.counters)
    assert after["stoq_access_refused_total{403}"] - before["stoq_access_refused_total{403}"] == 1
    assert after["stoq_access_allowed_writes_total"] - before["stoq_access_allowed_writes_total"] == 1
    assert "identity=cert:reader-client" in anode.text_log()
    # A missing file of the pair is named (GnuTLS said "Error while reading file." for either).
    for cert, key, named in ((tmp_path / "absent.pem", certs["writer"][1], "certificate"),
                             (certs["writer"][0], tmp_path / "absent.key", "key")):
        status, err = put(anode, "by-nobody", src, "--cert", cert, "--key", key)
        assert status is None and f"client {named} {tmp_path}/absent." in err and "No such file or directory" in err, err


def test_read_rule_needs_a_token(anode, src, tmp_path):
    status, err = put(anode, "private-x", src, "--token-file", anode.token_file)
    assert status == 201, err
    before = settled(anode.counters)
    out = tmp_path / "p.out"
    r = client("get", URL + "private-x", "--ca", anode.cert, "-o", out)
    assert r.returncode != 0 and "HTTP 401" in r.stderr
    assert h3(anode, "GET", "/manifests/private-x")["status"] == 401
    wrong = token(anode, "--subject", "eve", "--role", "reader", "--prefix", "/objects/public-")
    r = client("get", URL + "private-x", "--ca", anode.cert, "-o", out, "--token", wrong)
    assert r.returncode != 0 and "HTTP 403" in r.stderr
    right = token(anode, "--subject", "pat", "--role", "reader", "--prefix", "/objects/private-")
    r = client("get", URL + "private-x", "--ca", anode.cert, "-o", out, "--token", right)
    assert r.returncode == 0, r.stderr
    assert sha256_file(out) == sha256_file(src)
    after = settled(anode.counters)
    assert after["stoq_access_refused_total{401}"] - before["stoq_access_refused_total{401}"] == 2
    assert after["stoq_access_refused_total{403}"] - before["stoq_access_refused_total{403}"] == 1


def reload(node, text):
    """Writes `text` as the node's config, SIGHUPs it, and returns what it applied. The node
    also reloads on its own when it sees the file change, so one write can log two verdicts:
    the log must have settled before this one is read, or an earlier write's late second
    verdict would be taken for it."""
    deadline, seen = time.time() + 10, -1
    while time.time() < deadline and len(node.text_log()) != seen:
        seen = len(node.text_log())
        time.sleep(1.0)
    log_before = len(node.text_log())
    (node.work / "node.toml").write_text(text)
    node.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 20
    while time.time() < deadline:
        m = re.search(r"applied=(\S*) restart_needed=(\S*) .*reloaded|(is invalid, keeping|could not be applied, keeping)", node.text_log()[log_before:])
        if m:
            return m.group(1) if m.group(1) is not None else "invalid"
        time.sleep(0.2)
    raise AssertionError(node.text_log()[-2000:])


def test_access_reloads_live(anode, src):
    """`[access]` is reloadable: `write = "public"` opens writes at the next request, and
    putting the file back closes them again."""
    original = (anode.work / "node.toml").read_text()
    try:
        assert reload(anode, original.replace("[access]\n", '[access]\nwrite = "public"\n')) == "access"
        assert 'access.write = "public"' in anode.text_log()
        status, err = put(anode, "open.bin", src)
        assert status == 201, err
    finally:
        assert reload(anode, original) == "access"
    status, err = put(anode, "closed.bin", src)
    assert status == 401, err


def test_token_keys_accept_another_issuer(anode, src, tmp_path):
    """A token signed by another issuer's key is `unknown_key` until `token_keys` lists it."""
    other = tmp_path / "issuer-key.pem"
    r = run(["certtool", "--generate-privkey", "--key-type", "ecdsa", "--curve", "secp256r1", "--no-text",
             "--outfile", other])
    assert r.returncode == 0, r.stderr
    r = run([need_binary("stoq"), "trust", "token", "--key", other, "--subject", "partner", "--prefix", "/objects/p-"])
    assert r.returncode == 0, r.stderr
    t = r.stdout.strip()
    status, err = put(anode, "p-1", src, "--token", t)
    assert status == 401 and "unknown_key" in err
    original = (anode.work / "node.toml").read_text()
    try:
        # A file that is not a key refuses the reload, naming the key; nothing changes.
        assert reload(anode, original.replace("[access]\n", f'[access]\ntoken_keys = ["{src}"]\n')) == "invalid"
        assert "access.token_keys" in anode.text_log()
        assert reload(anode, original.replace("[access]\n", f'[access]\ntoken_keys = ["{other}"]\n')) == "access"
        status, err = put(anode, "p-1", src, "--token", t)
        assert status == 201, err
    finally:
        assert reload(anode, original) == "access"
    status, err = put(anode, "p-2", src, "--token", t)
    assert status == 401 and "unknown_key" in err
