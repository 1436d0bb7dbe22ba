"""Issue #16 items 3 and 4 on a real node: conditional writes (If-Match / If-None-Match),
the overwrite policy, writer quotas and the storage cap (507 with the numbers, nothing partial
left), per-client rate limits (429 with Retry-After), and the counters for all of it.

Every request goes through `request()` below, which presents the node's operator token on
writes (they need a credential, docs/access.md) and sends reads anonymously (reads are public):
quotas and rate limits are keyed on who the node says sent the request, `token:<sub>` for a
token and `addr:<the /64>/64` for an anonymous reader."""
import hashlib
import json
import os
import re
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import Node, need_binary, run, stoq, writer_token

HERE = Path(__file__).resolve().parent
ADMIN = '[admin]\nlisten = "[::1]:0"\n'


WRITES = ("PUT", "DELETE", "POST")
OPERATOR = object()  # request()'s default credential: the operator token for a write, none for a read


def request(node, method, name, body=None, headers=(), no_length=False, repeat=0, path=None, token=OPERATOR, announce=None):
    """One HTTP/3 request (aioquic, Tests/interop/h3client.py) to `node` from this namespace.
    `token`: the bearer token presented (None: anonymous); by default the node's operator token
    on a write and none on a read. Returns h3client's JSON: status, headers, text (or statuses
    with `repeat`)."""
    url = f"https://[::1]:{node.port}{path or '/objects/' + name}"
    args = [sys.executable, str(HERE / "h3client.py"), url, "--method", method, "--ca", node.cert]
    if token is OPERATOR:
        token = node.token if method in WRITES else None
    if token is not None:
        args += ["--header", f"authorization: Bearer {token}"]
    for h in headers:
        args += ["--header", h]
    if body is not None:
        f = node.workdir / f"body-{hashlib.sha256(body).hexdigest()[:16]}"
        f.write_bytes(body)
        args += ["--body", str(f)]
        if no_length:
            args.append("--no-length")
    if repeat:
        args += ["--repeat", str(repeat)]
    if announce is not None:
        args += ["--announce", str(announce)]
    r = run(args, timeout=120)
    assert r.returncode == 0, f"h3client failed: {r.stdout} {r.stderr[-2000:]}"
    return json.loads(r.stdout)


def stoq_put_chunked(node, path, name):
    """`stoq put --chunked` (chunks, then the manifest) from this namespace: the CLI's side of
    `request()`; conftest's `stoq()` presents the node's operator token."""
    return stoq("put", path, f"https://[::1]:{node.port}/objects/{name}", "--chunked", "--ca", node.cert)


def metrics(node):
    """Every sample of the node's /metrics: {"name{labels}": value}."""
    with urllib.request.urlopen(node.admin, timeout=10) as r:
        text = r.read().decode()
    return {m[0]: int(m[1]) for m in re.findall(r"^(stoq_[^ ]+) (\d+)$", text, re.M)}


def etag(data):
    return f'"{hashlib.sha256(data).hexdigest()}"'


def visible(node):
    """What a client or an operator could see of an upload: the files in the storage directory
    (temp files included) and the chunked objects' records."""
    files = sorted(os.listdir(node.storage))
    records = sorted(os.listdir(node.content / "objects")) if (node.content / "objects").exists() else []
    return files, [r for r in records if not r.startswith(".")]


# Plain uploads are chunked on ingest by default; with dedup off they stay plain files. The
# gate is the same for both, reached from different threads (ingest pool, worker).
DEDUP = {"ingest": "", "flat": "[chunking]\ndedup_enabled = false\n"}


@pytest.fixture
def make_node(tmp_path):
    nodes = []

    def make(extra="", name="node", storage=""):
        n = Node(tmp_path / name, extra=ADMIN + extra, storage=storage)
        nodes.append(n)
        return n
    yield make
    for n in nodes:
        assert n.stop() == 0


@pytest.mark.parametrize("store", DEDUP)
def test_if_none_match_star_refuses_an_existing_object(make_node, store):
    node = make_node(DEDUP[store])
    data = os.urandom(5000)
    first = request(node, "PUT", "once.bin", data, headers=["if-none-match: *"])
    assert first["status"] == 201 and first["headers"]["etag"] == etag(data)
    again = request(node, "PUT", "once.bin", b"other", headers=["if-none-match: *"])
    assert again["status"] == 412
    assert again["text"] == f"precondition failed for once.bin: If-None-Match: * but the object exists (ETag {etag(data)})\n"
    got = request(node, "GET", "once.bin")
    assert got["sha256"] == hashlib.sha256(data).hexdigest() and got["headers"]["etag"] == etag(data)
    assert metrics(node)["stoq_precondition_failed_total"] == 1


@pytest.mark.parametrize("store", DEDUP)
def test_if_match_with_a_stale_etag_fails_and_a_fresh_one_succeeds(make_node, store):
    node = make_node(DEDUP[store])
    v1, v2 = os.urandom(3000), os.urandom(4000)
    assert request(node, "PUT", "doc", v1)["status"] == 201
    head = request(node, "HEAD", "doc")
    assert head["headers"]["etag"] == etag(v1)
    stale = request(node, "PUT", "doc", v2, headers=['if-match: "0000"'])
    assert stale["status"] == 412 and "If-Match" in stale["text"]
    fresh = request(node, "PUT", "doc", v2, headers=[f"if-match: {etag(v1)}"])
    assert fresh["status"] == 201 and fresh["headers"]["etag"] == etag(v2)
    assert request(node, "GET", "doc")["sha256"] == hashlib.sha256(v2).hexdigest()
    # If-Match: * needs the object to exist.
    assert request(node, "PUT", "absent", v1, headers=["if-match: *"])["status"] == 412
    # Deletes are conditional too.
    assert request(node, "DELETE", "doc", headers=[f"if-match: {etag(v1)}"])["status"] == 412
    assert request(node, "DELETE", "doc", headers=[f"if-match: {etag(v2)}"])["status"] == 204
    assert request(node, "GET", "doc")["status"] == 404
    assert metrics(node)["stoq_precondition_failed_total"] == 3


@pytest.mark.parametrize("store", DEDUP)
def test_conditional_reads_answer_304_and_412(make_node, store):
    """GET and HEAD with If-None-Match matching the ETag (weakly) get 304 and no body; with
    If-Match not matching, 412 (RFC 9110 §13.2.2). They used to get the whole object."""
    node = make_node(DEDUP[store])
    data = os.urandom(300_000)
    assert request(node, "PUT", "cond.bin", data)["status"] == 201
    tag = etag(data)
    for method in ("GET", "HEAD"):
        for match in (tag, f"W/{tag}", f'"0000", {tag}', "*"):
            r = request(node, method, "cond.bin", headers=[f"if-none-match: {match}"])
            assert r["status"] == 304 and r["headers"]["etag"] == tag, (method, match, r)
            assert "content-length" not in r["headers"] and r["bytes"] == 0, r
    r = request(node, "GET", "cond.bin", headers=['if-none-match: "0000"'])
    assert r["status"] == 200 and r["sha256"] == hashlib.sha256(data).hexdigest()
    r = request(node, "GET", "cond.bin", headers=['if-match: "0000"'])
    assert r["status"] == 412 and r["text"] == f'precondition failed: If-Match: "0000" but the object\'s ETag is {tag}\n'
    r = request(node, "GET", "cond.bin", headers=[f"if-match: {tag}", "range: bytes=10-19"])
    assert r["status"] == 206 and r["sha256"] == hashlib.sha256(data[10:20]).hexdigest()


@pytest.mark.parametrize("store", DEDUP)
def test_writer_quota_answers_507_with_the_numbers_and_leaves_nothing(make_node, store):
    node = make_node(DEDUP[store] + '[limits]\nwriter_quota = "1MB"\n')
    first = os.urandom(700 << 10)
    assert request(node, "PUT", "a.bin", first)["status"] == 201
    before = visible(node)
    # Content-Length says it cannot fit: refused before the body is read.
    r = request(node, "PUT", "b.bin", os.urandom(500 << 10))
    assert r["status"] == 507
    assert r["text"] == ("quota for token:operator: 700 KB (716800 bytes) used of 1 MB (1048576 bytes) "
                         "(limits.writer_quota), this upload needs 500 KB (512000 bytes)\n")
    # No length: refused once the bytes pass what the quota leaves.
    r = request(node, "PUT", "c.bin", os.urandom(600 << 10), no_length=True)
    assert r["status"] == 507
    assert r["text"] == ("quota for token:operator: 700 KB (716800 bytes) used of 1 MB (1048576 bytes) "
                         "(limits.writer_quota), this upload needs more than 324 KB (331776 bytes)\n")
    for name in ("b.bin", "c.bin"):
        assert request(node, "GET", name)["status"] == 404
    assert visible(node) == before
    m = metrics(node)
    assert m['stoq_limits_quota_refused_total{kind="writer_quota"}'] == 2
    assert m['stoq_limits_quota_refused_total{kind="storage_cap"}'] == 0
    # Replacing one's own object is charged the difference.
    assert request(node, "PUT", "a.bin", os.urandom(900 << 10))["status"] == 201


def test_storage_cap_answers_507_with_the_numbers(make_node):
    node = make_node('[limits]\nstorage_cap = "1MB"\n')
    assert request(node, "PUT", "a.bin", os.urandom(700 << 10))["status"] == 201
    stored = metrics(node)["stoq_stored_bytes"]
    assert stored >= 700 << 10
    r = request(node, "PUT", "b.bin", os.urandom(500 << 10))
    assert r["status"] == 507
    assert r["text"].startswith("storage cap of this node: ") and "of 1 MB (1048576 bytes) (limits.storage_cap), this upload needs 500 KB (512000 bytes)" in r["text"]
    assert request(node, "GET", "b.bin")["status"] == 404
    m = metrics(node)
    assert m['stoq_limits_quota_refused_total{kind="storage_cap"}'] == 1
    assert m["stoq_stored_bytes"] == stored


def test_a_burst_over_the_rate_is_429_with_retry_after(make_node):
    node = make_node("[limits]\nrequests_per_second = 1\nrequest_burst = 3\n")
    r = request(node, "GET", "nothing", repeat=10)
    assert sorted(r["statuses"]) == [404] * 3 + [429] * 7
    assert r["headers"]["429"]["retry-after"] == "1"
    assert r["texts"]["429"] == ("rate limit for addr:::/64: more than 1 requests/s with a burst of 3 "
                                 "(limits.requests_per_second, limits.request_burst), retry in 1 s\n")
    assert metrics(node)["stoq_limits_rate_limited_total"] == 7


def test_mesh_paths_from_a_client_without_a_certificate_are_limited(make_node):
    """The mesh's paths are exempt from the limits only on a connection whose certificate the
    node verified (a neighbour's): a relay path serves objects and an advert needs no
    credential, so anyone else sending them is limited like any request. They were exempt
    whoever sent them."""
    node = make_node("[limits]\nrequests_per_second = 1\nrequest_burst = 2\n")
    r = request(node, "GET", "", path="/_stoq/relay/" + "ab" * 32 + "/1/objects/x", repeat=6)
    assert sorted(r["statuses"]).count(429) == 4, r["statuses"]
    assert metrics(node)["stoq_limits_rate_limited_total"] == 4


def test_another_identity_cannot_replace_or_delete_under_owner(make_node):
    # access.overwrite defaults to "owner": an object belongs to the identity that wrote it.
    node = make_node()
    alice, bob = writer_token(node, "alice"), writer_token(node, "bob")
    data = os.urandom(2000)
    assert request(node, "PUT", "mine.bin", data, token=alice)["status"] == 201
    r = request(node, "PUT", "mine.bin", b"theirs", token=bob)
    assert r["status"] == 403
    assert r["text"] == ('object mine.bin belongs to token:alice; access.overwrite = "owner" '
                         "lets only its owner or an admin replace it\n")
    r = request(node, "DELETE", "mine.bin", token=bob)
    assert r["status"] == 403
    assert r["text"] == ('object mine.bin belongs to token:alice; access.overwrite = "owner" '
                         "lets only its owner or an admin delete it\n")
    assert request(node, "GET", "mine.bin")["sha256"] == hashlib.sha256(data).hexdigest()
    assert metrics(node)["stoq_overwrite_refused_total"] == 2
    # Its owner may replace and delete it.
    assert request(node, "PUT", "mine.bin", b"v2", token=alice)["status"] == 201
    assert request(node, "GET", "mine.bin")["sha256"] == hashlib.sha256(b"v2").hexdigest()
    assert request(node, "DELETE", "mine.bin", token=alice)["status"] == 204
    assert request(node, "GET", "mine.bin")["status"] == 404
    # So may an admin: the operator's token (role admin) replaces and deletes alice's objects.
    assert request(node, "PUT", "a.bin", b"alice's a", token=alice)["status"] == 201
    assert request(node, "PUT", "b.bin", b"alice's b", token=alice)["status"] == 201
    # (they are alice's: bob is refused on both)
    assert request(node, "PUT", "a.bin", b"bob's a", token=bob)["status"] == 403
    assert request(node, "DELETE", "b.bin", token=bob)["status"] == 403
    assert request(node, "PUT", "a.bin", b"the operator's a", token=node.token)["status"] == 201
    assert request(node, "GET", "a.bin")["sha256"] == hashlib.sha256(b"the operator's a").hexdigest()
    assert request(node, "DELETE", "b.bin", token=node.token)["status"] == 204
    assert request(node, "GET", "b.bin")["status"] == 404
    assert metrics(node)["stoq_overwrite_refused_total"] == 4


def test_never_makes_objects_immutable(make_node):
    node = make_node('[access]\noverwrite = "never"\n')
    assert request(node, "PUT", "fixed", b"v1")["status"] == 201
    r = request(node, "PUT", "fixed", b"v2")
    assert r["status"] == 409
    assert r["text"] == 'object fixed exists and access.overwrite = "never": objects cannot be replaced\n'
    assert request(node, "DELETE", "fixed")["status"] == 409
    assert request(node, "GET", "fixed")["sha256"] == hashlib.sha256(b"v1").hexdigest()
    assert metrics(node)["stoq_overwrite_refused_total"] == 2


def test_a_chunked_put_is_charged_to_its_writer_and_conditions_hold_on_manifests(make_node, tmp_path):
    node = make_node('[limits]\nwriter_quota = "1MB"\n')
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(os.urandom(700 << 10))
    b.write_bytes(os.urandom(500 << 10))
    r = stoq_put_chunked(node, a, "a.bin")
    assert r.returncode == 0, r.stderr
    # The manifest names 500 KB more than the quota leaves: refused at the manifest PUT.
    r = stoq_put_chunked(node, b, "b.bin")
    assert r.returncode != 0
    assert ("quota for token:operator: 700 KB (716800 bytes) used of 1 MB (1048576 bytes) (limits.writer_quota), "
            "this upload needs 500 KB (512000 bytes)") in r.stderr + r.stdout
    assert request(node, "GET", "b.bin")["status"] == 404
    assert metrics(node)['stoq_limits_quota_refused_total{kind="writer_quota"}'] == 1
    # The chunked object's ETag is its content's SHA-256, and /manifests/ writes are conditional on it.
    assert request(node, "HEAD", "a.bin")["headers"]["etag"] == etag(a.read_bytes())
    stale = request(node, "DELETE", "a.bin", headers=['if-match: "00"'], path="/manifests/a.bin")
    assert stale["status"] == 412
    assert request(node, "DELETE", "a.bin", headers=[f"if-match: {etag(a.read_bytes())}"], path="/manifests/a.bin")["status"] == 204
    assert request(node, "GET", "a.bin")["status"] == 404
    assert metrics(node)["stoq_precondition_failed_total"] == 1


def test_a_manifest_over_the_quota_is_refused_before_its_chunks_are_read(make_node, tmp_path):
    """A manifest PUT costs a pass over its whole object on the store threads (its SHA-256 is
    checked against its chunks): the writer's quota comes first, so one past it is refused 507
    for the price of a lookup. Here a chunk it names is damaged on disk: read, it would have
    been quarantined and the answer a 409 asking for it."""
    node = make_node('[limits]\nwriter_quota = "1MB"\n')
    a = tmp_path / "a.bin"
    a.write_bytes(os.urandom(700 << 10))
    assert stoq_put_chunked(node, a, "a.bin").returncode == 0
    manifest = tmp_path / "a.manifest"
    assert stoq("chunk", a, "--manifest", manifest, "--summary").returncode == 0
    chunk = json.loads(stoq("chunk", a, "--json").stdout)["chunks"][0]["id"]
    path = node.content / "chunks" / chunk[:2] / chunk[2:4] / chunk
    with open(path, "r+b") as f:
        f.write(b"\x00")
    # The same object again under another name: 700 KB more than the 324 KB the quota leaves.
    r = request(node, "PUT", "again.bin", body=manifest.read_bytes(), path="/manifests/again.bin")
    assert r["status"] == 507, r
    assert ("quota for token:operator: 700 KB (716800 bytes) used of 1 MB (1048576 bytes) (limits.writer_quota), "
            "this upload needs 700 KB (716800 bytes)") in r["text"], r
    assert path.exists() and not any((node.content / "quarantine").iterdir()), "the chunks were read"
    assert metrics(node)['stoq_limits_quota_refused_total{kind="writer_quota"}'] == 1
    assert metrics(node)["stoq_content_manifest_checks_busy_total{worker=\"0\"}"] == 0


def test_a_chunked_put_over_max_object_size_is_refused_like_a_plain_one(tmp_path):
    """storage.max_object_size bounded plain PUTs only: a chunked upload of 3 MB stored fine
    under a 1 MB limit. Its manifest is refused now, naming the sizes, and nothing is visible."""
    node = Node(tmp_path / "node", workers=1, extra=ADMIN, storage='max_object_size = "1MB"\n')
    try:
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(3 << 20))
        r = stoq("put", big, node.url("big.bin"), "--ca", node.cert)
        assert r.returncode == 1 and "413" in r.stderr and "storage.max_object_size (1048576 bytes)" in r.stderr, r.stderr
        r = stoq_put_chunked(node, big, "big.bin")
        assert r.returncode != 0
        assert "object big.bin of 3145728 bytes is larger than storage.max_object_size (1048576 bytes)" in r.stderr + r.stdout
        assert request(node, "GET", "big.bin")["status"] == 404
    finally:
        assert node.stop() == 0


def test_a_chunk_over_the_storage_cap_is_507(make_node, tmp_path):
    node = make_node('[limits]\nstorage_cap = "1MB"\n')
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    r = stoq_put_chunked(node, big, "big.bin")
    assert r.returncode != 0 and "HTTP 507" in r.stderr
    assert request(node, "GET", "big.bin")["status"] == 404
    m = metrics(node)
    assert m['stoq_limits_quota_refused_total{kind="storage_cap"}'] >= 1
    # Chunks put at once each reserve their room first: together they stay under the cap.
    assert m["stoq_stored_bytes"] <= 1 << 20
    # The answer names the numbers.
    chunk = os.urandom(600 << 10)
    r = request(node, "PUT", "", chunk, path=f"/chunks/{hashlib.sha256(chunk).hexdigest()}")
    assert r["status"] == 507
    assert r["text"] == (f"storage cap of this node: {stored_text(m['stoq_stored_bytes'])} stored of 1 MB (1048576 bytes) "
                         "(limits.storage_cap), this upload needs 600 KB (614400 bytes)\n")


def stored_text(n):
    """How a 507 shows `n` bytes (ObjectGate.bytes)."""
    for size, unit in ((1 << 40, "TB"), (1 << 30, "GB"), (1 << 20, "MB"), (1 << 10, "KB")):
        if n >= size:
            x = n / size
            return f"{int(x) if x == int(x) else f'{x:.1f}'} {unit} ({n} bytes)"
    return f"{n} bytes"


def test_upload_bytes_over_the_byte_rate_are_paid_for_by_the_next_request(make_node):
    # 300 KB at 10 KB/s leaves some 29 s of debt: the next request, seconds later, waits.
    # The debt is the uploader's identity's (the operator token's), not its address's.
    node = make_node('[limits]\nbytes_per_second = "10KB"\n')
    body = os.urandom(300 << 10)
    assert request(node, "PUT", "big", body)["status"] == 201
    r = request(node, "GET", "big", token=node.token)
    assert r["status"] == 429
    assert 15 <= int(r["headers"]["retry-after"]) <= 29
    assert r["text"].startswith("rate limit for token:operator: uploads over 10KB/s (limits.bytes_per_second); ")
    # An anonymous reader from the same address has a bucket of its own.
    assert request(node, "GET", "big", token=None)["sha256"] == hashlib.sha256(body).hexdigest()
    assert metrics(node)["stoq_limits_rate_limited_total"] == 1


def test_a_put_refused_at_its_head_owes_nothing_for_the_length_it_announced(make_node):
    # 100 GB announced at 10 KB/s would be months of debt: refused at its head (413, over
    # storage.max_object_size), the PUT sent no body and is charged none.
    node = make_node('[limits]\nbytes_per_second = "10KB"\n', storage='max_object_size = "1MB"\n')
    r = request(node, "PUT", "huge", announce=100 << 30)
    assert r["status"] == 413 and "max_object_size" in r["text"], r
    r = request(node, "GET", "huge", token=node.token)
    assert r["status"] == 404, r
    assert metrics(node).get("stoq_limits_rate_limited_total", 0) == 0


def test_a_body_over_its_limit_without_a_length_is_answered_not_reset(make_node):
    # The node stops the client sending (H3_NO_ERROR) and answers on the same stream.
    node = make_node()
    chunk = os.urandom(2 << 20)
    r = request(node, "PUT", "", chunk, path=f"/chunks/{hashlib.sha256(chunk).hexdigest()}", no_length=True)
    assert r["status"] == 413, r
    assert r["text"] == "body of more than 1048576 bytes is over chunking.max_chunk_size (1048576 bytes)\n", r
    assert request(node, "GET", "still-serving")["status"] == 404
