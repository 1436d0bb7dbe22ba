"""Stalled requests and responses (slowloris) on a real node, with aioquic as the client:
`limits.body_timeout` answers a request whose body stopped 408 and frees its temp file;
`limits.send_timeout` resets a response whose client stopped granting flow control and
releases its mapping; the connection, and other clients, are served meanwhile; the counters
move and the node names the peer in its log. Timeouts of 3 s; durations only with generous bounds."""
import asyncio
import os
import re
import time
import urllib.request

import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import StopSendingReceived, StreamReset

from conftest import Node, settled, summed_counters, writer_token

# 3 s: long enough that the test sees both requests held before either times out, under load.
CONFIG = '[admin]\nlisten = "[::1]:0"\n[limits]\nbody_timeout = "3s"\nsend_timeout = "3s"\n'
BIG = 16 << 20


class Client(QuicConnectionProtocol):
    """Keeps every stream's answer: status, body, end, reset code. `frozen`: streams whose
    flow control window this client never raises (it stops reading them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.answers = {}
        self.frozen = set()
        quic, frozen = self._quic, self.frozen
        original = QuicConnection._write_stream_limits

        def write_stream_limits(builder, space, stream):
            if stream.stream_id not in frozen:
                original(quic, builder, space, stream)
        quic._write_stream_limits = write_stream_limits

    def answer(self, sid):
        return self.answers.setdefault(sid, {"status": None, "body": b"", "ended": False, "reset": None, "stop_sending": None})

    def quic_event_received(self, event):
        if isinstance(event, StreamReset):
            self.answer(event.stream_id)["reset"] = event.error_code
            return
        if isinstance(event, StopSendingReceived):
            self.answer(event.stream_id)["stop_sending"] = event.error_code
            return
        for ev in self.h3.handle_event(event):
            sid = getattr(ev, "stream_id", None)
            if sid is None:
                continue
            a = self.answer(sid)
            if isinstance(ev, HeadersReceived):
                a["status"] = int(dict(ev.headers).get(b":status", b"0"))
            elif isinstance(ev, DataReceived):
                a["body"] += ev.data
            if getattr(ev, "stream_ended", False):
                a["ended"] = True

    def send(self, method, node, path, headers=(), body=b"", end=True):
        sid = self._quic.get_next_available_stream_id()
        self.answer(sid)
        self.h3.send_headers(sid, [(b":method", method.encode()), (b":scheme", b"https"),
                                   (b":authority", f"[::1]:{node.port}".encode()), (b":path", path.encode()),
                                   *headers], end_stream=end and not body)
        if body:
            self.h3.send_data(sid, body, end_stream=end)
        self.transmit()
        return sid

    async def until(self, pred, timeout=20):
        deadline = time.time() + timeout
        while not pred():
            assert time.time() < deadline, f"timed out; answers: { {k: {**v, 'body': v['body'][:200]} for k, v in self.answers.items()} }"
            await asyncio.sleep(0.05)


def config(node, window):
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, max_data=64 << 20, max_stream_data=window,
                            idle_timeout=60)
    cfg.load_verify_locations(node.cert)
    return cfg


def held(pid):
    """What the node holds now for the two stalled requests: its file descriptors open on an
    upload's temp file, and its mappings of big.bin."""
    uploads = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            uploads += "/.upload-" in os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for line in f if line.rstrip().endswith("/big.bin"))
    return uploads, maps


@pytest.fixture(scope="module")
def stall_node(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("stall"), workers=1, extra=CONFIG)
    n.add_object("big.bin", BIG)
    n.add_object("small.bin", 1000)
    yield n
    assert n.stop() == 0


def test_stalled_body_gets_408_and_stalled_response_is_reset(stall_node):
    node = stall_node
    pid = node.proc.pid
    names = ["stoq_http_requests_timed_out_total"]
    before = settled(lambda: summed_counters(node, names))[names[0]]
    assert held(pid) == (0, 0)

    async def scenario():
        async with connect("::1", node.port, configuration=config(node, 64 << 10), create_protocol=Client) as a, \
                connect("::1", node.port, configuration=config(node, 64 << 20), create_protocol=Client) as b:
            # A PUT that announces 1 MiB, sends 12345 bytes and stops; a GET of 16 MiB whose
            # window (64 KiB) this client never raises. The connection stays up: aioquic
            # answers the node, and the test's other requests use it.
            put = a.send("PUT", node, "/objects/slow.bin",
                         [(b"content-length", b"1048576"), (b"authorization", f"Bearer {node.token}".encode())],
                         body=os.urandom(12345), end=False)
            get = a.send("GET", node, "/objects/big.bin")
            a.frozen.add(get)
            await a.until(lambda: a.answers[get]["status"] == 200)
            await asyncio.sleep(0.2)
            assert held(pid) == (1, 1), "the upload's temp file is open, the response's mapping held"
            # Meanwhile the same connection and another one are served.
            small_a = a.send("GET", node, "/objects/small.bin")
            small_b = b.send("GET", node, "/objects/small.bin")
            await a.until(lambda: a.answers[small_a]["ended"])
            await b.until(lambda: b.answers[small_b]["ended"])
            assert a.answers[small_a]["status"] == 200 and len(a.answers[small_a]["body"]) == 1000
            assert b.answers[small_b]["status"] == 200 and len(b.answers[small_b]["body"]) == 1000
            started = time.time()
            await a.until(lambda: a.answers[put]["ended"] and a.answers[get]["reset"] is not None)
            assert time.time() - started < 15
            assert a.answers[put]["status"] == 408
            assert a.answers[put]["body"].decode() == (  # docs/api.md
                "no request body bytes for 3 s (limits.body_timeout); 12345 of 1048576 bytes received\n")
            assert a.answers[get]["reset"] == 0x10C  # H3_REQUEST_CANCELLED
            assert len(a.answers[get]["body"]) < BIG
            # Still usable after both.
            again = a.send("GET", node, "/objects/small.bin")
            await a.until(lambda: a.answers[again]["ended"])
            assert a.answers[again]["status"] == 200
            # What they held goes back while the connection stays open.
            deadline = time.time() + 15
            while held(pid) != (0, 0) and time.time() < deadline:
                await asyncio.sleep(0.1)
            assert held(pid) == (0, 0), "upload fds, big.bin mappings still held"
            assert not [f for f in os.listdir(node.storage) if f.startswith(".upload-")]

    asyncio.run(scenario())
    # The worker logs stalls at its next tick (about a second).
    deadline = time.time() + 10
    while True:
        with open(node.workdir / "node.log") as f:
            log = f.read()
        if "stalled (limits.body_timeout, limits.send_timeout)" in log or time.time() > deadline:
            break
        time.sleep(0.2)
    assert "stalled (limits.body_timeout, limits.send_timeout)" in log and "[::1]:" in log
    after = settled(lambda: summed_counters(node, names))[names[0]]
    assert after - before == 2
    with urllib.request.urlopen(node.admin, timeout=10) as r:
        text = r.read().decode()
    body = sum(int(v) for v in re.findall(r'^stoq_http_requests_timed_out_total\{worker="\d+",what="body"\} (\d+)$', text, re.M))
    send = sum(int(v) for v in re.findall(r'^stoq_http_requests_timed_out_total\{worker="\d+",what="send"\} (\d+)$', text, re.M))
    assert (body, send) == (1, 1)


def test_a_body_refused_at_its_head_is_not_read_on(tmp_path):
    """A PUT without a credential, announcing 64 MiB and sending its first 64 KiB, is answered
    401 before its body ends: the node asks the client to stop sending it (STOP_SENDING,
    H3_NO_ERROR, RFC 9114 §4.1.2) instead of reading on, for as long as the client cares to send,
    on a stream it refused; the connection serves a GET after it."""
    node = Node(tmp_path / "n", workers=1)
    node.add_object("small.bin", 1000)

    async def scenario():
        async with connect("::1", node.port, configuration=config(node, 64 << 20), create_protocol=Client) as c:
            put = c.send("PUT", node, "/objects/refused", [(b"content-length", str(64 << 20).encode())],
                         body=os.urandom(64 << 10), end=False)
            await c.until(lambda: c.answers[put]["ended"] and c.answers[put]["stop_sending"] is not None)
            assert c.answers[put]["status"] == 401, c.answers[put]
            assert c.answers[put]["stop_sending"] == 0x100, c.answers[put]  # H3_NO_ERROR
            get = c.send("GET", node, "/objects/small.bin")
            await c.until(lambda: c.answers[get]["ended"])
            assert c.answers[get]["status"] == 200 and len(c.answers[get]["body"]) == 1000, c.answers[get]

    try:
        asyncio.run(scenario())
    finally:
        assert node.stop() == 0


def test_request_bodies_held_in_memory_are_bounded_node_wide(tmp_path):
    """`limits.body_memory` (here 2 MiB): two chunk PUTs that announce 1 MiB each and send
    part of it hold the node's room for bodies kept in memory; a third body is answered 503
    with Retry-After before it is read, naming what is held; once one of the two ends (stored,
    201), a new one is taken again, and a reset one gives its room back too."""
    import hashlib
    node = Node(tmp_path / "n", workers=1, extra='[admin]\nlisten = "[::1]:0"\n[limits]\nbody_memory = "2MB"\n')

    def held_in_memory():
        with urllib.request.urlopen(node.admin, timeout=10) as r:
            return int(re.search(r"^stoq_limits_body_memory_bytes (\d+)$", r.read().decode(), re.M).group(1))
    auth = (b"authorization", f"Bearer {node.token}".encode())

    def chunk_put(c, body, announced, end):
        cid = hashlib.sha256(body).hexdigest()
        return c.send("PUT", node, f"/chunks/{cid}", [(b"content-length", str(announced).encode()), auth],
                      body=body[:announced] if end else body[:4096], end=end)

    async def scenario():
        async with connect("::1", node.port, configuration=config(node, 64 << 20), create_protocol=Client) as a, \
                connect("::1", node.port, configuration=config(node, 64 << 20), create_protocol=Client) as b:
            first, second = os.urandom(1 << 20), os.urandom(1 << 20)
            p1 = chunk_put(a, first, 1 << 20, end=False)
            p2 = chunk_put(b, second, 1 << 20, end=False)
            await b.until(lambda: held_in_memory() == 2 << 20)
            small = os.urandom(1000)
            p3 = chunk_put(b, small, 1000, end=True)
            await b.until(lambda: b.answers[p3]["ended"])
            assert b.answers[p3]["status"] == 503, b.answers[p3]
            assert b.answers[p3]["body"].decode() == (
                "request bodies held in memory: 2097152 bytes of 2097152 (limits.body_memory); "
                "this one may need 1000; try again once others end\n")
            assert a.answers[p1]["status"] is None and b.answers[p2]["status"] is None, "the two in flight go on"
            # The first ends and is stored: its room comes back.
            a.h3.send_data(p1, first[4096:], end_stream=True)
            a.transmit()
            await a.until(lambda: a.answers[p1]["ended"])
            assert a.answers[p1]["status"] == 201, a.answers[p1]
            p4 = chunk_put(b, small, 1000, end=True)
            await b.until(lambda: b.answers[p4]["ended"])
            assert b.answers[p4]["status"] == 201, b.answers[p4]
            # The second is reset by its client: its room comes back too (1 MiB fits again).
            b._quic.reset_stream(p2, 0x10C)
            b.transmit()
            third = os.urandom(1 << 20)
            deadline = time.time() + 10
            while True:
                p5 = chunk_put(a, third, 1 << 20, end=True)
                await a.until(lambda: a.answers[p5]["ended"])
                if a.answers[p5]["status"] != 503 or time.time() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert a.answers[p5]["status"] == 201, a.answers[p5]
            assert held_in_memory() == 0, "every body ended gave its room back"

    try:
        asyncio.run(scenario())
    finally:
        assert node.stop() == 0


def test_one_client_holds_at_most_its_share_of_body_memory(tmp_path):
    """`limits.body_memory_per_client` (here 2 MiB of the node's 4 MiB): alice starts two 1 MiB
    chunk bodies and trickles them; her third body is answered 503 naming her and her share,
    while bob, another identity, still has his own room and stores his chunk; once one of
    alice's ends she gets room again."""
    import hashlib
    node = Node(tmp_path / "n", workers=1, extra='[admin]\nlisten = "[::1]:0"\n[limits]\n'
                'body_memory = "4MB"\nbody_memory_per_client = "2MB"\n')
    alice, bob = writer_token(node, "alice"), writer_token(node, "bob")

    def chunk_put(c, token, body, end):
        cid = hashlib.sha256(body).hexdigest()
        headers = [(b"content-length", str(len(body)).encode()), (b"authorization", f"Bearer {token}".encode())]
        return c.send("PUT", node, f"/chunks/{cid}", headers, body=body if end else body[:4096], end=end)

    def held_in_memory():
        with urllib.request.urlopen(node.admin, timeout=10) as r:
            return int(re.search(r"^stoq_limits_body_memory_bytes (\d+)$", r.read().decode(), re.M).group(1))

    async def scenario():
        async with connect("::1", node.port, configuration=config(node, 64 << 20), create_protocol=Client) as a, \
                connect("::1", node.port, configuration=config(node, 64 << 20), create_protocol=Client) as b:
            first, second = os.urandom(1 << 20), os.urandom(1 << 20)
            p1, p2 = chunk_put(a, alice, first, end=False), chunk_put(a, alice, second, end=False)
            await a.until(lambda: held_in_memory() == 2 << 20)
            small = os.urandom(1000)
            p3 = chunk_put(a, alice, small, end=True)
            await a.until(lambda: a.answers[p3]["ended"])
            assert a.answers[p3]["status"] == 503, a.answers[p3]
            assert a.answers[p3]["body"].decode() == (
                "request bodies held in memory for token:alice: 2097152 bytes of 2097152 "
                "(limits.body_memory_per_client); this one may need 1000; try again once its others end\n")
            # Bob is another client: the node's other 2 MiB are his to use.
            theirs = os.urandom(1 << 20)
            p4 = chunk_put(b, bob, theirs, end=True)
            await b.until(lambda: b.answers[p4]["ended"])
            assert b.answers[p4]["status"] == 201, b.answers[p4]
            assert a.answers[p1]["status"] is None and a.answers[p2]["status"] is None, "alice's two go on"
            # One of alice's ends and is stored: her room comes back.
            a.h3.send_data(p1, first[4096:], end_stream=True)
            a.transmit()
            await a.until(lambda: a.answers[p1]["ended"])
            assert a.answers[p1]["status"] == 201, a.answers[p1]
            p5 = chunk_put(a, alice, small, end=True)
            await a.until(lambda: a.answers[p5]["ended"])
            assert a.answers[p5]["status"] == 201, a.answers[p5]
            a.h3.send_data(p2, second[4096:], end_stream=True)
            a.transmit()
            await a.until(lambda: a.answers[p2]["ended"])
            assert a.answers[p2]["status"] == 201, a.answers[p2]
            assert held_in_memory() == 0, "every body ended gave its room back"

    try:
        asyncio.run(scenario())
    finally:
        assert node.stop() == 0


def test_a_chunked_upload_waits_out_a_node_busy_with_bodies(tmp_path):
    """With `limits.body_memory` at 1 MiB, `stoq put --chunked` (16 chunk PUTs in flight) has
    most of its chunks answered 503 at first; it sends each again a second later and the object
    is stored whole, byte-identical."""
    from conftest import random_file, sha256_file, stoq
    node = Node(tmp_path / "n", workers=1, extra='[limits]\nbody_memory = "1MB"\n')
    try:
        src = random_file(tmp_path / "src.bin", 6 << 20, seed=7)
        r = stoq("put", src, node.url("busy.bin"), "--chunked", "--ca", node.cert, "--json")
        assert r.returncode == 0, r.stderr
        out = tmp_path / "out.bin"
        r = stoq("get", node.url("busy.bin"), "-o", out, "--ca", node.cert)
        assert r.returncode == 0, r.stderr
        assert sha256_file(out) == sha256_file(src)
        node.log.flush()
    finally:
        assert node.stop() == 0


def test_unfinished_request_heads_are_refused_and_hold_no_buffer(tmp_path):
    """200 streams each begin a HEADERS frame of 255 bytes and send none of it (3 bytes each);
    16 more begin one of 8000 bytes and send a 4000-byte field of it, which the node keeps in
    an 8 KiB buffer. A connection's heads in progress hold at most 80 KiB (the shim's
    STOQ_HEAD_BYTES_MAX): the big ones past it are reset at once (H3_EXCESSIVE_LOAD). The rest are
    reset 10 s after they began (STOQ_HEAD_TIMEOUT, H3_REQUEST_REJECTED), whatever
    limits.body_timeout says; none reaches the application, the counter and the log say so, and
    another connection is served meanwhile, this one after (before, every unfinished head held
    20 KiB for as long as its client liked)."""
    from raw_h3 import RawH3, field_section, request, varint
    node = Node(tmp_path / "n", workers=1, extra='[admin]\nlisten = "[::1]:0"\n[limits]\nbody_timeout = "0s"\n')
    node.add_object("small.bin", 1000)
    names = ["stoq_http_requests_total"]
    authority = f"[::1]:{node.port}"

    def timed_out():
        with urllib.request.urlopen(node.admin, timeout=10) as r:
            text = r.read().decode()
        return sum(int(v) for v in re.findall(r'^stoq_http_requests_timed_out_total\{worker="\d+",what="head"\} (\d+)$', text, re.M))

    def get(c):
        sid = c.new_stream()
        c.send(sid, request("GET", "/objects/small.bin", authority), end=True)
        c.pump(lambda: sid in c.finished)
        status, body = c.response(sid)
        assert status == 200 and len(body) == 1000

    try:
        before = settled(lambda: summed_counters(node, names))
        c = RawH3(node)
        started = time.time()
        empty, big = [], []
        for _ in range(200):
            empty.append(c.new_stream())
            c.quic.send_stream_data(empty[-1], b"\x01\x40\xff")
        block = field_section("GET", "/objects/small.bin", authority, [("x-pad", "p" * 4000)])
        for _ in range(16):
            big.append(c.new_stream())
            c.quic.send_stream_data(big[-1], b"\x01" + varint(8000) + block)
        c.flush()
        c.pump(lambda: len(c.resets) >= 6)
        refused = {sid for sid, code in c.resets.items() if code == 0x107}
        assert refused <= set(big) and len(refused) >= 16 - (80 << 10) // (8 << 10), c.resets
        other = RawH3(node)
        get(other)  # another connection is served meanwhile
        other.close()
        assert all(sid not in c.resets for sid in empty), "no head timed out yet"
        c.pump(lambda: len(c.resets) == 216, timeout=30)
        assert 9 < time.time() - started < 25
        assert {code for sid, code in c.resets.items() if sid not in refused} == {0x10B}, c.resets
        assert not any(c.received.get(sid) for sid in empty + big), "nothing was answered"
        get(c)
        c.close()
        assert settled(timed_out) == 216 - len(refused)
        after = settled(lambda: summed_counters(node, names))
        assert after[names[0]] - before[names[0]] == 2, "only the two GETs reached the application"
        deadline = time.time() + 10
        while "request heads unfinished" not in (node.workdir / "node.log").read_text() and time.time() < deadline:
            time.sleep(0.2)
        log = (node.workdir / "node.log").read_text()
        assert "request head not complete 10 s after it began (a fixed limit)" in log and "[::1]:" in log, log[-2000:]
    finally:
        assert node.stop() == 0
