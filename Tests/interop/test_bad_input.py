"""Hostile and broken input: every case is refused or dropped, nothing on disk is
damaged, and the node keeps serving everyone else."""
import json
import os
import socket
import struct
import subprocess
import sys
import time
import pathlib

import pytest

from conftest import Node, need_binary, sha256_file, stoq, summed_counters, writer_token
from conftest import settled as settled_reading

HERE = pathlib.Path(__file__).resolve().parent


def still_serves(node):
    r = stoq("get", node.url("obj-65536.bin"), "--ca", node.cert, "--json", timeout=60)
    assert r.returncode == 0, f"node stopped serving: {r.stderr}"
    assert json.loads(r.stdout)["sha256"] == node.digests["obj-65536.bin"]


def udp(node):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    # Only a reply that is due waits on this (no test expects silence here): a debug node
    # beside compile jobs may take more than a second to answer.
    s.settimeout(10.0)
    s.connect(("::1", node.port))
    return s


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    """A node with /metrics, listening on [::] (the wildcard, where an IPv4 datagram could
    arrive as an IPv4-mapped address if the socket allowed it), for the tests that prove
    with counters what the node did with their input."""
    n = Node(tmp_path_factory.mktemp("metered"), workers=2, extra='[admin]\nlisten = "[::1]:0"', listen="::")
    n.digests = {"obj-65536.bin": n.add_object("obj-65536.bin", 65536)}
    yield n
    assert n.stop() == 0


COUNTERS = ["stoq_quic_datagrams_received_total", "stoq_quic_dropped_malformed_total",
            "stoq_quic_dropped_initials_total", "stoq_quic_dropped_unknown_total",
            "stoq_quic_version_negotiations_total", "stoq_quic_retries_total",
            "stoq_quic_invalid_tokens_total",
            "stoq_quic_stateless_resets_total", "stoq_quic_connections_accepted_total",
            "stoq_datapath_rx_datagrams_total", "stoq_datapath_rx_dropped_total",
            "stoq_worker_handoff_dropped_total", "stoq_quic_connections_closed_total", "stoq_quic_connections",
            "stoq_datapath_tx_datagrams_total"]
# Every way the endpoint disposes of a datagram for no known connection.
OUTCOMES = ["stoq_quic_dropped_malformed_total", "stoq_quic_dropped_initials_total",
            "stoq_quic_dropped_unknown_total", "stoq_quic_version_negotiations_total",
            "stoq_quic_retries_total", "stoq_quic_invalid_tokens_total",
            "stoq_quic_stateless_resets_total", "stoq_quic_connections_accepted_total"]


def counters(node):
    """The node's counters, summed over workers."""
    return summed_counters(node, COUNTERS)


def settled(node, timeout=20):
    """The node's counters once they stop moving (conftest.settled)."""
    return settled_reading(lambda: counters(node), timeout)


def deltas_once(node, before, name, at_least, timeout=20):
    """Polls /metrics until `name` has moved by `at_least` (workers publish about once a
    second), then returns every counter's change since `before`."""
    deadline = time.time() + timeout
    while True:
        now = counters(node)
        d = {k: now[k] - before[k] for k in COUNTERS}
        if d[name] >= at_least or time.time() > deadline:
            # One more publication period, so that a counter still moving shows up too.
            time.sleep(1.2)
            now = counters(node)
            return {k: now[k] - before[k] for k in COUNTERS}
        time.sleep(0.2)


def kernel_udp(version):
    """This network namespace's UDP counters (the suite runs its tests one at a time)."""
    if version == 4:
        lines = [l.split() for l in open("/proc/net/snmp") if l.startswith("Udp:")]
        return dict(zip(lines[0][1:], map(int, lines[1][1:])))
    out = {}
    for l in open("/proc/net/snmp6"):
        k, v = l.split()
        if k.startswith("Udp6"):
            out[k[4:]] = int(v)
    return out


def test_malformed_and_truncated_datagrams(metered):
    node = metered
    s = udp(node)
    # Random junk: what each one is depends on its bytes, but the kernel delivers every one;
    # the empty datagram is dropped by the datapath (it carries no packet), every other one
    # reaches the endpoint and is disposed of by exactly one of its refusal paths.
    before, kernel = settled(node), kernel_udp(6)
    junk = [0, 1, 2, 5, 6, 7, 20, 100, 1199, 1200, 1500]
    for n in junk:
        s.send(os.urandom(n))
    d = deltas_once(node, before, "stoq_quic_datagrams_received_total", len(junk) - 1)
    print("junk:", d)
    assert kernel_udp(6)["InDatagrams"] - kernel["InDatagrams"] == len(junk)
    assert d["stoq_datapath_rx_dropped_total"] == 1, d
    assert d["stoq_datapath_rx_datagrams_total"] == len(junk) - 1, d
    assert d["stoq_quic_datagrams_received_total"] == len(junk) - 1, d
    assert sum(d[k] for k in OUTCOMES) == len(junk) - 1, d
    assert d["stoq_quic_connections_accepted_total"] == 0, d
    assert d["stoq_quic_dropped_malformed_total"] >= 5, d  # 1, 2, 5, 6 and 7 bytes cannot parse

    # A v1 Initial header cut at every length: up to the end of its connection IDs (14
    # bytes) it does not parse; from there on it is an Initial shorter than the 1200 bytes
    # RFC 9000 §14.1 requires, which the server must drop.
    initial = bytes([0xC0]) + struct.pack(">I", 1) + bytes([8]) + os.urandom(8) + bytes([0]) + os.urandom(30)
    before = settled(node)
    for cut in range(1, len(initial)):
        s.send(initial[:cut])
    d = deltas_once(node, before, "stoq_quic_datagrams_received_total", len(initial) - 1)
    print("truncated:", d)
    assert d["stoq_datapath_rx_datagrams_total"] == len(initial) - 1, d
    assert d["stoq_quic_datagrams_received_total"] == len(initial) - 1, d
    assert d["stoq_quic_dropped_malformed_total"] == 14, d
    assert d["stoq_quic_dropped_initials_total"] == len(initial) - 1 - 14, d
    assert d["stoq_quic_connections_accepted_total"] == 0, d
    still_serves(node)


def test_unknown_version_gets_version_negotiation(node):
    s = udp(node)
    dcid, scid = os.urandom(8), os.urandom(4)
    pkt = bytes([0xC0]) + struct.pack(">I", 0x1A2A3A4A) + bytes([8]) + dcid + bytes([4]) + scid
    pkt += bytes(1200 - len(pkt))
    s.send(pkt)
    reply = s.recv(2048)
    assert struct.unpack(">I", reply[1:5])[0] == 0, "not a Version Negotiation packet"
    assert reply[5] == 4 and reply[6:10] == scid, "VN must echo the client's SCID as DCID"
    assert reply[10] == 8 and reply[11:19] == dcid
    versions = [struct.unpack(">I", reply[i:i + 4])[0] for i in range(19, len(reply), 4)]
    assert 1 in versions


def test_initial_flood(metered):
    node = metered
    s = udp(node)
    before, kernel = settled(node), kernel_udp(6)
    sent = 0
    start = time.time()
    for i in range(20000):
        pkt = bytes([0xC0]) + struct.pack(">I", 1) + bytes([8]) + os.urandom(8) + bytes([8]) + os.urandom(8)
        pkt += bytes([0, 0x44, 0xD0]) + os.urandom(1200 - len(pkt) - 3)
        try:
            s.send(pkt)
            sent += 1
        except BlockingIOError:
            pass
        if time.time() - start > 20:
            break
    kernel_dropped = kernel_udp(6)["RcvbufErrors"] - kernel["RcvbufErrors"]
    d = deltas_once(node, before, "stoq_datapath_rx_datagrams_total", sent - kernel_dropped)
    print(f"flood: sent {sent}, kernel dropped {kernel_dropped} (receive buffer full):", d)
    # Every datagram sent is accounted for: the kernel dropped it (receive buffer full) or
    # the node's datapath received it; what the datapath received reached an endpoint unless
    # the hand-off to its owner was full; and each Initial was refused, none accepted.
    assert sent > 0
    assert d["stoq_datapath_rx_datagrams_total"] + kernel_dropped == sent, d
    assert d["stoq_datapath_rx_dropped_total"] == 0, d
    received = d["stoq_quic_datagrams_received_total"]
    assert received == d["stoq_datapath_rx_datagrams_total"] - d["stoq_worker_handoff_dropped_total"], d
    assert received > 0
    assert sum(d[k] for k in OUTCOMES) == received, d
    # These Initials have a valid v1 header, which is all the server can check before it
    # makes connection state (the payload is only found undecryptable by that connection):
    # each is accepted, fails to decrypt and is released at once, and nothing is answered.
    assert d["stoq_quic_connections_accepted_total"] == received, d
    assert d["stoq_quic_connections_closed_total"] == received, d
    assert d["stoq_quic_connections"] == 0, d
    assert d["stoq_datapath_tx_datagrams_total"] == 0, d
    still_serves(node)


def test_path_traversal_and_bad_paths(node):
    for path in ["/objects/../../etc/passwd", "/objects/%2e%2e/x", "/objects/.hidden", "/objects/a/b",
                 "/objects/", "/etc/passwd", "/objects/" + "a" * 300]:
        r = subprocess.run([sys.executable, str(HERE / "h3client.py"), f"https://[::1]:{node.port}{path}",
                            "--ca", node.cert], capture_output=True, text=True, timeout=60)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert res.get("status") in (400, 404, 414), (path, res)
    assert not (node.storage.parent / "passwd").exists()
    # A refused name says which rule it broke.
    for path, why in (("/objects/" + "a" * 300, "it is 300 bytes long, the limit is 255"),
                      ("/objects/.hidden", "it starts with a dot"),
                      ("/objects/a%20b", 'it contains "%"; only A-Z a-z 0-9 . _ - are allowed')):
        r = subprocess.run([sys.executable, str(HERE / "h3client.py"), f"https://[::1]:{node.port}{path}",
                            "--ca", node.cert], capture_output=True, text=True, timeout=60)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert res["status"] == 400 and why in res["text"], (path, res)
    still_serves(node)


def test_missing_object_is_404(node):
    r = stoq("get", node.url("does-not-exist.bin"), "--ca", node.cert)
    assert r.returncode != 0 and "HTTP 404" in r.stderr


def test_oversized_request_headers(node):
    r = subprocess.run([sys.executable, str(HERE / "h3client.py"), node.url("obj-1.bin"), "--ca", node.cert,
                        "--header", "x-junk:" + "j" * 60000], capture_output=True, text=True, timeout=60)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res.get("status") == 431 or "error" in res, res
    still_serves(node)


def test_bad_method(node):
    # With the operator's credential, so that the object service (not the access check) answers.
    r = subprocess.run([sys.executable, str(HERE / "h3client.py"), node.url("obj-1.bin"), "--ca", node.cert,
                        "--method", "PATCH", "--header", node.auth], capture_output=True, text=True, timeout=60)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["status"] == 405 and res["headers"]["allow"] == "GET, HEAD, PUT, DELETE"


def test_streams_given_up_unwritten_return_their_credit(node):
    """600 request streams opened and given up before a byte (RESET_STREAM, STOP_SENDING) are
    streams HTTP/3 never sees; their credit comes back all the same, so the same connection's
    GET after them is answered (it hung at the stream limit)."""
    r = subprocess.run([sys.executable, str(HERE / "h3client.py"), node.url("obj-1.bin"), "--ca", node.cert,
                        "--abandon", "600", "--timeout", "20"], capture_output=True, text=True, timeout=90)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res.get("status") == 200, res
    still_serves(node)


def test_client_vanishes_mid_transfer(node):
    p = subprocess.Popen([str(need_binary("stoq")), "get", node.url(f"obj-{256 << 20}.bin"), "--ca", node.cert],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.7)
    p.kill()
    p.wait()
    still_serves(node)
    assert sha256_file(node.storage / f"obj-{256 << 20}.bin") == node.digests[f"obj-{256 << 20}.bin"]


def test_ipv4_never_reaches_the_node(metered):
    """The node listens on [::], the wildcard: a dual-stack socket there would take IPv4 too
    (as ::ffff:a.b.c.d). Its socket is IPV6_V6ONLY, so the kernel finds no socket for an IPv4
    datagram to that port, counts it as NoPorts and answers ICMP port unreachable; the node
    never sees it. The same probe over IPv6 is answered, so the port, the probe and the
    counters are live: were IPv4 let through, the probe would be received (or dropped as
    mapped by the datapath) and these asserts would fail."""
    node = metered
    pkt = bytes([0xC0]) + struct.pack(">I", 0x1A2A3A4A) + bytes([8]) + os.urandom(8) + bytes([4]) + os.urandom(4)
    pkt += bytes(1200 - len(pkt))
    before, kernel = settled(node), kernel_udp(4)
    s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s4.settimeout(5)
    s4.connect(("127.0.0.1", node.port))
    s4.send(pkt)
    with pytest.raises(ConnectionRefusedError):
        s4.recv(2048)
    assert kernel_udp(4)["NoPorts"] == kernel["NoPorts"] + 1

    s6 = udp(node)
    s6.send(pkt)
    reply = s6.recv(2048)
    assert struct.unpack(">I", reply[1:5])[0] == 0, "the IPv6 probe must get a Version Negotiation"
    d = deltas_once(node, before, "stoq_quic_datagrams_received_total", 1)
    print("ipv4 then ipv6 probe:", d)
    assert d["stoq_datapath_rx_datagrams_total"] == 1, d
    assert d["stoq_datapath_rx_dropped_total"] == 0, d
    assert d["stoq_quic_datagrams_received_total"] == 1, d
    assert d["stoq_quic_version_negotiations_total"] == 1, d


def test_flood_of_valid_initials_turns_retry_on_until_it_passes(tmp_path):
    """Initials with real ClientHellos (aioquic's) whose senders never answer, as a spoofed
    flood looks: each makes a half-open connection. Past `retry_threshold` of them the worker
    answers new ones with a stateless Retry and logs it; a real client is still served (after a
    Retry); once the half-open ones time out, Retry is off again and logged so."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    # The half-open ones must outlive the flood's reading and a real client's whole run: with
    # 3 s, beside other jobs, they had timed out before the client came (no Retry for it).
    n = Node(tmp_path, workers=1, extra='retry_threshold = 50\n[network.quic_config]\nhandshake_timeout = "10s"\n'
                                        '[admin]\nlisten = "[::1]:0"')
    try:
        n.digests = {"obj-65536.bin": n.add_object("obj-65536.bin", 65536)}
        names = ["stoq_quic_connections_accepted_total", "stoq_quic_retries_total", "stoq_quic_retries_forced_total",
                 "stoq_quic_connections_half_open"]
        s = udp(n)
        cfg = QuicConfiguration(is_client=True, alpn_protocols=["h3"])
        for _ in range(200):
            c = QuicConnection(configuration=cfg)
            c.connect(("::1", n.port), now=time.time())
            for data, _addr in c.datagrams_to_send(now=time.time()):
                s.send(data)
        flood = settled_reading(lambda: summed_counters(n, names))
        print("flood of 200 Initials:", flood)
        assert flood["stoq_quic_connections_accepted_total"] == 50, flood
        assert flood["stoq_quic_connections_half_open"] == 50, flood
        assert flood["stoq_quic_retries_forced_total"] == 150 == flood["stoq_quic_retries_total"], flood
        still_serves(n)
        after = settled_reading(lambda: summed_counters(n, names))
        assert after["stoq_quic_retries_forced_total"] == 151, after  # the real client went through a Retry
        assert after["stoq_quic_connections_accepted_total"] == 51, after
        # The half-open ones time out (10 s); the worker notices at its next tick.
        deadline = time.time() + 25
        while time.time() < deadline and "Retry off" not in n.workdir.joinpath("node.log").read_text():
            time.sleep(0.2)
        log = n.workdir.joinpath("node.log").read_text()
        assert "worker 0: 50 connections mid-handshake (retry_threshold 50): new ones get a Retry first" in log, log[-2000:]
        assert "under retry_threshold 50: Retry off" in log, log[-2000:]
        assert settled_reading(lambda: summed_counters(n, names))["stoq_quic_connections_half_open"] == 0
        still_serves(n)
        end = settled_reading(lambda: summed_counters(n, names))
        assert end["stoq_quic_retries_total"] == after["stoq_quic_retries_total"], end  # no Retry now
        assert end["stoq_quic_connections_accepted_total"] == 52, end
    finally:
        assert n.stop() == 0


# h3client.py with the URL's query kept in `:path` (h3client sends the path alone).
WITH_QUERY = """
import asyncio, sys, urllib.parse
sys.path.insert(0, sys.argv.pop(1))
import h3client
h3client.urlparse = lambda url: (lambda u: u._replace(path=u.path + "?" + u.query if u.query else u.path))(
    urllib.parse.urlparse(url))
sys.exit(asyncio.run(h3client.main()))
"""


def h3(node, method, name_or_path, *args, token=None, answered=True):
    """One request by aioquic (h3client.py), as `token`'s holder (None: anonymous). Without
    `answered`, no answer is needed (h3client's JSON then says why there was none)."""
    path = name_or_path if name_or_path.startswith("/") else "/objects/" + name_or_path
    client = [str(HERE / "h3client.py")] if "?" not in path else ["-c", WITH_QUERY, str(HERE)]
    cmd = [sys.executable, *client, f"https://[::1]:{node.port}{path}", "--ca", node.cert,
           "--method", method, *args]
    if token is not None:
        cmd += ["--header", f"authorization: Bearer {token}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 or not answered, r.stdout + r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A node that keeps uploads as plain files (chunking.dedup_enabled = false)."""
    n = Node(tmp_path_factory.mktemp("plain"), extra="[chunking]\ndedup_enabled = false")
    yield n
    assert n.stop() == 0


@pytest.mark.parametrize("store", ["plain", "chunked"])
def test_a_put_announcing_a_body_it_never_sends_changes_nothing(store, plain, node, tmp_path):
    """HEADERS with `content-length: 1000` and FIN: no body will come, so nothing is stored
    (it replaced the object with an empty one, renamed in place or ingested) and the answer is
    400. nghttp3 finds such a message malformed, an error of its stream alone (RFC 9114
    §4.1.2): the connection goes on (it was closed, with the 400 unsent). So does it after a
    body longer than announced, whose stream is reset (H3_MESSAGE_ERROR), and one shorter."""
    from raw_h3 import RawH3, request
    n = plain if store == "plain" else node
    body = tmp_path / "v1"
    body.write_bytes(os.urandom(3000))
    assert h3(n, "PUT", "announced.bin", "--body", str(body), token=n.token)["status"] == 201
    auth = ("authorization", f"Bearer {n.token}")
    c = RawH3(n)
    try:
        def put(length, data):
            sid = c.new_stream()
            head = request("PUT", "/objects/announced.bin", f"[::1]:{n.port}", [("content-length", str(length)), auth])
            c.send(sid, head + (b"\x00" + bytes([len(data)]) + data if data else b""), end=True)
            return sid
        missing = put(1000, b"")
        c.pump(lambda: missing in c.finished)
        assert c.response(missing) == (400, b"content-length 1000 but no body\n")
        for data in (b"x" * 20, b"x" * 5):
            sid = put(10, data)
            c.pump(lambda: sid in c.resets)
            assert c.resets[sid] == 0x10E, c.resets  # H3_MESSAGE_ERROR
        get = c.new_stream()
        c.send(get, request("GET", "/objects/announced.bin", f"[::1]:{n.port}"), end=True)
        c.pump(lambda: get in c.finished)
        status, got = c.response(get)
        assert status == 200 and got == body.read_bytes()
    finally:
        c.close()
    assert h3(n, "GET", "announced.bin")["sha256"] == sha256_file(body)
    still_serves(node)


def test_an_empty_put_has_an_etag_and_an_owner(plain):
    """A PUT whose HEADERS end the request (no body, no content-length) stores an empty object
    like any other: its ETag is the SHA-256 of nothing and it belongs to its writer, so under
    access.overwrite = "owner" nobody else may replace or delete it."""
    alice, bob = writer_token(plain, "alice"), writer_token(plain, "bob")
    r = h3(plain, "PUT", "empty.bin", token=alice)
    empty = '"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"'
    assert r["status"] == 201 and r["headers"].get("etag") == empty, r
    assert h3(plain, "GET", "empty.bin")["headers"].get("etag") == empty
    assert h3(plain, "PUT", "empty.bin", token=bob)["status"] == 403
    assert h3(plain, "DELETE", "empty.bin", token=bob)["status"] == 403
    assert h3(plain, "DELETE", "empty.bin", token=alice)["status"] == 204


def test_a_path_over_the_limit_is_414_for_every_kind_of_object(node, tmp_path):
    """A request target longer than the node accepts is cut; whatever object the cut path
    names (a plain file, a chunked object), the answer is 414, never that object (the chunked
    one was served)."""
    body = tmp_path / "chunked"
    body.write_bytes(os.urandom(5000))
    assert h3(node, "PUT", "long-path.bin", "--body", str(body), token=node.token)["status"] == 201
    assert not (node.storage / "long-path.bin").exists()  # chunked on ingest
    for name in ("long-path.bin", "obj-65536.bin"):
        assert h3(node, "GET", name)["status"] == 200
        r = h3(node, "GET", f"/objects/{name}?" + "x" * 5000)
        assert r["status"] == 414 and r["text"] == "path too long\n", (name, r)
    still_serves(node)


def test_a_head_waiting_for_qpack_on_a_closed_stream_is_never_answered(metered):
    """A GET whose HEADERS refer to a dynamic table entry not inserted yet waits for the encoder
    (QPACK blocked). The client gives the stream up (STOP_SENDING; it acknowledges the node's
    RESET_STREAM), so the stream closes; then the entry comes. The request is dropped unread:
    nghttp3 0.8 decoded it then, the node answered a stream that was gone, and the next write
    read the freed stream (the connection closed, or worse). Only the next request reaches the
    application, and the connection serves it, byte-identical."""
    import hashlib
    from raw_h3 import RawH3, request
    node, requests = metered, ["stoq_http_requests_total"]
    before = settled_reading(lambda: summed_counters(node, requests))
    c = RawH3(node)
    try:
        sid = c.new_stream()
        # Required Insert Count 1, base 1: dynamic entry 0 (:authority), then :method GET,
        # :scheme https, :path / from the static table.
        c.send(sid, bytes.fromhex("01 06 02 00 80 d1 d7 c1"), end=True)
        c.quic.stop_stream(sid, 0x10C)
        c.pump(lambda: sid in c.resets)
        c.sync()  # the node has our ACK of its RESET_STREAM: the stream is closed
        # Set Dynamic Table Capacity 4096, then insert :authority "a" (static name 0).
        c.send(c.encoder, bytes.fromhex("3f e1 1f c0 01 61"))
        c.sync()  # the node has read the entry, and written since: the connection is up
        again = c.new_stream()
        c.send(again, request("GET", "/objects/obj-65536.bin", f"[::1]:{node.port}"), end=True)
        c.pump(lambda: again in c.finished)
        c.sync()
        status, body = c.response(again)
        assert status == 200 and hashlib.sha256(body).hexdigest() == node.digests["obj-65536.bin"]
        assert sid not in c.received, "nothing is sent on the stream given up"
    finally:
        c.close()
    after = settled_reading(lambda: summed_counters(node, requests))
    assert after["stoq_http_requests_total"] - before["stoq_http_requests_total"] == 1, ("the closed stream's head was served", before, after)
    still_serves(node)
