"""Mutual TLS: a node with network.client_auth = "required" accepts a client certificate
from its own CA and refuses every bad one — each with its reason in the node's log and a
counter on /metrics — while it keeps serving good clients."""
import json
import pathlib
import re
import subprocess
import time
import urllib.request

import pytest

from conftest import Node, run, stoq


def certtool_cert(tmp, name, ca_dir, template, key_type=("--key-type", "ecdsa"), sign_args=()):
    """A certificate signed by the node's intermediate with GnuTLS's certtool (an
    independent tool), for the shapes STOQ's own CA refuses to make."""
    key, cert, tpl = tmp / f"{name}.key", tmp / f"{name}.crt", tmp / f"{name}.tpl"
    tpl.write_text(template)
    r = run(["certtool", "--generate-privkey", *key_type, "--outfile", key])
    assert r.returncode == 0, r.stderr
    r = run(["certtool", "--generate-certificate", *sign_args, "--load-privkey", key, "--load-ca-certificate",
             ca_dir / "intermediate.pem", "--load-ca-privkey", ca_dir / "intermediate-key.pem",
             "--template", tpl, "--outfile", cert])
    assert r.returncode == 0, r.stderr
    chain = tmp / f"{name}.chain.pem"
    chain.write_text(cert.read_text() + (ca_dir / "intermediate.pem").read_text())
    return chain, key


@pytest.fixture(scope="module")
def mtls(tmp_path_factory):
    if subprocess.run(["which", "certtool"], capture_output=True).returncode != 0:
        pytest.fail("certtool missing: scripts/install-deps installs gnutls-bin")
    work = tmp_path_factory.mktemp("mtls")
    first = Node(work, workers=1)           # creates the node's CA
    assert first.stop() == 0
    ca = work / "data" / "trust"
    certs = work / "certs"
    certs.mkdir()

    def issue(name, *extra, directory=ca):
        out, key = certs / f"{name}.pem", certs / f"{name}.key"
        r = stoq("trust", "issue", "--dir", directory, "--dns", f"{name}.client.example", "--out", out,
                 "--key-out", key, *extra)
        assert r.returncode == 0, r.stderr
        return out, key

    c = {"good": issue("good"), "expired": issue("expired", "--lifetime", "1s"), "revoked": issue("revoked")}
    assert stoq("trust", "init", "--dir", work / "other-ca").returncode == 0
    c["unknown-root"] = issue("stranger", directory=work / "other-ca")
    serial = json.loads(stoq("trust", "show", c["revoked"][0], "--json").stdout)["certificates"][0]["serial"]
    (ca / "revoked.txt").write_text(serial + "\n")
    c["wrong-eku"] = certtool_cert(certs, "server-only", ca, 'cn = "server-only"\ntls_www_server\nsigning_key\n'
                                                          'expiration_days = 1\n')
    c["not-yet-valid"] = certtool_cert(certs, "future", ca, 'cn = "future"\ntls_www_client\nsigning_key\n'
                                                       'activation_date = "2031-01-01 00:00:00 UTC"\n'
                                                       'expiration_date = "2032-01-01 00:00:00 UTC"\n')
    c["no-eku"] = certtool_cert(certs, "no-eku", ca, 'cn = "no-eku"\nsigning_key\nexpiration_days = 1\n')
    c["p521"] = certtool_cert(certs, "p521", ca, 'cn = "p521"\ntls_www_client\nsigning_key\nexpiration_days = 1\n',
                              key_type=("--key-type", "ecdsa", "--curve", "secp521r1"))
    c["sha1"] = certtool_cert(certs, "sha1", ca, 'cn = "sha1"\ntls_www_client\nsigning_key\nexpiration_days = 1\n',
                              sign_args=("--hash", "SHA1"))
    c["weak-key"] = certtool_cert(certs, "weak", ca, 'cn = "weak"\ntls_www_client\nsigning_key\nexpiration_days = 1\n',
                                  key_type=("--key-type", "rsa", "--bits", "1024"))
    # Five distinct certificates: leaf <- sub2 <- sub1 <- intermediate <- root.
    def sign(name, template, ca_cert, ca_key):
        key, cert, tpl = certs / f"{name}.key", certs / f"{name}.crt", certs / f"{name}.tpl"
        tpl.write_text(template)
        assert run(["certtool", "--generate-privkey", "--key-type", "ecdsa", "--outfile", key]).returncode == 0
        r = run(["certtool", "--generate-certificate", "--load-privkey", key, "--load-ca-certificate", ca_cert,
                 "--load-ca-privkey", ca_key, "--template", tpl, "--outfile", cert])
        assert r.returncode == 0, r.stderr
        return cert, key
    sub_ca = 'cn = "{}"\nca\ncert_signing_key\nexpiration_days = 1\n'
    sub1 = sign("sub1", sub_ca.format("sub1"), ca / "intermediate.pem", ca / "intermediate-key.pem")
    sub2 = sign("sub2", sub_ca.format("sub2"), *sub1)
    leaf = sign("deep", 'cn = "deep"\ntls_www_client\nsigning_key\nexpiration_days = 1\n', *sub2)
    long_chain = certs / "long.pem"
    long_chain.write_text("".join(p.read_text() for p in (leaf[0], sub2[0], sub1[0], ca / "intermediate.pem",
                                                          ca / "root.pem")))
    c["chain-too-long"] = (long_chain, leaf[1])
    time.sleep(2)                            # the 1 s certificate has expired
    node = Node(work, workers=1, extra='client_auth = "required"\n[admin]\nlisten = "[::1]:0"')
    node.add_object("a.bin", 100_000)
    node.client_certs = c
    yield node
    assert node.stop() == 0


def get(node, cert=None, *extra, url=None):
    """`stoq get` of a.bin (or `url`) from `node`, presenting `cert` (chain, key) when given."""
    args = ["get", url or node.url("a.bin"), "--ca", node.cert, "--json", "--timeout", "10", *extra]
    if cert:
        args += ["--cert", cert[0], "--key", cert[1]]
    return stoq(*args)


def refusals(node):
    node.log.flush()
    return re.findall(r"client certificate refused: (.*)$", pathlib.Path(node.log.name).read_text(), re.M)


def new_refusals(node, before, timeout=10):
    """The refusal lines logged after the first `before`, once there is at least one. The node
    logs a refusal when the connection leaves its closing period (3 PTO, from an RTT sample
    that includes a debug client's certificate checks), well after the client has exited."""
    deadline = time.time() + timeout
    while True:
        new = refusals(node)[before:]
        if new or time.time() > deadline:
            return new
        time.sleep(0.1)


def test_a_certificate_from_the_nodes_ca_is_accepted(mtls):
    r = get(mtls, mtls.client_certs["good"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bytes"] == 100_000


@pytest.mark.parametrize("case,reason", [
    ("none", "none was presented"),
    ("expired", "expired: leaf CN=expired.client.example expired at "),
    # The stranger's CA has the same names as the node's: the signature is what fails. The
    # client sends its certificate though its chain matches no CA the node trusts.
    ("unknown-root", "unknownRoot: signature of intermediate CN=STOQ Intermediate CA,O=STOQ does not verify"),
    ("revoked", "revoked: leaf CN=revoked.client.example serial "),
    ("wrong-eku", "wrongEKU: leaf CN=server-only allows [serverAuth]; clientAuth is required"),
    ("no-eku", "wrongEKU: leaf CN=no-eku has no extended key usage; clientAuth is required"),
    ("not-yet-valid", "notYetValid: leaf CN=future is not valid before 2031-01-01T00:00:00Z"),
    ("weak-key", "keyTooWeak: leaf CN=weak has a RSA-1024 key"),
    ("sha1", "weakSignature: leaf CN=sha1 is signed with SHA-1 (ecdsa-with-SHA1); accepted: SHA-256 or stronger"),
    # Depth is counted leaf to root over the verified path: five, though the client sent them all.
    ("chain-too-long", "chainTooLong: chain of 5 certificates (leaf to root) exceeds the maximum of 4"),
])
def test_bad_client_certificates_are_refused_with_their_reason(mtls, case, reason):
    before = len(refusals(mtls))
    r = get(mtls, None if case == "none" else mtls.client_certs[case])
    assert r.returncode != 0, f"{case}: the node accepted it"
    # The client says why the connection ended (the node's TLS alert), not "stream reset".
    assert "closed by the peer: CRYPTO_ERROR (0x1" in r.stderr and ", TLS alert " in r.stderr, r.stderr
    new = new_refusals(mtls, before)
    assert new and reason in new[-1], f"{case}: logged {new}"
    # The node keeps serving good clients.
    assert get(mtls, mtls.client_certs["good"]).returncode == 0


def test_a_p521_client_certificate_is_accepted(mtls):
    """P-521 is accepted in both roles (one key policy); the node serves it."""
    r = get(mtls, mtls.client_certs["p521"])
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("case", ["good", "p521", "expired", "unknown-root", "revoked", "wrong-eku", "no-eku",
                                  "not-yet-valid", "weak-key", "sha1", "chain-too-long"])
def test_the_node_and_stoq_trust_verify_agree(mtls, case):
    """One policy: the verdict and words the node logs for a client certificate over a real
    socket are exactly what `stoq trust verify --client` says about the same files."""
    chain, key = mtls.client_certs[case]
    ca = pathlib.Path(mtls.cert).parent
    v = stoq("trust", "verify", chain, "--bundle", ca / "root.pem", "--client", "--revoked", ca / "revoked.txt", "--json")
    # A verdict (0 valid, 1 refused), never 2 "does not parse": RSA-1024 and SHA-1 included.
    assert v.returncode in (0, 1), v.stderr
    verdict = json.loads(v.stdout)
    before = len(refusals(mtls))
    r = get(mtls, (chain, key))
    # A refusal is waited for; an accepted certificate logs none (every earlier refusal was
    # waited for by its own test, so none arrives late here), so a short look suffices.
    new = new_refusals(mtls, before, timeout=10 if r.returncode != 0 else 0.2)
    if verdict["valid"]:
        assert r.returncode == 0 and not new, f"{case}: trust verify accepts, the node logged {new}: {r.stderr}"
    else:
        assert r.returncode != 0 and new, f"{case}: trust verify refuses ({verdict}), the node accepted"
        clock = lambda s: re.sub(r" \(now [^)]*\)", "", s)
        assert clock(new[-1]) == clock(f'{verdict["reason"]}: {verdict["message"]}')


def test_a_handshake_failing_for_another_reason_logs_that_reason(mtls):
    """A client that speaks no protocol the node serves (ALPN h2): the node logs the TLS alert
    it sent, not a certificate refusal with every GnuTLS verify flag."""
    import asyncio
    import ssl
    from aioquic.asyncio.client import connect
    from aioquic.quic.configuration import QuicConfiguration

    async def attempt():
        cfg = QuicConfiguration(is_client=True, alpn_protocols=["h2"], verify_mode=ssl.CERT_NONE)
        try:
            async with connect("::1", mtls.port, configuration=cfg):
                return "connected"
        except Exception as e:     # noqa: BLE001 - any failure is the expected outcome
            return repr(e)

    before = len(refusals(mtls))
    outcome = asyncio.run(asyncio.wait_for(attempt(), 15))
    assert outcome != "connected", outcome
    want = "TLS handshake failed: No supported application protocol could be negotiated (alert 120)"
    deadline = time.time() + 10     # logged when the connection leaves its closing period
    while True:
        mtls.log.flush()
        log = pathlib.Path(mtls.log.name).read_text()
        if want in log or time.time() > deadline:
            break
        time.sleep(0.2)
    assert want in log, log[-2000:]
    assert "TOFU" not in log
    assert len(refusals(mtls)) == before


def counted_and_logged(node, timeout=10):
    """stoq_tls_peer_certificates_refused_total and the number of refusal lines, once they
    agree (or at the deadline): the worker publishes its counters about once a second."""
    deadline = time.time() + timeout
    while True:
        text = urllib.request.urlopen(node.admin, timeout=5).read().decode()
        counted = sum(int(v) for v in re.findall(r'^stoq_tls_peer_certificates_refused_total\{[^}]*\} (\d+)$', text, re.M))
        logged = len(refusals(node))
        if counted == logged or time.time() > deadline:
            return counted, logged
        time.sleep(0.2)


def test_refusals_are_counted(mtls):
    counted, logged = counted_and_logged(mtls)
    assert counted == logged >= 8


def test_a_server_certificate_without_server_auth_is_refused_by_the_client(mtls, tmp_path):
    """The other direction: a node (stoq) connecting to a peer refuses a certificate that
    chains to a trusted root but is not meant for a TLS server (EKU clientAuth only)."""
    import shutil
    import subprocess as sp
    from conftest import free_port
    ca = pathlib.Path(mtls.cert).parent
    chain, key = certtool_cert(tmp_path, "client-only", ca, 'cn = "client-only"\ntls_www_client\nsigning_key\n'
                                                           'ip_address = "::1"\nexpiration_days = 1\n')
    htdocs = tmp_path / "htdocs"
    htdocs.mkdir()
    (htdocs / "x.bin").write_bytes(b"x" * 1000)
    port = free_port()
    gtls = shutil.which("gtlsserver") or "/usr/sbin/gtlsserver"
    srv = sp.Popen([gtls, "-q", "-d", str(htdocs), "::1", str(port), str(key), str(chain)],
                   stdout=sp.DEVNULL, stderr=sp.DEVNULL)
    try:
        time.sleep(0.5)
        r = stoq("get", f"https://[::1]:{port}/x.bin", "--ca", mtls.cert, "--timeout", "10")
        assert r.returncode != 0 and "wrongEKU: leaf CN=client-only allows [clientAuth]; serverAuth is required" in r.stderr, \
            r.stderr
        # The node's own chain (EKU serverAuth + clientAuth) from the same server software works.
        srv.terminate()
        srv.wait(timeout=10)
        ident = pathlib.Path(mtls.identity_cert)
        srv = sp.Popen([gtls, "-q", "-d", str(htdocs), "::1", str(port), str(ident.with_name("key.pem")), str(ident)],
                       stdout=sp.DEVNULL, stderr=sp.DEVNULL)
        time.sleep(0.5)
        r = stoq("get", f"https://[::1]:{port}/x.bin", "--ca", mtls.cert, "--json", "--timeout", "10")
        assert r.returncode == 0, r.stderr
    finally:
        srv.terminate()
        srv.wait(timeout=10)
