"""Fewer workers than queues on AF_XDP: one worker reads both queues of the testbed's
veth (network.workers = 1) and serves clients whose packets arrive on either."""
import json
import re

from conftest import need_binary, run, sha256_file
from xdp_testbed import PORT, ROOT, VA, XDPNode, counters, in_a, in_b, needs_root, testbed  # noqa: F401 (fixture)

pytestmark = needs_root


def test_one_worker_reads_two_queues(testbed, tmp_path):
    work, digests = testbed
    r = run(in_a(ROOT / "scripts/xdp-attach", VA, "--mode", "native", "--ports", PORT))
    assert r.returncode == 0, r.stderr
    xps = [f"/sys/class/net/veth-b/queues/tx-{q}/xps_cpus" for q in (0, 1)]
    r = run(in_b("sh", "-c", f"cat {xps[0]} {xps[1]}; echo 1 > {xps[0]}; echo 2 > {xps[1]}"))
    assert r.returncode == 0, r.stderr
    saved = r.stdout.split()
    node = XDPNode(work, "native", workers=1)
    try:
        log = node.text()
        assert "datapath af_xdp: veth-a, 2 queue(s)" in log, log[-2000:]
        assert "AF_XDP: worker 0 reads queue(s) 0, 1" in log, log[-2000:]
        # A client on CPU 0 sends through veth queue 0, one on CPU 1 through queue 1 (XPS).
        for cpu in (0, 1):
            before = counters()
            out = tmp_path / f"big-{cpu}.bin"
            r = run(in_b("taskset", "-c", cpu, need_binary("stoq"), "get", node.url("big.bin"), "-o", out,
                         "--ca", node.cert, "--json"), timeout=300)
            assert r.returncode == 0, r.stderr[-2000:]
            assert json.loads(r.stdout)["sha256"] == digests["big.bin"] == sha256_file(out)
            after = counters()
            moved = {q: after[f"worker_{q}"] - before[f"worker_{q}"] for q in (0, 1)}
            # Nearly all on that CPU's queue (a stray datagram may leave from an io_uring
            # worker thread of the client elsewhere).
            assert moved[cpu] > 1000 and moved[1 - cpu] * 100 < moved[cpu], (cpu, moved)
        metrics = run(in_a("python3", "-c", f"import urllib.request; print(urllib.request.urlopen('{node.admin}').read().decode())"))
        assert re.findall(r'^stoq_datapath_info\{worker="(\d+)"', metrics.stdout, re.M) == ["0"], metrics.stdout[-2000:]
    finally:
        run(in_b("sh", "-c", f"echo {saved[0]} > {xps[0]}; echo {saved[1]} > {xps[1]}"))
        code = node.stop()
        run(in_a(ROOT / "scripts/xdp-attach", "--detach", VA))
    log = node.text()
    assert code == 0, log[-2000:]
    stops = re.findall(r"^.*worker \d+ stopped$", log, re.M)
    assert len(stops) == 1, log[-3000:]
    fields = dict(re.findall(r"(\w+)=(\S+)", stops[0]))
    assert fields["datapath"] == "af_xdp" and fields["frames_held"] == "0" and fields["frames_tx_in_flight"] == "0", stops[0]
