"""Dedup on ingest against a real stoq-node: a plain `PUT /objects/<name>` (not --chunked),
from `stoq put` or from aioquic, becomes content-addressed chunks plus a manifest, so the
same 256 MiB put twice stores almost nothing more; GET/HEAD/Range serve it as before, a
replaced object serves its new bytes, and with `chunking.dedup_enabled = false` uploads
stay flat files."""
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from conftest import Node, need_binary, random_file, run, sha256_file, stoq, summed_counters
from conftest import settled as settled_reading

HERE = pathlib.Path(__file__).resolve().parent
MiB = 1 << 20
INGEST = ["stoq_ingest_objects_total", "stoq_ingest_bytes_total", "stoq_ingest_new_bytes_total",
          "stoq_ingest_dedup_bytes_total", "stoq_ingest_failures_total", "stoq_ingest_followed_total"]


@pytest.fixture(scope="module")
def inode(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("ingest"), workers=2, extra='[admin]\nlisten = "[::1]:0"')
    yield n
    assert n.stop() == 0


def counters(node):
    return summed_counters(node, INGEST)


def settled(node, timeout=20):
    """The node's counters once they stop moving (conftest.settled)."""
    return settled_reading(lambda: counters(node), timeout)


def counters_after(node, before, key, at_least, timeout=20):
    """The counters once `key` has moved by `at_least` (workers publish about once a second)."""
    deadline = time.time() + timeout
    while True:
        now = counters(node)
        if now[key] - before[key] >= at_least or time.time() > deadline:
            return now
        time.sleep(0.5)


def disk_bytes(*dirs):
    """Bytes the files under `dirs` take on disk (st_blocks, like du), and their apparent sizes."""
    used = apparent = 0
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                try:
                    st = os.lstat(os.path.join(root, f))
                except FileNotFoundError:
                    continue
                used += st.st_blocks * 512
                apparent += st.st_size
    return used, apparent


def put(node, path, name):
    r = stoq("put", path, node.url(name), "--ca", node.cert, "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == 201
    return r


def get_sha(node, name, out, chunked=False):
    args = ["get", node.url(name), "-o", out, "--ca", node.cert, "--json"] + (["--chunked"] if chunked else [])
    r = stoq(*args, timeout=600)
    assert r.returncode == 0, r.stderr
    return sha256_file(out)


def h3(node, path, *extra):
    r = run([sys.executable, HERE / "h3client.py", f"https://[::1]:{node.port}{path}", "--ca", node.cert,
             "--header", node.auth, *extra],
            timeout=300)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert "error" not in res, res
    return res


def test_plain_put_of_the_same_256_mib_twice_stores_under_1_mib_more(inode, tmp_path):
    src = random_file(tmp_path / "big.bin", 256 * MiB, 11)
    digest = sha256_file(src)
    c0 = settled(inode)
    put(inode, src, "big.bin")
    c1 = counters_after(inode, c0, "stoq_ingest_objects_total", 1)
    assert c1["stoq_ingest_bytes_total"] - c0["stoq_ingest_bytes_total"] == 256 * MiB
    assert c1["stoq_ingest_new_bytes_total"] - c0["stoq_ingest_new_bytes_total"] == 256 * MiB
    # Chunked while it arrived (announced at 8 MiB or more), not after.
    assert c1["stoq_ingest_followed_total"] - c0["stoq_ingest_followed_total"] == 1
    # The object is a chunked object now: no flat file, no temp file, a record in the index.
    assert not (inode.storage / "big.bin").exists()
    assert not [p for p in inode.storage.iterdir() if p.name.startswith(".upload-")]
    assert (inode.content / "objects" / "big.bin").exists()
    used1, apparent1 = disk_bytes(inode.storage, inode.content)

    put(inode, src, "big.bin")
    c2 = counters_after(inode, c1, "stoq_ingest_objects_total", 1)
    used2, apparent2 = disk_bytes(inode.storage, inode.content)
    print(f"after first PUT: {used1} bytes on disk ({apparent1} apparent); after second: {used2} ({apparent2}); "
          f"growth {used2 - used1} ({apparent2 - apparent1} apparent)")
    print("ingest counters after the second PUT:", {k: c2[k] - c1[k] for k in INGEST})
    assert used2 - used1 < MiB and apparent2 - apparent1 < MiB
    assert c2["stoq_ingest_dedup_bytes_total"] - c1["stoq_ingest_dedup_bytes_total"] == 256 * MiB
    assert c2["stoq_ingest_new_bytes_total"] == c1["stoq_ingest_new_bytes_total"]
    assert c2["stoq_ingest_failures_total"] == c0["stoq_ingest_failures_total"]

    # Byte-identical back: as one body, and chunk by chunk through /manifests and /chunks.
    assert get_sha(inode, "big.bin", tmp_path / "big.out") == digest
    (tmp_path / "big.out").unlink()
    assert get_sha(inode, "big.bin", tmp_path / "big.chunked", chunked=True) == digest


def test_ingested_object_serves_head_range_and_404_like_a_flat_one(inode, tmp_path):
    src = random_file(tmp_path / "r.bin", 3 * MiB + 5, 12)
    data = src.read_bytes()
    put(inode, src, "ranged.bin")
    assert not (inode.storage / "ranged.bin").exists()
    head = h3(inode, "/objects/ranged.bin", "--method", "HEAD")
    assert head["status"] == 200 and head["bytes"] == 0
    assert head["headers"]["content-length"] == str(len(data))
    for lo, hi in [(0, 0), (100, 199), (MiB - 10, 2 * MiB + 10), (len(data) - 7, len(data) - 1)]:
        res = h3(inode, "/objects/ranged.bin", "--header", f"range: bytes={lo}-{hi}")
        assert res["status"] == 206 and res["bytes"] == hi - lo + 1, (lo, hi, res)
        assert res["headers"]["content-range"] == f"bytes {lo}-{hi}/{len(data)}"
        assert res["sha256"] == hashlib.sha256(data[lo:hi + 1]).hexdigest()
    res = h3(inode, "/objects/ranged.bin", "--header", "range: bytes=-10")
    assert res["status"] == 206 and res["sha256"] == hashlib.sha256(data[-10:]).hexdigest()
    res = h3(inode, "/objects/ranged.bin", "--header", f"range: bytes={len(data)}-")
    assert res["status"] == 416
    assert h3(inode, "/objects/never-put.bin")["status"] == 404
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    put(inode, empty, "empty.bin")
    res = h3(inode, "/objects/empty.bin")
    assert res["status"] == 200 and res["bytes"] == 0 and res["headers"]["content-length"] == "0"


def test_replacing_an_object_serves_the_new_bytes(inode, tmp_path):
    a = random_file(tmp_path / "a.bin", 5 * MiB, 13)
    b = random_file(tmp_path / "b.bin", 2 * MiB + 3, 14)
    put(inode, a, "replaced.bin")
    assert get_sha(inode, "replaced.bin", tmp_path / "1.out") == sha256_file(a)
    put(inode, b, "replaced.bin")
    assert get_sha(inode, "replaced.bin", tmp_path / "2.out") == sha256_file(b)
    # An object stored flat before (an earlier node, or dedup off) is replaced too.
    inode.add_object("was-flat.bin", MiB)
    assert (inode.storage / "was-flat.bin").exists()
    put(inode, a, "was-flat.bin")
    assert not (inode.storage / "was-flat.bin").exists()
    assert get_sha(inode, "was-flat.bin", tmp_path / "3.out") == sha256_file(a)


def test_a_flat_object_from_before_still_serves(inode, tmp_path):
    digest = inode.add_object("old-flat.bin", 2 * MiB)
    assert get_sha(inode, "old-flat.bin", tmp_path / "o.out") == digest


def test_aioquic_put_is_deduplicated_too(inode, tmp_path):
    src = random_file(tmp_path / "aq.bin", 8 * MiB, 15)
    c0 = settled(inode)
    for name in ["aioquic-1.bin", "aioquic-2.bin"]:
        res = h3(inode, f"/objects/{name}", "--method", "PUT", "--body", str(src))
        assert res["status"] == 201, res
        assert not (inode.storage / name).exists()
        assert h3(inode, f"/manifests/{name}")["status"] == 200
        assert h3(inode, f"/objects/{name}")["sha256"] == sha256_file(src)
    c1 = counters_after(inode, c0, "stoq_ingest_objects_total", 2)
    assert c1["stoq_ingest_bytes_total"] - c0["stoq_ingest_bytes_total"] == 16 * MiB
    assert c1["stoq_ingest_new_bytes_total"] - c0["stoq_ingest_new_bytes_total"] == 8 * MiB
    assert c1["stoq_ingest_dedup_bytes_total"] - c0["stoq_ingest_dedup_bytes_total"] == 8 * MiB


def test_a_client_that_leaves_before_the_answer_still_gets_its_object_stored(inode, tmp_path):
    # The client ends its body and closes its connection in the next datagram: the node has
    # the whole body, and no one to answer once the object is stored.
    src = random_file(tmp_path / "gone.bin", 32 * MiB, 17)
    for announced in (True, False):
        c0 = settled(inode)
        res = h3(inode, "/objects/gone.bin", "--method", "PUT", "--body", str(src), "--close-after-send",
                 *([] if announced else ["--no-length"]))
        assert res["status"] is None, res                       # it never waited for the 201
        c1 = counters_after(inode, c0, "stoq_ingest_objects_total", 1)
        assert c1["stoq_ingest_bytes_total"] - c0["stoq_ingest_bytes_total"] == 32 * MiB
        assert c1["stoq_ingest_followed_total"] - c0["stoq_ingest_followed_total"] == 1
        assert h3(inode, "/objects/gone.bin")["sha256"] == sha256_file(src)
        assert not [p for p in inode.storage.iterdir() if p.name.startswith(".upload-")]


def test_an_upload_without_a_length_is_chunked_while_it_arrives(inode, tmp_path):
    """A body sent without a content-length is followed once 8 MiB of it have arrived, like
    one announced that large; a smaller one is ingested once complete. Both are stored whole."""
    for size, followed in ((24 * MiB, 1), (6 * MiB, 0)):
        src = random_file(tmp_path / f"nolen{size}.bin", size, 19)
        c0 = settled(inode)
        res = h3(inode, f"/objects/nolen{size}.bin", "--method", "PUT", "--body", str(src), "--no-length")
        assert res["status"] == 201, res
        c1 = counters_after(inode, c0, "stoq_ingest_objects_total", 1)
        assert c1["stoq_ingest_followed_total"] - c0["stoq_ingest_followed_total"] == followed, size
        assert c1["stoq_ingest_bytes_total"] - c0["stoq_ingest_bytes_total"] == size
        assert h3(inode, f"/manifests/nolen{size}.bin")["status"] == 200
        assert h3(inode, f"/objects/nolen{size}.bin")["sha256"] == sha256_file(src)


def test_uploads_cancelled_while_being_chunked_store_nothing_and_free_their_followers(inode, tmp_path):
    """A large upload is chunked while it arrives (followed). Nine cancelled after 6 of their
    16 MiB, one more than the node follows at once, one after another: each was followed (so
    each one before it had freed its follower), none became an object or left a temp file,
    and the same name then stores whole."""
    src = random_file(tmp_path / "cut.bin", 16 * MiB, 18)
    c0 = settled(inode)
    for _ in range(9):
        res = h3(inode, "/objects/cut.bin", "--method", "PUT", "--body", str(src), "--abort-after", str(6 * MiB))
        assert res["status"] is None, res
    c1 = counters_after(inode, c0, "stoq_ingest_followed_total", 9)
    print("ingest counters after nine cancelled uploads:", {k: c1[k] - c0[k] for k in INGEST})
    assert c1["stoq_ingest_followed_total"] - c0["stoq_ingest_followed_total"] == 9
    assert c1["stoq_ingest_objects_total"] == c0["stoq_ingest_objects_total"]
    assert c1["stoq_ingest_failures_total"] == c0["stoq_ingest_failures_total"]
    assert h3(inode, "/objects/cut.bin")["status"] == 404
    assert h3(inode, "/manifests/cut.bin")["status"] == 404
    assert not [p for p in inode.storage.iterdir() if p.name.startswith(".upload-")]
    put(inode, src, "cut.bin")
    c2 = counters_after(inode, c1, "stoq_ingest_objects_total", 1)
    assert c2["stoq_ingest_followed_total"] - c1["stoq_ingest_followed_total"] == 1
    assert h3(inode, "/objects/cut.bin")["sha256"] == sha256_file(src)


def test_stoq_put_from_a_pipe_streams_the_body_and_it_is_followed(inode, tmp_path):
    """`stoq put - URL` sends standard input as it comes, without a content-length: a file
    redirected in (40 MiB: followed once 8 MiB are in) and a producer that pauses (3 MB in
    three writes: each piece goes when the pipe runs dry, not when a buffer fills)."""
    src = random_file(tmp_path / "piped.bin", 40 * MiB, 23)
    c0 = settled(inode)
    with open(src, "rb") as f:
        r = stoq("put", "-", inode.url("piped.bin"), "--ca", inode.cert, "--json", stdin=f, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == 201 and out["bytes"] == 40 * MiB, out
    c1 = counters_after(inode, c0, "stoq_ingest_objects_total", 1)
    assert c1["stoq_ingest_followed_total"] - c0["stoq_ingest_followed_total"] == 1
    assert h3(inode, "/objects/piped.bin")["sha256"] == sha256_file(src)

    pieces = [os.urandom(1_000_000) for _ in range(3)]
    env = {"STOQ_TOKEN": inode.token}
    p = subprocess.Popen([str(need_binary("stoq")), "put", "-", inode.url("paused.bin"), "--ca", str(inode.cert), "--json"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env})
    for piece in pieces:
        p.stdin.write(piece)
        p.stdin.flush()
        time.sleep(0.3)
    stdout, stderr = p.communicate(timeout=120)  # closes its input: the end of the body
    assert p.returncode == 0, stderr
    assert json.loads(stdout)["bytes"] == 3_000_000
    assert h3(inode, "/objects/paused.bin")["sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()

    # Input that cannot be read (a directory): the request is cancelled, nothing is stored.
    fd = os.open("/", os.O_RDONLY)
    try:
        r = stoq("put", "-", inode.url("unread.bin"), "--ca", inode.cert, stdin=fd)
    finally:
        os.close(fd)
    assert r.returncode == 1 and "reading the body failed after 0 bytes: Is a directory" in r.stderr, r.stderr
    assert h3(inode, "/objects/unread.bin")["status"] == 404
    time.sleep(0.5)
    assert not [p for p in inode.storage.iterdir() if p.name.startswith(".upload-")]

    r = stoq("put", "--chunked", "-", inode.url("x.bin"), "--ca", inode.cert, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "--chunked cuts a file it can read again: give a FILE, not -" in r.stderr, r.stderr


def test_with_dedup_off_a_plain_put_stays_a_flat_file(tmp_path_factory, tmp_path):
    n = Node(tmp_path_factory.mktemp("flat"), workers=1, extra='[chunking]\ndedup_enabled = false')
    try:
        src = random_file(tmp_path / "f.bin", 3 * MiB, 16)
        put(n, src, "flat.bin")
        assert sha256_file(n.storage / "flat.bin") == sha256_file(src)
        assert not (n.content / "objects" / "flat.bin").exists()
        assert get_sha(n, "flat.bin", tmp_path / "f.out") == sha256_file(src)
    finally:
        assert n.stop() == 0
