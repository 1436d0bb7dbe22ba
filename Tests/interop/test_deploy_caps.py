"""The least capabilities stoq-node needs on AF_XDP (deploy/capabilities, the list the systemd
unit and the DaemonSet grant): the node runs as a non-root user (65534) with exactly those, in
ambient, inheritable and bounding sets alike (setpriv), with bpffs mounted read-only (as
ProtectKernelTunables= leaves it) and an 8 MiB memlock limit (the kernel's default), on native
XDP on the veth testbed, and serves a GET; without any one of them it exits, naming it."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

import pytest

from conftest import ROOT, need_binary, read_banner, run, sha256_file
from xdp_testbed import ADDR_A, PORT, VA, in_a, in_b, needs_root

pytestmark = needs_root

UID = 65534  # nobody: owns nothing on the host but what the test gives it
PINS = pathlib.Path("/sys/fs/bpf/stoq") / VA


def listed_capabilities():
    """deploy/capabilities: one capability a line, then why; '#' starts a comment."""
    caps = []
    for line in (ROOT / "deploy/capabilities").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            caps.append(line.split()[0])
    assert caps and all(re.fullmatch(r"CAP_[A-Z_]+", c) for c in caps), caps
    return caps


CAPS = listed_capabilities()


@pytest.fixture(scope="module")
def attached():
    for tool in ("nsenter", "bpftool", "setpriv", "prlimit", "unshare"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: scripts/install-deps installs it")
    r = run([ROOT / "scripts/testbed", "up", "--xdp", "--queues", "2"])
    assert r.returncode == 0, r.stderr
    r = run(in_a(ROOT / "scripts/xdp-attach", VA, "--mode", "native", "--ports", PORT, "--owner", f"{UID}:{UID}"))
    assert r.returncode == 0, r.stderr
    assert f"owned by {UID}:{UID}" in r.stdout, r.stdout
    work = pathlib.Path(tempfile.mkdtemp(prefix="stoq-caps-"))  # not under pytest's root-only tmp
    (work / "objects").mkdir()
    (work / "objects" / "probe.bin").write_bytes(os.urandom(300_000))
    (work / "node.toml").write_text(
        f'[node]\ndata_dir = "{work}/data"\n[network]\nlisten_addr = "[{ADDR_A}]:{PORT}"\n'
        f'datapath = "af_xdp"\ninterface = "{VA}"\nxdp_mode = "native"\n'
        f'[storage]\npath = "{work}/objects"\ncontent_path = "{work}/content"\n[admin]\nlisten = "[::1]:0"\n')
    for p in [work, *work.rglob("*")]:
        os.chown(p, UID, UID)
    yield work
    shutil.rmtree(work, ignore_errors=True)
    run(in_a(ROOT / "scripts/xdp-attach", "--detach", VA))
    run([ROOT / "scripts/testbed", "down"])


class ConfinedNode:
    """stoq-node as uid 65534 with exactly `caps`, in the testbed's server namespace."""

    def __init__(self, work, caps, seccomp_profile=None, config="node.toml"):
        sets = ",".join(["-all"] + ["+" + c.removeprefix("CAP_").lower() for c in caps])
        # Under the profile, as a runtime applies it: last, just before the node's execve.
        confine = ["/usr/bin/python3", ROOT / "Tests/interop/seccomp_exec.py", seccomp_profile, "--"] if seccomp_profile else []
        cmd = in_a(
            "unshare", "-m", "--propagation", "private", "sh", "-c",
            'mount -o remount,bind,ro /sys/fs/bpf && exec "$@"', "sh",
            "prlimit", "--memlock=8388608",
            "setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--no-new-privs",
            f"--inh-caps={sets}", f"--ambient-caps={sets}", f"--bounding-set={sets}", "--", *confine,
            need_binary("stoq-node"), "--config", work / config, "--log-level", "info")
        self.logpath = work / f"node-{len(caps)}-{'-'.join(caps) or 'none'}-{config}.log"
        self.log = open(self.logpath, "w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def text(self):
        self.log.flush()
        return self.logpath.read_text()

    def stop(self):
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -999


def capability_names(mask):
    """Names of the capabilities set in a /proc/PID/status mask (capsh decodes it)."""
    r = run(["capsh", f"--decode={mask}"])
    assert r.returncode == 0, r.stderr
    names = r.stdout.strip().split("=", 1)[1]
    return sorted(n.upper() for n in names.split(",") if n)


def test_the_list_is_what_the_unit_grants():
    unit = (ROOT / "deploy/systemd/stoq-node.service").read_text()
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        m = re.search(rf"^{key}=(.*)$", unit, re.M)
        assert m and sorted(m.group(1).split()) == sorted(CAPS), (key, m and m.group(1), CAPS)


def seccomp_profile_file(work):
    """The DaemonSet's seccomp profile (the unit's SystemCallFilter=, expanded) as a JSON file."""
    import yaml
    doc = yaml.safe_load((ROOT / "deploy/kubernetes/seccomp.yaml").read_text())
    path = work / "seccomp.json"
    path.write_text(doc["data"]["stoq-node.json"])
    os.chmod(path, 0o644)
    return path


@pytest.mark.parametrize("syscalls", ["any", "unit-filter"])
def test_serves_on_af_xdp_with_exactly_the_listed_capabilities(attached, tmp_path, syscalls):
    """…and, with "unit-filter", under the system call allow list the unit and the DaemonSet
    give it (deploy/kubernetes/seccomp.yaml), loaded by libseccomp's Python bindings."""
    profile = None
    if syscalls == "unit-filter":
        if subprocess.run(["/usr/bin/python3", "-c", "import seccomp"], capture_output=True).returncode != 0:
            pytest.fail("python3-seccomp missing: scripts/install-deps installs it")
        profile = seccomp_profile_file(attached)
    node = ConfinedNode(attached, CAPS, profile)
    try:
        read_banner(node)
        status = pathlib.Path(f"/proc/{node.proc.pid}/status").read_text()
        fields = dict(re.findall(r"^(\w+):\s+(.*)$", status, re.M))
        assert fields["Uid"].split() == [str(UID)] * 4, fields["Uid"]
        for field in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
            assert capability_names(fields[field]) == sorted(CAPS), (field, fields[field])
        assert fields["Seccomp"] == ("2" if profile else "0"), fields["Seccomp"]
        assert fields["NoNewPrivs"] == "1"
        assert f"datapath af_xdp: {VA}, 2 queue(s), XDP native" in node.text(), node.text()[-2000:]
        out = tmp_path / "probe.bin"
        r = run(in_b(need_binary("stoq"), "get", f"https://[{ADDR_A}]:{PORT}/objects/probe.bin", "-o", out,
                     "--ca", node.cert, "--json"), timeout=60)
        assert r.returncode == 0, r.stderr[-2000:] + node.text()[-2000:]
        assert json.loads(r.stdout)["status"] == 200
        assert sha256_file(out) == sha256_file(attached / "objects" / "probe.bin")
    finally:
        code = node.stop()
    assert code == 0, f"stoq-node did not exit cleanly on SIGTERM (exit {code}): {node.text()[-2000:]}"


def confined_config(work, name, network):
    """work/name: node.toml with `network` instead of its [network] lines, owned by the node's user."""
    text = (work / "node.toml").read_text()
    head, rest = text.split("[network]\n", 1)
    path = work / name
    path.write_text(head + "[network]\n" + network + rest[rest.index("[storage]"):])
    os.chown(path, UID, UID)
    return name


def test_busy_polling_the_kernel_refuses_is_said(attached):
    """busy_poll_usec asks for options the kernel grants only with CAP_NET_ADMIN: the node
    runs on interrupts and says so once (it set them without looking)."""
    name = confined_config(attached, "node-busy.toml",
                           f'listen_addr = "[{ADDR_A}]:{PORT}"\ndatapath = "af_xdp"\ninterface = "{VA}"\n'
                           f'xdp_mode = "native"\n[network.xdp]\nbusy_poll_usec = 50\n')
    node = ConfinedNode(attached, CAPS, config=name)
    try:
        read_banner(node)
        log = node.text()
        said = [line for line in log.splitlines() if "busy_poll_usec = 50 is not in effect" in line]
        assert len(said) == 1, log[-2000:]
        assert "setsockopt(SO_PREFER_BUSY_POLL): Operation not permitted (needs CAP_NET_ADMIN)" in said[0], said
    finally:
        assert node.stop() == 0, node.text()[-2000:]


def test_capped_socket_buffers_are_said(attached):
    """On io_uring the node asks for 32 MiB socket buffers; without CAP_NET_ADMIN
    net.core.rmem_max / wmem_max cap them without an error: the node says so once a process
    (two workers, one line), naming the sysctls."""
    def sysctl(k, v=None):
        path = f"/proc/sys/net/core/{k}"
        return int(run(in_a("cat", path)).stdout) if v is None else run(in_a("sh", "-c", f"echo {v} > {path}"))

    keys = ("rmem_max", "wmem_max")
    before = {k: sysctl(k) for k in keys}
    # A host prepared as docs/deployment.md says (90-stoq.conf) caps nothing: cap the receive
    # side here for the test, and put it back after.
    if before["rmem_max"] >= 32 << 20:
        sysctl("rmem_max", 4 << 20)
    caps = {k: sysctl(k) for k in keys}
    name = confined_config(attached, "node-uring.toml",
                           f'listen_addr = "[{ADDR_A}]:{int(PORT) + 1}"\ndatapath = "io_uring"\nworkers = 2\n')
    node = ConfinedNode(attached, CAPS, config=name)
    try:
        read_banner(node)
        log = node.text()
        said = [line for line in log.splitlines() if "io_uring socket buffers: asked for 33554432 bytes" in line]
        assert len(said) == 1, log[-2000:]
        for k, v in caps.items():
            assert (f"raise net.core.{k}" in said[0]) == (v < 32 << 20), said
    finally:
        assert node.stop() == 0, node.text()[-2000:]
        for k, v in before.items():
            if sysctl(k) != v:
                sysctl(k, v)


@pytest.mark.parametrize("missing", CAPS)
def test_without_each_capability_the_node_names_it(attached, missing):
    node = ConfinedNode(attached, [c for c in CAPS if c != missing])
    try:
        code = node.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        node.stop()
        pytest.fail(f"stoq-node without {missing} kept running: {node.text()[-2000:]}")
    log = node.text()
    assert code != 0, log[-2000:]
    failure = [line for line in log.splitlines() if line.startswith("stoq-node: ")]
    assert failure and f"needs {missing}" in failure[-1], log[-2000:]


def test_maps_pinned_for_root_only_are_named(attached):
    """Without xdp-attach --owner the node's user cannot open the maps; it says whose they are."""
    subprocess.run(["chown", "-R", "0:0", PINS], check=True)
    try:
        node = ConfinedNode(attached, CAPS)
        code = node.proc.wait(timeout=60)
    finally:
        subprocess.run(["chown", "-R", f"{UID}:{UID}", PINS], check=True)
    assert code != 0
    assert "the pinned maps belong to another user: scripts/xdp-attach --owner USER" in node.text(), node.text()[-2000:]
