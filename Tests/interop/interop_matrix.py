"""The QUIC interop runner's test cases, run here: STOQ against ngtcp2 (gtlsserver/gtlsclient) and
aioquic, in both roles, through a link emulator, with the runner's checks.

One home for the cases (CASES), the peers (PEERS) and the checks; scripts/interop-matrix prints
the whole matrix, Tests/interop/test_interop_matrix.py runs a shortened pass under pytest.

The testbed: three network namespaces, client -- sim -- server, joined by veth pairs, IPv6 only.
The sim namespace routes between them and is the link emulator: each direction's forwarded
datagrams go through an NFQUEUE to scripts/impair/stoq-impair (delay, loss, corruption, the
runner's drop list), tbf on the sim's egress limits the rate and the queue; blackholes and
rebinding are ip6tables rules (DROP, SNAT) the case switches on and off while it runs. dumpcap
records each link at the sim (the client's side and the server's side, as the runner's two
traces), and tshark reads them with the keys both ends logged (SSLKEYLOGFILE, which GnuTLS and
aioquic honour) to check what the runner checks.

Every case runs over HTTP/3 (STOQ speaks nothing else; the runner's other cases use hq-interop)
and over IPv6 (stoq-impair is IPv6 only).
"""
import dataclasses
import datetime
import ipaddress
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

from conftest import sha256_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
KB, MB = 1 << 10, 1 << 20

CLIENT_ADDR, CLIENT_GW = "fd00:c1::2", "fd00:c1::1"
SERVER_ADDR, SERVER_GW = "fd00:5e::2", "fd00:5e::1"
# connectionmigration: the server's second address, offered as its preferred_address.
PREFERRED_ADDR = "fd00:5e::3"
PORT = 443
QUIC_V1 = "0x00000001"


# ---------------------------------------------------------------------------------------------
# Cases: what each sets up (files, link, peer options) and what it checks. From the runner's
# testcases_quic.py; `short` is the shortened form scripts/test runs.


@dataclasses.dataclass
class Link:
    delay_ms: float = 15  # each way
    rate_mbit: float = 10
    queue_packets: int = 25
    loss_to_server: float = 0  # percent
    loss_to_client: float = 0
    corrupt_to_server: float = 0
    corrupt_to_client: float = 0
    drops_to_server: str = ""  # the runner's droplist: these datagrams (1 = first) are dropped
    blackhole: tuple = ()  # (on_s, off_s): the link passes for on_s, then drops all for off_s, ...
    rebind: str = ""  # "port" or "addr": the sim's NAT gives the client a new port (and address)
    rebind_first_s: float = 1
    rebind_every_s: float = 5


@dataclasses.dataclass
class Case:
    name: str
    files: list  # sizes in bytes
    link: Link = dataclasses.field(default_factory=Link)
    mode: str = "single"  # single | multiconnect (a connection per file) | resumption | zerortt
    retry: bool = False
    chacha20: bool = False
    key_update: bool = False
    long_chain: bool = False  # amplificationlimit: a certificate chain over 7500 bytes
    cross_traffic: bool = False  # crosstraffic: an iperf3 TCP (cubic) flow shares the link
    preferred_address: bool = False  # connectionmigration: the server offers PREFERRED_ADDR
    checks: tuple = ("handshakes", "version", "files")
    handshakes: int = 1
    short: dict = dataclasses.field(default_factory=dict)  # fields scripts/test overrides
    not_implemented: str = ""
    timeout_s: int = 60


CASES = {c.name: c for c in [
    Case("handshake", [1 * KB], checks=("handshakes", "version", "files", "no_retry")),
    Case("transfer", [2 * MB, 3 * MB, 5 * MB], short={"files": [1 * MB, 2 * MB]}),
    Case("http3", [5 * KB, 10 * KB, 500 * KB]),
    Case("multiplexing", [32] * 1999, checks=("handshakes", "version", "files", "stream_limit"),
         short={"files": [32] * 200}),
    Case("chacha20", [3 * MB], chacha20=True, checks=("handshakes", "version", "files", "chacha20"),
         short={"files": [300 * KB]}),
    Case("retry", [10 * KB], retry=True, checks=("handshakes", "version", "files", "retry")),
    Case("resumption", [5 * KB, 10 * KB], mode="resumption", handshakes=2,
         checks=("handshakes", "version", "files", "resumed")),
    Case("zerortt", [32] * 40, mode="zerortt", handshakes=2, checks=("handshakes", "version", "files", "zerortt")),
    Case("ipv6", [5 * KB, 10 * KB], checks=("handshakes", "version", "files", "ipv6")),
    Case("handshakeloss", [1 * KB] * 50, mode="multiconnect", handshakes=50, timeout_s=300,
         link=Link(loss_to_server=30, loss_to_client=30), short={"files": [1 * KB] * 5, "handshakes": 5}),
    Case("transferloss", [2 * MB], link=Link(loss_to_server=2, loss_to_client=2), short={"files": [500 * KB]}),
    Case("handshakecorruption", [1 * KB] * 50, mode="multiconnect", handshakes=50, timeout_s=300,
         link=Link(corrupt_to_server=30, corrupt_to_client=30), short={"files": [1 * KB] * 5, "handshakes": 5}),
    Case("transfercorruption", [2 * MB], link=Link(corrupt_to_server=2, corrupt_to_client=2),
         short={"files": [500 * KB]}),
    Case("longrtt", [1 * KB], link=Link(delay_ms=750), checks=("handshakes", "version", "files", "two_client_hellos")),
    Case("goodput", [10 * MB], checks=("handshakes", "version", "files", "goodput"), short={"files": [2 * MB]}),
    Case("keyupdate", [3 * MB], key_update=True, checks=("handshakes", "version", "files", "key_update"),
         short={"files": [1 * MB]}),
    Case("blackhole", [10 * MB], link=Link(blackhole=(5, 2)), timeout_s=120, short={"files": [8 * MB]}),
    Case("amplificationlimit", [5 * KB], long_chain=True, link=Link(drops_to_server="2,3,4,5,6,7"),
         checks=("handshakes", "version", "files", "amplification")),
    Case("ecn", [100 * KB], checks=("handshakes", "version", "files", "ecn")),
    Case("rebind-port", [10 * MB], link=Link(rebind="port"), checks=("handshakes", "version", "files", "rebinding"),
         timeout_s=120, short={"files": [4 * MB]}),
    Case("rebind-addr", [10 * MB], link=Link(rebind="addr"),
         checks=("handshakes", "version", "files", "rebinding", "client_addresses"), timeout_s=120,
         short={"files": [4 * MB]}),
    Case("connectionmigration", [2 * MB], preferred_address=True,
         checks=("handshakes", "version", "files", "migration"), short={"files": [1 * MB]}),
    Case("crosstraffic", [25 * MB], cross_traffic=True, checks=("handshakes", "version", "files", "goodput"),
         timeout_s=180, short={"files": [3 * MB]}),
]}


def shortened(case: Case) -> Case:
    return dataclasses.replace(case, **case.short)


# ---------------------------------------------------------------------------------------------
# Helpers


def run(cmd, check=True, timeout=60, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: exit {r.returncode}: {r.stderr.strip()[-1500:]}")
    return r


def bin_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("STOQ_BIN_DIR", ROOT / ".build" / "debug"))


def tool(name) -> str:
    p = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if not p:
        raise RuntimeError(f"{name} is missing: scripts/install-deps installs it")
    return p


def impairer(build_dir: pathlib.Path) -> pathlib.Path:
    """scripts/impair/stoq-impair.c built into build_dir when missing or older than its source."""
    src = ROOT / "scripts" / "impair" / "stoq-impair.c"
    out = build_dir / "stoq-impair"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        build_dir.mkdir(parents=True, exist_ok=True)
        run(["cc", "-O2", "-Wall", "-o", out, src, "-lnetfilter_queue"])
    return out




def make_certs(out: pathlib.Path, chain_len: int, bulk=0):
    """A CA, `chain_len` intermediates (`bulk` 60-byte OUs each) and a leaf for SERVER_ADDR and
    "server": returns (ca.pem, chain.pem: leaf then intermediates, key.pem).

    amplificationlimit needs over 7500 bytes of server handshake: the runner gets there with a
    chain of 9 certificates, which stoq get refuses (its limit is 4, leaf to root: chainTooLong);
    here 2 intermediates with long names (10 KB with the leaf) get there within STOQ's limit."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(name, key, issuer_name, issuer_key, ca, san=None, bulk=0):
        # `bulk` organisational units of 60 bytes: a long chain's certificates, each about 1 KB.
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
        attrs += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"{i:02d}" + "x" * 58) for i in range(bulk)]
        b = (x509.CertificateBuilder().subject_name(x509.Name(attrs))
             .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = (b.add_extension(x509.SubjectAlternativeName(san), critical=False)
                 .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        return b.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "interop matrix CA")])
    ca = cert("interop matrix CA", ca_key, ca_name, ca_key, True)
    issuer, issuer_key, chain = ca, ca_key, []
    for i in range(chain_len):
        k = ec.generate_private_key(ec.SECP256R1())
        c = cert(f"interop matrix intermediate {i}", k, issuer.subject, issuer_key, True, bulk=bulk)
        chain.insert(0, c)
        issuer, issuer_key = c, k
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = cert("server", leaf_key, issuer.subject, issuer_key, False,
                [x509.DNSName("server"), x509.IPAddress(ipaddress.ip_address(SERVER_ADDR))])
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)
    (out / "ca.pem").write_bytes(pem(ca))
    (out / "chain.pem").write_bytes(pem(leaf) + b"".join(pem(c) for c in chain))
    (out / "key.pem").write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    os.chmod(out / "key.pem", 0o600)
    return out / "ca.pem", out / "chain.pem", out / "key.pem"


# ---------------------------------------------------------------------------------------------
# The testbed and its emulator


class Testbed:
    def __init__(self, work: pathlib.Path, prefix="iqm"):
        self.work = work
        self.cns, self.sns, self.vns = f"{prefix}-client", f"{prefix}-sim", f"{prefix}-server"
        self.procs = []
        self.threads_stop = threading.Event()
        self.threads = []

    def ns(self, which, *cmd):
        return ["ip", "netns", "exec", which, *map(str, cmd)]

    def sh(self, which, *cmd, check=True):
        return run(self.ns(which, *cmd), check=check)

    def up(self):
        self.down()
        for n in (self.cns, self.sns, self.vns):
            run(["ip", "netns", "add", n])
            self.sh(n, "ip", "link", "set", "lo", "up")
            self.sh(n, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0")
        run(["ip", "link", "add", "c0", "netns", self.cns, "type", "veth", "peer", "name", "sc", "netns", self.sns])
        run(["ip", "link", "add", "v0", "netns", self.vns, "type", "veth", "peer", "name", "sv", "netns", self.sns])
        self.sh(self.sns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        for n, dev, addr in ((self.cns, "c0", CLIENT_ADDR), (self.sns, "sc", CLIENT_GW),
                             (self.vns, "v0", SERVER_ADDR), (self.sns, "sv", SERVER_GW)):
            self.sh(n, "ip", "addr", "add", f"{addr}/64", "dev", dev, "nodad")
            self.sh(n, "ip", "link", "set", dev, "up")
            # One datagram a frame on the wire, as on a real link: the ends segment their GSO
            # batches, the sim merges nothing (the traces and the impairer see datagrams).
            self.sh(n, "ethtool", "-K", dev, "tx-udp-segmentation", "off", "gro", "off", check=False)
        self.sh(self.vns, "ip", "addr", "add", f"{PREFERRED_ADDR}/64", "dev", "v0", "nodad")
        self.sh(self.cns, "ip", "-6", "route", "add", "default", "via", CLIENT_GW)
        self.sh(self.vns, "ip", "-6", "route", "add", "default", "via", SERVER_GW)
        r = self.sh(self.cns, "ping", "-6", "-c", "1", "-W", "5", SERVER_ADDR, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"testbed: the client cannot reach {SERVER_ADDR}: {r.stdout}{r.stderr}")

    def down(self):
        for n in (self.cns, self.sns, self.vns):
            run(["ip", "netns", "del", n], check=False)

    def spawn(self, which, cmd, log, env=None):
        p = subprocess.Popen(self.ns(which, *cmd), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                             env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs.append(p)
        return p

    def emulate(self, link: Link, case_dir: pathlib.Path, seed: int):
        """Puts `link` on the sim: an impairer per direction, tbf on each egress, the blackhole,
        the rebinding NAT."""
        imp = impairer(self.work / "bin")
        ipt = "ip6tables-legacy"
        if link.rebind:
            # As a NAT does: nothing from the server passes unless it answers a mapping the
            # client made (else, once a mapping is forgotten, the server's next datagram would
            # make one back to the client's old port, and the rebinding would never happen).
            self.sh(self.sns, ipt, "-w", "-A", "FORWARD", "-i", "sv", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")
        for q, (inp, out, loss, corrupt, drops) in enumerate(
                [("sc", "sv", link.loss_to_server, link.corrupt_to_server, link.drops_to_server),
                 ("sv", "sc", link.loss_to_client, link.corrupt_to_client, "")], start=1):
            cmd = [imp, "--queue", q, "--delay-ms", link.delay_ms, "--loss", loss, "--corrupt", corrupt,
                   "--seed", seed * 2 + q]
            if drops:
                cmd += ["--drop", drops]
            p = self.spawn(self.sns, cmd, case_dir / f"impair-{out}.log")
            self.wait_log(case_dir / f"impair-{out}.log", "stoq-impair: queue", p)
            self.sh(self.sns, ipt, "-w", "-A", "FORWARD", "-i", inp, "-j", "NFQUEUE", "--queue-num", q)
            if link.rate_mbit:
                # The runner's queue is in packets of up to 1500 bytes; tbf's limit is in bytes.
                self.sh(self.sns, "tc", "qdisc", "replace", "dev", out, "root", "tbf", "rate",
                        f"{link.rate_mbit}mbit", "burst", 16000, "limit", link.queue_packets * 1500)
        if link.blackhole:
            on_s, off_s = link.blackhole

            def toggle():
                while not self.threads_stop.wait(on_s):
                    self.sh(self.sns, ipt, "-w", "-I", "FORWARD", "1", "-j", "DROP")
                    self.threads_stop.wait(off_s)
                    self.sh(self.sns, ipt, "-w", "-D", "FORWARD", "-j", "DROP", check=False)

            t = threading.Thread(target=toggle, daemon=True)
            t.start()
            self.threads.append(t)
        if link.rebind:
            rnd = random.Random(seed)

            def rebind():
                n = 0
                wait = link.rebind_first_s
                while not self.threads_stop.wait(wait):
                    # A NAT that forgets the client's mapping: a new source port (and address)
                    # for what it forwards to the server; the old one no longer reaches it.
                    n += 1
                    addr = f"fd00:c1::{0x100 + n:x}" if link.rebind == "addr" else CLIENT_ADDR
                    to = f"[{addr}]:{rnd.randrange(20000, 60000)}"
                    self.sh(self.sns, ipt, "-w", "-t", "nat", "-F", "POSTROUTING")
                    self.sh(self.sns, ipt, "-w", "-t", "nat", "-A", "POSTROUTING", "-o", "sv", "-p", "udp", "-s",
                            CLIENT_ADDR, "-j", "SNAT", "--to-source", to)
                    self.sh(self.sns, tool("conntrack"), "-D", "-f", "ipv6", "-p", "udp", check=False)
                    with open(case_dir / "rebind.log", "a") as f:
                        f.write(f"{time.monotonic():.3f} client now {to}\n")
                    wait = link.rebind_every_s

            t = threading.Thread(target=rebind, daemon=True)
            t.start()
            self.threads.append(t)

    def cross_traffic(self, case_dir: pathlib.Path, seconds: int):
        """An iperf3 TCP flow (cubic) from the server to the client through the sim."""
        p = self.spawn(self.vns, [tool("iperf3"), "-s", "-1", "--forceflush", "-B", SERVER_ADDR], case_dir / "iperf3-server.log")
        self.wait_log(case_dir / "iperf3-server.log", "Server listening", p)
        self.spawn(self.cns, [tool("iperf3"), "-c", SERVER_ADDR, "-R", "-C", "cubic", "-t", seconds],
                   case_dir / "iperf3-client.log")
        time.sleep(2)  # the TCP flow has its share of the link before the QUIC transfer starts

    def capture(self, case_dir: pathlib.Path):
        """dumpcap on both links at the sim: client.pcap (the client's side), server.pcap."""
        for dev, name in (("sc", "client"), ("sv", "server")):
            log = case_dir / f"dumpcap-{name}.log"
            p = self.spawn(self.sns, [tool("dumpcap"), "-q", "-i", dev, "-f", "udp", "-w", case_dir / f"{name}.pcap"],
                           log)
            self.wait_log(log, "Capturing on", p)

    @staticmethod
    def wait_log(log, text, proc, timeout=10):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in pathlib.Path(log).read_text(errors="replace"):
                return
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{proc.args}: never said '{text}': {pathlib.Path(log).read_text()[-800:]}")

    def reset(self):
        """Stops what the last case started and removes its emulation."""
        self.threads_stop.set()
        for t in self.threads:
            t.join(timeout=10)
        self.threads, self.threads_stop = [], threading.Event()
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        self.procs = []
        self.sh(self.sns, "ip6tables-legacy", "-w", "-F", "FORWARD", check=False)
        self.sh(self.sns, "ip6tables-legacy", "-w", "-t", "nat", "-F", "POSTROUTING", check=False)
        self.sh(self.sns, tool("conntrack"), "-F", check=False)
        for dev in ("sc", "sv"):
            self.sh(self.sns, "tc", "qdisc", "del", "dev", dev, "root", check=False)


# ---------------------------------------------------------------------------------------------
# Peers: how each implementation serves or fetches a case's files.


class Run:
    """One case between a server peer and a client peer: its directories and the shared keylog."""

    def __init__(self, case: Case, work: pathlib.Path):
        self.case = case
        self.dir = work
        self.www = work / "www"
        self.out = work / "download"
        self.keylog = work / "keys.log"
        self.qlog = work / "qlog"
        for d in (self.www, self.out, self.qlog):
            d.mkdir(parents=True, exist_ok=True)
        rnd = random.Random(case.name)  # the same files for a case in every run
        self.names = []
        for i, size in enumerate(case.files):
            name = f"{case.name}-{i}-{size}.bin"
            (self.www / name).write_bytes(rnd.randbytes(size))
            self.names.append(name)
        certs = make_certs(work / "certs", 2, bulk=32) if case.long_chain else make_certs(work / "certs", 0)
        self.ca, self.chain, self.key = certs


class StoqServer:
    name = "stoq"

    def path(self, name):
        return f"/objects/{name}"

    def start(self, tb: Testbed, r: Run):
        cfg = r.dir / "node.toml"
        # Offering a preferred address, it listens on every address (and answers from each).
        listen, preferred = (("::", f'preferred_address = "[{PREFERRED_ADDR}]:{PORT}"\n') if r.case.preferred_address
                             else (SERVER_ADDR, ""))
        cfg.write_text(
            f'[node]\ndata_dir = "{r.dir}/node-data"\n'
            f'[network]\nlisten_addr = "[{listen}]:{PORT}"\nworkers = 1\nretry = {str(r.case.retry).lower()}\n'
            f'{preferred}'
            # Its handshake timeout (10 s by default) is the case's, as for the other servers:
            # under the runner's 30 % loss a handshake can take longer, and the client's next
            # Initial would then make a second connection (two handshakes where one was made).
            # So is its idle timeout (30 s by default): under 30 % loss a client whose every copy of
            # HANDSHAKE_DONE was lost only resends its Handshake packets, which the server can no
            # longer read, so the server hears nothing; its own resends back off (1, 3, 6, 13,
            # 26 s) past 30 s, and it closed the connection with the file unsent (seen once in 50
            # handshakes; gtlsserver's 30 s idle timeout is as exposed).
            f'[network.quic_config]\nhandshake_timeout = "{r.case.timeout_s}s"\nidle_timeout = "{r.case.timeout_s}s"\n'
            f'[tls]\ncert_file = "{r.chain}"\nkey_file = "{r.key}"\n'
            f'[storage]\npath = "{r.www}"\ncontent_path = "{r.dir}/content"\n'
            f'[log]\nqlog_dir = "{r.qlog}"\n')
        p = tb.spawn(tb.vns, [bin_dir() / "stoq-node", "--config", cfg], r.dir / "server.log",
                     env={"SSLKEYLOGFILE": str(r.keylog)})
        tb.wait_log(r.dir / "server.log", "listening: ", p, timeout=30)


class GtlsServer:
    name = "ngtcp2"

    def path(self, name):
        return f"/{name}"

    def start(self, tb, r):
        cmd = [tool("gtlsserver"), "-q", "-d", r.www, "--qlog-dir", r.qlog, f"--handshake-timeout={r.case.timeout_s}s"]
        if r.case.retry:
            cmd.append("--validate-addr")
        if r.case.preferred_address:
            cmd.append(f"--preferred-ipv6-addr=[{PREFERRED_ADDR}]:{PORT}")
        p = tb.spawn(tb.vns, [*cmd, SERVER_ADDR, PORT, r.key, r.chain], r.dir / "server.log",
                     env={"SSLKEYLOGFILE": str(r.keylog)})
        wait_udp_listener(tb, p)


class AioquicServer:
    name = "aioquic"

    def path(self, name):
        return f"/{name}"

    def start(self, tb, r):
        cmd = [sys.executable, HERE / "aioquic_peer.py", "server", "--listen", SERVER_ADDR, "--port", PORT,
               "--www", r.www, "--cert", r.chain, "--key", r.key, "--keylog", r.keylog, "--qlog-dir", r.qlog]
        if r.case.retry:
            cmd.append("--retry")
        p = tb.spawn(tb.vns, cmd, r.dir / "server.log")
        tb.wait_log(r.dir / "server.log", "listening", p)


def wait_udp_listener(tb, proc, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if f":{PORT} " in tb.sh(tb.vns, "ss", "-Hnlu").stdout:
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args}: not listening on UDP {PORT}")


def connections(case, names):
    """The file names each client connection fetches, in order: the runner's resumption and
    0-RTT cases fetch the first file, then the rest on a second connection."""
    if case.mode == "multiconnect":
        return [[n] for n in names]
    if case.mode in ("resumption", "zerortt"):
        return [names[:1], names[1:]]
    return [names]


class StoqClient:
    name = "stoq"

    def commands(self, r: Run, server):
        env = {"SSLKEYLOGFILE": str(r.keylog), "XDG_CACHE_HOME": str(r.dir / "client-cache")}
        opts = ["--timeout", r.case.timeout_s, "--connect-timeout", min(r.case.timeout_s, 600)]
        if r.case.chacha20:
            opts += ["--cipher-suites", "CHACHA20-POLY1305"]
        if r.case.key_update:
            opts.append("--key-update")
        for names in connections(r.case, r.names):
            urls = [f"https://[{SERVER_ADDR}]:{PORT}{server.path(n)}" for n in names]
            out = r.out / names[0] if len(names) == 1 else f"{r.out}/"
            qlog = ["--qlog-dir", r.qlog] if len(urls) == 1 else []  # stoq get logs single transfers only
            yield [bin_dir() / "stoq", "get", *urls, "-o", out, "--ca", r.ca, *qlog, *opts], env


class GtlsClient:
    name = "ngtcp2"

    def commands(self, r, server):
        env = {"SSLKEYLOGFILE": str(r.keylog)}
        # Its handshake timeout is 10 s unless told (and it then exits 0 with nothing fetched):
        # the runner's loss cases need longer.
        opts = ["-q", "--exit-on-all-streams-close", f"--download={r.out}", f"--qlog-dir={r.qlog}",
                f"--timeout={r.case.timeout_s}s", f"--handshake-timeout={r.case.timeout_s}s"]
        if r.case.chacha20:
            # Its --ciphers is the first half of its GnuTLS priority string (the groups follow).
            opts.append("--ciphers=NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+CHACHA20-POLY1305")
        if r.case.key_update:
            opts.append("--key-update=100ms")
        if r.case.mode in ("resumption", "zerortt"):
            opts += [f"--session-file={r.dir / 'session.pem'}", f"--tp-file={r.dir / 'tp.txt'}"]
            if r.case.mode == "resumption":
                opts.append("--disable-early-data")
        for names in connections(r.case, r.names):
            urls = [f"https://[{SERVER_ADDR}]:{PORT}{server.path(n)}" for n in names]
            yield [tool("gtlsclient"), *opts, SERVER_ADDR, PORT, *urls], env


class AioquicClient:
    name = "aioquic"

    def commands(self, r, server):
        opts = ["--out", r.out, "--ca", r.ca, "--keylog", r.keylog, "--qlog-dir", r.qlog]
        if r.case.chacha20:
            opts.append("--chacha20")
        if r.case.key_update:
            opts.append("--key-update")
        if r.case.mode in ("resumption", "zerortt"):
            opts += ["--session-ticket", r.dir / "ticket.pickle"]
        for i, names in enumerate(connections(r.case, r.names)):
            urls = [f"https://[{SERVER_ADDR}]:{PORT}{server.path(n)}" for n in names]
            early = ["--early-data"] if r.case.mode == "zerortt" and i > 0 else []
            yield [sys.executable, HERE / "aioquic_peer.py", "client", *urls, *opts, *early], {}


SERVERS = {"stoq": StoqServer(), "ngtcp2": GtlsServer(), "aioquic": AioquicServer()}
CLIENTS = {"stoq": StoqClient(), "ngtcp2": GtlsClient(), "aioquic": AioquicClient()}
# Pairs: STOQ in each role against each other implementation.
PAIRS = [("stoq", "ngtcp2"), ("stoq", "aioquic"), ("ngtcp2", "stoq"), ("aioquic", "stoq")]  # (server, client)

# Where a case fails because of the peer itself (ngtcp2 0.12, aioquic): (case, server, client) ->
# the evidence. Such a pair is skipped with it.
_AIOQUIC_ECN = ("aioquic 1.7 has no ECN: its datagrams carry no ECT mark and its ACKs no ECN counts "
                "(capture of this case: 0 ECT-marked datagrams from aioquic, 0 ACK_ECN frames from it)")
KNOWN_PEER_FAILURES = {
    ("ecn", "stoq", "aioquic"): _AIOQUIC_ECN, ("ecn", "aioquic", "stoq"): _AIOQUIC_ECN,
    ("connectionmigration", "aioquic", "stoq"): (
        "aioquic 1.7 cannot offer a preferred_address as a server: its QuicConfiguration has no such setting "
        "(connection.py only reads the peer's, as a client)"),
}

# ngtcp2 0.12, the QUIC library under stoq-node and gtlsserver alike, answers an ack-eliciting
# datagram from a client's new (rebound) path with a bare ACK on that path at once and sends its
# PATH_CHALLENGE only 100-160 ms later; the runner wants the challenge first. Whether a case
# meets it depends on the client's first datagram there. A rebinding failure of exactly that
# kind with either of these servers is skipped with this evidence.
NGTCP2_ACK_BEFORE_CHALLENGE = (
    "ngtcp2 0.12 ACKs the client's first ack-eliciting datagram on the new path before its "
    "PATH_CHALLENGE: gtlsserver (no STOQ code) did the same in this testbed (rebind-port, frames "
    "954 ACK+PING in, 955 ACK out 0.13 ms later, 956 PATH_CHALLENGE 159 ms later), as does "
    "stoq-node (750 ACK, 753 PATH_CHALLENGE 98 ms later)")
# The datagram holds that ACK alone: ACK_ECN (0x03) to a client that reports ECN, ACK (0x02) to
# one that does not (aioquic).
ACK_BEFORE_CHALLENGE = ("frame types ['3'])", "frame types ['2'])")
NGTCP2_SERVERS = ("stoq", "ngtcp2")

# STOQ's own failures, found here and not fixed yet: (case, server, client) -> what fails.
# test_interop_matrix.py expects them to fail (strictly: a fix shows up as a test to update).
KNOWN_STOQ_FAILURES: dict[tuple[str, str, str], str] = {}


# ---------------------------------------------------------------------------------------------
# Traces: what tshark decodes from the captures, with the keys.


@dataclasses.dataclass
class QuicPacket:
    long_type: int  # 0 Initial, 1 0-RTT, 2 Handshake, 3 Retry; -1: a short header (1-RTT)
    scid: str
    version: str
    token_len: int
    key_phase: int
    length: int  # this packet's bytes (of its datagram)
    tree: dict  # tshark's decode of it


@dataclasses.dataclass
class Datagram:
    src: str
    dst: str
    sport: int
    dport: int
    ecn: int
    udp_payload: int
    packets: list


def walk(tree, key):
    """Every value under `key` anywhere in tshark's JSON tree (lists flattened)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key:
                if isinstance(v, list):
                    yield from v
                else:
                    yield v
            yield from walk(v, key)
    elif isinstance(tree, list):
        for v in tree:
            yield from walk(v, key)


def first(tree, key, default=None):
    return next(walk(tree, key), default)


def read_trace(pcap: pathlib.Path, keylog: pathlib.Path, display_filter="quic"):
    if not pcap.exists():
        return []
    prefs = ["-o", f"tls.keylog_file:{keylog}"] if keylog.exists() else []
    # -d: whatever the client's port, port 443 is QUIC (the client's random port once was
    # 37008, TZSP's, and tshark decoded that connection as TZSP: 49 handshakes seen of 50).
    r = run([tool("tshark"), "-n", "-r", pcap, *prefs, "-d", f"udp.port=={PORT},quic", "-Y", display_filter, "-T", "json", "--no-duplicate-keys",
             "-J", "ipv6 udp quic"], timeout=600)
    out = []
    for frame in json.loads(r.stdout or "[]"):
        layers = frame["_source"]["layers"]
        ip, udp = layers.get("ipv6", {}), layers.get("udp", {})
        quic = layers.get("quic", [])
        quic = quic if isinstance(quic, list) else [quic]
        pkts = []
        for q in quic:
            long_type = int(first(q, "quic.long.packet_type", -1))
            pkts.append(QuicPacket(long_type, first(q, "quic.scid", ""), first(q, "quic.version", ""),
                                   int(first(q, "quic.token_length", 0)),
                                   1 if first(q, "quic.key_phase", "0") in ("1", "True") else 0,
                                   int(first(q, "quic.packet_length", 0)), q))
        tclass = int(ip.get("ipv6.tclass", "0x0"), 16) if ip else 0
        out.append(Datagram(ip.get("ipv6.src", ""), ip.get("ipv6.dst", ""), int(udp.get("udp.srcport", 0)),
                            int(udp.get("udp.dstport", 0)), tclass & 3, int(udp.get("udp.length", 8)) - 8, pkts))
    return out


class Traces:
    def __init__(self, r: Run):
        self.r = r
        self._client = self._server = None

    @property
    def client(self):
        if self._client is None:
            self._client = read_trace(self.r.dir / "client.pcap", self.r.keylog)
        return self._client

    @property
    def server(self):
        if self._server is None:
            self._server = read_trace(self.r.dir / "server.pcap", self.r.keylog)
        return self._server


def from_server(d: Datagram):
    return d.sport == PORT


def packets(trace, long_type, server_sent):
    return [p for d in trace if from_server(d) == server_sent for p in d.packets if p.long_type == long_type]


# ---------------------------------------------------------------------------------------------
# Checks: each returns None when it holds, else what was wrong.


def check_handshakes(r, t):
    scids = {p.scid for p in packets(t.server, 0, True)}
    if len(scids) != r.case.handshakes:
        return f"expected {r.case.handshakes} handshake(s), the server's Initials show {len(scids)}"


def check_version(r, t):
    versions = {p.version for p in packets(t.server, 0, True)}
    if versions != {QUIC_V1}:
        return f"expected only QUIC version 1 in the server's Initials, got {sorted(versions)}"


def check_files(r, t):
    got = sorted(os.listdir(r.out))
    if got != sorted(r.names):
        missing = sorted(set(r.names) - set(got))
        extra = sorted(set(got) - set(r.names))
        return f"downloaded files differ: {len(missing)} missing (e.g. {missing[:3]}), unexpected {extra[:3]}"
    for n in r.names:
        if (r.out / n).stat().st_size != (r.www / n).stat().st_size or sha256_file(r.out / n) != sha256_file(r.www / n):
            return f"{n}: {(r.out / n).stat().st_size} bytes downloaded, not the {(r.www / n).stat().st_size} served"


def check_no_retry(r, t):
    if packets(t.client, 3, True):
        return "the server sent a Retry where none was asked for"


def check_retry(r, t):
    retries = packets(t.client, 3, True)
    if not retries:
        return "the server sent no Retry"
    if not [p for p in packets(t.server, 0, False) if p.token_len > 0]:
        return "no client Initial carried the Retry's token"


def check_chacha20(r, t):
    suites = {str(s) for p in packets(t.client, 0, True) for s in walk(p.tree, "tls.handshake.ciphersuite")}
    if suites not in ({"0x1303"}, {"4867"}):
        return f"expected the server to choose TLS_CHACHA20_POLY1305_SHA256 (0x1303), its ServerHello says {sorted(suites)}"


def check_stream_limit(r, t):
    limits = [int(v) for p in packets(t.client, 2, True) for v in walk(p.tree, "tls.quic.parameter.initial_max_streams_bidi")]
    if not limits:
        return "could not read the server's initial_max_streams_bidi (keys logged?)"
    if max(limits) > 1000:
        return f"the server set initial_max_streams_bidi {max(limits)} (> 1000: the runner wants it raised as streams end)"


def check_resumed(r, t):
    by_scid = {}
    for p in packets(t.client, 2, True):
        by_scid.setdefault(p.scid, []).append(p)
    if len(by_scid) != 2:
        return f"expected two handshakes' Handshake packets from the server, saw {len(by_scid)} connection(s)"
    first_c, second_c = list(by_scid.values())
    has_cert = lambda ps: any(next(walk(p.tree, "tls.handshake.certificates_length"), None) is not None for p in ps)
    if not has_cert(first_c):
        return "the first handshake has no Certificate (keys logged?)"
    if has_cert(second_c):
        return "the server sent a Certificate in the second handshake: it did not resume"


def check_zerortt(r, t):
    zero = sum(p.length for p in packets(t.client, 1, False))
    one = sum(p.length for p in packets(t.client, -1, False))
    if zero == 0:
        return "the client sent no 0-RTT packets"
    # The runner's bound: the 1-RTT bytes the client sends stay under half of the requests' paths.
    if one > 0.5 * 250 * 40:
        return f"the client sent {one} bytes in 1-RTT packets (0-RTT: {zero})"


def check_ipv6(r, t):
    if not t.server or any(":" not in d.src for d in t.server):
        return "the server's trace has datagrams that are not IPv6"


def check_two_client_hellos(r, t):
    n = 0
    for d in t.client:
        if not from_server(d) and d.packets and d.packets[0].long_type == 0:
            offsets = [int(o) for o in walk(d.packets[0].tree, "quic.crypto.offset")]
            n += 0 in offsets
    if n < 2:
        return f"expected at least 2 ClientHellos (the client's PTO under a 1.5 s RTT), saw {n}"


def check_key_update(r, t):
    c = sum(1 for d in t.client if not from_server(d) for p in d.packets if p.long_type == -1 and p.key_phase)
    s = sum(1 for d in t.server if from_server(d) for p in d.packets if p.long_type == -1 and p.key_phase)
    if c == 0 or s == 0:
        return f"expected key phase 1 packets from both ends: client sent {c}, server sent {s}"


def check_ecn(r, t):
    problems = []
    for who, trace, sent_by_server in (("client", t.client, False), ("server", t.server, True)):
        marks = [d.ecn for d in trace if from_server(d) == sent_by_server]
        if not any(m in (1, 2) for m in marks):
            problems.append(f"the {who} marked no datagram ECT(0)/ECT(1)")
        peer_acks = [d for d in trace if from_server(d) != sent_by_server
                     if next(walk([p.tree for p in d.packets], "quic.ack.ect0_count"), None) is not None]
        if not peer_acks:
            problems.append(f"the {'server' if who == 'client' else 'client'} sent no ACK_ECN frames")
    return "; ".join(problems) or None


def check_amplification(r, t):
    max_offset = 0
    for p in packets(t.server, 2, True):
        for off, ln in zip(walk(p.tree, "quic.crypto.offset"), walk(p.tree, "quic.crypto.length")):
            max_offset = max(max_offset, int(off) + int(ln))
    if max_offset < 7500:
        return f"the server sent only {max_offset} bytes of Handshake CRYPTO data (the long chain not used?)"
    allowed = 0
    for d in t.server:
        first_type = d.packets[0].long_type if d.packets else -2
        if not from_server(d):
            if first_type == 2:
                return None  # the client's Handshake packet validated its address
            if first_type == 0:
                allowed += 4 * d.udp_payload  # the runner's 3x, with its 4x tolerance
        else:
            allowed -= d.udp_payload
            if allowed < 0:
                return "the server sent more than 3-4x what the client had sent before address validation"
    return "the client never sent a Handshake packet"


def check_rebinding(r, t):
    """Each new path the server sees the client on starts with a PATH_CHALLENGE, and the client
    answers every challenge (the runner's rebind-port check)."""
    paths, last, challenges = set(), None, set()
    for d in t.server:
        if not from_server(d):
            continue
        cur = (d.src, d.sport, d.dst, d.dport)
        if last is None:
            last = cur
        elif cur != last and cur not in paths:
            paths.add(last)
            last = cur
            data = [v for p in d.packets for v in walk(p.tree, "quic.path_challenge.data")]
            if not data:
                kinds = sorted({v for p in d.packets for v in walk(p.tree, "quic.frame_type")})
                return (f"the server's first datagram to the client's new path {d.dst} port {d.dport} has no "
                        f"PATH_CHALLENGE (frame types {kinds})")
            challenges.update(data)
    if last is not None:
        paths.add(last)
    if len(paths) <= 1:
        return "the server saw the client on one path only (no rebinding happened?)"
    responses = {v for d in t.client if not from_server(d) for p in d.packets
                 for v in walk(p.tree, "quic.path_response.data")}
    if challenges - responses:
        return f"{len(challenges - responses)} of the server's {len(challenges)} PATH_CHALLENGEs got no PATH_RESPONSE"


def check_migration(r, t):
    """The runner's connectionmigration: the server offered PREFERRED_ADDR in its transport
    parameters, the client moved its 1-RTT packets there and stayed, and the server answered from
    it."""
    offered = {a for d in t.client if from_server(d) for p in d.packets
               for a in walk(p.tree, "tls.quic.parameter.preferred_address.ipv6address")}
    if PREFERRED_ADDR not in offered:
        return f"the server's transport parameters offer no preferred_address {PREFERRED_ADDR} (saw {sorted(offered)})"
    sent = [d for d in t.client if not from_server(d) and any(p.long_type == -1 for p in d.packets)]
    there = [d for d in sent if d.dst == PREFERRED_ADDR]
    if not there:
        return f"the client sent no 1-RTT packet to the preferred address (to {sorted({d.dst for d in sent})})"
    if sent[-1].dst != PREFERRED_ADDR:
        return f"the client moved back: its last 1-RTT datagram went to {sent[-1].dst}"
    if not any(from_server(d) and d.src == PREFERRED_ADDR for d in t.client):
        return "the server never answered from its preferred address"


def check_client_addresses(r, t):
    addrs = {d.dst for d in t.server if from_server(d)}
    if len(addrs) <= 1:
        return f"the server sent to one client address only ({sorted(addrs)})"


def check_impaired(r, t):
    """The emulator did what the case asked: the impairers' exit counters show datagrams
    dropped or corrupted in each direction that was to lose or corrupt some."""
    link = r.case.link
    for out, loss, corrupt in (("sv", link.loss_to_server or link.drops_to_server, link.corrupt_to_server),
                               ("sc", link.loss_to_client, link.corrupt_to_client)):
        log = r.dir / f"impair-{out}.log"
        stats = [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith('{"event":"exit"')]
        if not stats:
            return f"{log.name} has no exit counters"
        if loss and stats[-1]["dropped"] == 0:
            return f"{log.name}: no datagram dropped ({stats[-1]})"
        if corrupt and stats[-1]["corrupted"] == 0:
            return f"{log.name}: no datagram corrupted ({stats[-1]})"


def check_goodput(r, t):
    return None  # measured, not checked: run_case reports the transfer's kbit/s


CHECKS = {name[len("check_"):]: f for name, f in globals().items() if name.startswith("check_")}


# ---------------------------------------------------------------------------------------------
# Running one case


@dataclasses.dataclass
class Result:
    status: str  # pass | fail | skip | not-implemented
    reason: str = ""
    seconds: float = 0
    dir: str = ""


def client_error(log: pathlib.Path) -> str:
    """What a failed client said: its first line naming an error (the rest often repeat it for
    each URL), else its last lines."""
    lines = log.read_text(errors="replace").strip().splitlines()
    marks = ("ERR_", "error", "Error", "cannot", "failed", "refused", "timed out")
    hit = next((ln for ln in lines if any(m in ln for m in marks)), None)
    count = sum(1 for ln in lines if any(m in ln for m in marks))
    if hit:
        hit = hit[hit.find("stoq: "):] if "stoq: " in hit else hit  # stoq get's stdout may share the line
        return hit[-300:] + (f" (and {count - 1} more such lines)" if count > 1 else "")
    return " | ".join(lines[-3:])[-300:]


def run_case(tb: Testbed, case: Case, server: str, client: str, work: pathlib.Path, seed=1) -> Result:
    srv, cli = SERVERS[server], CLIENTS[client]
    if case.not_implemented:
        return Result("not-implemented", case.not_implemented)
    known = KNOWN_PEER_FAILURES.get((case.name, server, client))
    if known:
        return Result("skip", known)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    r = Run(case, work)
    tb.reset()
    started = time.time()
    try:
        tb.capture(work)
        tb.emulate(case.link, work, seed)
        srv.start(tb, r)
        if case.cross_traffic:
            tb.cross_traffic(work, case.timeout_s)
        t0 = time.monotonic()
        for i, (cmd, env) in enumerate(cli.commands(r, srv)):
            log = work / f"client-{i}.log"
            with open(log, "w") as f:
                p = subprocess.run(tb.ns(tb.cns, *cmd), stdout=f, stderr=subprocess.STDOUT,
                                   env={**os.environ, **env}, timeout=case.timeout_s + 30)
            if p.returncode != 0:
                return Result("fail", f"client exit {p.returncode} on connection {i + 1}: {client_error(log)}",
                              time.time() - started, str(work))
        elapsed = time.monotonic() - t0
        time.sleep(0.3)  # the last datagrams reach the captures
    except subprocess.TimeoutExpired:
        return Result("fail", f"client did not finish in {case.timeout_s + 30} s", time.time() - started, str(work))
    except RuntimeError as e:
        return Result("fail", f"setup: {e}", time.time() - started, str(work))
    finally:
        tb.reset()
    t = Traces(r)
    for name in ("impaired", *case.checks):
        problem = CHECKS[name](r, t)
        if problem and name == "rebinding" and server in NGTCP2_SERVERS and problem.endswith(ACK_BEFORE_CHALLENGE):
            return Result("skip", f"{NGTCP2_ACK_BEFORE_CHALLENGE} (here: {problem})", time.time() - started, str(work))
        if problem:
            return Result("fail", f"{name}: {problem}", time.time() - started, str(work))
    known = KNOWN_STOQ_FAILURES.get((case.name, server, client))
    if known:
        note = f"(listed in KNOWN_STOQ_FAILURES: {known})"
        return Result("pass", note, time.time() - started, str(work))
    note = ""
    if "goodput" in case.checks:
        note = f"{8 * sum(case.files) / elapsed / 1000:.0f} kbit/s"
    return Result("pass", note, time.time() - started, str(work))
