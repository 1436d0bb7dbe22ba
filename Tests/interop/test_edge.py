"""The edge cache between real nodes on [::1]: an edge node (edge.enable_caching) serves
objects it lacks from its origin over QUIC/HTTP/3, once: the second fetch comes from the
cache with the origin's counters unchanged; concurrent fetches coalesce; a chunk the origin
sends with wrong bytes is refused; the cache keeps its bound, honours TTL and the origin's
max-age, survives kill -9, and keeps serving what it holds while the origin is down."""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import (Node, free_port, metric_totals, need_binary, plain_cuts, random_file, read_banner, run, settled,
                      sha256_file, stoq)

HERE = pathlib.Path(__file__).resolve().parent
MiB = 1 << 20
ADMIN = '[admin]\nlisten = "[::1]:0"\n'
# This module's shared origin cuts no plain files: its plain tests test the edge's own cutting,
# which serves origins that do not cut (test_a_plain_file_the_origin_cuts_… tests those that do).
WHOLE = '[chunking]\ncut_plain_files = false\n'
# A manifest's TTL (and the origin's max-age) in test_ttl_expiry_…: two gets of 3 MiB must fit in
# it on a slow machine (a debug build beside compile jobs), or the "still fresh" half cannot be seen.
TTL = 8


def metrics(node, settle=True):
    # Workers publish their counters about once a second: wait for the latest.
    if settle:
        time.sleep(1.1)
    return metric_totals(node)


def origin_counts(origin):
    """The origin's counters of what it served, once every worker has published its latest
    (about every 1.0–1.05 s: a single reading 1.1 s later can miss one): read until two
    readings 1.2 s apart agree (conftest.settled). The tests compare them exactly."""
    def read():
        m = metric_totals(origin)
        return {k: m[k] for k in ("stoq_content_chunks_served_total", "stoq_content_manifests_served_total",
                                  "stoq_content_objects_served_total", "stoq_quic_connections_accepted_total")}
    return settled(read)


def edge_config(origin_port, origin_cert, cache="64MB", ttl="1h"):
    return (ADMIN + f'[trust]\nbundle = "{origin_cert}"\n'
            f'[edge]\nenable_caching = true\norigin = "https://[::1]:{origin_port}"\n'
            f'cache_size = "{cache}"\nttl_default = "{ttl}"\n')


def put(node, path, name):
    r = stoq("put", path, node.url(name), "--chunked", "--ca", node.cert, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def get(node, name, out, *extra, timeout=120):
    return stoq("get", node.url(name), "-o", out, "--ca", node.cert, "--json", "--timeout", "60", *extra, timeout=timeout)


def h3(node_port, cert, path, then=()):
    """GET `path` (aioquic); with `then`, those paths after it in turn on the same connection,
    each sent once the previous answer is in: a list of the answers."""
    r = run([sys.executable, HERE / "h3client.py", f"https://[::1]:{node_port}{path}", "--ca", cert,
             *(a for p in then for a in ("--then", p))], timeout=60)
    assert r.returncode == 0 or not then, r.stdout + r.stderr  # a list only when every answer came
    return json.loads(r.stdout)


def chunk_list(path):
    r = stoq("chunk", path, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    return doc["chunks"] if isinstance(doc, dict) else doc


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("origin"), workers=2, extra=ADMIN + WHOLE)
    yield n
    assert n.stop() == 0


@pytest.fixture(scope="module")
def edge(origin, tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("edge"), workers=2, extra=edge_config(origin.port, origin.cert))
    yield n
    assert n.stop() == 0


def test_edge_fetch_is_byte_identical_and_the_second_comes_from_cache(origin, edge, tmp_path):
    src = random_file(tmp_path / "a.bin", 24 * MiB, 11)
    up = put(origin, src, "edge-a")
    distinct = len({c["id"] for c in chunk_list(src)})
    assert up["chunks"] >= distinct > 10
    o0, e0 = origin_counts(origin), metrics(edge)

    first = get(edge, "edge-a", tmp_path / "first.bin")
    assert first.returncode == 0, first.stderr
    assert sha256_file(tmp_path / "first.bin") == sha256_file(src) == up["sha256"]
    o1, e1 = origin_counts(origin), metrics(edge)
    assert o1["stoq_content_chunks_served_total"] - o0["stoq_content_chunks_served_total"] == distinct
    assert o1["stoq_content_manifests_served_total"] - o0["stoq_content_manifests_served_total"] == 1
    assert e1["stoq_edge_origin_chunk_fetches_total"] - e0["stoq_edge_origin_chunk_fetches_total"] == distinct
    assert e1["stoq_edge_origin_bytes_total"] - e0["stoq_edge_origin_bytes_total"] >= 24 * MiB
    assert e1["stoq_edge_verification_failures_total"] == 0

    second = get(edge, "edge-a", tmp_path / "second.bin")
    assert second.returncode == 0, second.stderr
    assert sha256_file(tmp_path / "second.bin") == up["sha256"]
    # A Range through the edge (aioquic), from the cache.
    r = run([sys.executable, HERE / "h3client.py", edge.url("edge-a"), "--ca", edge.cert,
             "--header", "range: bytes=1000000-3999999"], timeout=60)
    part = json.loads(r.stdout)
    assert part["status"] == 206 and part["bytes"] == 3_000_000, part
    assert part["sha256"] == __import__("hashlib").sha256(src.read_bytes()[1_000_000:4_000_000]).hexdigest()
    # Also the chunked path through the edge: manifest + chunks, each verified by the client.
    chunked = get(edge, "edge-a", tmp_path / "chunked.bin", "--chunked")
    assert chunked.returncode == 0, chunked.stderr
    assert json.loads(chunked.stdout)["sha256"] == up["sha256"]
    o2, e2 = origin_counts(origin), metrics(edge)
    for k in ("stoq_content_chunks_served_total", "stoq_content_manifests_served_total",
              "stoq_content_objects_served_total"):
        assert o2[k] == o1[k], f"origin counter {k} moved: {o1[k]} -> {o2[k]}"
    assert e2["stoq_edge_origin_chunk_fetches_total"] == e1["stoq_edge_origin_chunk_fetches_total"]
    assert e2["stoq_edge_hits_total"] - e1["stoq_edge_hits_total"] >= 2 * distinct
    assert e2["stoq_edge_cached_chunks"] == distinct


def test_concurrent_fetches_coalesce_into_one_origin_fetch_per_chunk(origin, edge, tmp_path):
    """Six gets of one object while the origin is stopped (SIGSTOP): concurrent by construction,
    not by luck (started one by one, a fast fetch can end before the next get asks). Those that
    reach the edge meanwhile (all six, unless the machine is very slow) join the first one's
    manifest fetch; once the origin runs again, each chunk is fetched once."""
    src = random_file(tmp_path / "c.bin", 16 * MiB, 12)
    up = put(origin, src, "edge-c")
    distinct = len({c["id"] for c in chunk_list(src)})
    o0, e0 = origin_counts(origin), metrics(edge)
    procs, joined = [], 0
    os.kill(origin.proc.pid, signal.SIGSTOP)
    try:
        try:
            for i in range(6):
                procs.append(subprocess.Popen(
                    [str(pathlib.Path(edge.proc.args[0]).with_name("stoq")), "get", edge.url("edge-c"),
                     "-o", str(tmp_path / f"c{i}.bin"), "--ca", edge.cert, "--timeout", "60"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            # Edge counters are live. At most 4 s: within the edge's stall timeout (5 s), after
            # which it would ask the origin again.
            deadline = time.time() + 4
            while joined < 5 and time.time() < deadline:
                time.sleep(0.05)
                joined = metrics(edge, settle=False)["stoq_edge_coalesced_total"] - e0["stoq_edge_coalesced_total"]
        finally:
            os.kill(origin.proc.pid, signal.SIGCONT)
        assert joined >= 1, "no get joined the first one's fetch while the origin was stopped (4 s)"
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i in range(6):
        assert sha256_file(tmp_path / f"c{i}.bin") == up["sha256"]
    o1, e1 = origin_counts(origin), metrics(edge)
    assert o1["stoq_content_chunks_served_total"] - o0["stoq_content_chunks_served_total"] == distinct
    assert o1["stoq_content_manifests_served_total"] - o0["stoq_content_manifests_served_total"] == 1
    assert e1["stoq_edge_origin_chunk_fetches_total"] - e0["stoq_edge_origin_chunk_fetches_total"] == distinct
    assert e1["stoq_edge_origin_manifest_fetches_total"] - e0["stoq_edge_origin_manifest_fetches_total"] == 1


def test_a_plain_file_at_the_origin_is_cut_into_the_edges_cache_and_checked(origin, edge, tmp_path):
    """A file an operator put in the origin's storage.path has no manifest there (404): the
    edge fetches the object whole, cuts it into its own cache and serves it, then from the
    cache; a body that is not the SHA-256 its ETag names is refused and not cached."""
    digest = origin.add_object("plain-a.bin", 6 * MiB + 123)
    o0, e0 = origin_counts(origin), metrics(edge)
    first = get(edge, "plain-a.bin", tmp_path / "first.bin")
    assert first.returncode == 0, first.stderr
    assert sha256_file(tmp_path / "first.bin") == digest
    assert json.loads(first.stdout)["sha256"] == digest
    o1, e1 = origin_counts(origin), metrics(edge)
    assert o1["stoq_content_chunks_served_total"] == o0["stoq_content_chunks_served_total"]
    assert e1["stoq_edge_origin_object_fetches_total"] - e0["stoq_edge_origin_object_fetches_total"] == 1
    assert e1["stoq_edge_origin_bytes_total"] - e0["stoq_edge_origin_bytes_total"] >= 6 * MiB
    assert e1["stoq_edge_cached_chunks"] > e0["stoq_edge_cached_chunks"]
    # From the cache: whole, a range, and the chunked path (manifest and chunks from the edge).
    second = get(edge, "plain-a.bin", tmp_path / "second.bin")
    assert second.returncode == 0 and sha256_file(tmp_path / "second.bin") == digest, second.stderr
    r = run([sys.executable, HERE / "h3client.py", edge.url("plain-a.bin"), "--ca", edge.cert,
             "--header", "range: bytes=5000000-5999999"], timeout=60)
    part = json.loads(r.stdout)
    data = (origin.storage / "plain-a.bin").read_bytes()
    assert part["status"] == 206 and part["sha256"] == __import__("hashlib").sha256(data[5_000_000:6_000_000]).hexdigest()
    chunked = get(edge, "plain-a.bin", tmp_path / "chunked.bin", "--chunked")
    assert chunked.returncode == 0 and sha256_file(tmp_path / "chunked.bin") == digest, chunked.stderr
    e2 = metrics(edge)
    for k in ("stoq_edge_origin_object_fetches_total", "stoq_edge_origin_manifest_fetches_total",
              "stoq_edge_origin_chunk_fetches_total", "stoq_edge_origin_bytes_total"):
        assert e2[k] == e1[k], f"edge counter {k} moved: {e1[k]} -> {e2[k]}"
    # A plain file whose recorded SHA-256 (its ETag) is not its bytes' (as a flat upload
    # leaves it, forged here with the file's own size and mtime).
    origin.add_object("plain-lie.bin", 300_000)
    lied = origin.storage / "plain-lie.bin"
    st = os.stat(lied)
    os.setxattr(lied, "user.stoq.object", f"2 {digest} {st.st_size:x} {st.st_mtime_ns:x} token:x".encode())
    bad = h3(edge.port, edge.cert, "/objects/plain-lie.bin")
    assert bad["status"] == 502 and f"not the {digest} its ETag names" in bad["text"], bad
    e3 = metrics(edge)
    assert e3["stoq_edge_verification_failures_total"] > e1["stoq_edge_verification_failures_total"]
    assert h3(edge.port, edge.cert, "/manifests/plain-lie.bin")["status"] == 502
    # Not at the origin at all: still a 404.
    missing = h3(edge.port, edge.cert, "/objects/plain-none.bin")
    assert missing["status"] == 404, missing


def test_an_evicted_chunk_of_a_plain_object_is_fetched_as_a_range_of_it(origin, tmp_path):
    """The chunks an edge cut from a plain object exist nowhere upstream as chunks: one that
    left the cache is fetched again as its byte range of the object (206), checked against its
    id, instead of the whole object again (as before) or a chunk the origin never had. If the
    object changed at the origin since, the range is not that chunk: the edge says so, drops its
    cut, and the next request fetches the new object whole."""
    digests = {n: origin.add_object(f"plain-ev-{n}.bin", 5 * MiB) for n in range(4)}
    edge = Node(tmp_path / "edge", workers=1, extra=edge_config(origin.port, origin.cert, cache="16MB"))
    try:
        for n in range(4):
            r = get(edge, f"plain-ev-{n}.bin", tmp_path / f"{n}.bin")
            assert r.returncode == 0 and sha256_file(tmp_path / f"{n}.bin") == digests[n], r.stderr
        e0 = metrics(edge)
        assert e0["stoq_edge_evictions_total"] > 0 and e0["stoq_edge_cached_bytes"] <= 16_000_000
        r = get(edge, "plain-ev-0.bin", tmp_path / "again.bin")
        assert r.returncode == 0, r.stderr
        assert sha256_file(tmp_path / "again.bin") == digests[0]
        e1 = metrics(edge)
        ranges = e1["stoq_edge_origin_chunk_fetches_total"] - e0["stoq_edge_origin_chunk_fetches_total"]
        got = e1["stoq_edge_origin_bytes_total"] - e0["stoq_edge_origin_bytes_total"]
        assert e1["stoq_edge_origin_object_fetches_total"] == e0["stoq_edge_origin_object_fetches_total"]
        # (Its first chunks went first, so most of it comes back; in a cache this small a chunk
        # read ahead can leave again before it is sent, and is then asked for again.)
        assert ranges >= 1 and got > 0, (ranges, got)
        # One that could never be cached: its download stops once it passes the chunks' share.
        origin.add_object("plain-ev-big.bin", 64 * MiB)
        big = h3(edge.port, edge.cert, "/objects/plain-ev-big.bin")
        assert big["status"] == 502 and "is a plain object of more than 15728640 bytes" in big["text"], big
    finally:
        assert edge.stop() == 0
    # The object changes at the origin; the edge's chunks go while it is stopped (its cut
    # manifests stay on disk), so every chunk of the old cut is asked for as a range.
    new = origin.add_object("plain-ev-1.bin", 5 * MiB)
    for f in (tmp_path / "edge" / "content" / "edge" / "chunks").rglob("*"):
        if f.is_file():
            f.unlink()
    edge = Node(tmp_path / "edge", workers=1, extra=edge_config(origin.port, origin.cert, cache="16MB"))
    try:
        e0 = metrics(edge, settle=False)
        r = get(edge, "plain-ev-1.bin", tmp_path / "changed.bin")
        assert r.returncode != 0 and "plain-ev-1.bin changed at origin" in r.stderr, r.stderr
        r = get(edge, "plain-ev-1.bin", tmp_path / "new.bin")
        assert r.returncode == 0 and sha256_file(tmp_path / "new.bin") == new, r.stderr
        e1 = metrics(edge)
        # Every range asked for before the cut went (the one waited for and those read ahead).
        assert e1["stoq_edge_verification_failures_total"] > e0["stoq_edge_verification_failures_total"]
        assert e1["stoq_edge_origin_object_fetches_total"] == e0["stoq_edge_origin_object_fetches_total"] + 1
    finally:
        assert edge.stop() == 0


def test_an_expired_plain_object_is_revalidated_not_fetched_again(origin, tmp_path):
    """Once the manifest an edge cut from a plain object expires, the edge asks the origin for
    the object with If-None-Match: its SHA-256 (the origin's ETag once the file has one). An
    unchanged file is answered 304 and the cut stays; a changed one comes again, whole."""
    digest = origin.add_object("plain-ttl.bin", 4 * MiB)
    stored = origin.storage / "plain-ttl.bin"
    st = os.stat(stored)
    os.setxattr(stored, "user.stoq.object", f"2 {digest} {st.st_size:x} {st.st_mtime_ns:x} ".encode())
    edge = Node(tmp_path / "edge", workers=1, extra=edge_config(origin.port, origin.cert, ttl="1s"))
    try:
        r = get(edge, "plain-ttl.bin", tmp_path / "a.bin")
        assert r.returncode == 0 and sha256_file(tmp_path / "a.bin") == digest, r.stderr
        e0 = metrics(edge)
        time.sleep(1.2)
        r = get(edge, "plain-ttl.bin", tmp_path / "b.bin")
        assert r.returncode == 0 and sha256_file(tmp_path / "b.bin") == digest, r.stderr
        e1 = metrics(edge)
        assert e1["stoq_edge_origin_not_modified_total"] == e0["stoq_edge_origin_not_modified_total"] + 1
        assert e1["stoq_edge_origin_object_fetches_total"] == e0["stoq_edge_origin_object_fetches_total"] + 1
        assert e1["stoq_edge_origin_manifest_fetches_total"] == e0["stoq_edge_origin_manifest_fetches_total"]
        assert e1["stoq_edge_origin_bytes_total"] == e0["stoq_edge_origin_bytes_total"]
        # Replaced at the origin (a new file, no digest recorded yet, so another ETag): whole again.
        new = random_file(tmp_path / "new.bin", 4 * MiB, 99)
        shutil.copyfile(new, tmp_path / "staged.bin")
        os.replace(tmp_path / "staged.bin", stored)
        time.sleep(1.2)
        r = get(edge, "plain-ttl.bin", tmp_path / "c.bin")
        assert r.returncode == 0 and sha256_file(tmp_path / "c.bin") == sha256_file(new), r.stderr
        e2 = metrics(edge)
        assert e2["stoq_edge_origin_not_modified_total"] == e1["stoq_edge_origin_not_modified_total"]
        assert e2["stoq_edge_origin_bytes_total"] - e1["stoq_edge_origin_bytes_total"] >= 4 * MiB
    finally:
        assert edge.stop() == 0


def test_an_operator_purges_an_object_and_the_edge_asks_the_origin_again(origin, edge, tmp_path):
    """An object replaced at the origin stays as it was at the edge until its manifest expires
    (1 h here): `stoq edge purge` (POST /edge/purge/<name> on the admin API) drops it at once,
    and the next request gets the new version. What cannot be purged is named."""
    v1, v2 = random_file(tmp_path / "v1.bin", 3 * MiB, 21), random_file(tmp_path / "v2.bin", 3 * MiB, 22)
    put(origin, v1, "purged")
    assert get(edge, "purged", tmp_path / "a.bin").returncode == 0 and sha256_file(tmp_path / "a.bin") == sha256_file(v1)
    put(origin, v2, "purged")
    assert get(edge, "purged", tmp_path / "b.bin").returncode == 0 and sha256_file(tmp_path / "b.bin") == sha256_file(v1)
    purges = metrics(edge)["stoq_edge_purges_total"]
    r = stoq("edge", "purge", edge.admin, "purged")
    assert r.returncode == 0 and r.stdout.strip() == "purged purged from the edge cache", (r.stdout, r.stderr)
    assert get(edge, "purged", tmp_path / "c.bin").returncode == 0 and sha256_file(tmp_path / "c.bin") == sha256_file(v2)
    assert metrics(edge)["stoq_edge_purges_total"] == purges + 1
    r = stoq("edge", "purge", edge.admin, "never-cached", "purged")
    assert r.returncode == 1, r.stderr
    assert "never-cached: HTTP 404: the edge cache holds no manifest of never-cached" in r.stderr
    assert r.stdout.strip() == "purged purged from the edge cache"
    r = stoq("edge", "purge", edge.admin, "../etc")
    assert r.returncode == 1 and "HTTP 400" in r.stderr and "../etc" in r.stderr, r.stderr
    r = stoq("edge", "purge", origin.admin, "purged")
    assert r.returncode == 1 and "HTTP 409: this node has no edge cache" in r.stderr, r.stderr


def test_a_chunk_with_wrong_bytes_from_the_origin_is_refused(origin, tmp_path):
    """The origin here is ngtcp2's gtlsserver serving files (an independent HTTP/3 server
    with the origin node's own certificate): the real manifest, and chunk files of which one
    has a flipped byte."""
    gtls = shutil.which("gtlsserver") or "/usr/sbin/gtlsserver"
    if not pathlib.Path(gtls).exists():
        pytest.fail("gtlsserver missing: scripts/install-deps installs ngtcp2-server")
    src = random_file(tmp_path / "bad.bin", 4 * MiB, 13)
    put(origin, src, "edge-bad")
    htdocs = tmp_path / "htdocs"
    (htdocs / "manifests").mkdir(parents=True)
    (htdocs / "chunks").mkdir()
    m = run([sys.executable, HERE / "h3client.py", f"https://[::1]:{origin.port}/manifests/edge-bad", "--ca", origin.cert,
             "--out", htdocs / "manifests" / "edge-bad"])
    assert m.returncode == 0 and json.loads(m.stdout)["status"] == 200, m.stdout
    data = src.read_bytes()
    chunks = chunk_list(src)
    bad = chunks[1]
    for c in chunks:
        b = bytearray(data[c["offset"]:c["offset"] + c["length"]])
        if c is bad:
            b[len(b) // 2] ^= 0x01
        (htdocs / "chunks" / c["id"]).write_bytes(bytes(b))
    port = free_port()
    ident = pathlib.Path(origin.identity_cert)
    srv = subprocess.Popen([gtls, "-q", "-d", str(htdocs), "::1", str(port), str(ident.with_name("key.pem")), str(ident)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    edge = None
    try:
        time.sleep(0.5)
        edge = Node(tmp_path / "edge", workers=1, extra=edge_config(port, origin.cert))
        # A good chunk passes; the bad one is refused with a reason and never stored.
        good = h3(edge.port, edge.cert, f"/chunks/{chunks[0]['id']}")
        assert good["status"] == 200 and good["sha256"] == chunks[0]["id"], good
        r = h3(edge.port, edge.cert, f"/chunks/{bad['id']}")
        assert r["status"] == 502 and "do not verify" in r["text"], r
        assert not list((tmp_path / "edge" / "content" / "edge" / "chunks").rglob(bad["id"]))
        # The whole object cannot be served correctly: it fails rather than send wrong bytes.
        whole = get(edge, "edge-bad", tmp_path / "bad-out.bin")
        assert whole.returncode != 0
        assert not (tmp_path / "bad-out.bin").exists()
        m = metrics(edge)
        assert m["stoq_edge_verification_failures_total"] >= 2
        edge.log.flush()
        assert "refused chunk " + bad["id"] in (tmp_path / "edge" / "node.log").read_text()
    finally:
        srv.terminate()
        srv.wait(timeout=10)
        if edge:
            assert edge.stop() == 0


def test_the_cache_keeps_its_bound_and_evicts(origin, tmp_path):
    src = random_file(tmp_path / "big.bin", 12 * MiB, 14)
    up = put(origin, src, "edge-big")
    edge = Node(tmp_path / "edge", workers=2, extra=edge_config(origin.port, origin.cert, cache="3MB"))
    try:
        for i in range(2):
            r = get(edge, "edge-big", tmp_path / f"big{i}.bin")
            assert r.returncode == 0, r.stderr
            assert sha256_file(tmp_path / f"big{i}.bin") == up["sha256"]
        m = metrics(edge)
        assert m["stoq_edge_capacity_bytes"] == 3 * MiB
        assert 0 < m["stoq_edge_cached_bytes"] <= 3 * MiB
        assert m["stoq_edge_evictions_total"] > 0
        # What is on disk (chunks and the manifest) is what the cache counts, within the bound.
        cache = tmp_path / "edge" / "content" / "edge"
        on_disk = sum(p.stat().st_size for d in ("chunks", "manifests") for p in (cache / d).rglob("*") if p.is_file())
        assert m["stoq_edge_cached_manifests"] == 1
        assert on_disk == m["stoq_edge_cached_bytes"]
        # The second pass could not come from a 3 MB cache: the origin was asked again.
        assert m["stoq_edge_origin_chunk_fetches_total"] > len(chunk_list(src))
    finally:
        assert edge.stop() == 0


def test_ttl_expiry_and_origin_max_age_refetch_the_manifest(origin, tmp_path):
    """The edge keeps a manifest fresh for edge.ttl_default, or the origin's max-age, from when it
    got it: during the first get, after `asked` and before `got`. A second get by `asked` + TTL
    asks the origin nothing; one after `got` + TTL asks again and sees the origin's new version."""
    src = random_file(tmp_path / "t1.bin", 3 * MiB, 15)
    put(origin, src, "edge-ttl")
    distinct = len({c["id"] for c in chunk_list(src)})
    fetches = ("stoq_edge_origin_manifest_fetches_total", "stoq_edge_origin_chunk_fetches_total",
               "stoq_edge_origin_object_fetches_total")
    edge = Node(tmp_path / "edge", workers=1, extra=edge_config(origin.port, origin.cert, ttl=f"{TTL}s"))
    try:
        o0 = origin_counts(origin)
        asked = time.time()
        assert get(edge, "edge-ttl", tmp_path / "t-a.bin").returncode == 0
        got = time.time()
        e0 = metrics(edge, settle=False)   # the edge's own counters are live
        assert get(edge, "edge-ttl", tmp_path / "t-b.bin").returncode == 0   # fresh: nothing asked
        assert time.time() - asked < TTL, "too slow to observe a fresh manifest"
        e1 = metrics(edge, settle=False)
        assert {k: e1[k] for k in fetches} == {k: e0[k] for k in fetches}
        # At the origin, once both gets are counted: the first one's fetches, nothing more.
        o1 = origin_counts(origin)
        assert o1["stoq_content_manifests_served_total"] - o0["stoq_content_manifests_served_total"] == 1, (o0, o1)
        assert o1["stoq_content_chunks_served_total"] - o0["stoq_content_chunks_served_total"] == distinct, (o0, o1)
        assert o1["stoq_content_objects_served_total"] == o0["stoq_content_objects_served_total"], (o0, o1)
        # A new version under the same name; after the TTL the edge asks again and sees it.
        v2 = random_file(tmp_path / "t2.bin", 3 * MiB, 16)
        up2 = put(origin, v2, "edge-ttl")
        o2 = origin_counts(origin)
        time.sleep(max(0.0, got + TTL + 0.3 - time.time()))
        r = get(edge, "edge-ttl", tmp_path / "t-c.bin")
        assert r.returncode == 0, r.stderr
        assert sha256_file(tmp_path / "t-c.bin") == up2["sha256"]
        o3, e3 = origin_counts(origin), metrics(edge, settle=False)
        assert o3["stoq_content_manifests_served_total"] - o2["stoq_content_manifests_served_total"] == 1
        assert e3["stoq_edge_origin_manifest_fetches_total"] - e0["stoq_edge_origin_manifest_fetches_total"] == 1
    finally:
        assert edge.stop() == 0

    # The origin's Cache-Control: max-age overrides a long edge.ttl_default.
    short = Node(tmp_path / "origin2", workers=1, extra=ADMIN + f'[edge]\norigin_max_age = "{TTL}s"\n')
    edge = Node(tmp_path / "edge2", workers=1, extra=edge_config(short.port, short.cert, ttl="1h"))
    try:
        put(short, src, "edge-ma")
        a = origin_counts(short)["stoq_content_manifests_served_total"]
        asked = time.time()
        assert get(edge, "edge-ma", tmp_path / "m-a.bin").returncode == 0
        got = time.time()
        assert get(edge, "edge-ma", tmp_path / "m-b.bin").returncode == 0
        assert time.time() - asked < TTL, "too slow to observe a fresh manifest"
        assert origin_counts(short)["stoq_content_manifests_served_total"] == a + 1   # the first get's only
        time.sleep(max(0.0, got + TTL + 0.3 - time.time()))
        assert get(edge, "edge-ma", tmp_path / "m-c.bin").returncode == 0
        assert origin_counts(short)["stoq_content_manifests_served_total"] == a + 2
        assert sha256_file(tmp_path / "m-c.bin") == sha256_file(src)
    finally:
        assert edge.stop() == 0
        assert short.stop() == 0


def restart(node):
    """Stops `node` and starts it again on its port, data and storage."""
    assert node.stop() == 0
    node.proc = subprocess.Popen([str(need_binary("stoq-node")), "--config", str(node.config)],
                                 stdout=subprocess.PIPE, stderr=node.log, text=True)
    read_banner(node)


def test_chunked_get_of_a_plain_file_a_node_does_not_cut_gets_it_whole(origin, tmp_path):
    """`stoq get --chunked` of a file in an origin's storage.path with cut_plain_files = false:
    the origin has no manifest (404), so the client says so and gets the object whole, checked
    against its ETag, instead of failing. A name the origin lacks still fails, with the 404. The
    .part of an earlier --chunked download (which would resume) is left as it was."""
    digest = origin.add_object("plain-whole.bin", 3 * MiB + 1)
    r = get(origin, "plain-whole.bin", tmp_path / "w.bin", "--chunked")
    assert r.returncode == 0 and sha256_file(tmp_path / "w.bin") == digest, r.stderr
    assert "GET /manifests/plain-whole.bin: HTTP 404" in r.stderr and "getting the object whole instead" in r.stderr, r.stderr
    assert json.loads(r.stdout)["bytes"] == 3 * MiB + 1
    r = get(origin, "nobody-has-it", tmp_path / "x.bin", "--chunked")
    assert r.returncode != 0 and "getting the object whole instead" in r.stderr, r.stderr
    assert "/objects/nobody-has-it: HTTP 404" in r.stderr and not (tmp_path / "x.bin").exists(), r.stderr
    part = tmp_path / "p.bin.part"
    part.write_bytes(b"chunks of an earlier download")
    r = get(origin, "plain-whole.bin", tmp_path / "p.bin", "--chunked")
    assert r.returncode == 0 and "getting the object whole instead" in r.stderr, r.stderr
    assert sha256_file(tmp_path / "p.bin") == digest and part.read_bytes() == b"chunks of an earlier download"


def test_a_cut_outlives_the_request_that_asked_for_it(tmp_path):
    """A client that gives up on `GET /manifests/<name>` while the node cuts the plain file
    (its connection closes mid-cut) leaves the cut to finish: the node logs no error, and the
    next request gets that cut without a second one."""
    node = Node(tmp_path / "node", workers=1, extra=ADMIN)
    try:
        node.add_object("big.bin", 256 * MiB)
        url = f"https://[::1]:{node.port}/manifests/big.bin"
        # The cut (content-defined chunking and two SHA-256 passes of 256 MiB, at 1–2 s per GiB)
        # outlasts the client's 0.15 s. Those start once the connection is up and the request
        # sent (aioquic; `stoq get --timeout` would spend them on the handshake too), then the
        # client closes its connection.
        r = run([sys.executable, HERE / "h3client.py", url, "--ca", node.cert, "--timeout", "0.15"], timeout=60)
        gave_up = json.loads(r.stdout)
        assert r.returncode == 1 and gave_up["error"].startswith("TimeoutError: no complete answer 0.15 s after the request"), gave_up
        assert gave_up["error"].endswith("status None, 0 bytes received"), gave_up
        deadline = time.monotonic() + 60
        while (plain_cuts(node)["cut"] or 0) < 1:
            assert time.monotonic() < deadline, plain_cuts(node)
            time.sleep(0.2)
        r = stoq("get", url, "-o", tmp_path / "m1", "--ca", node.cert)
        assert r.returncode == 0 and (tmp_path / "m1").stat().st_size > 0, r.stderr
        cut = plain_cuts(node)
        assert (cut["cut"], cut["failed"]) == (1, 0), cut
        assert not re.search(r"^\S+ (error|critical) ", (tmp_path / "node" / "node.log").read_text(), re.M)
    finally:
        assert node.stop() == 0


def test_a_plain_file_the_origin_cuts_travels_by_chunks_and_survives_an_origin_restart(tmp_path):
    """An origin asked for the manifest of a plain file cuts it (chunking.cut_plain_files, the
    default) and answers with the cut: the edge fetches the object chunk by chunk, never whole,
    and streams it as chunks arrive instead of after the whole download. The origin's cuts live
    in its memory: after a restart it has none of the chunks the edge's manifest lists (404).
    The edge then drops that manifest and, as nothing was sent yet, asks for it again: the
    origin cuts the file again (the same chunks) and the request succeeds. A request that has
    sent bytes when it meets the 404 asks too, and goes on with the same manifest."""
    origin = Node(tmp_path / "origin", workers=1, extra=ADMIN)
    edge = None
    try:
        digest = origin.add_object("cut.bin", 12 * MiB + 5)
        chunks = chunk_list(origin.storage / "cut.bin")
        edge = Node(tmp_path / "edge", workers=1, extra=edge_config(origin.port, origin.cert))
        r = get(edge, "cut.bin", tmp_path / "a.bin")
        assert r.returncode == 0 and sha256_file(tmp_path / "a.bin") == digest, r.stderr
        e0 = metrics(edge)
        assert e0["stoq_edge_origin_object_fetches_total"] == 0
        assert e0["stoq_edge_origin_manifest_fetches_total"] == 1
        assert e0["stoq_edge_origin_chunk_fetches_total"] >= len(chunks)
        assert 12 * MiB <= e0["stoq_edge_origin_bytes_total"] < 12 * MiB + 200_000
        cut = plain_cuts(origin)
        assert (cut["cut"], cut["failed"], cut["stale"]) == (1, 0, 0) and cut["served"] >= len(chunks), cut
        # The edge as a --chunked client sees it: the origin's cut, manifest and ids.
        r = get(edge, "cut.bin", tmp_path / "b.bin", "--chunked")
        assert r.returncode == 0 and sha256_file(tmp_path / "b.bin") == digest, r.stderr
        # The edge loses its chunks (stopped; its manifest stays on disk), the origin its cuts.
        # Then again, but the edge keeps the first chunk: it sends it, then meets the 404. It
        # asks for the manifest again, gets the same one (the origin cut the same file again)
        # and goes on where it was; before, the client's stream was reset after the first chunk.
        for keep, said in (("", "asking for its manifest again"), (chunks[0]["id"], "asking for its manifest again to go on")):
            assert edge.stop() == 0
            for f in (tmp_path / "edge" / "content" / "edge" / "chunks").rglob("*"):
                if f.is_file() and f.name != keep:
                    f.unlink()
            restart(origin)
            edge = Node(tmp_path / "edge", workers=1, extra=edge_config(origin.port, origin.cert))
            r = get(edge, "cut.bin", tmp_path / "c.bin")
            assert r.returncode == 0 and sha256_file(tmp_path / "c.bin") == digest, (keep, r.stderr)
            # (objects_served is a worker's, published about once a second: read until it settles.)
            served = settled(lambda: metric_totals(edge)["stoq_content_objects_served_total"])
            e1 = metrics(edge, settle=False)
            # One request, asked again: counted once.
            assert (e1["stoq_edge_manifests_forgotten_total"], served) == (1, 1), (served, e1)
            assert e1["stoq_edge_origin_manifest_fetches_total"] == 1 and e1["stoq_edge_origin_object_fetches_total"] == 0
            assert plain_cuts(origin)["cut"] == 1
            log = (tmp_path / "edge" / "node.log").read_text()
            assert "cut.bin" in log and said in log and (keep or "to go on" not in log), log[-2000:]
    finally:
        if edge:
            assert edge.stop() == 0
        assert origin.stop() == 0


def test_the_index_survives_kill_9_and_the_edge_serves_while_the_origin_is_down(tmp_path):
    origin = Node(tmp_path / "origin", workers=1, extra=ADMIN)
    edge = None
    try:
        a = random_file(tmp_path / "a.bin", 6 * MiB, 17)
        b = random_file(tmp_path / "b.bin", 2 * MiB, 18)
        up_a = put(origin, a, "down-a")
        put(origin, b, "down-b")
        edge = Node(tmp_path / "edge", workers=2, extra=edge_config(origin.port, origin.cert))
        assert get(edge, "down-a", tmp_path / "a1.bin").returncode == 0
        # b's manifest only: its chunks will have to come from the origin.
        assert h3(edge.port, edge.cert, "/manifests/down-b")["status"] == 200
        cached = metrics(edge)["stoq_edge_cached_chunks"]
        assert cached > 0
        edge.proc.send_signal(signal.SIGKILL)   # no clean shutdown: the index must still hold
        edge.proc.wait(timeout=10)
        o0 = origin_counts(origin)
        assert origin.stop() == 0                # and the origin is gone from here on

        edge = Node(tmp_path / "edge", workers=2, extra=edge_config(origin.port, origin.cert))
        assert metrics(edge)["stoq_edge_cached_chunks"] == cached
        r = get(edge, "down-a", tmp_path / "a2.bin")
        assert r.returncode == 0, r.stderr
        assert sha256_file(tmp_path / "a2.bin") == up_a["sha256"]
        m = metrics(edge)
        assert m["stoq_edge_origin_chunk_fetches_total"] == 0 and m["stoq_edge_hits_total"] >= cached

        # Not cached, origin down: a clear error, quickly, and the node keeps serving. b's
        # manifest is cached, so the object's head was ready: it is held until the first chunk
        # is at hand (it used to be a 200 reset before its first byte, naming nothing).
        # Within the next second another miss fails at once, with the same reason (docs/content.md):
        # the answer says it is the held failure, not a connect of its own. That miss goes on the
        # same connection as soon as the first answer is in (milliseconds, where a new client
        # process could take more than the edge's 1 s hold, EdgeCache.holdUnreachable).
        t0 = time.time()
        r, again = h3(edge.port, edge.cert, "/objects/down-b", then=["/objects/down-c"])
        assert r["status"] == 502 and "unreachable" in r["text"] and f"[::1]:{origin.port}" in r["text"], r
        assert time.time() - t0 < 15
        r = again
        assert r["status"] == 502 and "unreachable" in r["text"] and "ms ago; tried again 1000 ms after" in r["text"], r
        assert metrics(edge)["stoq_edge_origin_errors_total"] >= 1
        edge.log.flush()
        assert "unreachable" in (tmp_path / "edge" / "node.log").read_text()
        r = get(edge, "down-a", tmp_path / "a3.bin")
        assert r.returncode == 0 and sha256_file(tmp_path / "a3.bin") == up_a["sha256"]
        assert o0["stoq_content_chunks_served_total"] > 0
    finally:
        if edge:
            assert edge.stop() == 0
        if origin.proc.poll() is None:
            origin.stop()


def test_edge_and_origin_authenticate_each_other(tmp_path):
    """Node to node is mutual TLS: an origin with client_auth = "required" serves an edge
    that presents its own node certificate from a CA the origin trusts, and refuses (with its
    reason) an edge whose CA it does not know; that edge answers its client 502."""
    edge_dir, stranger_dir = tmp_path / "edge", tmp_path / "stranger"
    for d in (edge_dir, stranger_dir):
        r = stoq("trust", "init", "--dir", d / "data" / "trust")   # the edge's own CA, made ahead
        assert r.returncode == 0, r.stderr
    origin = Node(tmp_path / "origin", workers=1,
                  extra='client_auth = "required"\n' + ADMIN + f'[trust]\nbundle = "{edge_dir}/data/trust/root.pem"\n')
    edge = stranger = None
    try:
        # The origin itself is reached with a client certificate of the edge's CA.
        client_cert, client_key = tmp_path / "c.pem", tmp_path / "c.key"
        assert stoq("trust", "issue", "--dir", edge_dir / "data" / "trust", "--dns", "op.example", "--out", client_cert,
                    "--key-out", client_key).returncode == 0
        src = random_file(tmp_path / "m.bin", 3 * MiB, seed=7)
        r = stoq("put", src, origin.url("m.bin"), "--chunked", "--ca", origin.cert, "--json",
                 "--cert", client_cert, "--key", client_key)
        assert r.returncode == 0, r.stderr
        edge = Node(edge_dir, workers=1, extra=edge_config(origin.port, origin.cert))
        out = tmp_path / "via-edge.bin"
        r = get(edge, "m.bin", out)
        assert r.returncode == 0, r.stderr
        assert sha256_file(out) == sha256_file(src)
        stranger = Node(stranger_dir, workers=1, extra=edge_config(origin.port, origin.cert))
        r = get(stranger, "m.bin", tmp_path / "refused.bin")
        assert r.returncode != 0 and "502" in (r.stderr + r.stdout), r.stderr
        origin.log.flush()
        log = pathlib.Path(origin.log.name).read_text()
        # The stranger's CA bears the same names as the origin's: the signature is what fails.
        assert re.search(r"client certificate refused: unknownRoot: signature of .* does not verify", log), log[-2000:]
    finally:
        for n in (stranger, edge, origin):
            if n:
                assert n.stop() == 0
