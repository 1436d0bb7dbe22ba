#!/usr/bin/env python3
"""aioquic (an implementation nobody here wrote) as an interop-matrix peer, in either role.

  aioquic_peer.py server --listen ADDR --port P --www DIR --cert PEM --key PEM
                         [--retry] [--keylog FILE] [--qlog-dir DIR]
      serves DIR over HTTP/3 (GET /NAME -> DIR/NAME) until SIGTERM; issues session tickets and
      accepts 0-RTT (tickets kept in memory).
  aioquic_peer.py client URL... --out DIR [--ca PEM] [--keylog FILE] [--qlog-dir DIR]
                         [--chacha20] [--key-update] [--session-ticket FILE] [--early-data]
                         [--connection-per-url]
      fetches every URL (their requests in flight together on one connection, or one
      connection each with --connection-per-url) into DIR/<last path segment>. exit 1 when
      any fails, naming it.
"""
import argparse
import asyncio
import os
import pickle
import signal
import ssl
import sys
from urllib.parse import urlparse

from aioquic.asyncio import serve
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ProtocolNegotiated
from aioquic.quic.logger import QuicFileLogger
from aioquic.tls import CipherSuite


class ServerProtocol(QuicConnectionProtocol):
    def __init__(self, *args, www, **kwargs):
        super().__init__(*args, **kwargs)
        self.www = www
        self.h3 = None

    def quic_event_received(self, event):
        if isinstance(event, ProtocolNegotiated):
            self.h3 = H3Connection(self._quic)
        if self.h3 is None:
            return
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived):
                path = dict(ev.headers).get(b":path", b"/").decode()
                name = os.path.basename(path)
                full = os.path.join(self.www, name)
                if name and os.path.isfile(full):
                    with open(full, "rb") as f:
                        body = f.read()
                    self.h3.send_headers(ev.stream_id, [(b":status", b"200"),
                                                        (b"content-length", str(len(body)).encode())])
                    self.h3.send_data(ev.stream_id, body, end_stream=True)
                else:
                    self.h3.send_headers(ev.stream_id, [(b":status", b"404")], end_stream=True)
        self.transmit()


async def run_server(a) -> int:
    cfg = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN, max_datagram_frame_size=None)
    cfg.load_cert_chain(a.cert, a.key)
    if a.keylog:
        cfg.secrets_log_file = open(a.keylog, "a", buffering=1)
    if a.qlog_dir:
        cfg.quic_logger = QuicFileLogger(a.qlog_dir)
    tickets = {}
    await serve(a.listen, a.port, configuration=cfg, retry=a.retry,
                create_protocol=lambda *x, **k: ServerProtocol(*x, www=a.www, **k),
                session_ticket_fetcher=tickets.get,
                session_ticket_handler=lambda t: tickets.__setitem__(t.ticket, t))
    print("listening", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    return 0


class ClientProtocol(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.streams = {}  # stream id -> [file, status, ended future]

    def quic_event_received(self, event):
        for ev in self.h3.handle_event(event):
            st = self.streams.get(getattr(ev, "stream_id", None))
            if st is None:
                continue
            if isinstance(ev, HeadersReceived):
                st[1] = int(dict(ev.headers).get(b":status", b"0"))
            elif isinstance(ev, DataReceived):
                st[0].write(ev.data)
            if getattr(ev, "stream_ended", False) and not st[2].done():
                st[2].set_result(True)

    async def fetch(self, urls, out_dir, key_update):
        loop = asyncio.get_running_loop()
        for url in urls:
            u = urlparse(url)
            sid = self._quic.get_next_available_stream_id()
            f = open(os.path.join(out_dir, os.path.basename(u.path)), "wb")
            self.streams[sid] = [f, None, loop.create_future()]
            self.h3.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"),
                                       (b":authority", u.netloc.encode()), (b":path", u.path.encode())],
                                 end_stream=True)
        self.transmit()
        if key_update:
            # Once the handshake is confirmed (keys may change only then), update this end's keys.
            while not self._quic._handshake_confirmed:
                await asyncio.sleep(0.01)
            self._quic.request_key_update()
            self.transmit()
        await asyncio.wait_for(asyncio.gather(*(s[2] for s in self.streams.values())), 240)
        bad = []
        for sid, (f, status, _) in self.streams.items():
            f.close()
            if status != 200:
                bad.append(f"{f.name}: status {status}")
                os.unlink(f.name)
        return bad


async def run_client(a) -> int:
    u = urlparse(a.urls[0])
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, max_data=64 << 20, max_stream_data=64 << 20)
    if a.ca:
        cfg.load_verify_locations(a.ca)
    else:
        cfg.verify_mode = ssl.CERT_NONE
    cfg.server_name = a.server_name
    if a.keylog:
        cfg.secrets_log_file = open(a.keylog, "a", buffering=1)
    if a.qlog_dir:
        cfg.quic_logger = QuicFileLogger(a.qlog_dir)
    if a.chacha20:
        cfg.cipher_suites = [CipherSuite.CHACHA20_POLY1305_SHA256]
    if a.session_ticket and os.path.exists(a.session_ticket) and os.path.getsize(a.session_ticket) > 0:
        with open(a.session_ticket, "rb") as f:
            cfg.session_ticket = pickle.load(f)
    saved = []

    def save(ticket):
        saved.append(ticket)
        if a.session_ticket:
            with open(a.session_ticket, "wb") as f:
                pickle.dump(ticket, f)

    groups = [[x] for x in a.urls] if a.connection_per_url else [a.urls]
    bad = []
    for urls in groups:
        async with connect(u.hostname, u.port or 443, configuration=cfg, create_protocol=ClientProtocol,
                           session_ticket_handler=save, wait_connected=not a.early_data) as c:
            bad += await c.fetch(urls, a.out, a.key_update)
            if a.session_ticket:
                # The server's NewSessionTicket follows the handshake: give it time to land.
                for _ in range(200):
                    if saved:
                        break
                    await asyncio.sleep(0.02)
            c.close()
            await c.wait_closed()
    for b in bad:
        print(f"aioquic_peer: {b}", file=sys.stderr)
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--listen", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--www", required=True)
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--retry", action="store_true")
    c = sub.add_parser("client")
    c.add_argument("urls", nargs="+")
    c.add_argument("--out", required=True)
    c.add_argument("--ca")
    c.add_argument("--server-name", default="server")
    c.add_argument("--chacha20", action="store_true")
    c.add_argument("--key-update", action="store_true")
    c.add_argument("--session-ticket")
    c.add_argument("--early-data", action="store_true")
    c.add_argument("--connection-per-url", action="store_true")
    for p in (s, c):
        p.add_argument("--keylog")
        p.add_argument("--qlog-dir")
    a = ap.parse_args()
    return asyncio.run(run_server(a) if a.role == "server" else run_client(a))


if __name__ == "__main__":
    sys.exit(main())
