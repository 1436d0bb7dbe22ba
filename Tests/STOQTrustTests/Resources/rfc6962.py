#!/usr/bin/env python3
"""Independent RFC 6962 section 2.1 reference, written from the RFC's recursive definitions
(MTH, PATH, PROOF/SUBPROOF) with hashlib only. It shares nothing with the Swift code: the
Swift tests feed it leaves and compare its answers with MerkleTree's.

stdin:  {"leaves": ["<hex>", ...]}
stdout: {"roots": [hex per size 0..N],
         "paths": [[m, n, [hex, ...]], ...]   for every 0 <= m < n <= N,
         "proofs": [[m, n, [hex, ...]], ...]  for every 0 < m < n <= N}
"""
import hashlib
import json
import sys


def sha256(b):
    return hashlib.sha256(b).digest()


def k_for(n):
    # the largest power of two smaller than n
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(d):
    n = len(d)
    if n == 0:
        return sha256(b"")
    if n == 1:
        return sha256(b"\x00" + d[0])
    k = k_for(n)
    return sha256(b"\x01" + mth(d[:k]) + mth(d[k:]))


def path(m, d):
    n = len(d)
    if n == 1:
        return []
    k = k_for(n)
    if m < k:
        return path(m, d[:k]) + [mth(d[k:])]
    return path(m - k, d[k:]) + [mth(d[:k])]


def subproof(m, d, b):
    n = len(d)
    if m == n:
        return [] if b else [mth(d)]
    k = k_for(n)
    if m <= k:
        return subproof(m, d[:k], b) + [mth(d[k:])]
    return subproof(m - k, d[k:], False) + [mth(d[:k])]


def proof(m, d):
    return subproof(m, d, True)


def main():
    req = json.load(sys.stdin)
    leaves = [bytes.fromhex(h) for h in req["leaves"]]
    n_max = len(leaves)
    out = {"roots": [], "paths": [], "proofs": []}
    for n in range(0, n_max + 1):
        d = leaves[:n]
        out["roots"].append(mth(d).hex())
        for m in range(0, n):
            out["paths"].append([m, n, [h.hex() for h in path(m, d)]])
        for m in range(1, n):
            out["proofs"].append([m, n, [h.hex() for h in proof(m, d)]])
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
