#!/usr/bin/env python3
"""Holds N long-lived HTTP/3 connections (aioquic) to a node for a while, each sending a
GET every `--every` seconds, and opens one new connection every `--every` seconds to
see which certificate new handshakes get. Prints one JSON object:
{"requests_ok", "requests_failed", "connections_lost", "serials", "handshake_ms"}.

Usage: rotation_client.py URL --ca ROOT [--connections 100] [--seconds 45] [--every 2] [--probe-every S]
"""
import argparse
import asyncio
import json
import time
from urllib.parse import urlparse

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StreamReset


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.waiting = {}
        self.terminated = False

    def quic_event_received(self, event):
        if isinstance(event, ConnectionTerminated):
            self.terminated = True
            for f in self.waiting.values():
                if not f.done():
                    f.set_exception(RuntimeError("connection terminated"))
            return
        if isinstance(event, StreamReset):
            f = self.waiting.pop(event.stream_id, None)
            if f and not f.done():
                f.set_exception(RuntimeError(f"stream reset 0x{event.error_code:x}"))
            return
        for ev in self.h3.handle_event(event):
            f = self.waiting.get(getattr(ev, "stream_id", None))
            if f is None:
                continue
            if isinstance(ev, HeadersReceived):
                f.status = dict(ev.headers).get(b":status")
            if getattr(ev, "stream_ended", False) and not f.done():
                self.waiting.pop(ev.stream_id, None)
                f.set_result(getattr(f, "status", None))

    async def get(self, url):
        u = urlparse(url)
        sid = self._quic.get_next_available_stream_id()
        f = asyncio.get_event_loop().create_future()
        self.waiting[sid] = f
        self.h3.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", u.netloc.encode()),
                                   (b":path", u.path.encode())], end_stream=True)
        self.transmit()
        return await asyncio.wait_for(f, 10)


def config(ca):
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, idle_timeout=60)
    cfg.load_verify_locations(ca)
    return cfg


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--ca", required=True)
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=45)
    ap.add_argument("--every", type=float, default=2)
    ap.add_argument("--probe-every", type=float, default=None, help="new handshakes this often (default: --every)")
    a = ap.parse_args()
    u = urlparse(a.url)
    stats = {"requests_ok": 0, "requests_failed": 0, "connections_lost": 0, "serials": [], "handshake_ms": [],
             "errors": []}
    end = time.monotonic() + a.seconds

    async def long_lived(i):
        try:
            async with connect(u.hostname, u.port, configuration=config(a.ca), create_protocol=Client) as c:
                await asyncio.sleep(i * a.every / a.connections)  # spread the requests out
                while time.monotonic() < end:
                    try:
                        status = await c.get(a.url)
                        if status == b"200":
                            stats["requests_ok"] += 1
                        else:
                            stats["requests_failed"] += 1
                            stats["errors"].append(f"status {status}")
                    except Exception as e:  # noqa: BLE001 - counted and reported
                        stats["requests_failed"] += 1
                        stats["errors"].append(f"{type(e).__name__}: {e}")
                    if c.terminated:
                        stats["connections_lost"] += 1
                        return
                    await asyncio.sleep(a.every)
        except Exception as e:  # noqa: BLE001
            stats["connections_lost"] += 1
            stats["errors"].append(f"connect: {type(e).__name__}: {e}")

    async def prober():
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                async with connect(u.hostname, u.port, configuration=config(a.ca), create_protocol=Client) as c:
                    stats["handshake_ms"].append((time.monotonic() - t0) * 1000)
                    cert = c._quic.tls._peer_certificate
                    stats["serials"].append(format(cert.serial_number, "x"))
            except Exception as e:  # noqa: BLE001
                stats["errors"].append(f"probe: {type(e).__name__}: {e}")
            await asyncio.sleep(a.probe_every or a.every)

    await asyncio.gather(prober(), *(long_lived(i) for i in range(a.connections)))
    stats["errors"] = stats["errors"][:20]
    print(json.dumps(stats))


if __name__ == "__main__":
    asyncio.run(main())
