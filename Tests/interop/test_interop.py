"""Byte-identical transfers between STOQ and implementations nobody here wrote."""
import json
import os
import pathlib
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from conftest import SIZES, Node, free_port, need_binary, run, sha256_file, stoq

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.parametrize("size", SIZES)
def test_gtlsclient_downloads_from_stoq_node(node, size, tmp_path):
    if not shutil.which("gtlsclient"):
        pytest.fail("gtlsclient missing: scripts/install-deps installs ngtcp2-client")
    name = f"obj-{size}.bin"
    r = run(["gtlsclient", "--exit-on-all-streams-close", "-q", f"--download={tmp_path}", "::1", node.port,
             node.url(name)], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sha256_file(tmp_path / name) == node.digests[name]


@pytest.mark.parametrize("path", ["/objects/nothere", "/objects/..x", "/manifests/nothere", "/chunks/zz"])
def test_a_refused_head_has_no_content_and_nghttp3_keeps_the_connection(node, path):
    """A refusal's text went out as DATA on HEAD too; nghttp3 (gtlsclient, curl) then closed the
    whole connection (H3_MESSAGE_ERROR, 0x10e). One connection: the refused HEAD, then a good one."""
    name = min(node.digests, key=lambda n: int(n.split("-")[1].split(".")[0]))
    r = run(["gtlsclient", "--exit-on-all-streams-close", "-m", "HEAD", "--no-quic-dump", "::1", node.port,
             f"https://[::1]:{node.port}{path}", node.url(name)], timeout=60)
    assert r.returncode == 0 and "ERR_MALFORMED" not in r.stderr and "(0x10e)" not in r.stderr, r.stderr[-2000:]
    statuses = re.findall(r"\[:status: (\d+)\]", r.stderr)
    assert sorted(statuses) == sorted([statuses[0], "200"]) and statuses[0] != "200", statuses


@pytest.mark.parametrize("size", SIZES)
def test_stoq_get_from_stoq_node(node, size, tmp_path):
    name = f"obj-{size}.bin"
    out = tmp_path / name
    r = stoq("get", node.url(name), "-o", out, "--ca", node.cert, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["status"] == 200 and res["bytes"] == size
    assert res["sha256"] == node.digests[name]
    assert sha256_file(out) == node.digests[name]


@pytest.mark.parametrize("size", SIZES)
def test_aioquic_downloads_from_stoq_node(node, size):
    name = f"obj-{size}.bin"
    r = run([sys.executable, HERE / "h3client.py", node.url(name), "--ca", node.cert], timeout=300)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0, res
    assert res["status"] == 200 and res["bytes"] == size
    assert res["sha256"] == node.digests[name]


def test_stoq_get_from_gtlsserver(node, tmp_path):
    """Our client against ngtcp2's server, with the node's identity as its certificate."""
    if not shutil.which("gtlsserver") and not os.path.exists("/usr/sbin/gtlsserver"):
        pytest.fail("gtlsserver missing: scripts/install-deps installs ngtcp2-server")
    gtls = shutil.which("gtlsserver") or "/usr/sbin/gtlsserver"
    htdocs = tmp_path / "htdocs"
    htdocs.mkdir()
    digests = {}
    # gtlsserver cannot serve an empty file (it mmaps it: EINVAL), so its sizes start at 1.
    for size in [1, 1200, (1 << 20) + 7, 256 << 20]:
        name = f"g-{size}.bin"
        with open(htdocs / name, "wb") as f:
            f.write(os.urandom(size))
        digests[name] = sha256_file(htdocs / name)
    # gtlsserver presents the node's own chain (issued by the node's CA, which the client trusts).
    key = pathlib.Path(node.identity_cert).with_name("key.pem")
    port = free_port()
    srv = subprocess.Popen([gtls, "-q", "-d", str(htdocs), "::1", str(port), str(key), node.identity_cert],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)
        for name, digest in digests.items():
            out = tmp_path / ("out-" + name)
            r = stoq("get", f"https://[::1]:{port}/{name}", "-o", out, "--ca", node.cert, "--json")
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["sha256"] == digest
            assert sha256_file(out) == digest
    finally:
        srv.terminate()
        srv.wait(timeout=10)


def test_put_then_get_round_trip(node, tmp_path):
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom((3 << 20) + 11))
    r = stoq("put", src, node.url("uploaded.bin"), "--ca", node.cert, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == 201
    # chunking.dedup_enabled (the default): the upload became chunks + a manifest, no flat file.
    assert not (node.storage / "uploaded.bin").exists()
    assert (node.content / "objects" / "uploaded.bin").exists()
    assert not [p for p in node.storage.iterdir() if p.name.startswith(".upload-")], "temp file left behind"
    r = stoq("get", node.url("uploaded.bin"), "--ca", node.cert, "--json")
    assert json.loads(r.stdout)["sha256"] == sha256_file(src)


def test_put_on_a_terminal_shows_its_progress(node, tmp_path):
    """Plain `stoq put` with standard error on a terminal redraws a progress line as the node
    acknowledges the body, ending at 100 % of the file; on a pipe it prints nothing (before:
    nothing on either, until it ended)."""
    import pty
    src = tmp_path / "progress.bin"
    src.write_bytes(os.urandom(8 << 20))
    master, slave = pty.openpty()
    p = subprocess.Popen([need_binary("stoq"), "put", str(src), node.url("progress.bin"), "--ca", str(node.cert)],
                         stdout=subprocess.PIPE, stderr=slave, env={**os.environ, "STOQ_TOKEN": node.token})
    os.close(slave)
    out = b""
    while True:
        try:
            got = os.read(master, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not got:
            break
        out += got
    os.close(master)
    assert p.wait(timeout=120) == 0
    text = out.decode(errors="replace")
    assert text.startswith("\r") and "8.0 MiB" in text and "100%" in text, repr(text)
    r = stoq("put", src, node.url("progress2.bin"), "--ca", node.cert)
    assert r.returncode == 0 and r.stderr == "", r.stderr


@pytest.mark.parametrize("cc", ["reno", "bbr", "bbr2"])
def test_put_with_each_congestion_control(node, tmp_path, cc):
    """`stoq put --cc` sends with that controller; the bytes arrive the same. STOQ_STATS
    shows the transport's window as it goes."""
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom((8 << 20) + 3))
    r = stoq("put", src, node.url(f"cc-{cc}.bin"), "--ca", node.cert, "--cc", cc, "--json", env={"STOQ_STATS": "1"})
    assert r.returncode == 0, r.stderr
    r2 = stoq("get", node.url(f"cc-{cc}.bin"), "--ca", node.cert, "--json")
    assert r2.returncode == 0 and json.loads(r2.stdout)["sha256"] == sha256_file(src), r2.stderr
    assert re.search(r"^transport: t=\d+ms cwnd=\d+ in_flight=\d+ srtt=\d+us", r.stderr, re.M), r.stderr[-500:]


def test_an_unknown_congestion_control_is_refused_by_name(node, tmp_path):
    r = stoq("put", tmp_path / "none", node.url("x.bin"), "--cc", "vegas")
    assert r.returncode == 2
    assert "'vegas' is invalid for '--cc <cc>'" in r.stderr


def test_a_command_line_refused_as_given_exits_2():
    """Refused by ArgumentParser (an unknown option, flags that do not go together) or by the
    command itself: one status, 2 (ArgumentParser's own was 64), with the message and usage."""
    r = stoq("get", "https://[::1]:9/objects/x", "--no-such-flag")
    assert r.returncode == 2 and "Error: Unknown option '--no-such-flag'" in r.stderr and "Usage: stoq get" in r.stderr, r.stderr
    r = stoq("get", "https://[::1]:9/objects/x", "--json", "-o", "-")
    assert r.returncode == 2 and "-o - writes the body to standard output, where --json prints" in r.stderr, r.stderr
    r = stoq("get", "https://[::1]:9/objects/x", "--chunked", "--qlog-dir", "/nonexistent/q")
    assert r.returncode == 2 and "--qlog-dir logs one connection" in r.stderr, r.stderr


def test_a_node_command_line_refused_as_given_exits_2():
    """stoq-node's bad flag exits 2, as its invalid configuration does (systemd does not
    restart either: RestartPreventExitStatus=2), not ArgumentParser's 64."""
    r = run([need_binary("stoq-node"), "--log-level", "loud"], timeout=30)
    assert r.returncode == 2 and "Error: The value 'loud' is invalid for '--log-level <log-level>'" in r.stderr, r.stderr


@pytest.mark.parametrize("value", ["inf", "nan", "1e10"])
def test_seconds_no_clock_can_count_are_refused_by_name(value):
    """Seconds are converted to nanoseconds; past a year they are refused, not trapped on."""
    r = stoq("get", "https://[::1]:9/objects/x", "--timeout", value)
    assert r.returncode == 2, r.stderr
    assert "--timeout " in r.stderr and "expected seconds > 0, at most 31536000 (a year)" in r.stderr, r.stderr


def test_stoq_get_offers_only_the_cipher_suites_asked_and_updates_keys(node):
    """The suite the handshake agreed on is reported; --cipher-suites narrows what is offered;
    --key-update starts one key update once the handshake is confirmed (the interop matrix's
    chacha20 and keyupdate cases check both in the capture, against ngtcp2 and aioquic)."""
    name = f"obj-{16 << 20}.bin"
    r = stoq("get", node.url(name), "--ca", node.cert, "--json", "--no-session-cache")
    res = json.loads(r.stdout)
    assert res["cipher_suite"] == "TLS_AES_128_GCM_SHA256" and "key_updates" not in res, res
    r = stoq("get", node.url(name), "--ca", node.cert, "--json", "--no-session-cache",
             "--cipher-suites", "CHACHA20-POLY1305", "--key-update")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["sha256"] == node.digests[name]
    assert res["cipher_suite"] == "TLS_CHACHA20_POLY1305_SHA256" and res["key_updates"] == 1, res
    r = stoq("get", node.url(name), "--ca", node.cert, "--cipher-suites", "AES-128-GCM,AES-128-CCM-8")
    assert r.returncode == 1
    assert "cipher suites: unknown suite 'AES-128-CCM-8'" in r.stderr, r.stderr


def test_a_node_accepts_only_its_cipher_suites(tmp_path_factory):
    """tls.cipher_suites: the node accepts only those; a client offering none of them gets TLS's
    handshake_failure, one offering several gets the first of its own order the node accepts."""
    n = Node(tmp_path_factory.mktemp("suites"), workers=1, extra='[tls]\ncipher_suites = ["AES-128-GCM", "AES-256-GCM"]')
    try:
        digest = n.add_object("s.bin", 50_000)

        def get(*suites):
            return stoq("get", n.url("s.bin"), "--ca", n.cert, "--json", "--no-session-cache", *suites)
        r = get()
        assert r.returncode == 0 and json.loads(r.stdout)["cipher_suite"] == "TLS_AES_128_GCM_SHA256", r.stderr
        r = get("--cipher-suites", "CHACHA20-POLY1305")
        assert r.returncode == 1 and "closed by the peer: CRYPTO_ERROR (0x128)" in r.stderr, r.stderr
        r = get("--cipher-suites", "CHACHA20-POLY1305,AES-256-GCM")
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert (res["cipher_suite"], res["sha256"]) == ("TLS_AES_256_GCM_SHA384", digest)
    finally:
        assert n.stop() == 0


def test_range_request(node):
    name = "obj-1200.bin"
    data = (node.storage / name).read_bytes()
    r = run([sys.executable, HERE / "h3client.py", node.url(name), "--ca", node.cert, "--header", "range: bytes=100-199"])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    import hashlib
    assert res["status"] == 206 and res["bytes"] == 100
    assert res["sha256"] == hashlib.sha256(data[100:200]).hexdigest()


def test_stoq_bench_against_node(node):
    r = stoq("bench", node.url(f"obj-{(1 << 20) + 7}.bin"), "--connections", 3, "--streams", 2, "--bytes", 20 << 20,
             "--ca", node.cert, "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["failed"] == 0 and res["requests"] >= 19, res
    assert res["bytes"] == res["requests"] * ((1 << 20) + 7)
    assert res["latency_p99_ms"] >= res["latency_p50_ms"] > 0
    # Each connection's share of the bytes, in whole objects: none starved, Jain's index as computed.
    assert 1 / 3 <= res["fairness"] <= 1 and res["min_share"] > 0, res


def test_get_into_a_device_writes_in_place(node, tmp_path):
    """`-o /dev/null` (or any non-regular file) is written in place: renaming a temp file over
    it once replaced the machine's /dev/null with a regular file. `--chunked`, which resumes
    into a regular file, refuses one with a clear error."""
    name = sorted(node.digests)[0]
    before = os.stat("/dev/null")
    r = stoq("get", node.url(name), "-o", "/dev/null", "--ca", node.cert)
    assert r.returncode == 0, r.stderr
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert not os.path.exists("/dev/null.part")
    r = stoq("get", "--chunked", node.url(name), "-o", "/dev/null", "--ca", node.cert)
    assert r.returncode == 2 and "is not one" in r.stderr, r.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
