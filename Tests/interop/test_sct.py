"""Certificate transparency: certificates from a STOQ CA carry an embedded SCT (RFC 6962
precertificate flow) that an independent implementation (Python's `cryptography`) parses and
verifies against the key the node serves at /_stoq/log/key; GnuTLS accepts them; a node with
trust.require_transparency refuses client certificates whose SCT is missing, forged or from an
unknown log, with the reason in its log and counter; and `stoq get` refuses a server whose
certificate lacks an SCT (--require-transparency) or does not name the address it dialed."""
import datetime
import hashlib
import json
import pathlib
import re
import shutil
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.certificate_transparency import LogEntryType, Version
from cryptography.x509.oid import ExtensionOID

from conftest import Node, free_port, run, stoq
from test_mtls import certtool_cert, counted_and_logged, get, new_refusals, refusals

SCT_OID = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")


def load(path):
    return x509.load_pem_x509_certificates(pathlib.Path(path).read_bytes())


def sct_signed_struct(sct, tbs, issuer_key_hash):
    """RFC 6962 §3.2 digitally-signed struct for a precert entry, built here independently."""
    ms = (sct.timestamp.replace(tzinfo=datetime.timezone.utc)
          - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)) // datetime.timedelta(milliseconds=1)
    ext = sct.extension_bytes
    return (b"\x00" + b"\x00" + ms.to_bytes(8, "big") + (1).to_bytes(2, "big") + issuer_key_hash
            + len(tbs).to_bytes(3, "big") + tbs + len(ext).to_bytes(2, "big") + ext)


def raw_extension_value(cert, oid):
    """The extnValue content (DER) of one extension, cut out of the TBS by hand."""
    der = cert.tbs_certificate_bytes
    assert oid == SCT_OID
    # The DER OID of 1.3.6.1.4.1.11129.2.4.2, then an optional critical flag and the OCTET STRING.
    enc = bytes.fromhex("060a2b06010401d679020402")
    i = der.index(enc) + len(enc)
    if der[i] == 0x01:                       # critical BOOLEAN
        i += 3
    assert der[i] == 0x04
    n, i = der[i + 1], i + 2
    if n & 0x80:
        k = n & 0x7f
        n, i = int.from_bytes(der[i:i + k], "big"), i + k
    return der[i:i + n]


def resign(cert, ca_key, sct_value, subject=None, public_key=None):
    """A certificate with `cert`'s fields (optionally another subject/key) and `sct_value` as
    its SCT list extension, signed by the CA's intermediate key."""
    b = (x509.CertificateBuilder().subject_name(subject or cert.subject).issuer_name(cert.issuer)
         .public_key(public_key or cert.public_key()).serial_number(cert.serial_number)
         .not_valid_before(cert.not_valid_before_utc).not_valid_after(cert.not_valid_after_utc))
    for e in cert.extensions:
        if e.oid == SCT_OID:
            continue
        if e.oid == ExtensionOID.SUBJECT_KEY_IDENTIFIER and public_key is not None:
            b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            continue
        b = b.add_extension(e.value, critical=e.critical)
    b = b.add_extension(x509.UnrecognizedExtension(SCT_OID, sct_value), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def write_chain(path, cert, intermediate_pem):
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + intermediate_pem)


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    if shutil.which("certtool") is None:
        pytest.fail("certtool missing: scripts/install-deps installs gnutls-bin")
    work = tmp_path_factory.mktemp("sct")
    first = Node(work, workers=1)           # creates the node's CA and its log
    assert first.stop() == 0
    ca = work / "data" / "trust"
    certs = work / "certs"
    certs.mkdir()

    def issue(name, directory=ca):
        out, key = certs / f"{name}.pem", certs / f"{name}.key"
        r = stoq("trust", "issue", "--dir", directory, "--dns", f"{name}.client.example", "--out", out, "--key-out", key)
        assert r.returncode == 0, r.stderr
        return out, key

    c = {"good": issue("good")}
    # Same CA (same intermediate), but a log this node does not trust.
    rogue = work / "rogue-ca"
    rogue.mkdir(mode=0o700)
    for f in ("root.pem", "intermediate.pem", "intermediate-key.pem"):
        shutil.copy(ca / f, rogue / f)
    c["unknown-log"] = issue("rogue", directory=rogue)
    # No SCT at all: signed by the intermediate with certtool.
    c["missing"] = certtool_cert(certs, "nosct", ca, 'cn = "nosct"\ntls_www_client\nsigning_key\nexpiration_days = 1\n')
    # Forged: the good certificate's SCT list on a certificate with another subject and key,
    # signed by the same CA; and the good certificate with one byte of its SCT signature flipped.
    inter_pem = (ca / "intermediate.pem").read_bytes()
    ca_key = serialization.load_pem_private_key((ca / "intermediate-key.pem").read_bytes(), None)
    good = load(c["good"][0])[0]
    value = raw_extension_value(good, SCT_OID)
    other_key = ec.generate_private_key(ec.SECP256R1())
    (certs / "transplant.key").write_bytes(other_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    t = resign(good, ca_key, value, subject=x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "impostor")]),
               public_key=other_key.public_key())
    write_chain(certs / "transplant.pem", t, inter_pem)
    c["transplanted"] = (certs / "transplant.pem", certs / "transplant.key")
    corrupt = bytearray(value)
    corrupt[-5] ^= 0x01                        # inside the ECDSA signature, the list's last field
    write_chain(certs / "corrupt.pem", resign(good, ca_key, bytes(corrupt)), inter_pem)
    c["corrupt"] = (certs / "corrupt.pem", c["good"][1])

    node = Node(work, workers=1, extra='client_auth = "required"\n[admin]\nlisten = "[::1]:0"\n'
                                       '[trust]\nrequire_transparency = true')
    node.add_object("a.bin", 50_000)
    node.client_certs = c
    node.ca_dir = ca
    node.work = work
    yield node
    assert node.stop() == 0


def test_the_sct_verifies_independently_with_the_served_log_key(ct, tmp_path):
    key_pem = tmp_path / "log.pub.pem"
    r = get(ct, ct.client_certs["good"], "-o", key_pem, url=f"https://[::1]:{ct.port}/_stoq/log/key")
    assert r.returncode == 0, r.stderr
    log_key = serialization.load_pem_public_key(key_pem.read_bytes())
    spki = log_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    for chain in (ct.client_certs["good"][0], ct.identity_cert):
        leaf, issuer = load(chain)[:2]
        ext = leaf.extensions.get_extension_for_class(x509.PrecertificateSignedCertificateTimestamps)
        assert not ext.critical and list(leaf.extensions)[-1].oid == SCT_OID   # last extension
        scts = list(ext.value)
        assert len(scts) == 1
        sct = scts[0]
        assert sct.version == Version.v1 and sct.entry_type == LogEntryType.PRE_CERTIFICATE
        assert sct.log_id == hashlib.sha256(spki).digest()
        assert isinstance(sct.signature_hash_algorithm, hashes.SHA256)
        ikh = hashlib.sha256(issuer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()
        log_key.verify(sct.signature, sct_signed_struct(sct, leaf.tbs_precertificate_bytes, ikh),
                       ec.ECDSA(hashes.SHA256()))
        # Over another TBS the signature fails: the check above can fail.
        with pytest.raises(Exception):
            log_key.verify(sct.signature, sct_signed_struct(sct, leaf.tbs_certificate_bytes, ikh),
                           ec.ECDSA(hashes.SHA256()))
    # `stoq trust show` reports it as valid against this key.
    r = stoq("trust", "show", ct.client_certs["good"][0], "--log-key", key_pem, "--json")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)["certificates"][0]["scts"]
    assert len(shown) == 1 and shown[0]["status"] == "valid"
    assert shown[0]["log_id"] == __import__("base64").b64encode(hashlib.sha256(spki).digest()).decode()
    r = stoq("trust", "show", ct.client_certs["corrupt"][0], "--log-key", key_pem, "--json")
    assert json.loads(r.stdout)["certificates"][0]["scts"][0]["status"] == "invalid"
    r = stoq("trust", "show", ct.client_certs["good"][0])
    assert re.search(r"SCT: +log \S+ at \S+: unchecked", r.stdout), r.stdout


def test_gnutls_accepts_certificates_with_embedded_scts(ct):
    r = run(["certtool", "--certificate-info", "--infile", ct.client_certs["good"][0]])
    assert r.returncode == 0, r.stderr
    assert "1.3.6.1.4.1.11129.2.4.2" in r.stdout or "CT" in r.stdout, r.stdout
    r = run(["certtool", "--verify", "--load-ca-certificate", ct.ca_dir / "root.pem", "--infile",
             ct.client_certs["good"][0]])
    assert r.returncode == 0 and "Chain verification output: Verified" in r.stdout, r.stdout + r.stderr


def test_a_certificate_with_a_valid_sct_is_accepted(ct):
    r = get(ct, ct.client_certs["good"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bytes"] == 50_000


@pytest.mark.parametrize("case,reason", [
    ("missing", "sctMissing: leaf CN=nosct carries no SCT"),
    ("transplanted", "sctInvalid: leaf CN=impostor: SCT signature invalid (forged)"),
    ("corrupt", "sctInvalid: leaf CN=good.client.example: SCT signature invalid (forged)"),
    ("unknown-log", "sctUnknownLog: leaf CN=rogue.client.example has SCTs only from unknown logs"),
])
def test_certificates_without_a_valid_sct_are_refused(ct, case, reason):
    before = len(refusals(ct))
    r = get(ct, ct.client_certs[case])
    assert r.returncode != 0, f"{case}: the node accepted it"
    new = new_refusals(ct, before)
    assert new and new[-1].startswith(reason), f"{case}: logged {new}"
    assert get(ct, ct.client_certs["good"]).returncode == 0


def test_sct_refusals_are_counted(ct):
    counted, logged = counted_and_logged(ct)
    assert counted == logged >= 4


def test_stoq_verify_requires_transparency(ct, tmp_path):
    pub = tmp_path / "log.pub.pem"
    assert run(["openssl", "pkey", "-in", ct.ca_dir / "log-key.pem", "-pubout", "-out", pub]).returncode == 0
    base = ["trust", "verify", "--bundle", ct.ca_dir / "root.pem", "--client", "--json", "--require-transparency",
            "--log-key", pub]
    r = stoq(*base[:2], ct.client_certs["good"][0], *base[2:])
    assert r.returncode == 0, r.stdout + r.stderr
    for case, code in [("missing", "sctMissing"), ("transplanted", "sctInvalid"), ("corrupt", "sctInvalid"),
                       ("unknown-log", "sctUnknownLog")]:
        r = stoq(*base[:2], ct.client_certs[case][0], *base[2:])
        assert r.returncode == 1 and json.loads(r.stdout)["reason"] == code, (case, r.stdout, r.stderr)
    # Without --require-transparency the SCT is not looked at.
    r = stoq("trust", "verify", ct.client_certs["missing"][0], "--bundle", ct.ca_dir / "root.pem", "--client")
    assert r.returncode == 0, r.stderr


def test_the_client_requires_transparency_and_a_matching_name(ct, tmp_path):
    """`stoq get` as a client: --require-transparency refuses a server certificate without an
    SCT, and a certificate that does not name the dialed address is refused naming both."""
    pub = tmp_path / "log.pub.pem"
    assert run(["openssl", "pkey", "-in", ct.ca_dir / "log-key.pem", "-pubout", "-out", pub]).returncode == 0
    good = ct.client_certs["good"]
    # The node's own certificate has an SCT from its log: accepted.
    r = get(ct, good, "--require-transparency", "--log-key", pub)
    assert r.returncode == 0, r.stderr
    # A certificate from another log: refused.
    other = tmp_path / "other.pub.pem"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    r = get(ct, good, "--require-transparency", "--log-key", other)
    assert r.returncode != 0 and "sctUnknownLog: " in r.stderr and "has SCTs only from unknown logs" in r.stderr, r.stderr
    htdocs = tmp_path / "htdocs"
    htdocs.mkdir()
    (htdocs / "x.bin").write_bytes(b"x" * 1000)
    gtls = shutil.which("gtlsserver") or "/usr/sbin/gtlsserver"
    nosct = certtool_cert(tmp_path, "srv-nosct", ct.ca_dir, 'cn = "srv"\ntls_www_server\nsigning_key\n'
                                                           'ip_address = "::1"\nexpiration_days = 1\n')
    elsewhere = certtool_cert(tmp_path, "srv-else", ct.ca_dir, 'cn = "else"\ntls_www_server\nsigning_key\n'
                                                              'dns_name = "elsewhere.example"\n'
                                                              'ip_address = "2001:db8::99"\nexpiration_days = 1\n')
    for (chain, key), args, expect in [
        (nosct, ["--require-transparency", "--log-key", pub], ["sctMissing: leaf CN=", "carries no SCT"]),
        (elsewhere, [], ["sanMismatch: leaf CN=", "names [DNS:elsewhere.example, IP:2001:db8::99], not IP:::1"]),
    ]:
        port = free_port()
        srv = subprocess.Popen([gtls, "-q", "-d", str(htdocs), "::1", str(port), str(key), str(chain)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            r = stoq("get", f"https://[::1]:{port}/x.bin", "--ca", ct.cert, "--timeout", "10", *args)
            assert r.returncode != 0, f"{chain}: accepted"
            for e in expect:
                assert e in r.stderr, r.stderr
            if args:    # the same server is fine when transparency is not required
                r = stoq("get", f"https://[::1]:{port}/x.bin", "--ca", ct.cert, "--timeout", "10")
                assert r.returncode == 0, r.stderr
        finally:
            srv.terminate()
            srv.wait(timeout=10)


def test_a_certificate_issued_while_the_node_runs_is_logged_and_audited(ct, tmp_path):
    """`stoq trust issue` on the running node's CA appends to the same log (another process);
    the audit finds the certificate by its recomputed precert leaf and checks its SCT."""
    pub = tmp_path / "log.pub.pem"
    assert run(["openssl", "pkey", "-in", ct.ca_dir / "log-key.pem", "-pubout", "-out", pub]).returncode == 0
    cert, key = tmp_path / "late.pem", tmp_path / "late.key"
    r = stoq("trust", "issue", "--dir", ct.ca_dir, "--dns", "late.client.example", "--out", cert, "--key-out", key)
    assert r.returncode == 0, r.stderr
    good = ct.client_certs["good"]
    r = stoq("trust", "audit", f"https://[::1]:{ct.port}", "--ca", ct.cert, "--cert", good[0], "--key", good[1],
             "--require-transparency", "--log-key", pub, "--include", cert, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report[f"{cert} included"] and report[f"{cert} SCT signature"]
    # The leaf alone needs its issuer to recompute the entry.
    leaf_only = tmp_path / "leaf.pem"
    leaf_only.write_bytes(load(cert)[0].public_bytes(serialization.Encoding.PEM))
    r = stoq("trust", "audit", f"https://[::1]:{ct.port}", "--ca", ct.cert, "--cert", good[0], "--key", good[1],
             "--log-key", pub, "--include", leaf_only)
    assert r.returncode == 2 and "its issuer is needed" in r.stderr, r.stderr
    r = stoq("trust", "audit", f"https://[::1]:{ct.port}", "--ca", ct.cert, "--cert", good[0], "--key", good[1],
             "--log-key", pub, "--include", leaf_only, "--issuer", ct.ca_dir / "intermediate.pem")
    assert r.returncode == 0, r.stderr
    # The late certificate is accepted by the node too (its SCT is from the trusted log).
    assert get(ct, (cert, key)).returncode == 0


def test_require_transparency_applies_on_reload(ct, tmp_path):
    """A node that only asks for client certificates accepts one without SCT; once the config
    file says require_transparency = true, the same certificate is refused (hot reload)."""
    n = Node(tmp_path, workers=1, extra='client_auth = "required"')
    try:
        n.add_object("a.bin", 1000)
        ca = pathlib.Path(n.cert).parent
        nosct = certtool_cert(tmp_path, "reload-nosct", ca, 'cn = "r"\ntls_www_client\nsigning_key\nexpiration_days = 1\n')
        assert get(n, nosct).returncode == 0
        n.config.write_text(n.config.read_text() + "[trust]\nrequire_transparency = true\n")
        deadline = time.time() + 10
        while time.time() < deadline and get(n, nosct).returncode == 0:
            time.sleep(0.3)
        before = len(refusals(n))
        assert get(n, nosct).returncode != 0
        new = new_refusals(n, before)
        assert new and new[-1] == "sctMissing: leaf CN=r carries no SCT; transparency is required", new
        # Its own CA's certificates (SCT from its own log, the default trusted log) still pass.
        cert, key = tmp_path / "c.pem", tmp_path / "c.key"
        assert stoq("trust", "issue", "--dir", ca, "--dns", "c.example", "--out", cert, "--key-out", key).returncode == 0
        r = get(n, (cert, key))
        assert r.returncode == 0, r.stderr
    finally:
        assert n.stop() == 0
