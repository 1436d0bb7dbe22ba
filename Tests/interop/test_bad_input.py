"""Hostile and broken input: every case is refused or dropped, nothing on disk is
damaged, and the node keeps serving everyone else."""
import json
import os
import socket
import struct
import subprocess
import sys
import time
import pathlib

import pytest

from conftest import need_binary, sha256_file, stoq

HERE = pathlib.Path(__file__).resolve().parent


def still_serves(node):
    r = stoq("get", node.url("obj-65536.bin"), "--ca", node.cert, "--json", timeout=60)
    assert r.returncode == 0, f"node stopped serving: {r.stderr}"
    assert json.loads(r.stdout)["sha256"] == node.digests["obj-65536.bin"]


def udp(node):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    s.connect(("::1", node.port))
    return s


def test_malformed_and_truncated_datagrams(node):
    s = udp(node)
    for n in [0, 1, 2, 5, 6, 7, 20, 100, 1199, 1200, 1500]:
        s.send(os.urandom(n))
    initial = bytes([0xC0]) + struct.pack(">I", 1) + bytes([8]) + os.urandom(8) + bytes([0]) + os.urandom(30)
    for cut in range(1, len(initial)):
        s.send(initial[:cut])
    still_serves(node)


def test_unknown_version_gets_version_negotiation(node):
    s = udp(node)
    dcid, scid = os.urandom(8), os.urandom(4)
    pkt = bytes([0xC0]) + struct.pack(">I", 0x1A2A3A4A) + bytes([8]) + dcid + bytes([4]) + scid
    pkt += bytes(1200 - len(pkt))
    s.send(pkt)
    reply = s.recv(2048)
    assert struct.unpack(">I", reply[1:5])[0] == 0, "not a Version Negotiation packet"
    assert reply[5] == 4 and reply[6:10] == scid, "VN must echo the client's SCID as DCID"
    assert reply[10] == 8 and reply[11:19] == dcid
    versions = [struct.unpack(">I", reply[i:i + 4])[0] for i in range(19, len(reply), 4)]
    assert 1 in versions


def test_initial_flood(node):
    s = udp(node)
    start = time.time()
    for i in range(20000):
        pkt = bytes([0xC0]) + struct.pack(">I", 1) + bytes([8]) + os.urandom(8) + bytes([8]) + os.urandom(8)
        pkt += bytes([0, 0x44, 0xD0]) + os.urandom(1200 - len(pkt) - 3)
        try:
            s.send(pkt)
        except BlockingIOError:
            pass
        if time.time() - start > 20:
            break
    still_serves(node)


def test_path_traversal_and_bad_paths(node):
    for path in ["/objects/../../etc/passwd", "/objects/%2e%2e/x", "/objects/.hidden", "/objects/a/b",
                 "/objects/", "/etc/passwd", "/objects/" + "a" * 300]:
        r = subprocess.run([sys.executable, str(HERE / "h3client.py"), f"https://[::1]:{node.port}{path}",
                            "--ca", node.cert], capture_output=True, text=True, timeout=60)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert res.get("status") in (400, 404, 414), (path, res)
    assert not (node.storage.parent / "passwd").exists()
    still_serves(node)


def test_missing_object_is_404(node):
    r = stoq("get", node.url("does-not-exist.bin"), "--ca", node.cert)
    assert r.returncode != 0 and "HTTP 404" in r.stderr


def test_oversized_request_headers(node):
    r = subprocess.run([sys.executable, str(HERE / "h3client.py"), node.url("obj-1.bin"), "--ca", node.cert,
                        "--header", "x-junk:" + "j" * 60000], capture_output=True, text=True, timeout=60)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res.get("status") == 431 or "error" in res, res
    still_serves(node)


def test_bad_method(node):
    r = subprocess.run([sys.executable, str(HERE / "h3client.py"), node.url("obj-1.bin"), "--ca", node.cert,
                        "--method", "DELETE"], capture_output=True, text=True, timeout=60)
    assert json.loads(r.stdout.strip().splitlines()[-1])["status"] == 405


def test_client_vanishes_mid_transfer(node):
    p = subprocess.Popen([str(need_binary("stoq")), "get", node.url(f"obj-{256 << 20}.bin"), "--ca", node.cert],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.7)
    p.kill()
    p.wait()
    still_serves(node)
    assert sha256_file(node.storage / f"obj-{256 << 20}.bin") == node.digests[f"obj-{256 << 20}.bin"]


def test_ipv4_never_reaches_the_node(node):
    s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s4.settimeout(0.5)
    pkt = bytes([0xC0]) + struct.pack(">I", 0x1A2A3A4A) + bytes([8]) + os.urandom(8) + bytes([4]) + os.urandom(4)
    s4.sendto(pkt + bytes(1200 - len(pkt)), ("127.0.0.1", node.port))
    with pytest.raises((socket.timeout, ConnectionRefusedError)):
        s4.recv(2048)
