"""`stoq get URL…` (#15 item 3): several objects over one connection per server, their requests
in flight together, files named curl-like (-O, or -o DIR), each renamed into place when whole;
a URL that fails leaves no file and fails the run, the others are kept; the session is kept
and resumed by the next run."""
import json
import os
import re
import pathlib
import shutil
import subprocess
import sys

import pytest

from conftest import TOKENS, Node, free_port, need_binary, run, settled, sha256_file, stoq, summed_counters

ADMIN = '[admin]\nlisten = "[::1]:0"\n'


def accepted(node):
    """Connections the node accepted, once every worker has published its count."""
    return settled(lambda: summed_counters(node, ["stoq_quic_connections_accepted_total"]))[
        "stoq_quic_connections_accepted_total"]


def test_several_objects_over_one_connection_byte_identical(tmp_path):
    node = Node(tmp_path / "n", workers=2, extra=ADMIN)
    try:
        sizes = [0, 1, 70_000, 3 << 20, 9 << 20, 1200]
        digests = {}
        for i, size in enumerate(sizes):
            digests[f"m{i}.bin"] = node.add_object(f"m{i}.bin", size)
        cache = tmp_path / "cache"
        env = {"XDG_CACHE_HOME": str(cache)}
        before = accepted(node)
        out = tmp_path / "out"
        urls = [node.url(n) for n in digests]
        r = stoq("get", *urls, "-o", out, "--ca", node.cert, "--json", env=env)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        # One handshake for six objects, and the node saw one connection.
        assert report["handshakes"] == 1 and report["resumed"] == 0, report
        assert accepted(node) - before == 1
        for res, (name, digest) in zip(report["results"], digests.items()):
            assert res["status"] == 200 and res.get("failure") is None, res
            assert res["sha256"] == digest == sha256_file(out / name)
        assert sorted(os.listdir(out)) == sorted(digests), "a .part file was left"

        # -O: named after the path, in the current directory; the kept session resumes.
        here = tmp_path / "here"
        here.mkdir()
        r = stoq("get", "-O", urls[2], urls[3], "--ca", node.cert, "--json", env=env, cwd=here)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["handshakes"] == 1 and report["resumed"] == 1, report
        assert sorted(os.listdir(here)) == ["m2.bin", "m3.bin"]
        assert sha256_file(here / "m3.bin") == digests["m3.bin"]

        # One URL that fails: named, no file for it, the others kept, exit 1.
        mixed = tmp_path / "mixed"
        r = stoq("get", urls[1], node.url("absent.bin"), urls[4], "-o", mixed, "--ca", node.cert, env=env)
        assert r.returncode == 1
        assert f"stoq: {node.url('absent.bin')}: HTTP 404" in r.stderr, r.stderr
        assert sorted(os.listdir(mixed)) == ["m1.bin", "m4.bin"]
        assert sha256_file(mixed / "m4.bin") == digests["m4.bin"]

        # Two URLs that would write one file are refused before anything is fetched.
        r = stoq("get", urls[0], urls[0], "-o", tmp_path / "dup", "--ca", node.cert)
        assert r.returncode == 2 and "would both write m0.bin" in r.stderr, r.stderr
        r = stoq("get", urls[0], urls[1], "--chunked", "-o", tmp_path / "x", "--ca", node.cert)
        assert r.returncode != 0 and "--chunked fetches one object" in r.stderr, r.stderr
    finally:
        assert node.stop() == 0


def test_one_url_into_a_directory_takes_its_name(tmp_path):
    node = Node(tmp_path / "n", workers=1)
    try:
        digest = node.add_object("solo.bin", 50_000)
        out = tmp_path / "dir"
        out.mkdir()
        r = stoq("get", node.url("solo.bin"), "-o", out, "--ca", node.cert)
        assert r.returncode == 0, r.stderr
        assert os.listdir(out) == ["solo.bin"] and sha256_file(out / "solo.bin") == digest
        # A single URL still writes a file path as before.
        r = stoq("get", node.url("solo.bin"), "-o", tmp_path / "file.bin", "--ca", node.cert)
        assert r.returncode == 0 and sha256_file(tmp_path / "file.bin") == digest
    finally:
        assert node.stop() == 0


def test_headers_that_cannot_be_made_stop_the_run_before_anything(tmp_path):
    """A token file that cannot be read: exit 2 naming it, no file made and no request sent.
    Each GET went out without the token, every body was fetched, and the .part files stayed."""
    node = Node(tmp_path / "n", workers=1, extra=ADMIN)
    try:
        for name in ("h1.bin", "h2.bin"):
            node.add_object(name, 50_000)
        out = tmp_path / "out"
        before = accepted(node)
        r = stoq("get", node.url("h1.bin"), node.url("h2.bin"), "-o", out, "--ca", node.cert,
                 "--token-file", tmp_path / "missing.token")
        assert r.returncode == 2, r.stderr
        assert "missing.token" in r.stderr, r.stderr
        assert not out.exists() or os.listdir(out) == [], os.listdir(out)
        assert accepted(node) == before
    finally:
        assert node.stop() == 0


def test_a_download_is_flushed_to_disk_before_it_is_placed(tmp_path):
    """`stoq get -o` writes a part file and renames it over the target once whole; it is
    fsynced first, so a crash after the rename leaves the whole body, never a short file.
    Seen with strace: one URL to a file, and two into a directory."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (scripts/install-deps installs it)")
    node = Node(tmp_path / "n", workers=1)
    try:
        digests = {name: node.add_object(name, size) for name, size in (("a.bin", 3 << 20), ("b.bin", 70_000))}
        out = tmp_path / "dir"
        out.mkdir()
        for args in ([node.url("a.bin"), "-o", tmp_path / "a.bin"], [node.url("a.bin"), node.url("b.bin"), "-o", out]):
            trace = tmp_path / "trace"
            r = run(["strace", "-f", "-qq", "-o", trace, "-e", "trace=openat,fsync,fdatasync,rename,renameat,renameat2",
                     need_binary("stoq"), "get", *args, "--ca", node.cert],
                    env={**os.environ, "STOQ_TOKEN": TOKENS[str(node.port)]})
            assert r.returncode == 0, r.stderr
            lines = trace.read_text().splitlines()
            opened = {}  # part file -> its fd
            placed = []
            for i, line in enumerate(lines):
                m = re.search(r'openat\(AT_FDCWD, "([^"]+\.part)", [^)]*\) = (\d+)', line)
                if m:
                    opened[m.group(1)] = m.group(2)
                m = re.search(r'rename(?:at2?)?\((?:AT_FDCWD, )?"([^"]+\.part)"', line)
                if m:
                    part = m.group(1)
                    assert part in opened, (part, lines)
                    synced = [l for l in lines[:i] if re.search(rf"f(data)?sync\({opened[part]}\) += 0", l)]
                    assert synced, f"{part} renamed before it was flushed:\n" + "\n".join(lines[:i + 1])
                    placed.append(part)
            assert len(placed) == len(args) - 2, lines
        assert sha256_file(tmp_path / "a.bin") == digests["a.bin"]
        assert sorted(os.listdir(out)) == ["a.bin", "b.bin"] and sha256_file(out / "b.bin") == digests["b.bin"]
    finally:
        assert node.stop() == 0


def test_a_part_of_the_object_is_not_saved_as_all_of_it(tmp_path):
    """A server answering a GET without Range with 206 (aioquic's h3server, /partial/<name>:
    half the file) sent a part: stoq get fails naming it and creates no file, for -o FILE,
    -o DIR and -O alike; the whole object from the same server is still saved."""
    node = Node(tmp_path / "n", workers=1)
    htdocs = tmp_path / "htdocs"
    htdocs.mkdir()
    (htdocs / "a.bin").write_bytes(os.urandom(100_000))
    (htdocs / "b.bin").write_bytes(os.urandom(100_000))
    port = free_port()
    key = pathlib.Path(node.identity_cert).with_name("key.pem")
    srv = subprocess.Popen([sys.executable, pathlib.Path(__file__).parent / "h3server.py", str(port), node.identity_cert, key,
                            htdocs], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(srv.stdout.readline()) == {"ready": port}, srv.stderr.read()
        part, whole = f"https://[::1]:{port}/partial/a.bin", f"https://[::1]:{port}/b.bin"
        why = "the server sent part of the object (206) to a request for all of it"
        target = tmp_path / "a.bin"
        r = stoq("get", part, "-o", target, "--ca", node.cert)
        assert r.returncode == 1 and why in r.stderr, r.stderr
        assert not target.exists()
        out = tmp_path / "out"
        r = stoq("get", part, whole, "-o", out, "--ca", node.cert)
        assert r.returncode == 1 and f"stoq: {part}: {why}" in r.stderr, r.stderr
        # The whole one is saved; no file, and no .part, for the part.
        assert os.listdir(out) == ["b.bin"] and sha256_file(out / "b.bin") == sha256_file(htdocs / "b.bin")
        here = tmp_path / "here"
        here.mkdir()
        r = stoq("get", "-O", part, "--ca", node.cert, cwd=here)
        assert r.returncode == 1 and why in r.stderr, r.stderr
        assert os.listdir(here) == []
    finally:
        srv.terminate()
        srv.wait(timeout=10)
        assert node.stop() == 0
