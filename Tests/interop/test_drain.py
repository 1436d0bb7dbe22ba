"""A node told to stop (SIGTERM) drains: new connections are refused by name, each open one gets
an HTTP/3 GOAWAY, and the requests under way run to their end, for at most
`network.drain_timeout`, before the connections are closed and the node exits 0. (It used to
close every connection at once, cutting every transfer.)

The transfer is held open by its reader: `stoq get -o FIFO`, drained slowly by this test, so
QUIC's flow control keeps the node sending at the reader's pace, whatever the machine's speed."""
import hashlib
import os
import signal
import subprocess
import threading
import time

from conftest import Node, need_binary, stoq

SIZE = 48 << 20


def slow_get(node, name, fifo, pace, slow_at=None):
    """Starts `stoq get` of `name` into `fifo` and a reader taking 256 KiB every `pace` seconds.
    Returns the client, the reader and its tally: bytes read, their SHA-256. With `slow_at`
    the reader, once it has read that many bytes, sets tally["slowed"] and takes 256 KiB every
    0.25 s (1 MiB/s) until tally["resume"] is set: flow control keeps the node sending at that
    pace (credit comes back in steps; between them the client's 1 s keep-alive keeps the
    connection from looking silent to a drain, which closes one silent for 2 s), and the rest
    of the body takes tens of seconds however fast the machine."""
    os.mkfifo(fifo)
    client = subprocess.Popen([str(need_binary("stoq")), "get", node.url(name), "-o", str(fifo), "--ca", str(node.cert)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tally = {"bytes": 0, "sha": hashlib.sha256(), "slowed": threading.Event(), "resume": threading.Event()}

    def read():
        with open(fifo, "rb") as f:
            while chunk := f.read(256 << 10):
                tally["bytes"] += len(chunk)
                tally["sha"].update(chunk)
                if slow_at is not None and tally["bytes"] >= slow_at and not tally["resume"].is_set():
                    tally["slowed"].set()
                    tally["resume"].wait(0.25)
                else:
                    time.sleep(pace)

    reader = threading.Thread(target=read)
    reader.start()
    return client, reader, tally


def wait_for(cond, seconds=30):
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_sigterm_lets_a_download_finish_and_refuses_new_connections(tmp_path):
    node = Node(tmp_path / "node", workers=1, extra='drain_timeout = "60s"')
    digest = node.add_object("big.bin", SIZE)
    # From 4 MiB the reader takes 1 MiB/s until the late get has been refused: the other 44 MiB
    # would take 44 s, so the download is under way for as long as the test looks.
    client, reader, tally = slow_get(node, "big.bin", tmp_path / "body.fifo", pace=0.02, slow_at=4 << 20)
    try:
        wait_for(lambda: tally["slowed"].is_set() or client.poll() is not None)
        assert tally["slowed"].is_set(), client.communicate()
        node.proc.send_signal(signal.SIGTERM)
        # The worker logs this once it has begun to drain (new connections refused from then).
        draining = "worker 0: draining: 1 connections have requests open"
        wait_for(lambda: draining in (node.workdir / "node.log").read_text() or node.proc.poll() is not None)
        # The node keeps serving the download, and refuses a new connection, saying why.
        assert node.proc.poll() is None and client.poll() is None and tally["bytes"] < SIZE, \
            "the download ended before the test could look"
        r = stoq("get", node.url("big.bin"), "-o", tmp_path / "late.bin", "--ca", node.cert, "--no-session-cache")
        assert r.returncode == 1 and "CONNECTION_REFUSED (0x2): this node is shutting down" in r.stderr, r.stderr
        assert node.proc.poll() is None and client.poll() is None, "the download ended while it was slowed"
        tally["resume"].set()
        out, err = client.communicate(timeout=120)
        reader.join(timeout=60)
        assert client.returncode == 0, err
        assert tally["bytes"] == SIZE and tally["sha"].hexdigest() == digest
        assert node.proc.wait(timeout=30) == 0
    finally:
        tally["resume"].set()
        if client.poll() is None:
            client.kill()
        if node.proc.poll() is None:
            node.proc.kill()
    node.log.seek(0)
    log = node.log.read()
    assert "worker 0: draining: 1 connections have requests open" in log, log[-3000:]
    assert "drain_timeout" not in log, log[-3000:]


def test_drain_timeout_bounds_the_wait(tmp_path):
    node = Node(tmp_path / "node", workers=1, extra='drain_timeout = "1s"')
    node.add_object("big.bin", SIZE)
    client, reader, tally = slow_get(node, "big.bin", tmp_path / "body.fifo", pace=0.05)
    try:
        wait_for(lambda: tally["bytes"] >= 1 << 20)
        start = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(timeout=30) == 0
        waited = time.monotonic() - start
        out, err = client.communicate(timeout=60)
        reader.join(timeout=60)
        assert client.returncode == 1 and tally["bytes"] < SIZE, err
    finally:
        if client.poll() is None:
            client.kill()
        if node.proc.poll() is None:
            node.proc.kill()
    assert waited >= 1.0, f"the node exited {waited:.2f} s after SIGTERM, before its drain_timeout"
    node.log.seek(0)
    log = node.log.read()
    assert "worker 0: network.drain_timeout (1000 ms) passed with requests open on 1 connections: closing them" in log, log[-3000:]


def test_an_idle_connection_does_not_hold_the_node(tmp_path):
    """A client holding a connection with no request open: the node closes it at once."""
    node = Node(tmp_path / "node", workers=1, extra='drain_timeout = "60s"')
    node.add_object("small.bin", 1000)
    # `stoq bench --hold` keeps connections open and idle after their requests.
    bench = subprocess.Popen([str(need_binary("stoq")), "bench", node.url("small.bin"), "--ca", str(node.cert),
                              "--connections", "4", "--hold", "30", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        start = time.monotonic()
        assert node.stop() == 0
        assert time.monotonic() - start < 10, "the node waited on idle connections"
    finally:
        bench.kill()
        bench.communicate()


def test_a_client_gone_mid_download_does_not_hold_the_node(tmp_path):
    """A client killed mid-request leaves its stream open until the idle timeout: a drain takes a
    peer silent for 2 s (QUICEndpoint.drainSilence) as gone instead of waiting drain_timeout."""
    node = Node(tmp_path / "node", workers=1, extra='drain_timeout = "60s"')
    node.add_object("big.bin", SIZE)
    client, reader, tally = slow_get(node, "big.bin", tmp_path / "body.fifo", pace=0.05)
    try:
        wait_for(lambda: tally["bytes"] >= 1 << 20)
        client.kill()
        client.wait()
        start = time.monotonic()
        assert node.stop() == 0
        assert time.monotonic() - start < 10, "the node waited on a client that was gone"
    finally:
        if client.poll() is None:
            client.kill()
        reader.join(timeout=60)
