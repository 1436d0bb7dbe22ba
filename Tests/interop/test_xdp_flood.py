"""An Initial flood against a node on AF_XDP: the worker has STOQ's XDP program shed the
flooding /64's tokenless Initials in the driver (its stoq_shed entry), clients elsewhere are
served while it lasts, and the shedding ends with the flood."""
import json
import re
import socket
import struct
import subprocess
import time

from conftest import need_binary, run
from xdp_testbed import ADDR_A, B, PORT, ROOT, VA, XDPNode, counters, in_a, in_b, needs_root, testbed  # noqa: F401

pytestmark = needs_root

SPOOFED = "fd00:5705::"  # a /64 nobody on the testbed uses
SECONDS, RATE = 4, 20000

# Sends RATE tokenless v1 Initials a second for SECONDS from 256 hosts of SPOOFED/64 as whole
# Ethernet frames on B's end of the link (AF_PACKET: spoofing needs no route), each with a
# correct UDP checksum (the AF_XDP engine checks it).
FLOODER = r'''
import os, socket, struct, sys, time
dst, port, spoofed, seconds, rate, ifname, dmac = sys.argv[1:]
port, seconds, rate = int(port), float(seconds), int(rate)
dst = socket.inet_pton(socket.AF_INET6, dst)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
smac = open(f"/sys/class/net/{ifname}/address").read().strip()
eth = bytes.fromhex(dmac.replace(":", "")) + bytes.fromhex(smac.replace(":", "")) + b"\x86\xdd"
def csum(data):
    if len(data) % 2: data += b"\0"
    t = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while t >> 16: t = (t & 0xffff) + (t >> 16)
    return ~t & 0xffff or 0xffff
frames = []
for h in range(256):
    src = socket.inet_pton(socket.AF_INET6, spoofed) [:8] + os.urandom(7) + bytes([h])
    quic = b"\xc3\x00\x00\x00\x01\x08" + os.urandom(8) + b"\x00\x00"
    rest = 1200 - len(quic) - 2
    quic += struct.pack("!H", 0x4000 | rest) + os.urandom(rest)
    udp = struct.pack("!HHHH", 40000 + h, port, 8 + len(quic), 0) + quic
    c = csum(src + dst + struct.pack("!IxxxB", len(udp), 17) + udp)
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    ip = struct.pack("!IHBB", 0x60000000, len(udp), 17, 64) + src + dst
    frames.append(eth + ip + udp)
sent, start = 0, time.monotonic()
while (now := time.monotonic()) - start < seconds:
    due = int((now - start) * rate)
    while sent < due:
        s.send(frames[sent % 256]); sent += 1
    time.sleep(0.001)
print(sent)
'''


def test_an_initial_flood_is_shed_by_the_xdp_program(testbed, tmp_path):
    work, digests = testbed
    r = run(in_a(ROOT / "scripts/xdp-attach", VA, "--mode", "native", "--ports", PORT))
    assert r.returncode == 0, r.stderr
    # Every tokenless Initial wants a Retry, so the flood spends its /64's reply budget at once.
    node = XDPNode(work, "native", network="retry = true\n")
    try:
        shed0 = counters().get("shed_initial", 0)
        mac = json.loads(run(["ip", "-n", "stoq-a", "-j", "link", "show", VA]).stdout)[0]["address"]
        flood = subprocess.Popen(in_b("python3", "-c", FLOODER, ADDR_A, PORT, SPOOFED, SECONDS, RATE, "veth-b", mac),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # A client in another /64, mid-flood: answered as if there were none.
        time.sleep(2)
        r = run(in_b(need_binary("stoq"), "get", node.url("small.bin"), "--ca", node.cert, "--json"), timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["sha256"] == digests["small.bin"]
        out, err = flood.communicate(timeout=60)
        assert flood.returncode == 0, err
        sent = int(out)
        shed = counters().get("shed_initial", 0) - shed0
        log = node.text()
        assert re.search(r"worker \d+: Initial flood: .* the kernel now keeps", log), log[-3000:]
        # The XDP program dropped part of the flood before it reached a UMEM frame.
        assert 0 < shed < sent, (shed, sent)
        # With the flood gone each worker clears its stoq_shed entry. Each sheds for itself, and
        # can stop and start again while a flood lasts: every worker that shed must have "over"
        # as its last word on it.
        def over(text):
            last = {}
            for m in re.finditer(r"worker (\d+): Initial flood(?: over|:.* the kernel now keeps)", text):
                last[m.group(1)] = m.group(0).endswith("over")
            return bool(last) and all(last.values())
        deadline = time.time() + 10
        while not over(node.text()) and time.time() < deadline:
            time.sleep(0.2)
        assert over(node.text()), node.text()[-3000:]
        shed1 = counters()["shed_initial"]
        flood = subprocess.run(in_b("python3", "-c", FLOODER, ADDR_A, PORT, SPOOFED, 0.2, 1000, "veth-b", mac),
                               capture_output=True, text=True, timeout=30)
        assert flood.returncode == 0, flood.stderr
        assert counters()["shed_initial"] == shed1, "a trickle after the flood was shed"
    finally:
        assert node.stop() == 0, node.text()[-2000:]
        run(in_a(ROOT / "scripts/xdp-attach", "--detach", VA))
