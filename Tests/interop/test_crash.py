"""Crash safety end to end (#15 item 6): `kill -9` of a node while it stores plain uploads,
chunked uploads and edge fills, and of a mesh relay while it relays, 20 times each by default
(STOQ_CRASH_ROUNDS, STOQ_CRASH_RELAY_ROUNDS) at random moments. After every restart: every upload
the node acknowledged is there and byte-identical, an upload it did not acknowledge is either
absent or whole (never partial), no temporary file is visible as an object, every stored chunk
verifies against its name, and what the edge or the relay was fetching is served
byte-identical again."""
import hashlib
import json
import os
import pathlib
import random
import subprocess
import time

import pytest

from conftest import Node, need_binary, random_file, sha256_file, stoq
from test_mesh_testbed import MESH, Mesh, mesh, state, testbed, topology  # noqa: F401  (fixtures)

MiB = 1 << 20
ROUNDS = int(os.environ.get("STOQ_CRASH_ROUNDS", "20"))
# A relay round takes ~20 s (the restarted relay must be seen up and routed through again).
# scripts/test runs fewer of both; the full 20 is the default here.
RELAY_ROUNDS = int(os.environ.get("STOQ_CRASH_RELAY_ROUNDS", str(ROUNDS)))
ADMIN = '[admin]\nlisten = "[::1]:0"\n'


def client(node, *args):
    """A `stoq` client process against `node` as its operator, started now (it is killed or
    finishes later)."""
    return subprocess.Popen([str(need_binary("stoq")), *map(str, args), "--ca", node.cert, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, STOQ_TOKEN=node.token))


def outcome(proc):
    """The JSON a client printed, or None when it failed (connection lost, 5xx…). The node is
    dead by now: a client that has not had its answer within two seconds never will."""
    try:
        out, _ = proc.communicate(timeout=2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None
    if proc.returncode != 0:
        return None
    try:
        return json.loads(out)
    except ValueError:
        return None


def chunk_files(content):
    """Every chunk file under a content path: the store's (content/chunks/ab/cd/<64 hex>) and
    the edge cache's (content/edge/…, the same layout), which also keeps what a relay relays."""
    return [p for p in content.rglob("*") if p.is_file() and p.parent.parent.parent.name == "chunks"
            and len(p.name) == 64 and all(c in "0123456789abcdef" for c in p.name)]


def assert_chunks_verify(content, when):
    for path in chunk_files(content):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, f"{when}: chunk {path} does not verify"


def test_kill_9_during_uploads_and_edge_fills_loses_nothing_acknowledged(tmp_path):
    origin = Node(tmp_path / "origin", workers=1, extra=ADMIN)
    sources = tmp_path / "src"
    sources.mkdir()
    # What the edge fills from: chunked objects on the origin.
    fills = {}
    for i in range(3):
        src = random_file(sources / f"fill-{i}.bin", 6 * MiB, 100 + i)
        r = stoq("put", src, origin.url(f"fill-{i}"), "--chunked", "--ca", origin.cert, "--json")
        assert r.returncode == 0, r.stderr
        fills[f"fill-{i}"] = sha256_file(src)
    edge_dir = tmp_path / "edge"
    edge_extra = (ADMIN + f'[trust]\nbundle = "{origin.cert}"\n[edge]\nenable_caching = true\n'
                  f'origin = "https://[::1]:{origin.port}"\ncache_size = "256MB"\n')
    rng = random.Random(int(os.environ.get("STOQ_CRASH_SEED", "15")))
    acknowledged, attempted = {}, {}
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    checked = set()
    edge = Node(edge_dir, workers=2, extra=edge_extra)
    try:
        for round in range(ROUNDS):
            procs = []
            for j in range(3):
                name = f"plain-{round}-{j}"
                src = random_file(sources / name, rng.choice([64 * 1024, 2 * MiB, 8 * MiB]), rng.getrandbits(32))
                attempted[name] = sha256_file(src)
                procs.append((name, client(edge, "put", src, edge.url(name))))
            for j in range(2):
                name = f"chunked-{round}-{j}"
                src = random_file(sources / name, rng.choice([3 * MiB, 9 * MiB]), rng.getrandbits(32))
                attempted[name] = sha256_file(src)
                procs.append((name, client(edge, "put", src, edge.url(name), "--chunked")))
            fill = rng.choice(sorted(fills))
            procs.append((None, client(edge, "get", edge.url(fill), "-o", fetched / f"{fill}-{round}", "--timeout", "20")))
            time.sleep(rng.uniform(0.05, 1.5))
            edge.proc.kill()
            edge.proc.wait()
            edge.log.close()
            for name, p in procs:
                got = outcome(p)
                if name and got is not None and got.get("status") in (200, 201):
                    acknowledged[name] = attempted[name]

            # Restarted on the same directories. This round's uploads, and everything
            # acknowledged in any round (all of it after the last kill, a sample before).
            edge = Node(edge_dir, workers=2, extra=edge_extra)
            earlier = sorted(set(acknowledged) - {n for n in attempted if n.split("-")[1] == str(round)})
            sample = earlier if round == ROUNDS - 1 else rng.sample(earlier, min(4, len(earlier)))
            for name in [n for n in attempted if n.split("-")[1] == str(round)] + sample:
                out = fetched / f"check-{name}"
                r = stoq("get", edge.url(name), "-o", out, "--ca", edge.cert, "--json", "--timeout", "30")
                if name in acknowledged:
                    assert r.returncode == 0, f"round {round}: acknowledged {name} lost: {r.stderr}"
                if r.returncode == 0:
                    # Present: then whole and exactly what was sent, never a prefix.
                    assert sha256_file(out) == attempted[name], f"round {round}: {name} is not what was uploaded"
                else:
                    assert "404" in r.stderr, f"round {round}: {name} neither whole nor absent: {r.stderr}"
                checked.add(name)
                out.unlink(missing_ok=True)
            for name in os.listdir(edge.storage):
                assert name in attempted, f"round {round}: {name} visible in the object directory"
            assert_chunks_verify(edge.content, f"round {round}")
            # The fill the kill interrupted completes, byte-identical.
            r = stoq("get", edge.url(fill), "-o", fetched / "refill", "--ca", edge.cert, "--timeout", "60")
            assert r.returncode == 0, r.stderr
            assert sha256_file(fetched / "refill") == fills[fill]
        assert edge.stop() == 0
        print(f"{ROUNDS} kills: {len(acknowledged)} of {len(attempted)} uploads acknowledged, all intact; "
              f"{len(chunk_files(edge_dir / 'content'))} chunks verified")
        # Random moments must include some mid-upload: otherwise the test proves nothing.
        assert len(acknowledged) < len(attempted), "every upload finished before its kill: no kill hit a write"
        assert acknowledged, "no upload was ever acknowledged"
    finally:
        if edge.proc.poll() is None:
            edge.proc.kill()
        origin.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the mesh testbed needs root (network namespaces)")
def test_kill_9_of_a_relay_mid_fetch_leaves_its_store_whole(tmp_path, state):
    """Line 1-2-3: node 3 fetches objects node 1 holds, every chunk relayed (and kept) by node
    2, which is killed mid-fetch and started again."""
    mesh("up", "--topology", topology(tmp_path, "a,b,rate_mbit,delay_ms,loss_pct\n1,2,200,1,0\n2,3,200,1,0\n"),
         state=state)
    m = Mesh(state)
    m.converge([(3, 1)])
    rng = random.Random(int(os.environ.get("STOQ_CRASH_SEED", "15")))
    env = dict(os.environ, STOQ_MESH_STATE=str(state))
    relay_store = state / "node2" / "data" / "content"
    kept = hit = 0
    recovery = []
    for round in range(RELAY_ROUNDS):
        src = random_file(tmp_path / f"r{round}", rng.choice([6, 12]) << 20, rng.getrandbits(32))
        m.run(1, "stoq", "put", "--chunked", "--ca", m.ca, src, f"{m.urls[1]}/objects/r{round}")
        out = tmp_path / f"r{round}.out"
        fetch = subprocess.Popen([str(MESH), "exec", "3", str(need_binary("stoq")), "get", "--ca", m.ca, "--json",
                                  f"{m.urls[3]}/objects/r{round}", "-o", str(tmp_path / "first"), "--timeout", "20"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.1, 1.0))
        mesh("node", 2, "kill", state=state)
        hit += outcome(fetch) is None
        kept = max(kept, len(chunk_files(relay_store)))
        assert_chunks_verify(relay_store, f"round {round}, relay killed")
        mesh("node", 2, "start", state=state)
        restarted = time.monotonic()
        # Until node 3 has seen the relay come back (its neighbour state and routes), it
        # answers 502 "no other node is reachable yet", or resets a response whose next chunk
        # it cannot fetch: a client retries. Integrity is what this test judges.
        deadline, r = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            r = m.run(3, "stoq", "get", "--json", "--ca", m.ca, f"{m.urls[3]}/objects/r{round}", "-o", out,
                      check=False)
            if r.returncode == 0:
                break
            # 404 too: while node 3 has a route to the relay but not yet beyond it, the search
            # asks only the relay, which lacks the object.
            assert any(s in r.stderr for s in ("502", "404", "transfer aborted")), f"round {round}: {r.stderr}"
            time.sleep(0.2)
        assert r.returncode == 0, f"round {round}: no fetch through the restarted relay within 60 s: {r.stderr}"
        recovery.append(time.monotonic() - restarted)
        assert sha256_file(out) == sha256_file(src), f"round {round}: fetched through the restarted relay"
        assert_chunks_verify(relay_store, f"round {round}, after restart")
    recovery.sort()
    print(f"{RELAY_ROUNDS} relay kills, {hit} of them mid-fetch: the relay's store "
          f"({len(chunk_files(relay_store))} chunks) verified after each; from restart to a "
          f"fetch through it: median {recovery[len(recovery) // 2]:.1f} s, max {recovery[-1]:.1f} s")
    assert kept > 0, "the relay never kept a chunk"
    assert hit > 0, "every fetch finished before its kill: no kill hit a relay at work"
