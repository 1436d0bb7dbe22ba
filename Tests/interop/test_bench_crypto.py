"""scripts/bench-crypto --json: packet protection per packet in GnuTLS, OpenSSL and Nettle. The
program checks that the three libraries seal, open and mask alike before it times them; here,
that it ran every case and printed sane figures. Timings are the benchmark's business."""
import json
import subprocess

from conftest import ROOT


def test_bench_crypto_runs_every_case_and_the_libraries_agree():
    r = subprocess.run([str(ROOT / "scripts" / "bench-crypto"), "--json", "--runs", "1", "--packets", "2000",
                        "--size", "1200", "--size", "1430"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    cases = {(c["cipher"], c["bytes"], c["op"]): c for c in out["cases"]}
    want = {(cipher, size, op) for cipher in ("AES-128-GCM", "CHACHA20-POLY1305") for size in (1200, 1430)
            for op in ("seal", "open")} | {(cipher, 16, "hp_mask") for cipher in ("AES-128-GCM", "CHACHA20-POLY1305")}
    assert set(cases) == want
    for c in cases.values():
        ns = c["ns_per_packet"]
        assert all(ns[lib] > 0 for lib in ("gnutls", "openssl", "nettle")), c
        assert abs(c["openssl_over_gnutls"] - ns["openssl"] / ns["gnutls"]) < 0.01, c


def test_bench_crypto_refuses_a_bad_size():
    r = subprocess.run([str(ROOT / "scripts" / "bench-crypto"), "--size", "8"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 1 and "--size must be 16 … 16384 bytes" in r.stderr
