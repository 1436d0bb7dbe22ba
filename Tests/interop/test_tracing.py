"""Distributed tracing across real nodes on [::1]: an origin and an edge both export their spans
over OTLP/HTTP to a real receiver (OTLPReceiver: the official opentelemetry-proto definitions
decode each ExportTraceServiceRequest). `stoq get` through the edge with a traceparent makes one
trace: the client's span → the edge's server span → its upstream (client) spans → the origin's
server spans → the origin's store reads. A node that stops flushes the spans it still holds."""
import json
import os
import time

import pytest

from conftest import Node, free_port, random_file, sha256_file, stoq

pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2",
                    reason="opentelemetry-proto is missing: run scripts/install-deps")
from otlp_receiver import OTLPReceiver  # noqa: E402

MiB = 1 << 20
ADMIN = '[admin]\nlisten = "[::1]:0"\n'


def tracing(receiver, service, interval="100ms"):
    return (f'[tracing]\nenabled = true\nendpoint = "{receiver.endpoint}"\nservice_name = "{service}"\n'
            f'sample_ratio = 1.0\nexport_interval = "{interval}"\n')


def wait_for(what, check, timeout=30):
    """Polls `check()` until it returns something truthy; fails naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def receiver():
    r = OTLPReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def origin(receiver, tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("origin"), workers=2, extra=ADMIN + tracing(receiver, "stoq-origin"))
    yield n
    assert n.stop() == 0


@pytest.fixture(scope="module")
def edge(receiver, origin, tmp_path_factory):
    extra = (ADMIN + f'[trust]\nbundle = "{origin.cert}"\n'
             f'[edge]\nenable_caching = true\norigin = "https://[::1]:{origin.port}"\ncache_size = "64MB"\n'
             + tracing(receiver, "stoq-edge"))
    n = Node(tmp_path_factory.mktemp("edge"), workers=2, extra=extra)
    yield n
    assert n.stop() == 0


def new_traceparent():
    return "00-" + os.urandom(16).hex() + "-" + os.urandom(8).hex() + "-01"


def test_one_trace_spans_client_edge_and_origin(receiver, origin, edge, tmp_path):
    src = random_file(tmp_path / "t.bin", 3 * MiB, 17)
    r = stoq("put", src, origin.url("traced"), "--chunked", "--ca", origin.cert, "--json")
    assert r.returncode == 0, r.stderr
    chunks = json.loads(r.stdout)["chunks"]
    assert chunks >= 3

    parent = new_traceparent()
    _, trace_id, client_span, _ = parent.split("-")
    out = tmp_path / "t.out"
    r = stoq("get", edge.url("traced"), "-o", out, "--ca", edge.cert, "--json", "--traceparent", parent)
    assert r.returncode == 0, r.stderr
    assert sha256_file(out) == sha256_file(src)

    def chain():
        spans = receiver.spans(trace_id)
        edge_server = [s for s in spans if s["service"] == "stoq-edge" and s["kind"] == "server"]
        upstream = [s for s in spans if s["service"] == "stoq-edge" and s["kind"] == "client"]
        origin_server = [s for s in spans if s["service"] == "stoq-origin" and s["kind"] == "server"]
        # The manifest and every chunk went upstream, each answered by an origin server span.
        if edge_server and len(upstream) >= 1 + chunks and len(origin_server) >= len(upstream):
            return spans, edge_server, upstream, origin_server
        return None

    spans, edge_server, upstream, origin_server = wait_for(
        f"the spans of trace {trace_id} from both nodes (have {len(receiver.spans(trace_id))}, "
        f"{receiver.requests} exports, refused {receiver.refused})", chain)
    by_id = {s["span_id"]: s for s in spans}

    # The edge's server span is the child of the client's span (the traceparent's parent id).
    assert len(edge_server) == 1, edge_server
    es = edge_server[0]
    assert es["parent_span_id"] == client_span
    assert es["name"] == "GET /objects/{name}"
    assert es["attributes"]["http.request.method"] == "GET"
    assert es["attributes"]["url.path"] == "/objects/traced"
    assert es["attributes"]["http.response.status_code"] == 200
    assert es["start"] <= es["end"]

    # Its dispatch is a child of it.
    handlers = [s for s in spans if s["service"] == "stoq-edge" and s["name"] == "handler"]
    assert handlers and all(h["parent_span_id"] == es["span_id"] for h in handlers)

    # Each upstream request is a client span under the edge's server span, and the parent of
    # exactly the origin server span that answered it: the traceparent crossed the hop.
    paths = set()
    for u in upstream:
        assert u["parent_span_id"] == es["span_id"], u
        assert u["attributes"]["http.request.method"] == "GET"
        assert u["attributes"]["http.response.status_code"] == 200
        assert u["attributes"]["stoq.upstream"].startswith("origin https://[::1]:")
        path = u["attributes"]["url.path"]
        paths.add(path)
        assert u["name"] == ("GET /manifests/{name}" if path.startswith("/manifests/") else "GET /chunks/{id}")
        answered = [o for o in origin_server if o["parent_span_id"] == u["span_id"]]
        assert len(answered) == 1, (u, answered)
        o = answered[0]
        assert o["attributes"]["url.path"] == path
        assert o["attributes"]["http.request.method"] == "GET"
        assert o["attributes"]["http.response.status_code"] == 200
        assert o["name"] == u["name"]
    assert "/manifests/traced" in paths
    assert sum(p.startswith("/chunks/") for p in paths) >= chunks

    # Every origin server span of the trace hangs off an edge upstream span, and the origin's
    # store reads hang off those server spans.
    upstream_ids = {u["span_id"] for u in upstream}
    assert all(o["parent_span_id"] in upstream_ids for o in origin_server)
    reads = [s for s in spans if s["service"] == "stoq-origin" and s["name"] == "store.read"]
    assert reads and all(by_id[r["parent_span_id"]]["kind"] == "server" for r in reads)
    assert any(r["attributes"].get("stoq.object") == "traced" for r in reads)
    # One trace: nothing of it has an unknown parent but the client's own span.
    assert all(s["parent_span_id"] in by_id or s["parent_span_id"] == client_span for s in spans)


def test_a_request_without_traceparent_starts_its_own_trace(receiver, origin, tmp_path):
    src = random_file(tmp_path / "r.bin", 64 << 10, 5)
    r = stoq("put", src, origin.url("rooted"), "--ca", origin.cert)
    assert r.returncode == 0, r.stderr
    r = stoq("get", origin.url("rooted"), "-o", tmp_path / "r.out", "--ca", origin.cert)
    assert r.returncode == 0, r.stderr

    def root():
        return [s for s in receiver.spans() if s["service"] == "stoq-origin" and s["kind"] == "server"
                and s["attributes"].get("url.path") == "/objects/rooted" and s["attributes"]["http.request.method"] == "GET"]

    spans = wait_for("the origin's span of an untraced GET", root)
    assert spans[0]["parent_span_id"] == ""
    assert spans[0]["attributes"]["http.response.status_code"] == 200


def test_a_traced_chunked_put_shows_its_store_writes(receiver, origin, tmp_path):
    src = random_file(tmp_path / "w.bin", 2 * MiB, 23)
    r = stoq("put", src, origin.url("written"), "--chunked", "--ca", origin.cert, "--json", "--trace")
    assert r.returncode == 0, r.stderr
    trace_id = r.stderr.split("trace: ", 1)[1].split()[0]
    chunks = json.loads(r.stdout)["chunks_sent"]
    assert chunks >= 2

    def writes():
        spans = receiver.spans(trace_id)
        puts = [s for s in spans if s["kind"] == "server" and s["attributes"]["http.request.method"] == "PUT"]
        stores = [s for s in spans if s["name"] == "store.write"]
        return (spans, puts, stores) if len(puts) == chunks + 1 and len(stores) == chunks + 1 else None

    spans, puts, stores = wait_for(f"the PUTs of trace {trace_id}", writes)
    assert {p["name"] for p in puts} == {"PUT /chunks/{id}", "PUT /manifests/{name}"}
    assert all(p["attributes"]["http.response.status_code"] == 201 for p in puts)
    # The client's spans are its own: every server span's parent is the one traceparent it sent.
    assert len({p["parent_span_id"] for p in puts}) == 1
    put_ids = {p["span_id"] for p in puts}
    assert all(w["parent_span_id"] in put_ids for w in stores)
    assert sum("stoq.chunk" in w["attributes"] for w in stores) == chunks
    assert [w["attributes"]["stoq.object"] for w in stores if "stoq.object" in w["attributes"]] == ["written"]


def test_stoq_trace_flag_and_a_stopping_node_flushes(receiver, tmp_path):
    # A long export interval: the spans can only arrive through the flush at shutdown.
    n = Node(tmp_path / "node", workers=1, extra=tracing(receiver, "stoq-flush", interval="60s"))
    try:
        src = random_file(tmp_path / "f.bin", 1000, 3)
        r = stoq("put", src, n.url("flushed"), "--ca", n.cert, "--trace")
        assert r.returncode == 0, r.stderr
        trace_id = r.stderr.split("trace: ", 1)[1].split()[0]
        assert len(trace_id) == 32
        time.sleep(0.5)
        assert receiver.spans(trace_id) == []
    finally:
        assert n.stop() == 0
    spans = wait_for("the spans flushed at shutdown", lambda: receiver.spans(trace_id), timeout=10)
    server = [s for s in spans if s["kind"] == "server"]
    assert len(server) == 1 and server[0]["service"] == "stoq-flush"
    assert server[0]["attributes"]["http.request.method"] == "PUT"
    assert server[0]["attributes"]["http.response.status_code"] == 201


def test_an_unreachable_collector_stops_neither_requests_nor_the_node(tmp_path):
    dead = f'[tracing]\nenabled = true\nendpoint = "http://[::1]:{free_port()}/v1/traces"\nexport_interval = "50ms"\n'
    n = Node(tmp_path / "node", workers=1, extra=dead)
    try:
        src = random_file(tmp_path / "d.bin", 4096, 9)
        for i in range(3):
            r = stoq("put", src, n.url(f"d{i}"), "--ca", n.cert, "--trace")
            assert r.returncode == 0, r.stderr
            r = stoq("get", n.url(f"d{i}"), "-o", tmp_path / "d.out", "--ca", n.cert, "--trace")
            assert r.returncode == 0, r.stderr
            assert sha256_file(tmp_path / "d.out") == sha256_file(src)
        time.sleep(1)
    finally:
        assert n.stop() == 0
    # The exporter's own logger is set to warning; that once silenced every logger of the node.
    log = (tmp_path / "node" / "node.log").read_text()
    assert "info stoq-node: " in log and "tracing on" in log and "draining connections and stopping" in log, log[-2000:]
    failed = [l for l in log.splitlines() if "Failed to export" in l]
    assert all("otlp_endpoint=http://[::1]:" in l for l in failed), failed


@pytest.mark.parametrize("value", [
    "00-abc-def-01",
    # fullwidth flags: hex digits to Character.isHexDigit, not to a radix-16 conversion
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-\uff10\uff11",
])
def test_a_bad_traceparent_is_refused_by_the_cli(value):
    r = stoq("get", "https://[::1]:1/objects/x", "--traceparent", value)
    assert r.returncode == 2, r.stderr
    assert f"traceparent {value}: expected 00-<32 hex trace id" in r.stderr, r.stderr
