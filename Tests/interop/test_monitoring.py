"""Monitoring with a real Prometheus (Debian's `prometheus`, scripts/install-deps): two meshed
nodes on loopback, scraped every second with deploy/prometheus/'s rules loaded; the test asks
Prometheus's HTTP API what it saw. Also: promtool checks and unit-tests the rules, and every
metric that a rule or a dashboard query (deploy/grafana/stoq-node.json) names is exported by
the running nodes' /metrics.

Node A keeps its own certificates (trust.mode embedded, its CA seeded with the test's root);
node B serves a fixed tls.cert_file issued by the same root, so each certificate path shows, and
expects AF_XDP on lo where no XDP program is attached, so it runs on io_uring (a fallback).
The tests share the nodes and run in file order; the last one kills B."""
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import time
import types
import urllib.parse
import urllib.request

import pytest
import yaml

from conftest import ROOT, free_port, need_binary, read_banner, stoq

PROM_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = [PROM_DIR / "stoq-rules.yml", PROM_DIR / "stoq-alerts.yml"]
DASHBOARD = ROOT / "deploy" / "grafana" / "stoq-node.json"
# Made by Prometheus for every target, not by the node.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added",
                 "scrape_samples_post_metric_relabeling"}


def tool(name):
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} is missing: apt-get install -y prometheus (scripts/install-deps does)")
    return path


# --- metric names in PromQL -------------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
             "bool", "offset", "atan2", "inf", "nan"}


def metric_names(expr: str) -> set:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    keywords, label names (in matchers or in by/on/… lists), durations or Grafana variables."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)           # strings
    e = re.sub(r"\{[^}]*\}", " ", e)                                            # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                                           # ranges, subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)                                          # $__rate_interval
    names = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def test_metric_names_extraction():
    assert metric_names('sum by (instance, job) (rate(stoq_a_total{x="y{z}"}[5m])) / '
                        'on (instance) group_left(backend) (b:c:d > 0) and e unless 1e6 * time()') == {
        "stoq_a_total", "b:c:d", "e"}
    assert ("variable $instance", 'up{job="stoq-node"}') in dashboard_exprs()
    assert metric_names("increase(x_total{instance=~\"$instance\"}[$__rate_interval]) offset 5m") == {"x_total"}


def rule_exprs():
    """(where, expr) for every rule, and the names the recording rules define."""
    exprs, recorded = [], set()
    for f in RULE_FILES:
        for g in yaml.safe_load(f.read_text())["groups"]:
            for r in g["rules"]:
                exprs.append((f"{f.name}: {r.get('record') or r.get('alert')}", r["expr"]))
                if "record" in r:
                    recorded.add(r["record"])
    return exprs, recorded


def dashboard_exprs():
    doc = json.loads(DASHBOARD.read_text())
    out = []

    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))
    for p in panels(doc["panels"]):
        for t in p.get("targets", []):
            out.append((f"panel '{p['title']}' {t['refId']}", t["expr"]))
    for v in doc["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            # label_values(selector, label): the selector's metric, not the label.
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
            out.append((f"variable ${v['name']}", m.group(1) if m else q))
    return out


def exported(text: str) -> set:
    """Metric names in a /metrics exposition; a histogram's or summary's _bucket/_sum/_count
    series count as its family's name (and the family's name as exported)."""
    names = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    names |= set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", text, re.M))
    return names


def resolve(name: str, names: set, families: dict) -> bool:
    if name in names:
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and families.get(base) in ("histogram", "summary"):
            return True
    return False


def test_dashboard_is_importable_json():
    """What Grafana's import needs and what a hand edit most often breaks: unique panel ids,
    every query with a refId and the datasource variable, panels inside the 24-column grid."""
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "stoq-node" and doc["title"] == "STOQ node"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    names = {v["name"] for v in doc["templating"]["list"]}
    assert names == {"datasource", "instance"}
    for p in doc["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"], p["title"]
            assert 'instance=~"$instance"' in t["expr"] or t["expr"].startswith("up{"), (p["title"], t["expr"])


# --- promtool ----------------------------------------------------------------------------------

def test_promtool_checks_and_tests_the_rules():
    promtool = tool("promtool")
    r = subprocess.run([promtool, "check", "rules", *map(str, RULE_FILES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 14 rules found" in r.stdout and "SUCCESS: 15 rules found" in r.stdout, r.stdout
    tests = sorted((PROM_DIR / "tests").glob("*.yml"))
    assert tests
    r = subprocess.run([promtool, "test", "rules", *map(str, tests)], capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([promtool, "check", "config", str(PROM_DIR / "prometheus.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --- two nodes and a Prometheus ------------------------------------------------------------

def tcp_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


def start_node(workdir: pathlib.Path, port: int, extra: str, network: str = "workers = 1"):
    """stoq-node on [::1]:port with the admin API on a free port (conftest.Node picks its own
    port, and each node must name the other's in `[mesh] peers` before either starts);
    `network`: keys of its [network] section."""
    n = types.SimpleNamespace(workdir=workdir, port=port)
    (workdir / "objects").mkdir(parents=True, exist_ok=True)
    cfg = workdir / "node.toml"
    cfg.write_text(
        f'[node]\ndata_dir = "{workdir}/data"\n[network]\nlisten_addr = "[::1]:{port}"\n{network}\n'
        f'client_auth = "optional"\n{extra}\n[admin]\nlisten = "[::1]:0"\n'
        f'[storage]\npath = "{workdir}/objects"\ncontent_path = "{workdir}/content"\n')
    n.log = open(workdir / "node.log", "w+")
    n.proc = subprocess.Popen([str(need_binary("stoq-node")), "--config", str(cfg)],
                              stdout=subprocess.PIPE, stderr=n.log, text=True)
    read_banner(n)
    n.target = urllib.parse.urlsplit(n.admin).netloc  # "[::1]:PORT"
    return n


def stop(n):
    if n.proc.poll() is None:
        n.proc.send_signal(signal.SIGTERM)
        try:
            n.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            n.proc.kill()
            n.proc.wait()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    need_binary("stoq")
    tmp = tmp_path_factory.mktemp("monitoring")
    ca = tmp / "ca"
    r = stoq("trust", "init", "--dir", ca)
    assert r.returncode == 0, r.stderr
    r = stoq("trust", "issue", "--dir", ca, "--ip", "::1", "--lifetime", "7d",
             "--out", tmp / "b.pem", "--key-out", tmp / "b.key")
    assert r.returncode == 0, r.stderr
    # Node A's embedded CA is the test's root, so its certificates chain where B's does; both
    # judge their neighbour by that root (trust.bundle).
    shutil.copytree(ca, tmp / "a" / "data" / "trust")
    pa, pb = free_port(), free_port()
    a = start_node(tmp / "a", pa, f'[trust]\nbundle = "{ca}/root.pem"\n[mesh]\npeers = ["https://[::1]:{pb}"]\n')
    nodes = [a]
    try:
        # B expects AF_XDP on lo (auto + interface) but no XDP program is attached there: it
        # starts on io_uring, the fallback StoqDatapathFallback is about.
        b = start_node(tmp / "b", pb, f'interface = "lo"\n[tls]\ncert_file = "{tmp}/b.pem"\nkey_file = "{tmp}/b.key"\n'
                                      f'[trust]\nbundle = "{ca}/root.pem"\n'
                                      f'[mesh]\npeers = ["https://[::1]:{pa}"]\n')
        nodes.append(b)
        web = f"[::1]:{tcp_port()}"
        cfg = tmp / "prometheus.yml"
        cfg.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(f) for f in RULE_FILES],
            "scrape_configs": [{"job_name": "stoq-node", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [a.target, b.target]}]}],
        }))
        log = open(tmp / "prometheus.log", "w+")
        prom = subprocess.Popen([tool("prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={tmp}/tsdb",
                                 f"--web.listen-address={web}"], stdout=log, stderr=subprocess.STDOUT)
        api = f"http://{web}"
        try:
            wait(lambda: http_ok(f"{api}/-/ready"), 60, "Prometheus ready", log)
            yield types.SimpleNamespace(a=a, b=b, api=api, tmp=tmp, ca=ca, log=log)
        finally:
            prom.send_signal(signal.SIGTERM)
            try:
                prom.wait(timeout=20)
            except subprocess.TimeoutExpired:
                prom.kill()
    finally:
        for n in nodes:
            stop(n)


def http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def wait(pred, timeout, what, log=None):
    """pred()'s first truthy value, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            tail = ""
            if log:
                log.flush()
                log.seek(0)
                tail = log.read()[-3000:]
            pytest.fail(f"timed out waiting for {what}; last: {v!r}\n{tail}")
        time.sleep(0.5)


def query(api, q):
    """An instant query's result: {labels: value} (labels as a sorted tuple of pairs)."""
    with urllib.request.urlopen(f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": q}), timeout=10) as r:
        doc = json.loads(r.read())
    assert doc["status"] == "success", doc
    return {tuple(sorted(s["metric"].items())): float(s["value"][1]) for s in doc["data"]["result"]}


def one(api, q):
    """The value of a query expected to give one sample, or None."""
    res = query(api, q)
    return next(iter(res.values())) if len(res) == 1 else None


def metrics_text(n):
    with urllib.request.urlopen(n.admin, timeout=10) as r:
        return r.read().decode()


def test_prometheus_scrapes_both_nodes(setup):
    api, a, b = setup.api, setup.a, setup.b
    up = wait(lambda: (lambda r: r if len(r) == 2 else None)(query(api, 'up{job="stoq-node"} == 1')), 30, "both targets up")
    assert {dict(k)["instance"] for k in up} == {a.target, b.target}
    with urllib.request.urlopen(f"{api}/api/v1/rules", timeout=10) as r:
        groups = json.loads(r.read())["data"]["groups"]
    assert {g["name"] for g in groups} == {"stoq.rules", "stoq.alerts"}
    assert all(rule["health"] in ("ok", "unknown") for g in groups for rule in g["rules"]), groups


def test_a_request_moves_the_counter_and_the_rules(setup):
    api, a = setup.api, setup.a
    sel = f'instance="{a.target}"'
    wait(lambda: query(api, f"stoq_http_requests_total{{{sel}}}"), 30, "A's request counter in Prometheus")
    before = one(api, f"sum(stoq_http_requests_total{{{sel}}})")
    obj = a.workdir / "objects" / "m.bin"
    obj.write_bytes(os.urandom(200_000))
    r = stoq("get", f"https://[::1]:{a.port}/objects/m.bin", "--ca", a.cert, "-o", setup.tmp / "m.out")
    assert r.returncode == 0, r.stderr
    assert (setup.tmp / "m.out").read_bytes() == obj.read_bytes()
    wait(lambda: (one(api, f"sum(stoq_http_requests_total{{{sel}}})") or 0) >= before + 1, 30,
         "the request counter to move in Prometheus")
    wait(lambda: (one(api, f"sum(stoq_datapath_tx_bytes_total{{{sel}}})") or 0) >= 200_000, 30, "tx bytes")
    # Recording rules evaluate on the scraped series.
    wait(lambda: (one(api, f"instance:stoq_http_requests:rate1m{{{sel}}}") or 0) > 0, 30, "the request rate rule")
    wait(lambda: one(api, f"instance:stoq_mesh_neighbours_up:sum{{{sel}}}") == 1, 30, "A's neighbour up (rule)")
    expiry = wait(lambda: query(api, "instance:stoq_tls_certificate_expiry:seconds"), 30, "certificate expiry (rule)")
    by_instance = {dict(k)["instance"]: v for k, v in expiry.items()}
    # A: a renewed embedded certificate (24 h by default); B: the 7-day tls.cert_file.
    assert 3600 < by_instance[a.target] <= 24 * 3600, by_instance
    assert 6 * 86400 < by_instance[setup.b.target] <= 7 * 86400, by_instance
    # A: auto with no interface, io_uring is the choice. B: auto on lo, AF_XDP expected.
    expected = query(api, "instance:stoq_datapath_xdp_expected:bool")
    assert {dict(k)["instance"]: v for k, v in expected.items()} == {setup.b.target: 1}
    assert one(api, f"instance:stoq_datapath_io_uring_workers:count{{{sel}}}") == 1


def test_a_refused_certificate_counts_as_a_handshake_failure(setup):
    api, a = setup.api, setup.a
    sel = f'instance="{a.target}"'
    other = setup.tmp / "other-ca"
    assert stoq("trust", "init", "--dir", other).returncode == 0
    r = stoq("get", f"https://[::1]:{a.port}/objects/m.bin", "--ca", other / "root.pem", "-o", setup.tmp / "x.out")
    assert r.returncode != 0 and "certificate" in r.stderr, r.stderr
    wait(lambda: (one(api, f"sum(stoq_quic_handshake_failures_total{{{sel}}})") or 0) >= 1, 30,
         "A's handshake failure in Prometheus")
    wait(lambda: (one(api, f"instance:stoq_quic_handshake_failures:rate5m{{{sel}}}") or 0) > 0, 30,
         "the handshake failure rate rule")


def test_every_rule_and_dashboard_metric_is_exported(setup):
    texts = [metrics_text(setup.a), metrics_text(setup.b)]
    names = set().union(*(exported(t) for t in texts))
    families = {}
    for t in texts:
        families.update(dict(re.findall(r"^# TYPE (\S+) (\S+)$", t, re.M)))
    # What this change added to the node, on the node that has each.
    assert re.search(r'^stoq_datapath_configured_info\{datapath="auto",interface=""\} 1$', texts[0], re.M)
    assert re.search(r'^stoq_datapath_configured_info\{datapath="auto",interface="lo"\} 1$', texts[1], re.M)
    assert re.search(r"^stoq_tls_certificate_not_after_seconds \d+$", texts[1], re.M)  # fixed tls.cert_file
    assert "stoq_tls_certificates_issued_total" not in texts[1]
    for t in texts:
        assert "# TYPE stoq_quic_handshake_failures_total counter" in t
        assert "# TYPE stoq_quic_connection_errors_total counter" in t
    r = subprocess.run([tool("promtool"), "check", "metrics"], input=texts[0], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr

    rules, recorded = rule_exprs()
    dash = dashboard_exprs()
    assert len(rules) == 29 and len(dash) >= 40, (len(rules), len(dash))
    missing = []
    for where, expr in rules + dash:
        found = metric_names(expr)
        assert found, f"{where}: no metric in {expr!r}"
        for name in found:
            if not (name in recorded or name in SCRAPE_SERIES or resolve(name, names, families)):
                missing.append(f"{where}: {name}")
    assert not missing, "not exported by stoq-node:\n" + "\n".join(missing)


def alert(api, name, **labels):
    """The alerts named `name` with `labels` that Prometheus holds now (pending or firing)."""
    with urllib.request.urlopen(f"{api}/api/v1/alerts", timeout=10) as r:
        alerts = json.loads(r.read())["data"]["alerts"]
    return [x for x in alerts if x["labels"].get("alertname") == name
            and all(x["labels"].get(k) == v for k, v in labels.items())]


def test_datapath_fallback_alert(setup):
    """B runs io_uring where its config expects AF_XDP; A chose io_uring. `for: 1m`: pending
    proves the expression matched; waiting a minute for firing would add nothing."""
    api, a, b = setup.api, setup.a, setup.b
    got = wait(lambda: alert(api, "StoqDatapathFallback", instance=b.target), 30, "StoqDatapathFallback for B")
    assert got[0]["state"] in ("pending", "firing") and float(got[0]["value"]) == 1
    assert not alert(api, "StoqDatapathFallback", instance=a.target)
    assert "datapath auto: AF_XDP on lo unavailable (" in (b.workdir / "node.log").read_text()


def test_killed_node_raises_node_down_and_mesh_link_down(setup):
    api, a, b = setup.api, setup.a, setup.b
    wait(lambda: one(api, f'up{{instance="{b.target}"}}') == 1, 30, "B up")
    b.proc.kill()
    b.proc.wait()
    wait(lambda: one(api, f'up{{instance="{b.target}"}}') == 0, 30, "B's up to drop to 0")
    down = wait(lambda: alert(api, "StoqNodeDown", instance=b.target), 30, "StoqNodeDown for B")
    assert down[0]["state"] in ("pending", "firing") and down[0]["labels"]["severity"] == "critical"
    link = wait(lambda: alert(api, "StoqMeshLinkDown", instance=a.target), 30, "StoqMeshLinkDown on A")
    assert link[0]["labels"]["neighbour"] == f"https://[::1]:{b.port}"
    assert not alert(api, "StoqNodeDown", instance=a.target)
