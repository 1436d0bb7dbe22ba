#!/usr/bin/env python3
"""A mesh neighbour on aioquic that answers probes in bursts: it holds each
`GET /_stoq/mesh/probe` until BURST of them wait, then answers them all in one transmit (one
datagram), their lengths differing (`load` alternates between 0 and 999999, as a real node's
does when its load changes digit count). So two answers end in one drive of the prober's
connection pool, as after a loss or with an RTT past the probe interval. Anything else is 404.

Usage: probe_burst_peer.py PORT CERT KEY [BURST]
CERT is a node certificate (chain) of the mesh's CA; the answers name its key's node id.
Prints {"ready": PORT, "node": hex} once listening, then {"burst": N} per burst answered.
"""
import asyncio
import hashlib
import json
import sys

from aioquic.asyncio import serve
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import serialization

NODE = ""
BURST = 2


class Peer(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.held = []
        self.answered = 0

    def quic_event_received(self, event):
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived):
                h = dict(ev.headers)
                if h.get(b":method") == b"GET" and h.get(b":path") == b"/_stoq/mesh/probe":
                    self.held.append(ev.stream_id)
                    if len(self.held) >= BURST:
                        self.burst()
                else:
                    self.h3.send_headers(ev.stream_id, [(b":status", b"404"), (b"content-length", b"0")], end_stream=True)
                    self.transmit()

    def burst(self):
        for stream_id in self.held:
            load = 0 if self.answered % 2 == 0 else 999999
            self.answered += 1
            body = f"stoq-mesh-probe 1\nnode {NODE}\nload {load}\nsequence 0\n".encode()
            self.h3.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"text/plain"),
                                             (b"content-length", str(len(body)).encode())])
            self.h3.send_data(stream_id, body, end_stream=True)
        print(json.dumps({"burst": len(self.held)}), flush=True)
        self.held = []
        self.transmit()


async def main():
    global NODE, BURST
    port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    if len(sys.argv) > 4:
        BURST = int(sys.argv[4])
    leaf = x509.load_pem_x509_certificates(open(cert, "rb").read())[0]
    point = leaf.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    NODE = hashlib.sha256(point).hexdigest()
    cfg = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    cfg.load_cert_chain(cert, key)
    await serve("::1", port, configuration=cfg, create_protocol=Peer)
    print(json.dumps({"ready": port, "node": NODE}), flush=True)
    await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main())
