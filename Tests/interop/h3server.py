#!/usr/bin/env python3
"""A minimal HTTP/3 file server on aioquic (an implementation nobody here wrote), for clients'
resumption and 0-RTT tests.

Usage: h3server.py PORT CERT KEY DIR
Serves GET and HEAD of DIR/<name> at /<name>; at /partial/<name>, a broken server's answer
to a GET for all of it: 206 with the first half of the file and no Content-Range. Issues session tickets (kept in memory) and,
with them, accepts 0-RTT. Prints {"ready": PORT} once listening, then one JSON line per
request: {"method": ..., "path": ..., "early": true when it came before the handshake
completed (0-RTT)}.
"""
import asyncio
import json
import os
import sys

from aioquic.asyncio import serve
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration


class Server(QuicConnectionProtocol):
    root = "."

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)

    def quic_event_received(self, event):
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived):
                self.answer(ev)

    def answer(self, ev):
        h = dict(ev.headers)
        method, path = h.get(b":method", b"").decode(), h.get(b":path", b"").decode()
        print(json.dumps({"method": method, "path": path, "early": not self._quic._handshake_complete}), flush=True)
        file = os.path.join(self.root, os.path.basename(path))
        if method not in ("GET", "HEAD") or not os.path.isfile(file):
            self.h3.send_headers(ev.stream_id, [(b":status", b"404"), (b"content-length", b"0")], end_stream=True)
        else:
            body = open(file, "rb").read()
            status = b"200"
            if path.startswith("/partial/"):
                body, status = body[:len(body) // 2], b"206"
            self.h3.send_headers(ev.stream_id, [(b":status", status), (b"content-length", str(len(body)).encode())],
                                 end_stream=method == "HEAD")
            if method == "GET":
                self.h3.send_data(ev.stream_id, body, end_stream=True)
        self.transmit()


async def main():
    port, cert, key, root = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    Server.root = root
    cfg = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN, max_data=64 << 20, max_stream_data=64 << 20)
    cfg.load_cert_chain(cert, key)
    tickets = {}
    await serve("::1", port, configuration=cfg, create_protocol=Server,
                session_ticket_fetcher=lambda label: tickets.pop(label, None), session_ticket_handler=lambda t: tickets.__setitem__(t.ticket, t))
    print(json.dumps({"ready": port}), flush=True)
    await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main())
