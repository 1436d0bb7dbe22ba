"""A real OTLP/HTTP trace receiver for the tests: POST /v1/traces with a protobuf
ExportTraceServiceRequest body (decoded with the official opentelemetry-proto definitions),
answered with an ExportTraceServiceResponse like a collector. Spans are kept flat, each with
its resource's service.name, ids in hex and attributes as plain Python values."""
import gzip
import json
import http.server
import socket
import threading

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

KINDS = {v: k.removeprefix("SPAN_KIND_").lower() for k, v in Span.SpanKind.items()}


def value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(e) for e in v.array_value.values]
    return getattr(v, kind) if kind else None


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        receiver = self.server.receiver
        if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
            receiver.refused.append((self.path, self.headers.get("content-type")))
            self.send_response(415 if self.path == "/v1/traces" else 404)
            self.end_headers()
            return
        if self.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        receiver.add(request)
        out = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True


class OTLPReceiver:
    def __init__(self):
        self.server = _Server(("::1", 0), _Handler)
        self.server.receiver = self
        self.port = self.server.server_address[1]
        self.endpoint = f"http://[::1]:{self.port}/v1/traces"
        self.lock = threading.Lock()
        self.requests = 0
        self.refused = []
        self._spans = []
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, request):
        with self.lock:
            self.requests += 1
            for rs in request.resource_spans:
                resource = {a.key: value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self._spans.append({
                            "service": resource.get("service.name"),
                            "name": s.name,
                            "kind": KINDS.get(s.kind, s.kind),
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "attributes": {a.key: value(a.value) for a in s.attributes},
                            "status": s.status.code,
                            "start": s.start_time_unix_nano,
                            "end": s.end_time_unix_nano,
                        })

    def spans(self, trace_id=None):
        with self.lock:
            return [s for s in self._spans if trace_id is None or s["trace_id"] == trace_id]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class _FileSink(OTLPReceiver):
    """Script mode: every span appended to a JSON-lines file as it arrives."""

    def __init__(self, host, port, out):
        self.out = open(out, "a")
        _Server.address_family = socket.AF_INET6
        self.server = _Server((host, port), _Handler)
        self.server.receiver = self
        self.lock = threading.Lock()
        self.requests, self.refused, self._spans = 0, [], []

    def add(self, request):
        super().add(request)
        with self.lock:
            for s in self._spans:
                self.out.write(json.dumps(s) + "\n")
            self._spans.clear()
            self.out.flush()


if __name__ == "__main__":
    # python3 otlp_receiver.py HOST PORT OUT: serve until killed (e.g. in another network
    # namespace, where the test's own thread cannot listen).
    import json
    import sys
    sink = _FileSink(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    print("listening", flush=True)
    sink.server.serve_forever()
