"""scripts/bench-edge --mesh --json on a small object: the three fetch paths through a mesh
(a chunked object, a plain file cut by its holder, a plain file whole) run, are byte-identical
(the script exits 1 otherwise), and report their keys. Timings are the benchmark's business,
never asserted here."""
import json
import subprocess

from conftest import ROOT, bin_dir, need_binary


def test_mesh_mode_runs_all_three_paths(tmp_path):
    need_binary("stoq-node")
    need_binary("stoq")
    r = subprocess.run([str(ROOT / "scripts" / "bench-edge"), "--mesh", "--bytes", "3000007", "--runs", "1", "--workers", "1",
                        "--bin", str(bin_dir()), "--dir", str(tmp_path), "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    result = json.loads(r.stdout)
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
    need_binary("stoq-node")
    need_binary("stoq")
    r = subprocess.run([str(ROOT / "scripts" / "bench-edge"), "--plain", "--bytes", "3000007", "--runs", "1", "--workers", "1",
                        "--bin", str(bin_dir()), "--dir", str(tmp_path), "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    plain = json.loads(r.stdout)["plain"]
    cut, whole = plain["cut"], plain["whole"]
    assert cut["first_byte_s"] > 0 and whole["first_byte_s"] > 0, plain
    assert cut["edge_first"]["stoq_edge_origin_object_fetches_total"] == 0, cut
    assert cut["edge_first"]["stoq_edge_origin_manifest_fetches_total"] == 1, cut
    assert cut["edge_first"]["stoq_edge_origin_chunk_fetches_total"] >= 1, cut
    assert whole["edge_first"]["stoq_edge_origin_object_fetches_total"] == 1, whole
    assert whole["edge_first"]["stoq_edge_origin_chunk_fetches_total"] == 0, whole
