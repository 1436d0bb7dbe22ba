"""qlog (issue #17): a node with log.qlog_dir and `stoq get --qlog-dir` each write one file per
connection, <odcid-hex>.<role>.sqlog, that reads as JSON-SEQ (RFC 7464) with the trace header
qvis expects and the transfer's packet and congestion events; qlog_sample = 0 writes nothing;
bad values are refused naming the key; a reload turns qlog on for new connections."""
import json
import pathlib
import re
import signal
import time

from conftest import Node, settled, sha256_file, stoq, summed_counters


def read_json_seq(path: pathlib.Path):
    """Every record of a JSON-SEQ file, parsed; fails on anything else."""
    data = path.read_bytes()
    assert data[:1] == b"\x1e", f"{path.name}: a JSON-SEQ file starts with RS"
    records = []
    for i, rec in enumerate(data.split(b"\x1e")[1:]):
        assert rec.endswith(b"\n"), f"{path.name}: record {i} does not end with LF"
        records.append(json.loads(rec))
    return records


def check_trace(path: pathlib.Path, role: str):
    """The header names the format, the vantage point and the ODCID the file is named after;
    returns the events by name."""
    records = read_json_seq(path)
    head = records[0]
    # What qvis's loader asks (FileLoader.ts, textsequencejsontoqlog.ts): a .sqlog whose first
    # 1024 bytes hold qlog_version and "JSON-SEQ", then a header record with qlog_version,
    # qlog_format and trace, then one record per event.
    assert b"qlog_version" in path.read_bytes()[:1024] and path.suffix == ".sqlog"
    assert head["qlog_format"] == "JSON-SEQ" and head["qlog_version"] == "0.3"
    trace = head["trace"]
    assert trace["vantage_point"]["type"] == role
    odcid = trace["common_fields"]["group_id"]
    assert path.name == f"{odcid}.{role}.sqlog"
    events = {}
    for e in records[1:]:
        assert isinstance(e["time"], (int, float)) and ":" in e["name"]
        events.setdefault(e["name"], []).append(e)
    return odcid, events


def get(node, name, *extra):
    return stoq("get", node.url(name), "--ca", node.cert, "--json", "--timeout", "30", *extra)


def test_a_transfer_is_logged_by_both_ends(tmp_path):
    qdir = tmp_path / "qlog-server"                     # the node makes it
    n = Node(tmp_path, workers=2, extra=f'[log]\nqlog_dir = "{qdir}"\nqlog_sample = 1.0\n[admin]\nlisten = "[::1]:0"')
    try:
        digest = n.add_object("four.bin", 4 << 20)
        out = tmp_path / "four.out"
        r = get(n, "four.bin", "-o", out, "--qlog-dir", tmp_path / "qlog-client")
        assert r.returncode == 0, r.stderr
        assert sha256_file(out) == digest
        names = ["stoq_qlog_connections_total", "stoq_qlog_bytes_total", "stoq_qlog_errors_total"]
        m = settled(lambda: summed_counters(n, names))
        assert m["stoq_qlog_connections_total"] == 1 and m["stoq_qlog_errors_total"] == 0
        assert m["stoq_qlog_bytes_total"] > 1_000_000
    finally:
        assert n.stop() == 0                             # every connection freed: files complete
    [server] = list(qdir.iterdir())
    [client] = list((tmp_path / "qlog-client").iterdir())
    s_odcid, s = check_trace(server, "server")
    c_odcid, c = check_trace(client, "client")
    assert s_odcid == c_odcid and len(s_odcid) >= 16
    # The sender of 4 MB sent some 2,900 full packets and acted on the client's ACKs.
    assert len(s["transport:packet_sent"]) > 2800
    assert len(s["transport:packet_received"]) > 10
    assert len(c["transport:packet_received"]) > 2800 and len(c["transport:packet_sent"]) > 10
    assert s["transport:packet_sent"][0]["data"]["header"]["packet_type"] == "initial"
    frames = {f["frame_type"] for e in s["transport:packet_sent"] for f in e["data"].get("frames", [])}
    assert {"stream", "ack", "crypto"} <= frames
    # Congestion control as it ran: the window moved during the transfer.
    cwnd = [e["data"]["congestion_window"] for e in s["recovery:metrics_updated"]]
    assert len(set(cwnd)) > 3
    assert "transport:parameters_set" in s


def test_sample_zero_writes_nothing(tmp_path):
    qdir = tmp_path / "qlog"
    qdir.mkdir()
    n = Node(tmp_path, workers=1, extra=f'[log]\nqlog_dir = "{qdir}"\nqlog_sample = 0.0')
    try:
        n.add_object("a.bin", 200_000)
        for _ in range(3):
            assert get(n, "a.bin").returncode == 0
    finally:
        assert n.stop() == 0
    assert list(qdir.iterdir()) == []


def test_bad_values_are_refused_naming_the_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[log]\nqlog_dir = 3\nqlog_sample = 1.5\n')
    r = stoq("config", "check", cfg)
    assert r.returncode == 2
    assert "log.qlog_dir = 3: bad type; expected a string" in r.stdout + r.stderr
    assert ("log.qlog_sample = 1.5: out of range; expected a number from 0.0 to 1.0, the fraction of "
            "connections (0.01 = one in a hundred)") in r.stdout + r.stderr


def test_an_unwritable_directory_stops_the_node_naming_the_key(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    try:
        Node(tmp_path, workers=1, extra=f'[log]\nqlog_dir = "{blocker}/q"')
        raise AssertionError("the node started with an unusable log.qlog_dir")
    except RuntimeError as e:
        # The directory that could not be made, and the system's reason (not Foundation's
        # "The file doesn't exist", which named neither).
        assert f'log.qlog_dir = "{blocker}/q": cannot create the directory: mkdir {blocker}: Not a directory' in str(e)


def test_a_reload_turns_qlog_on_for_new_connections(tmp_path):
    n = Node(tmp_path, workers=1)
    qdir = tmp_path / "qlog"
    try:
        n.add_object("a.bin", 100_000)
        assert get(n, "a.bin").returncode == 0
        n.config.write_text(n.config.read_text() + f'[log]\nqlog_dir = "{qdir}"\nqlog_sample = 1.0\n')
        n.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        while time.time() < deadline:
            n.log.flush()
            m = re.search(r"applied=(\S+) restart_needed=(\S*) .*reloaded", pathlib.Path(n.log.name).read_text())
            if m:
                break
            time.sleep(0.2)
        assert m and m.group(1) == "log.qlog_dir" and m.group(2) == ""
        # Workers take the setting at their next turn (one at least every 50 ms, idle or
        # not); the next connection is logged.
        time.sleep(0.3)
        assert get(n, "a.bin").returncode == 0
    finally:
        assert n.stop() == 0
    files = list(qdir.iterdir())
    assert len(files) == 1
    check_trace(files[0], "server")
