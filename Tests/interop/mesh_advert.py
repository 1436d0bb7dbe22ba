#!/usr/bin/env python3
"""Builds signed link-state adverts from docs/mesh.md ("Wire format, version 1"), not from the
Swift code, so the tests can hand a node adverts that are valid, forged or broken in a known
way. The reader beside it (Tests/STOQMeshTests/Resources/advert.py) decodes; this signs.

Usage: mesh_advert.py --cert CHAIN.pem --key KEY.pem --out FILE [--sequence N] [--lifetime-ms N]
                      [--flip OFFSET]
`--flip` XORs one byte of the result with 0x01 (a forged or altered advert); a negative
offset counts from the end. Prints one JSON line: {"origin": hex, "bytes": N}.
"""
import argparse
import hashlib
import json
import struct
import sys
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

MAGIC = b"SQLA"


def node_id(cert: x509.Certificate) -> bytes:
    """A node's id: SHA-256 of the leaf's subjectPublicKey (the uncompressed P-256 point)."""
    point = cert.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return hashlib.sha256(point).digest()


def body(origin: bytes, sequence: int, issued_ms: int, lifetime_ms: int, load_ppm: int = 0, links=()) -> bytes:
    """The advert body; `links` are (neighbour id, rtt µs, rttvar µs, loss ppm, kbit/s, load ppm)."""
    out = MAGIC + struct.pack(">BB", 1, 0) + origin + struct.pack(">QQIIH", sequence, issued_ms, lifetime_ms,
                                                                  load_ppm, len(links))
    for neighbour, *metrics in links:
        out += neighbour + struct.pack(">IIIII", *metrics)
    return out


def sign(advert_body: bytes, chain_pem: bytes, key_pem: bytes) -> bytes:
    """Body, then the chain (count, then length-prefixed DER, leaf first), then the DER ECDSA
    P-256 SHA-256 signature over every byte before the signature's length."""
    chain = x509.load_pem_x509_certificates(chain_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    out = advert_body + struct.pack(">B", len(chain))
    for c in chain:
        der = c.public_bytes(serialization.Encoding.DER)
        out += struct.pack(">H", len(der)) + der
    signature = key.sign(out, ec.ECDSA(hashes.SHA256()))
    return out + struct.pack(">H", len(signature)) + signature


def build(chain_pem: bytes, key_pem: bytes, sequence=None, lifetime_ms=10_000, links=()) -> bytes:
    """A valid advert for the node whose certificate chain and key these are, issued now."""
    now_ms = int(time.time() * 1000)
    origin = node_id(x509.load_pem_x509_certificates(chain_pem)[0])
    return sign(body(origin, sequence or now_ms, now_ms, lifetime_ms, links=links), chain_pem, key_pem)


def flip(data: bytes, offset: int) -> bytes:
    b = bytearray(data)
    b[offset] ^= 0x01
    return bytes(b)


# Where the sequence number sits: a byte there changes what was signed, and nothing else.
SEQUENCE_OFFSET = 38


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sequence", type=int)
    ap.add_argument("--lifetime-ms", type=int, default=10_000)
    ap.add_argument("--flip", type=int)
    a = ap.parse_args()
    chain_pem, key_pem = open(a.cert, "rb").read(), open(a.key, "rb").read()
    data = build(chain_pem, key_pem, a.sequence, a.lifetime_ms)
    if a.flip is not None:
        data = flip(data, a.flip)
    open(a.out, "wb").write(data)
    print(json.dumps({"origin": node_id(x509.load_pem_x509_certificates(chain_pem)[0]).hex(), "bytes": len(data)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
