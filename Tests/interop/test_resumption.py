"""Session resumption (and 0-RTT) against clients nobody here wrote: ngtcp2's gtlsclient and
aioquic. The node counts each resumed handshake in stoq_tls_resumed_total, read from /metrics."""
import json
import shutil
import sys

import pytest

import pathlib

from conftest import Node, run, settled, summed_counters

HERE = pathlib.Path(__file__).resolve().parent


def resumed(node):
    return settled(lambda: summed_counters(node, ["stoq_tls_resumed_total"])["stoq_tls_resumed_total"])


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
