"""Garbage collection of the content store on a real node (docs/content.md, `storage.gc_interval`):
what a replaced chunked object leaves is removed by the scheduled run once past the grace period,
`limits.storage_cap` frees it (a write refused 507 for the cap goes through again), the runs are
counted on /metrics, and `POST /store/collect` on the admin API runs one at once.

The grace period cannot be configured under a minute; the tests age the chunk files instead
(their mtime is what the grace period is measured by)."""
import json
import os
import pathlib
import sys
import time
import urllib.error
import urllib.request

from conftest import Node, metric_totals, random_file, run, stoq

HERE = pathlib.Path(__file__).resolve().parent

MiB = 1 << 20
ADMIN = '[admin]\nlisten = "[::1]:0"\n'


def put_chunked(node, path, name):
    return stoq("put", path, node.url(name), "--chunked", "--ca", node.cert)


def age_chunks(node, hours=2):
    """Dates every chunk file `hours` back: past the one-hour grace period."""
    then = time.time() - hours * 3600
    for p in (node.content / "chunks").rglob("*"):
        if p.is_file() and len(p.name) == 64:
            os.utime(p, (then, then))


def chunk_files(node):
    return {p.name for p in (node.content / "chunks").rglob("*") if p.is_file() and len(p.name) == 64}


def admin_post(node, path):
    base = node.admin.removesuffix("/metrics")
    req = urllib.request.Request(base + path, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_scheduled_collection_frees_a_replaced_objects_chunks_for_the_cap(tmp_path):
    node = Node(tmp_path / "n", extra=f'{ADMIN}[limits]\nstorage_cap = "12MB"\n', storage='gc_interval = "1s"\n')
    try:
        v1 = random_file(tmp_path / "v1.bin", 8 * MiB, 21)
        v2 = random_file(tmp_path / "v2.bin", 3 * MiB, 22)
        assert put_chunked(node, v1, "gc-object").returncode == 0
        old = chunk_files(node)
        r = put_chunked(node, v2, "gc-object")
        assert r.returncode == 0, r.stderr  # replaced: v1's chunks are garbage now, but counted
        current = chunk_files(node) - old
        time.sleep(2.5)                     # scheduled runs: garbage, but within its grace period
        assert chunk_files(node) >= old
        v3 = random_file(tmp_path / "v3.bin", 4 * MiB, 23)
        r = put_chunked(node, v3, "gc-other")
        assert r.returncode != 0 and "HTTP 507" in r.stderr, r.stderr
        age_chunks(node)                    # past the grace period (v2's too, but they are named)
        deadline = time.time() + 30
        while time.time() < deadline and chunk_files(node) & old:
            time.sleep(0.2)
        assert not chunk_files(node) & old, "the scheduled collection did not remove v1's chunks"
        assert chunk_files(node) >= current, "chunks an object names are kept, however old"
        r = put_chunked(node, v3, "gc-other")
        assert r.returncode == 0, "the cap still counts the collected chunks: " + r.stderr
        m = metric_totals(node)
        assert m["stoq_store_gc_chunks_removed_total"] >= len(old)
        assert m["stoq_store_gc_bytes_freed_total"] >= 8 * MiB
        assert m["stoq_store_gc_runs_total"] >= 2
        out = tmp_path / "v2.out"
        r = stoq("get", node.url("gc-object"), "--ca", node.cert, "-o", out)
        assert r.returncode == 0 and out.read_bytes() == v2.read_bytes(), r.stderr
        assert "garbage collection" in (tmp_path / "n" / "node.log").read_text()
    finally:
        assert node.stop() == 0


def test_post_store_collect_runs_one_now(tmp_path):
    node = Node(tmp_path / "n", extra=ADMIN, storage='gc_interval = "0s"\n')
    try:
        src = random_file(tmp_path / "a.bin", 2 * MiB, 24)
        assert put_chunked(node, src, "gc-deleted").returncode == 0
        status, text = admin_post(node, "/store/collect")
        assert status == 200 and "0 removed" in text, text  # young: kept for the grace period
        before = chunk_files(node)
        assert before
        # Deleted, and aged past the grace period: garbage.
        d = run([sys.executable, HERE / "h3client.py", f"https://[::1]:{node.port}/manifests/gc-deleted", "--ca", node.cert,
                 "--method", "DELETE", "--header", node.auth], timeout=60)
        assert d.returncode == 0 and json.loads(d.stdout)["status"] == 204, d.stdout + d.stderr
        age_chunks(node)
        status, text = admin_post(node, "/store/collect")
        assert status == 200 and f"{len(before)} removed" in text, text
        assert chunk_files(node) == set()
        assert metric_totals(node)["stoq_store_gc_runs_total"] == 2
    finally:
        assert node.stop() == 0
