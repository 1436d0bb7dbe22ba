#!/usr/bin/env python3
"""Writes the seed corpus of `scripts/fuzz worker` (Tests/Fuzz/corpus/worker/), in the input
format Tests/Fuzz/WorkerFuzz.swift describes. The ClientHellos are aioquic's, taken from its
first Initial and decrypted (aioquic, an implementation nobody here wrote, is what a hostile or
merely different client looks like); the rest are hand-made records. Run it again when the
input format changes; the seeds are committed."""
import pathlib
import struct
import sys

from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import pull_quic_header

OUT = pathlib.Path(__file__).resolve().parent / "corpus" / "worker"


def client_initial(**config):
    """The CRYPTO frame(s) and connection IDs of aioquic's first Initial, as plaintext."""
    conn = QuicConnection(configuration=QuicConfiguration(is_client=True, server_name="stoq.fuzz", **config))
    conn.connect(("fd00::1", 4433), now=0.0)
    data = conn.datagrams_to_send(now=0.0)[0][0]
    buf = Buffer(data=data)
    header = pull_quic_header(buf, host_cid_length=8)
    pair = CryptoPair()
    pair.setup_initial(header.destination_cid, is_client=False, version=header.version)
    _, payload, _ = pair.decrypt_packet(data[:header.packet_length], buf.tell(), 0)
    frames = payload.rstrip(b"\0")   # the padding: the harness pads again
    return header.destination_cid, header.source_cid, frames


def initial(src, dcid, scid, frames, token=b"", pn=0, pn_len=1, pad=True):
    return (bytes([1, src, len(dcid)]) + dcid + bytes([len(scid)]) + scid + bytes([len(token)]) + token
            + bytes([(pn_len - 1) | (4 if pad else 0)]) + struct.pack(">I", pn) + struct.pack("<H", len(frames)) + frames)


def wait(ms_root):
    return bytes([2, ms_root])


def datagram(src, data):
    return bytes([0, src]) + struct.pack("<H", len(data)) + data


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    dcid, scid, hello = client_initial(alpn_protocols=["h3"])
    _, _, hello_hq = client_initial(alpn_protocols=["hq-interop"])
    seeds = {
        # A ClientHello, then time for the handshake and idle timers to end it.
        "hello": b"\0" + initial(1, dcid, scid, hello) + wait(120),
        "hello-retry": b"\1" + initial(1, dcid, scid, hello) + wait(120),
        # The same Initial twice and once from elsewhere (replay, address change).
        "hello-replayed": b"\0" + initial(1, dcid, scid, hello) + bytes([3, 1]) + bytes([3, 0x35]) + wait(200),
        # Too small to be accepted (no padding).
        "hello-unpadded": b"\0" + initial(2, dcid, scid, hello, pad=False),
        # A token the server never issued.
        "hello-forged-token": b"\1" + initial(3, dcid, scid, hello, token=b"\x01" * 40),
        # PING and ACK frames only, 4-byte packet number.
        "ping-ack": b"\0" + initial(4, dcid, scid, b"\x01\x02\x00\x00\x00\x00", pn=7, pn_len=4),
        # An unknown version (version negotiation) and a short header for no connection (reset).
        "unknown-version": b"\0" + datagram(5, b"\xc0\x0a\x0a\x0a\x0a\x08" + dcid + b"\x08" + scid + b"\0" * 1180),
        "short-header": b"\0" + datagram(6, b"\x40" + dcid + b"\x55" * 60),
        "hello-two-sources-one-alpn-refused": b"\0" + initial(7, dcid, scid, hello) + initial(8, dcid[::-1], scid, hello_hq) + wait(255),
    }
    for name, data in seeds.items():
        (OUT / name).write_bytes(data)
    print(f"wrote {len(seeds)} seeds to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
