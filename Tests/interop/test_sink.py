"""Received bodies reach their files through the body writer (a thread off the QUIC loop):
byte-identical into a pipe, and a file system that is full fails the transfer by name, on
either side (stoq get -o; a node storing a PUT: 507)."""
import hashlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from conftest import Node, metric_totals, need_binary, part_file, random_file, run, settled, sha256_file, stoq, summed_counters


def test_get_into_a_pipe_is_byte_identical(node, tmp_path):
    """A FIFO is written with write(), in order (pwrite on a pipe is ESPIPE)."""
    name = max(node.digests, key=lambda n: int(n.split("-")[1].split(".")[0]))
    fifo = tmp_path / "body.fifo"
    os.mkfifo(fifo)
    digest = hashlib.sha256()
    count = [0]

    def drain():
        with open(fifo, "rb") as f:
            while chunk := f.read(1 << 16):
                digest.update(chunk)
                count[0] += len(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    r = stoq("get", node.url(name), "-o", fifo, "--ca", node.cert)
    reader.join(timeout=60)
    assert r.returncode == 0, r.stderr
    assert digest.hexdigest() == node.digests[name] and count[0] > 0


def test_get_to_standard_output_and_through_links(node, tmp_path):
    """-o - is standard output; -o LINK writes what the link names and leaves the link (a temp
    file renamed over /dev/stdout replaced the system's link)."""
    name = min(node.digests, key=lambda n: int(n.split("-")[1].split(".")[0]))
    with open(tmp_path / "stdout.bin", "wb") as out:
        r = subprocess.run([str(need_binary("stoq")), "get", node.url(name), "-o", "-", "--ca", str(node.cert)],
                           stdout=out, stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sha256_file(tmp_path / "stdout.bin") == node.digests[name]
    (tmp_path / "target.txt").write_text("original")
    os.symlink("target.txt", tmp_path / "link.txt")
    os.symlink("made.txt", tmp_path / "dangling.txt")
    for link, target in (("link.txt", "target.txt"), ("dangling.txt", "made.txt")):
        r = stoq("get", node.url(name), "-o", tmp_path / link, "--ca", node.cert)
        assert r.returncode == 0, r.stderr
        assert os.path.islink(tmp_path / link) and sha256_file(tmp_path / target) == node.digests[name]
    # A failed GET through a link that names nothing yet makes nothing (it left a partial file).
    os.symlink("later.txt", tmp_path / "later-link.txt")
    r = stoq("get", node.url("no-such-object"), "-o", tmp_path / "later-link.txt", "--ca", node.cert)
    assert r.returncode == 1 and not (tmp_path / "later.txt").exists(), r.stderr
    assert [p for p in os.listdir(tmp_path) if p.startswith("later")] == ["later-link.txt"]
    # --chunked through a link: the link stays (its rename replaced the link with the file).
    (tmp_path / "target.txt").write_text("original")
    r = stoq("get", node.url(name), "-o", tmp_path / "link.txt", "--ca", node.cert, "--chunked")
    assert r.returncode == 0, r.stderr
    assert os.path.islink(tmp_path / "link.txt") and sha256_file(tmp_path / "target.txt") == node.digests[name]
    r = stoq("get", node.url(name), "-o", "-", "--json", "--ca", node.cert)
    assert r.returncode == 2 and "-o - writes the body to standard output, where --json prints" in r.stderr


def test_a_plain_get_writes_a_part_file_of_its_own(node, tmp_path):
    """`-o F` writes F.XXXXXX.part and renames it over F: F.part, where an interrupted --chunked
    download keeps its chunks, stays as it was (it was emptied, and removed when the GET
    failed); a 0600 F stays 0600 (it became 0644); and `-o /dev/stdout` writes where standard
    output goes, after what is there (the file standard output went to was replaced)."""
    name = min(node.digests, key=lambda n: int(n.split("-")[1].split(".")[0]))
    out, chunks = tmp_path / "f.bin", tmp_path / "f.bin.part"
    chunks.write_bytes(b"chunks of a --chunked download")
    out.write_bytes(b"an older copy")
    os.chmod(out, 0o600)
    r = stoq("get", node.url(name), "-o", out, "--ca", node.cert)
    assert r.returncode == 0, r.stderr
    assert sha256_file(out) == node.digests[name] and out.stat().st_mode & 0o777 == 0o600
    assert chunks.read_bytes() == b"chunks of a --chunked download"
    r = stoq("get", node.url("no-such-object"), "-o", out, "--ca", node.cert)
    assert r.returncode == 1 and "HTTP 404" in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["f.bin", "f.bin.part"] and sha256_file(out) == node.digests[name]
    log = tmp_path / "log"
    with open(log, "wb") as f:
        f.write(b"what was there\n")
        f.flush()
        r = subprocess.run([str(need_binary("stoq")), "get", node.url(name), "-o", "/dev/stdout", "--ca", str(node.cert)],
                           stdout=f, stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 0, r.stderr
    kept = log.read_bytes()
    assert kept.startswith(b"what was there\n") and hashlib.sha256(kept[15:]).hexdigest() == node.digests[name]


def test_an_interrupted_get_leaves_no_part_file(node, tmp_path):
    """SIGTERM mid-body (and SIGINT, as Ctrl-C sends): the run dies of the signal and its part
    file goes with it; so does a run stopped by a --progress-log it cannot open."""
    digest = node.add_object("interrupted.bin", 1 << 30)
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            out = tmp_path / f"{sig.name}.bin"
            proc = subprocess.Popen([str(need_binary("stoq")), "get", node.url("interrupted.bin"), "-o", str(out),
                                     "--ca", str(node.cert)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 30
            while (part_file(out) is None or part_file(out).stat().st_size == 0) and proc.poll() is None:
                assert time.monotonic() < deadline, "no part file"
                time.sleep(0.005)
            proc.send_signal(sig)
            assert proc.wait(timeout=30) == -sig, proc.communicate()
            assert part_file(out) is None and not out.exists(), os.listdir(tmp_path)
        assert sha256_file(node.storage / "interrupted.bin") == digest
    finally:
        os.unlink(node.storage / "interrupted.bin")
    r = stoq("get", node.url(min(node.digests)), "-o", tmp_path / "p.bin", "--ca", node.cert,
             "--progress-log", tmp_path / "no-such-dir" / "log")
    assert r.returncode == 2 and "--progress-log" in r.stderr, r.stderr
    assert part_file(tmp_path / "p.bin") is None and not (tmp_path / "p.bin").exists()


def test_the_clients_own_timeout_is_named(node, tmp_path):
    """--timeout expiring mid-body closed the connection, and the stream our close reset was
    reported as the server's: 'transfer aborted (HTTP/3 error 0x10c)'."""
    name = max(node.digests, key=lambda n: int(n.split("-")[1].split(".")[0]))
    r = stoq("get", node.url(name), "-o", tmp_path / "partial.bin", "--ca", node.cert, "--timeout", "0.2",
             "--no-session-cache")
    assert r.returncode == 1, r.stderr
    assert "timed out after 0.2 s (the transfer's timeout)" in r.stderr or "cannot connect" in r.stderr, r.stderr
    assert "0x10c" not in r.stderr and not (tmp_path / "partial.bin").exists()


def test_put_from_a_fifo_sends_what_it_yields(node, tmp_path):
    """A FIFO has no size: it is read to its end (it used to be stored empty, with a 201)."""
    src = random_file(tmp_path / "src.bin", 700_000, 31)
    fifo = tmp_path / "up.fifo"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "wb") as f, open(src, "rb") as g:
            f.write(g.read())

    writer = threading.Thread(target=feed)
    writer.start()
    r = stoq("put", fifo, node.url("from-fifo.bin"), "--ca", node.cert, "--json")
    writer.join(timeout=60)
    assert r.returncode == 0, r.stderr
    # --json's sha256 is what the node stored (its ETag); it used to be "".
    assert json.loads(r.stdout)["sha256"] == sha256_file(src), r.stdout
    r = stoq("get", node.url("from-fifo.bin"), "-o", tmp_path / "back.bin", "--ca", node.cert)
    assert r.returncode == 0 and sha256_file(tmp_path / "back.bin") == sha256_file(src), r.stderr
    r = stoq("put", tmp_path, node.url("a-directory"), "--ca", node.cert)
    assert r.returncode == 1 and f"{tmp_path}: is a directory" in r.stderr, r.stderr


def test_put_of_a_file_that_shrinks_is_cancelled_by_name(node, tmp_path):
    """A file cut short while it is sent ends the upload with a reset and an error naming it;
    the node stores nothing. (The body was an mmap of the file: the client died of SIGBUS.)"""
    src = tmp_path / "shrinks.bin"
    with open(src, "wb") as f:
        f.truncate(8 << 30)  # sparse: read at memory speed, never written
    cut = threading.Event()

    def cut_short():
        # Once the node has part of the body, the file loses all but its first MiB.
        for _ in range(3000):
            if any(p.stat().st_size > (4 << 20) for p in node.storage.glob(".upload-*")):
                os.truncate(src, 1 << 20)
                cut.set()
                return
            threading.Event().wait(0.01)

    cutter = threading.Thread(target=cut_short)
    cutter.start()
    r = stoq("put", src, node.url("shrinks.bin"), "--ca", node.cert)
    cutter.join(timeout=60)
    assert cut.is_set(), "the upload's temp file never passed 4 MiB"
    assert r.returncode == 1, r.stderr
    assert f"{src}: shrank to " in r.stderr and f"bytes while it was sent ({8 << 30} announced)" in r.stderr, r.stderr
    r = stoq("get", node.url("shrinks.bin"), "-o", tmp_path / "back.bin", "--ca", node.cert)
    assert r.returncode == 1 and "404" in r.stderr, r.stderr


def cut_under_a_download(tmp_path, size, cut_to, check=lambda node: None):
    """Serves a `size`-byte object to a slow reader, truncates it in place to `cut_to` once
    2 MiB are read, and asserts what must follow: the node lives, the client fails with
    H3_INTERNAL_ERROR short of the whole body, and the cut is counted once. `check(node)`
    runs while the node still serves. Returns the node's log."""
    from test_drain import slow_get, wait_for
    node = Node(tmp_path / "node", workers=1, extra='[admin]\nlisten = "[::1]:0"\n')
    node.add_object("cut.bin", size)
    client, reader, tally = slow_get(node, "cut.bin", tmp_path / "body.fifo", pace=0.02)
    try:
        wait_for(lambda: tally["bytes"] >= 2 << 20)
        os.truncate(node.storage / "cut.bin", cut_to)
        out, err = client.communicate(timeout=120)
        reader.join(timeout=60)
        assert node.proc.poll() is None, f"the node died ({node.proc.poll()})"
        assert client.returncode == 1, (client.returncode, err)
        assert ("transfer aborted (HTTP/3 error 0x102, H3_INTERNAL_ERROR: the server could not finish the response "
                "(its log says why)) after") in err, err
        assert tally["bytes"] < size
        check(node)
        counters = settled(lambda: summed_counters(node, ["stoq_http_bodies_cut_short_total"]))
        assert counters == {"stoq_http_bodies_cut_short_total": 1}, counters
    finally:
        if client.poll() is None:
            client.kill()
        assert node.stop() == 0
    node.log.seek(0)
    return node.log.read()


def test_a_file_cut_short_under_a_download_costs_that_response_only(tmp_path):
    """An object truncated in place while it is sent (cp over it, not a rename): the response
    is reset and counted, and the node serves on. Reading its mapping past the new end raised
    SIGBUS, which ended the node."""
    def serves_on(node):
        digest = node.add_object("small.bin", 10_000)
        r = stoq("get", node.url("small.bin"), "-o", tmp_path / "small.out", "--ca", node.cert)
        assert r.returncode == 0 and sha256_file(tmp_path / "small.out") == digest, r.stderr

    log = cut_under_a_download(tmp_path, 48 << 20, 1 << 20, serves_on)
    assert "1 responses reset: the file each was sent from shrank while it was sent" in log


def test_a_file_cut_short_in_its_last_page_is_not_completed_with_zeros(tmp_path):
    """The last page of an object goes (truncated to a page boundary) while flow control
    holds its tail: the packet that reads it also carries the body's FIN. It used to be sent
    with zeros where the bytes were, completing the body at the client before the reset came
    (stoq get exited 0 with the wrong bytes). Those datagrams are now dropped, as if lost."""
    cut_under_a_download(tmp_path, (48 << 20) + 100, 48 << 20)


def test_get_to_standard_output_goes_after_what_is_there(node, tmp_path):
    """-o - into a file writes where standard output is, not at its start, and leaves it after
    the body: the shell's `(printf HDR; stoq get -o -; printf TAIL) > f` keeps all three (the
    body was written from byte 0, over HDR, and TAIL then over the body)."""
    name = min(node.digests, key=lambda n: int(n.split("-")[1].split(".")[0]))
    out = tmp_path / "joined.bin"
    stoq_bin = need_binary("stoq")
    r = subprocess.run(["sh", "-c", f'printf HDR; "{stoq_bin}" get "{node.url(name)}" -o - --ca "{node.cert}"; printf TAIL'],
                       stdout=open(out, "wb"), stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    body = (node.storage / name).read_bytes()
    assert data[:3] == b"HDR" and data[-4:] == b"TAIL" and data[3:-4] == body, (len(data), len(body))


def test_many_gets_into_a_full_file_system_fail_by_name(node, tmp_path):
    """`stoq get -o DIR` (the many-URL path) checked no write: a full disk left a short file
    in place and exit 0, or blamed the server for a digest that did not match."""
    name = max(node.digests, key=lambda n: int(n.split("-")[1].split(".")[0]))
    small = tmp_path / "small"
    mount_small_tmpfs(small)
    try:
        r = stoq("get", node.url(name), "-o", small, "--ca", node.cert, "--no-verify")
        assert r.returncode == 1, r.stderr
        assert "writing the body failed after" in r.stderr and "No space left on device" in r.stderr, r.stderr
        assert os.listdir(small) == [], os.listdir(small)
    finally:
        unmount(small)


def test_a_body_that_cannot_be_put_in_place_fails(node, tmp_path):
    """-O over a directory of the object's name: the rename fails, and so does the run (it
    said "N bytes" and exited 0, leaving the body in NAME.part)."""
    name = min(node.digests, key=lambda n: int(n.split("-")[1].split(".")[0]))
    (tmp_path / name).mkdir()
    r = subprocess.run([str(need_binary("stoq")), "get", "-O", node.url(name), "--ca", str(node.cert)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert f"cannot put the body in place at ./{name}" in r.stderr or f"cannot put the body in place at {name}" in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == [name], os.listdir(tmp_path)


def mount_small_tmpfs(where):
    """A 2 MiB tmpfs at `where` (the tests run in their own mount namespace, as root)."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


def unmount(where):
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_get_into_a_full_file_system_fails_by_name(node, tmp_path):
    name = max(node.digests, key=lambda n: int(n.split("-")[1].split(".")[0]))
    assert os.path.getsize(node.storage / name) > 2 << 20
    small = tmp_path / "small"
    mount_small_tmpfs(small)
    try:
        out = small / "out.bin"
        r = stoq("get", node.url(name), "-o", out, "--ca", node.cert)
        assert r.returncode != 0
        assert "No space left on device" in r.stderr, r.stderr
        assert not out.exists() and list(small.iterdir()) == [], list(small.iterdir())
        # Chunk by chunk: the write that failed is named, not the node's chunks (they were
        # "from the node does not match its id").
        r = stoq("get", node.url(name), "-o", out, "--ca", node.cert, "--chunked")
        assert r.returncode != 0 and "out.bin.part: writing chunk" in r.stderr, r.stderr
        assert "No space left on device" in r.stderr and "does not match" not in r.stderr, r.stderr
    finally:
        unmount(small)


def tmpfs_room(where):
    """(size, free) of the file system at `where`, in bytes."""
    st = os.statvfs(where)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def test_put_into_a_full_store_is_a_507_naming_how_far_it_got(tmp_path):
    """An upload larger than the storage's free space is a 507 naming the object and what was
    written; the next one that fits is stored. What the second depends on is checked where it
    must hold, not assumed: the node puts nothing of its own in storage.path, and it removes a
    refused upload's temp file before it answers 507. A temp file still there at the answer (or
    anything else taking room) made the second upload fail by chance, far from the cause. The
    sizes are the tmpfs's own, not 2 MiB taken on trust: three times it cannot fit, a seventh
    of it does."""
    work = tmp_path / "node"
    storage = work / "objects"  # the node's storage.path: uploads land there first
    mount_small_tmpfs(storage)
    try:
        n = Node(work, workers=1)
        try:
            size, free = tmpfs_room(storage)
            assert os.listdir(storage) == [] and free == size, (os.listdir(storage), free, size)
            body = tmp_path / "body.bin"
            random_file(body, 3 * size, seed=14)
            r = stoq("put", body, n.url("big.bin"), "--ca", n.cert)
            assert r.returncode != 0
            # The writer's ENOSPC reaches the answer (the full-disk rules: test_full_disk.py).
            assert "HTTP 507: no space left on device while storing big.bin (" in r.stderr, r.stderr
            # Released before the answer: the client has it, so the room is back now.
            assert os.listdir(storage) == [], os.listdir(storage)
            assert tmpfs_room(storage) == (size, size)
            # A body that fits is stored whole: the failure was the disk's, not the path's.
            small = tmp_path / "small.bin"
            random_file(small, size // 7, seed=15)
            r = stoq("put", small, n.url("small.bin"), "--ca", n.cert)
            assert r.returncode == 0, r.stderr
            r = stoq("get", n.url("small.bin"), "-o", tmp_path / "back.bin", "--ca", n.cert)
            assert r.returncode == 0, r.stderr
            assert sha256_file(tmp_path / "back.bin") == sha256_file(small)
        finally:
            assert n.stop() == 0
    finally:
        unmount(storage)


def test_the_writer_counts_what_it_wrote(tmp_path):
    """stoq_sink_* on /metrics: an upload's bytes are written by the worker's writer thread and
    none is left queued once it is stored."""
    n = Node(tmp_path / "node", workers=1, extra='[admin]\nlisten = "[::1]:0"')
    try:
        names = ["stoq_sink_bytes_written_total", "stoq_sink_bytes_queued"]
        before = settled(lambda: summed_counters(n, names))
        body = tmp_path / "counted.bin"
        random_file(body, 5 << 20, seed=21)
        r = stoq("put", body, n.url("counted.bin"), "--ca", n.cert)
        assert r.returncode == 0, r.stderr
        after = settled(lambda: summed_counters(n, names))
        assert after["stoq_sink_bytes_written_total"] - before["stoq_sink_bytes_written_total"] == 5 << 20
        assert after["stoq_sink_bytes_queued"] == 0
    finally:
        assert n.stop() == 0


def test_a_body_is_checked_against_the_digest_its_etag_names(tmp_path):
    """A flat upload keeps its SHA-256 on the file (`user.stoq.object`): the object's ETag. A
    `cp` over the file keeps the inode and that attribute, and the old digest went on being
    served as the new bytes' ETag. The digest now holds only while the file's size and mtime
    are those it was recorded with; and `stoq get` checks a whole body against a SHA-256 ETag,
    so a digest that does not match fails the download by name."""
    node = Node(tmp_path / "node", workers=1, extra="[chunking]\ndedup_enabled = false\n")
    try:
        first = random_file(tmp_path / "first.bin", 300_000, 41)
        second = random_file(tmp_path / "second.bin", 300_000, 42)
        r = stoq("put", first, node.url("obj.bin"), "--ca", node.cert, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["sha256"] == sha256_file(first), r.stdout
        stored = node.storage / "obj.bin"
        assert os.getxattr(stored, "user.stoq.object").startswith(b"2 " + sha256_file(first).encode())
        # In place, as cp does: same inode, same attribute, new bytes.
        inode = os.stat(stored).st_ino
        threading.Event().wait(0.02)
        with open(second, "rb") as src, open(stored, "r+b") as dst:
            dst.write(src.read())
        assert os.stat(stored).st_ino == inode
        out = tmp_path / "back.bin"
        r = stoq("get", node.url("obj.bin"), "-o", out, "--ca", node.cert, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["sha256"] == sha256_file(second) == sha256_file(out)
        # A digest that lies about the bytes (recorded with the file's own size and mtime).
        st = os.stat(stored)
        lie = f"2 {sha256_file(first)} {st.st_size:x} {st.st_mtime_ns:x} token:x".encode()
        os.setxattr(stored, "user.stoq.object", lie)
        r = stoq("get", node.url("obj.bin"), "-o", out, "--ca", node.cert)
        assert r.returncode == 1, r.stderr
        assert (f"the body's SHA-256 is {sha256_file(second)}, not the {sha256_file(first)} its ETag names"
                in r.stderr), r.stderr
        assert sha256_file(out) == sha256_file(second) and not (tmp_path / "back.bin.part").exists()
        # Several URLs over one connection: the one that fails is not kept, the other is.
        r = stoq("put", first, node.url("good.bin"), "--ca", node.cert)
        assert r.returncode == 0, r.stderr
        many = tmp_path / "many"
        r = stoq("get", node.url("obj.bin"), node.url("good.bin"), "-o", many, "--ca", node.cert)
        assert r.returncode == 1 and r.stderr.count("its ETag names") == 1, r.stderr
        assert sorted(p.name for p in many.iterdir()) == ["good.bin"]
        assert sha256_file(many / "good.bin") == sha256_file(first)
        r = stoq("get", node.url("obj.bin"), "-o", tmp_path / "unchecked.bin", "--ca", node.cert, "--no-verify")
        assert r.returncode == 0, r.stderr
        assert sha256_file(tmp_path / "unchecked.bin") == sha256_file(second)
    finally:
        assert node.stop() == 0


def test_an_operators_file_gets_its_sha256_as_its_etag_once_it_is_read(tmp_path):
    """A file copied into storage.path has no recorded SHA-256, so its ETag (inode, mtime,
    size) lets no client check a body. Its first GET asks for the digest; a background thread
    hashes the file and records it (format 2, with the size and mtime it belongs to), and the
    responses after that carry it as their ETag, which `stoq get` checks. A rewrite in place
    loses it at once and gets the new one the same way."""
    h3client = pathlib.Path(__file__).resolve().parent / "h3client.py"
    node = Node(tmp_path / "node", workers=1, extra='[admin]\nlisten = "[::1]:0"\n')

    def etag():
        r = run([sys.executable, h3client, node.url("op.bin"), "--ca", node.cert], timeout=60)
        got = json.loads(r.stdout)
        assert got["status"] == 200, got
        return got["headers"]["etag"]

    def becomes(want):
        for _ in range(100):
            tag = etag()
            if tag == want:
                return
            threading.Event().wait(0.1)
        pytest.fail(f"the ETag stayed {tag}, never {want}")

    try:
        digest = node.add_object("op.bin", (3 << 20) + 5)
        stored = node.storage / "op.bin"
        assert etag().startswith('"f')
        becomes(f'"{digest}"')
        st = os.stat(stored)
        assert os.getxattr(stored, "user.stoq.object") == f"2 {digest} {st.st_size:x} {st.st_mtime_ns:x} ".encode()
        r = stoq("get", node.url("op.bin"), "-o", tmp_path / "out.bin", "--ca", node.cert, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["sha256"] == digest == sha256_file(tmp_path / "out.bin"), r.stderr
        # In place, as cp does: the old digest is not served for the new bytes, the new one comes.
        other = random_file(tmp_path / "other.bin", (3 << 20) + 5, 77)
        with open(other, "rb") as src, open(stored, "r+b") as dst:
            dst.write(src.read())
        assert etag().startswith('"f')
        becomes(f'"{sha256_file(other)}"')
        totals = settled(lambda: metric_totals(node))
        assert totals["stoq_plain_digests_total"] == 2, totals.get("stoq_plain_digests_total")
    finally:
        assert node.stop() == 0


def test_a_read_only_storage_turns_the_digester_off_and_says_so(tmp_path):
    """Where the attribute cannot be written at all (here a read-only tmpfs), the first file
    tried is counted as unrecorded, the reason is logged once, and no other file is read for
    nothing: files keep their inode/mtime ETag."""
    storage = tmp_path / "node" / "objects"
    storage.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(storage)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    node = None
    try:
        for n in ("a.bin", "b.bin"):
            (storage / n).write_bytes(os.urandom(100_000))
        subprocess.run(["mount", "-o", "remount,ro", str(storage)], check=True)
        node = Node(tmp_path / "node", workers=1, extra='[admin]\nlisten = "[::1]:0"\n')
        h3client = pathlib.Path(__file__).resolve().parent / "h3client.py"

        def etag(name):
            got = json.loads(run([sys.executable, h3client, node.url(name), "--ca", node.cert], timeout=60).stdout)
            assert got["status"] == 200, got
            return got["headers"]["etag"]

        assert etag("a.bin").startswith('"f')

        def unrecorded():
            text = urllib.request.urlopen(node.admin, timeout=10).read().decode()
            return int(re.search(r'^stoq_plain_digests_total\{outcome="unrecorded"\} (\d+)$', text, re.M).group(1))

        for _ in range(50):
            if unrecorded() == 1:
                break
            threading.Event().wait(0.1)
        assert unrecorded() == 1
        assert etag("b.bin").startswith('"f') and etag("a.bin").startswith('"f')
        threading.Event().wait(1.5)
        assert unrecorded() == 1
        node.log.flush()
        text = (tmp_path / "node" / "node.log").read_text()
        assert text.count("no file of this storage will get one") == 1, text[-2000:]
        assert "Read-only file system" in text
    finally:
        if node:
            assert node.stop() == 0
        unmount(storage)
