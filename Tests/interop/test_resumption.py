"""Session resumption (and 0-RTT) against clients nobody here wrote: ngtcp2's gtlsclient and
aioquic. The node counts each resumed handshake in stoq_tls_resumed_total, read from /metrics."""
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

import pathlib

from conftest import Node, free_port, run, settled, sha256_file, stoq, summed_counters

HERE = pathlib.Path(__file__).resolve().parent


COUNTERS = ["stoq_tls_resumed_total", "stoq_tls_early_data_total", "stoq_http_too_early_total"]


def counters(node):
    return settled(lambda: summed_counters(node, COUNTERS))


def resumed(node):
    return counters(node)["stoq_tls_resumed_total"]


@pytest.fixture(scope="module")
def tnode(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("tickets"), workers=2, extra='[admin]\nlisten = "[::1]:0"')
    n.digest = n.add_object("r.bin", 70_000)
    yield n
    assert n.stop() == 0


def gtlsclient(node, tmp_path, *extra):
    if not shutil.which("gtlsclient"):
        pytest.fail("gtlsclient missing: scripts/install-deps installs ngtcp2-client")
    return run(["gtlsclient", "--exit-on-all-streams-close", f"--download={tmp_path}",
                f"--session-file={tmp_path / 'session.pem'}", f"--tp-file={tmp_path / 'tp.txt'}", *extra,
                "::1", node.port, node.url("r.bin")], timeout=60)


def test_gtlsclient_resumes_with_the_ticket_the_node_issued(tnode, tmp_path):
    before = resumed(tnode)
    r = gtlsclient(tnode, tmp_path, "--disable-early-data")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "session.pem").stat().st_size > 0, "the node issued no session ticket"
    assert resumed(tnode) == before, "a first connection cannot resume"
    for _ in range(3):
        r = gtlsclient(tnode, tmp_path, "--disable-early-data")
        assert r.returncode == 0, r.stderr[-2000:]
    # Each of the three resumed; with 2 workers, tickets one worker sealed open on the other.
    assert resumed(tnode) == before + 3


def test_aioquic_resumes_with_the_ticket_the_node_issued(tnode, tmp_path):
    ticket = tmp_path / "ticket.pickle"
    before = resumed(tnode)
    outs = []
    for _ in range(3):
        r = run([sys.executable, HERE / "h3client.py", tnode.url("r.bin"), "--ca", tnode.cert,
                 "--session-ticket", ticket], timeout=60)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert r.returncode == 0, res
        assert res["status"] == 200 and res["sha256"] == tnode.digest
        outs.append(res["resumed"])
    assert outs == [False, True, True]
    assert resumed(tnode) == before + 2


def h3client(node, *args):
    r = run([sys.executable, HERE / "h3client.py", *args, "--ca", node.cert, "--header", node.auth], timeout=60)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0, res
    return res


def test_gtlsclient_gets_in_0rtt_and_a_put_in_0rtt_is_too_early(tnode, tmp_path):
    """gtlsclient sends its requests in 0-RTT when it resumes. The node serves a GET from early
    data; a PUT there is answered 425 Too Early (RFC 8470) and never reaches the store."""
    r = gtlsclient(tnode, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    before = counters(tnode)
    (tmp_path / "r.bin").unlink()
    r = gtlsclient(tnode, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[:status: 200]" in r.stderr
    assert sha256_file(tmp_path / "r.bin") == tnode.digest
    after = counters(tnode)
    assert after["stoq_tls_early_data_total"] == before["stoq_tls_early_data_total"] + 1
    assert after["stoq_http_too_early_total"] == before["stoq_http_too_early_total"]

    (tmp_path / "body").write_bytes(b"must not be stored")
    r = run(["gtlsclient", "--exit-on-all-streams-close", f"--session-file={tmp_path / 'session.pem'}",
             f"--tp-file={tmp_path / 'tp.txt'}", "-m", "PUT", f"--data={tmp_path / 'body'}",
             "::1", tnode.port, tnode.url("early-put.bin")], timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[:status: 425]" in r.stderr, r.stderr[-2000:]
    final = counters(tnode)
    assert final["stoq_tls_early_data_total"] == after["stoq_tls_early_data_total"] + 1
    assert final["stoq_http_too_early_total"] == after["stoq_http_too_early_total"] + 1
    assert not (tnode.storage / "early-put.bin").exists()
    assert not (tnode.content / "objects" / "early-put.bin").exists()


def test_aioquic_gets_in_0rtt_and_a_put_in_0rtt_is_too_early(tnode, tmp_path):
    ticket = tmp_path / "ticket.pickle"
    first = h3client(tnode, tnode.url("r.bin"), "--session-ticket", ticket)
    assert first["resumed"] is False and first["early_data"] is False
    before = counters(tnode)
    res = h3client(tnode, tnode.url("r.bin"), "--session-ticket", ticket, "--early-data")
    assert res["status"] == 200 and res["sha256"] == tnode.digest
    assert res["resumed"] is True and res["early_data"] is True
    body = tmp_path / "body"
    body.write_bytes(b"must not be stored")
    res = h3client(tnode, tnode.url("early-put2.bin"), "--session-ticket", ticket, "--early-data",
                   "--method", "PUT", "--body", body)
    assert res["status"] == 425 and res["early_data"] is True
    after = counters(tnode)
    assert after["stoq_tls_early_data_total"] == before["stoq_tls_early_data_total"] + 2
    assert after["stoq_http_too_early_total"] == before["stoq_http_too_early_total"] + 1
    assert not (tnode.content / "objects" / "early-put2.bin").exists()
    # The same PUT after the handshake (no --early-data) is an ordinary upload.
    res = h3client(tnode, tnode.url("early-put2.bin"), "--session-ticket", ticket, "--method", "PUT", "--body", body)
    assert res["status"] == 201 and res["resumed"] is True


def test_a_replayed_0rtt_client_hello_gets_no_early_data(tnode, tmp_path):
    """An attacker who captured a client's first flight (ClientHello with a ticket, and 0-RTT)
    sends it again: the node runs the handshake but refuses the early data (RFC 9001 §9.2),
    so the replayed request is not served. A UDP relay in front of the node records aioquic's
    first datagram and, once that connection is gone, sends it again from a fresh port."""
    ticket = tmp_path / "ticket.pickle"
    h3client(tnode, tnode.url("r.bin"), "--session-ticket", ticket)
    relay = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    relay.bind(("::1", 0))
    upstream = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    upstream.connect(("::1", int(tnode.port)))
    first, stop = [], threading.Event()

    def pump():
        client = None
        while not stop.is_set():
            ready, _, _ = select.select([relay, upstream], [], [], 0.1)
            for s in ready:
                if s is relay:
                    data, client = relay.recvfrom(65536)
                    if len(first) < 2:  # the ClientHello and the 0-RTT request (coalesced or not)
                        first.append(data)
                    upstream.send(data)
                elif client:
                    relay.sendto(upstream.recv(65536), client)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    before = counters(tnode)
    requests_before = summed_counters(tnode, ["stoq_http_requests_total"])["stoq_http_requests_total"]
    try:
        res = h3client(tnode, f"https://[::1]:{relay.getsockname()[1]}/objects/r.bin", "--session-ticket", ticket,
                       "--early-data")
    finally:
        stop.set()
        t.join()
    assert res["status"] == 200 and res["early_data"] is True
    mid = counters(tnode)
    assert mid["stoq_tls_early_data_total"] == before["stoq_tls_early_data_total"] + 1
    requests_mid = settled(lambda: summed_counters(tnode, ["stoq_http_requests_total"]))["stoq_http_requests_total"]
    assert requests_mid == requests_before + 1
    accepted = summed_counters(tnode, ["stoq_quic_connections_accepted_total"])["stoq_quic_connections_accepted_total"]
    # The replay, well inside GnuTLS's 10 s freshness window.
    attacker = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    for d in first:
        attacker.sendto(d, ("::1", int(tnode.port)))
    attacker.settimeout(5)
    assert attacker.recv(65536), "the node did not answer the replayed Initial"
    attacker.close()
    assert settled(lambda: summed_counters(tnode, ["stoq_quic_connections_accepted_total"]))[
        "stoq_quic_connections_accepted_total"] > accepted, "the replay did not reach the handshake"
    # Had the node taken the replayed early data, it would have served the GET in it at once,
    # before the handshake (which the attacker cannot finish) completes.
    assert settled(lambda: summed_counters(tnode, ["stoq_http_requests_total"]))["stoq_http_requests_total"] \
        == requests_mid


def test_stoq_get_keeps_sessions_per_server_and_resumes(tnode, tmp_path):
    """`stoq get` keeps the node's newest ticket in $XDG_CACHE_HOME/stoq (mode 0600) and
    resumes with it next time; --no-session-cache does neither."""
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    before = resumed(tnode)
    runs = []
    for extra in [[], [], ["--no-session-cache"], []]:
        r = stoq("get", tnode.url("r.bin"), "--ca", tnode.cert, "--json", *extra, env=env)
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["sha256"] == tnode.digest
        runs.append(res.get("resumed"))
    assert runs == [False, True, None, True]
    assert resumed(tnode) == before + 2
    files = list((tmp_path / "cache" / "stoq").iterdir())
    assert [f.name for f in files] == [f"__1_{tnode.port}.session"]
    assert files[0].stat().st_mode & 0o777 == 0o600


def test_stoq_get_resumes_against_gtlsserver(tnode, tmp_path):
    gtls = shutil.which("gtlsserver") or "/usr/sbin/gtlsserver"
    if not os.path.exists(gtls):
        pytest.fail("gtlsserver missing: scripts/install-deps installs ngtcp2-server")
    htdocs = tmp_path / "htdocs"
    htdocs.mkdir()
    (htdocs / "g.bin").write_bytes(os.urandom(3000))
    digest = sha256_file(htdocs / "g.bin")
    key = pathlib.Path(tnode.identity_cert).with_name("key.pem")
    port = free_port()
    srv = subprocess.Popen([gtls, "-q", "-d", str(htdocs), "::1", str(port), str(key), tnode.identity_cert],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    try:
        time.sleep(0.5)
        runs = []
        for _ in range(3):
            r = stoq("get", f"https://[::1]:{port}/g.bin", "--ca", tnode.cert, "--json", env=env)
            assert r.returncode == 0, r.stderr
            res = json.loads(r.stdout)
            assert res["sha256"] == digest
            runs.append(res["resumed"])
        assert runs == [False, True, True]
    finally:
        srv.terminate()
        srv.wait(timeout=10)
