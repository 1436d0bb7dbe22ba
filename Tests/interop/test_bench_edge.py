"""scripts/bench-edge --json on a small object: --mesh runs the three fetch paths through a mesh
(a chunked object, a plain file cut by its holder, a plain file whole), --plain an edge in
front of an origin that cuts plain files and one that does not; all byte-identical (the script
exits 1 otherwise), with their keys. Timings are the benchmark's business, never asserted here."""
import json
import subprocess

from conftest import ROOT, bin_dir, need_binary


def bench_edge(tmp_path, mode):
    """scripts/bench-edge `mode` on 3 MB, one run, one worker: its JSON (it exited 0)."""
    need_binary("stoq-node")
    need_binary("stoq")
    r = subprocess.run([str(ROOT / "scripts" / "bench-edge"), mode, "--bytes", "3000007", "--runs", "1", "--workers", "1",
                        "--bin", str(bin_dir()), "--dir", str(tmp_path), "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(r.stdout)


def test_mesh_mode_runs_all_three_paths(tmp_path):
    result = bench_edge(tmp_path, "--mesh")
    for key in ("chunked", "plain_cut", "plain_whole"):
        assert result[key]["first_s"] > 0 and result[key]["second_s"] > 0, (key, result[key])
        assert len(result[key]["runs"]) == 1
    # The holder cut its plain file once and served its chunks; on the whole path it cut nothing.
    cut, whole = result["plain_cut"]["runs"][0], result["plain_whole"]["runs"][0]
    assert cut["c_plain_cuts"] == 1 and cut["c_chunks_served"] >= 1, cut
    assert whole["c_plain_cuts"] == 0 and whole["c_chunks_served"] == 0, whole


def test_plain_mode_compares_an_origin_that_cuts_with_one_that_does_not(tmp_path):
    """--plain: the same plain file through an edge from an origin that cuts it (the edge asks
    for a manifest and chunks, never the object whole) and from one that does not (the object
    whole, once), byte-identical both ways, with the first-byte times reported."""
    plain = bench_edge(tmp_path, "--plain")["plain"]
    cut, whole = plain["cut"], plain["whole"]
    assert cut["first_byte_s"] > 0 and whole["first_byte_s"] > 0, plain
    assert cut["edge_first"]["stoq_edge_origin_object_fetches_total"] == 0, cut
    assert cut["edge_first"]["stoq_edge_origin_manifest_fetches_total"] == 1, cut
    assert cut["edge_first"]["stoq_edge_origin_chunk_fetches_total"] >= 1, cut
    assert whole["edge_first"]["stoq_edge_origin_object_fetches_total"] == 1, whole
    assert whole["edge_first"]["stoq_edge_origin_chunk_fetches_total"] == 0, whole
