#!/usr/bin/env python3
"""Several uploads side by side on one HTTP/3 connection (aioquic), their bodies paced, so that
they are all in progress at once for as long as the test needs to look at the server's disk.

Usage: paced_puts.py BASE_URL --ca CERT --count N --size BYTES [--header k:v ...] [--no-length]
                     [--piece BYTES] [--interval S] [--prefix NAME] [--timeout S]
Starts N `PUT BASE_URL/<prefix><i>` at once (each announcing its length unless --no-length),
then sends `piece` bytes of each body in turn every `interval` seconds. An upload answered before
its body is all sent (a refusal at its head, or once its body passed what it may hold) sends no
more. Prints one JSON list, in the order started: {"name", "status", "text", "sent"} (sent: body
bytes given to QUIC). Exit 1 on failure (no answer within --timeout)."""
import argparse
import asyncio
import json
import os
import sys
from urllib.parse import urlparse

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StopSendingReceived, StreamReset


class Uploads(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.uploads = {}  # stream id -> {"name", "status", "text", "sent", "sending", "ended"}

    def quic_event_received(self, event: QuicEvent) -> None:
        up = self.uploads.get(getattr(event, "stream_id", None))
        if up is not None and isinstance(event, StopSendingReceived):
            up["sending"] = False
        if up is not None and isinstance(event, StreamReset):
            up["sending"], up["ended"] = False, True
            up["text"] += f"<reset 0x{event.error_code:x}>"
            return
        for ev in self.h3.handle_event(event):
            up = self.uploads.get(getattr(ev, "stream_id", None))
            if up is None:
                continue
            if isinstance(ev, HeadersReceived):
                # Answered: whatever of the body is left is not wanted.
                up["sending"] = False
                up["status"] = next(int(v) for k, v in ev.headers if k == b":status")
            elif isinstance(ev, DataReceived):
                up["text"] += ev.data[:2048].decode("utf-8", "replace")
            if ev.stream_ended:
                up["ended"] = True

    async def run(self, url, headers, count, size, no_length, piece, interval, prefix, timeout):
        u = urlparse(url)
        for i in range(count):
            sid = self._quic.get_next_available_stream_id()
            name = f"{prefix}{i}"
            hdrs = [(b":method", b"PUT"), (b":scheme", b"https"), (b":authority", u.netloc.encode()),
                    (b":path", f"{u.path.rstrip('/')}/{name}".encode())] + headers
            if not no_length:
                hdrs.append((b"content-length", str(size).encode()))
            self.h3.send_headers(sid, hdrs, end_stream=False)
            # A body of its own each: with dedup on, equal bodies would be stored once.
            self.uploads[sid] = {"name": name, "status": None, "text": "", "sent": 0, "sending": True, "ended": False,
                                 "body": os.urandom(size)}
        self.transmit()
        deadline = asyncio.get_event_loop().time() + timeout
        while not all(up["ended"] for up in self.uploads.values()):
            if asyncio.get_event_loop().time() > deadline:
                raise TimeoutError(f"no answer to every upload in {timeout} s: {self.summary()}")
            for sid, up in self.uploads.items():
                if not up["sending"] or up["sent"] >= size:
                    continue
                n = min(piece, size - up["sent"])
                try:
                    self.h3.send_data(sid, up["body"][up["sent"]:up["sent"] + n], end_stream=up["sent"] + n == size)
                    up["sent"] += n
                except Exception:  # noqa: BLE001 - the server stopped the stream meanwhile
                    up["sending"] = False
            self.transmit()
            await asyncio.sleep(interval)
        return self.summary()

    def summary(self):
        return [{k: up[k] for k in ("name", "status", "text", "sent")} for _, up in sorted(self.uploads.items())]


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--ca")
    ap.add_argument("--header", action="append", default=[])
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--no-length", action="store_true")
    ap.add_argument("--piece", type=int, default=16 << 10)
    ap.add_argument("--interval", type=float, default=0.02)
    ap.add_argument("--prefix", default="paced-")
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args()
    u = urlparse(a.url)
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, max_data=64 << 20, max_stream_data=64 << 20)
    if a.ca:
        cfg.load_verify_locations(a.ca)
    headers = [(k.strip().lower().encode(), v.strip().encode()) for k, v in (h.split(":", 1) for h in a.header)]
    async with connect(u.hostname, u.port or 443, configuration=cfg, create_protocol=Uploads) as c:
        print(json.dumps(await c.run(a.url, headers, a.count, a.size, a.no_length, a.piece, a.interval, a.prefix, a.timeout)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except Exception as e:  # noqa: BLE001 - report any failure as one line
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)
