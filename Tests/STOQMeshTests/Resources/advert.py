#!/usr/bin/env python3
"""An independent reader of STOQ's link-state adverts, written from docs/mesh.md ("Link-state
adverts") and not from the Swift code: decodes an advert file, checks its structure, that the
origin is the SHA-256 of the leaf certificate's subjectPublicKey (the uncompressed P-256
point), and its ECDSA P-256
SHA-256 signature (with the `cryptography` package). Prints the fields as JSON; exits 1 with
the reason on anything malformed. Usage: advert.py FILE"""
import hashlib
import json
import struct
import sys

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


def read(data):
    pos = 0

    def take(n, what):
        nonlocal pos
        if pos + n > len(data):
            raise ValueError(f"truncated at {what}")
        out = data[pos:pos + n]
        pos += n
        return out

    magic, version, reserved = struct.unpack(">4sBB", take(6, "header"))
    if magic != b"SQLA" or version != 1 or reserved != 0:
        raise ValueError(f"not a version 1 advert: {magic!r} {version} {reserved}")
    origin = take(32, "origin").hex()
    sequence, issued, lifetime, load, count = struct.unpack(">QQIIH", take(26, "fields"))
    links = []
    for i in range(count):
        n = take(32, f"link {i}").hex()
        rtt, var, loss, rate, peer_load = struct.unpack(">IIIII", take(20, f"link {i} metrics"))
        links.append({"neighbour": n, "rtt_us": rtt, "rtt_var_us": var, "loss_ppm": loss, "delivery_kbps": rate,
                      "peer_load_ppm": peer_load})
    (chain_count,) = take(1, "chain count")
    chain = []
    for i in range(chain_count):
        (length,) = struct.unpack(">H", take(2, f"certificate {i} length"))
        chain.append(x509.load_der_x509_certificate(take(length, f"certificate {i}")))
    signed = data[:pos]
    (sig_len,) = struct.unpack(">H", take(2, "signature length"))
    signature = take(sig_len, "signature")
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} bytes after the signature")
    key = chain[0].public_key()
    point = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    try:
        key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
        valid = True
    except InvalidSignature:
        valid = False
    return {"origin": origin, "sequence": sequence, "issued_ms": issued, "lifetime_ms": lifetime, "load_ppm": load,
            "links": links, "chain": [c.subject.rfc4514_string() for c in chain],
            "signer_key_sha256": hashlib.sha256(point).hexdigest(), "signature_valid": valid}


if __name__ == "__main__":
    try:
        print(json.dumps(read(open(sys.argv[1], "rb").read())))
    except (ValueError, IndexError) as e:
        print(f"advert.py: {e}", file=sys.stderr)
        sys.exit(1)
