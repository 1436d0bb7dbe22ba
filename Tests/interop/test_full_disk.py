"""A full disk loses nothing (issue #16, item 5). A node whose data (data_dir, storage.path and
content_path) lives on an 8 MiB tmpfs takes uploads until the disk is full: plain PUTs (flat
files with dedup off, ingested into chunks with it on) and chunked PUTs (chunks, then the
manifest). Every acknowledged object stays byte-identical; every refused upload got 507 naming
the object and the bytes written, left no temp file and nothing visible (404); the node serves
GETs throughout, counts the refusals (stoq_store_disk_full_total) and logs one warning for the
episode; once the tmpfs is made bigger, the next upload succeeds with no restart (the episode's
"space is back" notice waits for 30 s without a refusal: DiskFullMonitorTests covers it).

An edge node on such a tmpfs, filling from an origin: the chunks it cannot store are served
all the same (byte-identical), counted, and cached again once space returns.

Runs as root (it mounts a tmpfs); the fixture unmounts."""
import hashlib
import json
import os
import re
import sys
import time

import pytest

from conftest import Node, metric_totals, random_file, run, sha256_file, stoq

import pathlib

HERE = pathlib.Path(__file__).resolve().parent
MiB = 1 << 20
ADMIN = '[admin]\nlisten = "[::1]:0"\n'
TEMP = re.compile(r"^\.(tmp-|upload-)|\.tmp$")


@pytest.fixture
def disk(tmp_path):
    """An 8 MiB tmpfs, and a work directory whose data/, objects/ and content/ live on it (the
    node's config and log stay on the real disk)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "stoq-full-disk", mnt])
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root in a mount namespace needed): {r.stderr.strip()}")
    work = tmp_path / "node"
    work.mkdir()
    for d in ("data", "objects", "content"):
        (mnt / d).mkdir()
        (work / d).symlink_to(mnt / d)
    yield mnt, work
    run(["umount", "-l", mnt])


def grow(mnt, size="64m"):
    r = run(["mount", "-o", f"remount,size={size}", mnt])
    assert r.returncode == 0, r.stderr


def temp_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if TEMP.search(p.name))


metrics = metric_totals


def h3(node, method, path, body=None):
    """One HTTP/3 request; a write presents the node's operator token (writes need a
    credential, docs/access.md), a read goes anonymous (reads are public)."""
    cmd = [sys.executable, HERE / "h3client.py", f"https://[::1]:{node.port}{path}", "--ca", node.cert, "--method", method]
    if method in ("PUT", "DELETE", "POST"):
        cmd += ["--header", node.auth]
    if body is not None:
        cmd += ["--body", body]
    r = run(cmd, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def get_sha(node, name, tmp_path):
    out = tmp_path / f"got-{name}"
    r = stoq("get", node.url(name), "-o", out, "--ca", node.cert, "--json", "--timeout", "60")
    assert r.returncode == 0, f"GET {name}: {r.stderr}"
    digest = sha256_file(out)
    out.unlink()
    return digest


def visible(node, work):
    """The objects the node shows: flat files and object records."""
    flat = {p.name for p in (work / "objects").iterdir() if not p.name.startswith(".")}
    records = work / "content" / "objects"
    recs = {p.name for p in records.iterdir() if not p.name.startswith(".")} if records.exists() else set()
    return flat | recs


def fill(node, work, tmp_path, chunked, prefix, seed):
    """Uploads 1.5 MiB objects until one is refused; returns (acknowledged {name: sha256},
    the refused name, its stderr)."""
    acked = {}
    for i in range(40):
        name = f"{prefix}-{i}.bin"
        src = random_file(tmp_path / name, 3 * MiB // 2, seed * 1000 + i)
        args = ["put", src, node.url(name), "--ca", node.cert] + (["--chunked"] if chunked else [])
        before = visible(node, work)
        r = stoq(*args)
        if r.returncode == 0:
            acked[name] = sha256_file(src)
            continue
        assert "HTTP 507" in r.stderr, r.stderr
        assert "while storing" in r.stderr and "bytes written)" in r.stderr, r.stderr
        assert visible(node, work) == before, "a refused upload left an object visible"
        return acked, name, r.stderr
    pytest.fail("the 8 MiB disk never filled")


@pytest.mark.parametrize("dedup", [False, True], ids=["flat", "ingest"])
def test_plain_and_chunked_puts_on_a_full_disk(disk, tmp_path, dedup):
    mnt, work = disk
    node = Node(work, workers=2, extra=ADMIN + f"[chunking]\ndedup_enabled = {'true' if dedup else 'false'}\n")
    try:
        acked, refused, why = fill(node, work, tmp_path, chunked=False, prefix="plain", seed=1)
        assert acked, "nothing fitted before the disk filled"
        assert f"no space left on device while storing {refused}" in why, why
        # Nothing partial: the refused object is not there, no temp file anywhere.
        assert h3(node, "GET", f"/objects/{refused}")["status"] == 404
        assert temp_files(mnt) == []
        # A chunked upload meets the same full disk: 507 on a chunk (or the manifest).
        src = random_file(tmp_path / "chunked.bin", 3 * MiB, 77)
        r = stoq("put", src, node.url("chunked.bin"), "--chunked", "--ca", node.cert)
        assert r.returncode != 0 and "HTTP 507" in r.stderr, r.stderr
        assert h3(node, "GET", "/objects/chunked.bin")["status"] == 404
        assert h3(node, "GET", "/manifests/chunked.bin")["status"] == 404
        assert temp_files(mnt) == []
        # A raw chunk PUT says which chunk it could not store.
        blob = tmp_path / "blob"
        blob.write_bytes(os.urandom(MiB))
        hexid = hashlib.sha256(blob.read_bytes()).hexdigest()
        res = h3(node, "PUT", f"/chunks/{hexid}", body=blob)
        assert res["status"] == 507, res
        assert res["text"].startswith(f"no space left on device while storing chunk {hexid} ("), res["text"]
        assert h3(node, "GET", f"/chunks/{hexid}")["status"] == 404
        # Every acknowledged object is intact, and served while the disk is full.
        for name, digest in acked.items():
            assert get_sha(node, name, tmp_path) == digest, name
        assert set(acked) <= visible(node, work)
        time.sleep(1.2)  # workers publish about once a second; the store counts at once
        m = metrics(node)
        assert m["stoq_store_disk_full_total"] >= 3, m
        assert m["stoq_http_uploads_no_space_total"] == 1, m     # the plain PUT; the others are content requests
        assert m["stoq_store_disk_full"] == 1
        log = (work / "node.log").read_text()
        # One warning for the episode, not one per refused request.
        assert log.count("disk full: writes are refused") == 1, log[-3000:]

        # Space returns: the next upload succeeds, with no restart.
        grow(mnt)
        src = random_file(tmp_path / "after.bin", 3 * MiB // 2, 99)
        r = stoq("put", src, node.url("after.bin"), "--ca", node.cert)
        assert r.returncode == 0, r.stderr
        assert get_sha(node, "after.bin", tmp_path) == sha256_file(src)
        r = stoq("put", tmp_path / "chunked.bin", node.url("chunked.bin"), "--chunked", "--ca", node.cert)
        assert r.returncode == 0, r.stderr
        assert get_sha(node, "chunked.bin", tmp_path) == sha256_file(tmp_path / "chunked.bin")
        for name, digest in acked.items():
            assert get_sha(node, name, tmp_path) == digest, name
        assert metrics(node)["stoq_store_disk_full"] == 0
        assert temp_files(mnt) == []
    finally:
        assert node.stop() == 0


def test_an_edge_fill_on_a_full_disk_still_serves(disk, tmp_path):
    mnt, work = disk
    origin = Node(tmp_path / "origin", workers=1, extra=ADMIN)
    try:
        src = random_file(tmp_path / "big.bin", 24 * MiB, 5)
        r = stoq("put", src, origin.url("big.bin"), "--chunked", "--ca", origin.cert)
        assert r.returncode == 0, r.stderr
        want = sha256_file(src)
        # The cache's bound is far above the disk: the disk fills first.
        edge = Node(work, workers=1, extra=ADMIN + f'[trust]\nbundle = "{origin.cert}"\n'
                    f'[edge]\nenable_caching = true\norigin = "https://[::1]:{origin.port}"\ncache_size = "1GB"\n')
        try:
            for _ in range(2):
                assert get_sha(edge, "big.bin", tmp_path) == want
            m = metrics(edge)
            assert m["stoq_store_disk_full_total"] >= 1, m
            assert temp_files(mnt) == []
            log = (work / "node.log").read_text()
            assert log.count("disk full: writes are refused") == 1, log[-3000:]
            cached_full = m["stoq_edge_cached_chunks"]
            grow(mnt)
            assert get_sha(edge, "big.bin", tmp_path) == want
            time.sleep(1.2)
            m = metrics(edge)
            assert m["stoq_edge_cached_chunks"] > cached_full, m
            assert m["stoq_store_disk_full"] == 0
        finally:
            assert edge.stop() == 0
    finally:
        assert origin.stop() == 0


def test_an_upload_chunked_while_it_arrives_meets_a_full_disk(disk, tmp_path):
    """A 9 MiB plain PUT (large enough to be chunked while it arrives) to a 14 MiB disk: its
    temp file and its chunks cannot both fit, so either the body's writes or the chunks' meet
    the full disk. Either way: 507 naming the object, nothing visible, no temp file, and once
    space returns the same PUT stores it whole."""
    mnt, work = disk
    grow(mnt, "14m")
    node = Node(work, workers=1, extra=ADMIN)
    try:
        src = random_file(tmp_path / "followed.bin", 9 * MiB, 41)
        r = stoq("put", src, node.url("followed.bin"), "--ca", node.cert)
        assert r.returncode != 0 and "HTTP 507" in r.stderr, r.stderr
        assert "no space left on device while storing followed.bin" in r.stderr, r.stderr
        assert h3(node, "GET", "/objects/followed.bin")["status"] == 404
        assert h3(node, "GET", "/manifests/followed.bin")["status"] == 404
        assert temp_files(mnt) == []
        time.sleep(1.2)  # workers publish about once a second
        m = metrics(node)
        assert m["stoq_ingest_followed_total"] == 1 and m["stoq_ingest_objects_total"] == 0, m
        grow(mnt)
        r = stoq("put", src, node.url("followed.bin"), "--ca", node.cert)
        assert r.returncode == 0, r.stderr
        assert get_sha(node, "followed.bin", tmp_path) == sha256_file(src)
        assert temp_files(mnt) == []
    finally:
        assert node.stop() == 0
