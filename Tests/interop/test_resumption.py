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
import urllib.request

import pytest

import pathlib
import re

from conftest import Node, free_port, run, settled, sha256_file, stoq, summed_counters

HERE = pathlib.Path(__file__).resolve().parent


COUNTERS = ["stoq_tls_resumed_total", "stoq_tls_early_data_total", "stoq_http_too_early_total",
            "stoq_http_early_requests_total"]


def counters(node):
    return settled(lambda: summed_counters(node, COUNTERS))


def anti_replay(node, verdict):
    """The node's stoq_tls_anti_replay_total{verdict=...} (the process's table)."""
    with urllib.request.urlopen(node.admin, timeout=10) as r:
        m = re.search(rf'^stoq_tls_anti_replay_total{{verdict="{verdict}"}} (\d+)$', r.read().decode(), re.M)
    assert m, f"no stoq_tls_anti_replay_total{{verdict=\"{verdict}\"}} in /metrics"
    return int(m.group(1))


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


def replay_an_early_flight(tnode, tmp_path, ticket, pause=0.0):
    """Fetches r.bin in 0-RTT through a UDP relay that records aioquic's first flight (its
    ClientHello with the ticket, and the 0-RTT request), waits `pause` seconds once that
    connection is gone, then sends the flight again from a fresh port, as an attacker who
    captured it would. Returns the node's requests served after the fetch and after the replay."""
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
    fetched = time.monotonic()
    assert res["status"] == 200 and res["early_data"] is True
    mid = counters(tnode)
    assert mid["stoq_tls_early_data_total"] == before["stoq_tls_early_data_total"] + 1
    requests_mid = settled(lambda: summed_counters(tnode, ["stoq_http_requests_total"]))["stoq_http_requests_total"]
    assert requests_mid == requests_before + 1
    accepted = summed_counters(tnode, ["stoq_quic_connections_accepted_total"])["stoq_quic_connections_accepted_total"]
    time.sleep(max(0.0, pause - (time.monotonic() - fetched)))
    attacker = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    for d in first:
        attacker.sendto(d, ("::1", int(tnode.port)))
    attacker.settimeout(5)
    assert attacker.recv(65536), "the node did not answer the replayed Initial"
    attacker.close()
    assert settled(lambda: summed_counters(tnode, ["stoq_quic_connections_accepted_total"]))[
        "stoq_quic_connections_accepted_total"] > accepted, "the replay did not reach the handshake"
    requests_after = settled(lambda: summed_counters(tnode, ["stoq_http_requests_total"]))["stoq_http_requests_total"]
    return requests_mid, requests_after


def test_a_replayed_0rtt_client_hello_gets_no_early_data(tnode, tmp_path):
    """An attacker who captured a client's first flight (ClientHello with a ticket, and 0-RTT)
    sends it again, well inside GnuTLS's 10 s freshness window: the node runs the handshake but
    refuses the early data (RFC 9001 §9.2), so the replayed request is not served (had the node
    taken it, it would have served the GET at once, before the handshake the attacker cannot
    finish)."""
    ticket = tmp_path / "ticket.pickle"
    h3client(tnode, tnode.url("r.bin"), "--session-ticket", ticket)
    accepted, replays = anti_replay(tnode, "accepted"), anti_replay(tnode, "replay")
    served, after = replay_an_early_flight(tnode, tmp_path, ticket)
    assert after == served
    # The table took the fetch's ClientHello, and refused the replay as one unless GnuTLS had
    # already refused it (its 10 s window rolled over in between: it then asks no table).
    assert anti_replay(tnode, "accepted") == accepted + 1
    assert anti_replay(tnode, "replay") - replays in (0, 1)


def test_a_replay_across_a_new_anti_replay_window_gets_no_early_data(tnode, tmp_path):
    """GnuTLS keys the ClientHellos it has seen by its current 10 s window and starts a new one
    once that has elapsed: a replay arriving just after the rollover, its ticket age still inside
    the window, used to get a fresh key, and its early data was served. Here a first 0-RTT
    handshake starts a window, the captured one comes 6 s into it and the replay 5 s later, in
    the next window."""
    ticket = tmp_path / "ticket.pickle"
    h3client(tnode, tnode.url("r.bin"), "--session-ticket", ticket)
    time.sleep(10.5)  # whatever window earlier tests started has elapsed
    res = h3client(tnode, tnode.url("r.bin"), "--session-ticket", ticket, "--early-data")
    assert res["early_data"] is True  # this one starts the window
    time.sleep(6)
    served, after = replay_an_early_flight(tnode, tmp_path, ticket, pause=5)
    assert after == served, "the replay across the window's rollover was served from early data"


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
    assert len(files) == 1 and re.fullmatch(rf"__1_{tnode.port}-[0-9a-f]{{16}}\.session", files[0].name), files
    assert files[0].stat().st_mode & 0o777 == 0o600


def start_gtlsserver(tnode, htdocs, port):
    gtls = shutil.which("gtlsserver") or "/usr/sbin/gtlsserver"
    if not os.path.exists(gtls):
        pytest.fail("gtlsserver missing: scripts/install-deps installs ngtcp2-server")
    key = pathlib.Path(tnode.identity_cert).with_name("key.pem")
    srv = subprocess.Popen([gtls, "-q", "-d", str(htdocs), "::1", str(port), str(key), tnode.identity_cert],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    return srv


def test_stoq_get_resumes_against_gtlsserver(tnode, tmp_path):
    htdocs = tmp_path / "htdocs"
    htdocs.mkdir()
    (htdocs / "g.bin").write_bytes(os.urandom(3000))
    digest = sha256_file(htdocs / "g.bin")
    port = free_port()
    srv = start_gtlsserver(tnode, htdocs, port)
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    try:
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


def get_json(url, ca, cache, *extra):
    """`stoq get --json` with its session cache under `cache`: the parsed report."""
    r = stoq("get", url, "--ca", ca, "--json", *extra, env={"XDG_CACHE_HOME": str(cache)})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_stoq_get_sends_its_get_in_0rtt(tnode, tmp_path):
    """A second `stoq get` resumes and sends its GET in 0-RTT; the node serves it from early
    data (stoq_http_early_requests_total), the body byte-identical. --no-early-data resumes
    and waits for the handshake."""
    cache, out = tmp_path / "cache", tmp_path / "r.bin"
    first = get_json(tnode.url("r.bin"), tnode.cert, cache)
    assert (first["resumed"], first["early_data"]) == (False, "none")
    before = counters(tnode)
    res = get_json(tnode.url("r.bin"), tnode.cert, cache, "-o", out)
    assert (res["resumed"], res["early_data"]) == (True, "accepted")
    assert res["sha256"] == tnode.digest and sha256_file(out) == tnode.digest
    after = counters(tnode)
    assert after["stoq_http_early_requests_total"] == before["stoq_http_early_requests_total"] + 1
    assert after["stoq_tls_early_data_total"] == before["stoq_tls_early_data_total"] + 1
    assert after["stoq_tls_resumed_total"] == before["stoq_tls_resumed_total"] + 1
    res = get_json(tnode.url("r.bin"), tnode.cert, cache, "--no-early-data")
    assert (res["resumed"], res["early_data"], res["sha256"]) == (True, "none", tnode.digest)
    assert counters(tnode)["stoq_http_early_requests_total"] == after["stoq_http_early_requests_total"]


def test_stoq_get_of_several_urls_sends_them_in_0rtt(tnode, tmp_path):
    cache = tmp_path / "cache"
    digests = {"r.bin": tnode.digest, "m1.bin": tnode.add_object("m1.bin", 5000),
               "m2.bin": tnode.add_object("m2.bin", 200_000)}
    urls = [tnode.url(n) for n in digests]
    first = get_json(urls[0], tnode.cert, cache, *urls[1:], "-o", tmp_path / "one")
    assert (first["resumed"], first["early_data_accepted"]) == (0, 0)
    before = counters(tnode)
    rep = get_json(urls[0], tnode.cert, cache, *urls[1:], "-o", tmp_path / "two")
    assert (rep["handshakes"], rep["resumed"], rep["early_data_accepted"], rep["early_data_rejected"]) == (1, 1, 1, 0)
    for name, digest in digests.items():
        assert sha256_file(tmp_path / "two" / name) == digest
    after = counters(tnode)
    assert after["stoq_http_early_requests_total"] == before["stoq_http_early_requests_total"] + 3


def test_a_bad_or_old_session_file_costs_only_the_resumption(tnode, tmp_path):
    """The cache file is versioned: an older stoq's (the bare TLS session) or a damaged one is
    named on stderr, the run does a full handshake, and writes a good file for the next."""
    cache = tmp_path / "cache"
    get_json(tnode.url("r.bin"), tnode.cert, cache)
    kept, = (cache / "stoq").glob(f"__1_{tnode.port}-*.session")
    assert kept.read_bytes().startswith(b"STOQSESS\x02")
    for bad, why in [(kept.read_bytes()[13:100], "not a stoq session file (an older stoq's, or damaged)"),
                     (b"STOQSESS\x01" + kept.read_bytes()[9:], "format version 1, this stoq reads version 2"),
                     (kept.read_bytes()[:40], "truncated")]:
        kept.write_bytes(bad)
        r = stoq("get", tnode.url("r.bin"), "--ca", tnode.cert, "--json", env={"XDG_CACHE_HOME": str(cache)})
        assert r.returncode == 0, r.stderr
        assert f"stoq: session cache {kept}: {why}; resuming nothing (a full handshake)" in r.stderr
        res = json.loads(r.stdout)
        assert (res["resumed"], res["early_data"], res["sha256"]) == (False, "none", tnode.digest)
        res = get_json(tnode.url("r.bin"), tnode.cert, cache)
        assert (res["resumed"], res["early_data"]) == (True, "accepted")


def test_stoq_get_with_other_cipher_suites_makes_a_full_handshake(tnode, tmp_path):
    """A kept session is offered only where its suite is offered first (GnuTLS stalls a
    resumption that changes the suite until the handshake times out): a run offering another
    suite first makes a full handshake, and keeps its own session for the next like it."""
    cache = tmp_path / "cache"
    chacha = ["--cipher-suites", "CHACHA20-POLY1305,AES-128-GCM"]
    seen = []
    for extra in [[], chacha, chacha, [], []]:
        res = get_json(tnode.url("r.bin"), tnode.cert, cache, *extra)
        assert res["sha256"] == tnode.digest
        seen.append((res["cipher_suite"], res["resumed"]))
    aes, cc = "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"
    assert seen == [(aes, False), (cc, False), (cc, True), (aes, False), (aes, True)]


def test_a_session_is_resumed_only_under_the_trust_that_verified_it(tnode, tmp_path):
    """A resumption verifies no certificate, so a session kept with one --ca must not let a
    run with another CA (or with transparency required) skip its verification: such a run
    makes a full handshake, which then fails by name."""
    cache = tmp_path / "cache"
    assert get_json(tnode.url("r.bin"), tnode.cert, cache)["resumed"] is False
    assert get_json(tnode.url("r.bin"), tnode.cert, cache)["resumed"] is True
    r = stoq("trust", "init", "--dir", tmp_path / "stranger")
    assert r.returncode == 0, r.stderr
    env = {"XDG_CACHE_HOME": str(cache)}
    r = stoq("get", tnode.url("r.bin"), "--ca", tmp_path / "stranger" / "root.pem", "--json", env=env)
    assert r.returncode == 1 and "unknownRoot" in r.stderr, (r.stdout, r.stderr)
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", tmp_path / "log.key"], check=True)
    subprocess.run(["openssl", "pkey", "-in", tmp_path / "log.key", "-pubout", "-out", tmp_path / "log.pub"], check=True)
    r = stoq("get", tnode.url("r.bin"), "--ca", tnode.cert, "--require-transparency", "--log-key", tmp_path / "log.pub",
             "--json", env=env)
    assert r.returncode == 1 and "sct" in r.stderr.lower(), (r.stdout, r.stderr)
    # The first trust's session is still there for it.
    assert get_json(tnode.url("r.bin"), tnode.cert, cache)["resumed"] is True


def test_stoq_get_completes_when_the_node_refuses_0rtt(tmp_path_factory, tmp_path):
    """A node with tls.early_data = false resumes but refuses 0-RTT: the GETs sent in it go
    again after the handshake, and the files are whole."""
    n = Node(tmp_path_factory.mktemp("noearly"), workers=1,
             extra='[admin]\nlisten = "[::1]:0"\n[tls]\nearly_data = false')
    try:
        digest, digest2 = n.add_object("x.bin", 300_000), n.add_object("y.bin", 1000)
        cache = tmp_path / "cache"
        assert get_json(n.url("x.bin"), n.cert, cache)["early_data"] == "none"
        res = get_json(n.url("x.bin"), n.cert, cache, "-o", tmp_path / "x.bin")
        assert (res["resumed"], res["early_data"], res["sha256"]) == (True, "rejected", digest)
        assert sha256_file(tmp_path / "x.bin") == digest
        rep = get_json(n.url("x.bin"), n.cert, cache, n.url("y.bin"), "-o", tmp_path / "d")
        assert (rep["resumed"], rep["early_data_accepted"], rep["early_data_rejected"]) == (1, 0, 1)
        assert [r["status"] for r in rep["results"]] == [200, 200]
        assert sha256_file(tmp_path / "d" / "x.bin") == digest and sha256_file(tmp_path / "d" / "y.bin") == digest2
        c = counters(n)
        assert (c["stoq_tls_resumed_total"], c["stoq_tls_early_data_total"], c["stoq_http_early_requests_total"]) == (2, 0, 0)
    finally:
        assert n.stop() == 0


def test_stoq_get_0rtt_against_gtlsserver_and_after_its_restart(tnode, tmp_path):
    """ngtcp2's own server takes stoq's 0-RTT. Restarted, it has a new ticket key: the kept
    session and its 0-RTT are refused, the GET goes again after a full handshake."""
    htdocs, cache, out = tmp_path / "htdocs", tmp_path / "cache", tmp_path / "g.bin"
    htdocs.mkdir()
    (htdocs / "g.bin").write_bytes(os.urandom(100_000))
    digest = sha256_file(htdocs / "g.bin")
    port = free_port()
    url = f"https://[::1]:{port}/g.bin"
    srv = start_gtlsserver(tnode, htdocs, port)
    try:
        assert get_json(url, tnode.cert, cache)["early_data"] == "none"
        res = get_json(url, tnode.cert, cache, "-o", out)
        assert (res["resumed"], res["early_data"], res["sha256"]) == (True, "accepted", digest)
        assert sha256_file(out) == digest
        srv.terminate()
        srv.wait(timeout=10)
        out.unlink()
        srv = start_gtlsserver(tnode, htdocs, port)
        res = get_json(url, tnode.cert, cache, "-o", out)
        assert (res["resumed"], res["early_data"], res["sha256"]) == (False, "rejected", digest)
        assert sha256_file(out) == digest
    finally:
        srv.terminate()
        srv.wait(timeout=10)


def test_stoq_get_resumes_and_sends_0rtt_to_aioquic(tnode, tmp_path):
    """aioquic's server (Tests/interop/h3server.py) resumes stoq's session and serves its GET
    from 0-RTT."""
    htdocs, cache, out = tmp_path / "htdocs", tmp_path / "cache", tmp_path / "a.bin"
    htdocs.mkdir()
    (htdocs / "a.bin").write_bytes(os.urandom(150_000))
    digest = sha256_file(htdocs / "a.bin")
    port = free_port()
    key = pathlib.Path(tnode.identity_cert).with_name("key.pem")
    srv = subprocess.Popen([sys.executable, HERE / "h3server.py", str(port), tnode.identity_cert, key, htdocs],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(srv.stdout.readline()) == {"ready": port}, srv.stderr.read()
        url = f"https://[::1]:{port}/a.bin"
        first = get_json(url, tnode.cert, cache)
        assert (first["resumed"], first["early_data"], first["sha256"]) == (False, "none", digest)
        res = get_json(url, tnode.cert, cache, "-o", out)
        assert (res["resumed"], res["early_data"], res["sha256"]) == (True, "accepted", digest)
        assert sha256_file(out) == digest
    finally:
        srv.terminate()
        srv.wait(timeout=10)
    requests = [json.loads(line) for line in srv.stdout.read().splitlines()]
    assert requests == [{"method": "GET", "path": "/a.bin", "early": False},
                        {"method": "GET", "path": "/a.bin", "early": True}]
