"""Fixtures for STOQ's integration tests: a real stoq-node on real sockets, and the
real peers (ngtcp2's gtlsclient/gtlsserver, aioquic) talking to it."""
import atexit
import hashlib
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# `stoq get` keeps TLS sessions under $XDG_CACHE_HOME/stoq: the tests' go to a directory of their
# own, never the user's cache, removed when the run ends (tests that need a cache of their own
# still set one).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="stoq-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
SIZES = [0, 1, 1200, 65536, (1 << 20) + 7, 16 << 20, 256 << 20]


def bin_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("STOQ_BIN_DIR", ROOT / ".build" / "debug"))


def need_binary(name: str) -> pathlib.Path:
    p = bin_dir() / name
    if not p.exists():
        pytest.skip(f"{name} not built at {p}: run `swift build` first (scripts/test does)")
    return p


def free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


def part_file(out):
    """Where a plain `stoq get -o OUT` writes the body before renaming it over OUT
    (`OUT.XXXXXX.part`, a name of its own), or None when there is none."""
    out = pathlib.Path(out)
    found = sorted(out.parent.glob(out.name + ".??????.part"))
    return found[0] if found else None


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# Each running node's operator token by port: `stoq()` presents it to the node a command names
# (as `stoq` itself does for a node on this machine whose data_dir is ./stoq-data).
TOKENS = {}


def read_banner(node, timeout=30):
    """Reads what stoq-node prints once it serves (trust:, certificate:, admin:, listening:)
    into node.cert, node.identity_cert, node.admin; kills it and raises with its log if it
    does not get there."""
    node.cert = node.identity_cert = node.admin = node.token_file = None
    keys = {"trust": "cert", "certificate": "identity_cert", "admin": "admin", "operator token": "token_file"}
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = node.proc.stdout.readline()
        if not line:
            break
        key, _, value = line.partition(": ")
        if key in keys:
            setattr(node, keys[key], value.strip())
        if key == "listening":
            if node.token_file:
                node.token = pathlib.Path(node.token_file).read_text().strip()
                node.auth = f"authorization: Bearer {node.token}"
                TOKENS[str(getattr(node, "port", ""))] = node.token
            return
    node.proc.kill()
    node.log.flush()
    node.log.seek(0)
    raise RuntimeError(f"stoq-node did not start: {node.log.read()[-2000:]}")


def stop_node(proc) -> int:
    """SIGTERM, then the exit code; -999 (after SIGKILL) when it takes over 15 s to drain."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return -999


class Node:
    def __init__(self, workdir: pathlib.Path, workers: int = 2, extra: str = "", listen: str = "::1", storage: str = ""):
        """`extra` goes after [network]'s keys (its own keys, or whole sections); `storage`, into [storage]."""
        self.workdir = workdir
        self.port = free_port()
        self.storage = workdir / "objects"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "node.toml"
        self.config.write_text(
            f'[node]\ndata_dir = "{workdir}/data"\n[network]\nlisten_addr = "[{listen}]:{self.port}"\n'
            f'workers = {workers}\n{extra}\n[storage]\npath = "{self.storage}"\ncontent_path = "{workdir}/content"\n{storage}')
        self.content = workdir / "content"
        self.log = open(workdir / "node.log", "w+")
        self.proc = subprocess.Popen([str(need_binary("stoq-node")), "--config", str(self.config)],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        read_banner(self)

    def url(self, name: str) -> str:
        return f"https://[::1]:{self.port}/objects/{name}"

    def add_object(self, name: str, size: int) -> str:
        path = self.storage / name
        with open(path, "wb") as f:
            left = size
            while left > 0:
                n = min(left, 1 << 20)
                f.write(os.urandom(n))
                left -= n
        return sha256_file(path)

    def stop(self) -> int:
        return stop_node(self.proc)


@pytest.fixture(scope="session")
def node(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("node"))
    n.digests = {f"obj-{s}.bin": n.add_object(f"obj-{s}.bin", s) for s in SIZES}
    yield n
    code = n.stop()
    assert code == 0, f"stoq-node did not exit cleanly on SIGTERM (exit {code})"


def run(cmd, timeout=180, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def writer_token(node, subject):
    """A writer token for every path, issued with the node's key as an operator would
    (`stoq trust token`, docs/access.md): the node knows its holder as `token:<subject>`."""
    key = node.workdir / "data" / "access" / "token-key.pem"
    r = run([need_binary("stoq"), "trust", "token", "--key", key, "--subject", subject, "--role", "writer", "--lifetime", "1h"])
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def stoq(*args, timeout=180, env=None, token=True, cwd=None, stdin=None):
    """The stoq CLI; `env` adds variables to this environment. Unless `token` is False or the
    command brings its own credential, it presents (as $STOQ_TOKEN) the operator token of the
    test node whose port the command's URL names: writes need a credential (docs/access.md)."""
    env = dict(env or {})
    flat = [str(a) for a in args]
    if token and "STOQ_TOKEN" not in env and not any(a in ("--token", "--token-file") for a in flat):
        for a in flat:
            m = re.match(r"https://\[[^]]+\]:(\d+)/", a)
            if m and m.group(1) in TOKENS:
                env["STOQ_TOKEN"] = TOKENS[m.group(1)]
                break
    return run([need_binary("stoq"), *args], timeout=timeout, env={**os.environ, **env} if env else None, cwd=cwd,
               stdin=stdin)


def random_file(path, size, seed):
    """`size` bytes of seeded pseudo-random data at `path` (the same bytes for the same seed)."""
    rnd = __import__("random").Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 << 20)
            f.write(rnd.randbytes(n))
            left -= n
    return path


def summed_counters(node, names):
    """The node's /metrics samples of each counter in `names`, summed over their labels (workers)."""
    with urllib.request.urlopen(node.admin, timeout=10) as r:
        text = r.read().decode()
    return {name: sum(int(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\d+)$", text, re.M)) for name in names}


def plain_cuts(node):
    """What the node's cutter of plain files did, from /metrics (None: the node cuts none)."""
    with urllib.request.urlopen(node.admin, timeout=10) as r:
        text = r.read().decode()

    def sample(name, outcome):
        m = re.search(rf'^{name}{{outcome="{outcome}"}} (\d+)$', text, re.M)
        return int(m.group(1)) if m else None
    return {"cut": sample("stoq_content_plain_cuts_total", "cut"), "failed": sample("stoq_content_plain_cuts_total", "failed"),
            "served": sample("stoq_content_plain_chunks_total", "served"), "stale": sample("stoq_content_plain_chunks_total", "stale")}


def metric_totals(node):
    """Every sample on the node's /metrics, summed over its labels: name -> total."""
    with urllib.request.urlopen(node.admin, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for name, value in re.findall(r"^([a-z_]+)(?:\{[^}]*\})? (\d+)$", text, re.M):
        out[name] = out.get(name, 0) + int(value)
    return out


def settled(read, timeout=20):
    """What `read()` returns once it stops moving: workers publish their counters about once a
    second, so what an earlier test did can still show up a second later; two equal readings
    1.2 s apart mean every worker has published everything it has seen."""
    deadline = time.time() + timeout
    last = read()
    while time.time() < deadline:
        time.sleep(1.2)
        now = read()
        if now == last:
            return now
        last = now
    return last


def veth_namespaces(node_ns, node_if, node_addrs, client_ns, client_if, client_addr):
    """Two network namespaces joined by a veth pair: `node_addrs` (a /64 each) on the node's
    side, `client_addr` on the client's, both links up. Any half-made state is removed before
    a failure is raised; the caller deletes the namespaces when done (`ip netns del`)."""
    if shutil.which("ip") is None:
        pytest.fail("iproute2 missing: scripts/install-deps installs it")

    def must(cmd):
        r = run(cmd)
        assert r.returncode == 0, f"{cmd}: {r.stderr}"

    for ns in (node_ns, client_ns):
        run(["ip", "netns", "del", ns])
    try:
        for ns in (node_ns, client_ns):
            must(["ip", "netns", "add", ns])
        must(["ip", "link", "add", node_if, "type", "veth", "peer", "name", client_if])
        must(["ip", "link", "set", node_if, "netns", node_ns])
        must(["ip", "link", "set", client_if, "netns", client_ns])
        for a in node_addrs:  # nodad: usable at once, no duplicate address detection to wait for
            must(["ip", "-n", node_ns, "addr", "add", f"{a}/64", "dev", node_if, "nodad"])
        must(["ip", "-n", client_ns, "addr", "add", f"{client_addr}/64", "dev", client_if, "nodad"])
        for ns, dev in ((node_ns, node_if), (client_ns, client_if)):
            must(["ip", "-n", ns, "link", "set", "lo", "up"])
            must(["ip", "-n", ns, "link", "set", dev, "up"])
    except BaseException:
        for ns in (node_ns, client_ns):
            run(["ip", "netns", "del", ns])
        raise
