"""`kvstore certs init DIR --config FILE` (CONTRACT §10): a private certificate
authority for one cluster, a certificate per node and one client certificate.

Writes
    DIR/ca.pem, DIR/ca-key.pem            the CA (10 years; signs certificates only)
    DIR/{id}.pem, DIR/{id}-key.pem        per node: CN = the id; subject alternative names
                                          = the host of its URL (a DNS name, or an IP
                                          address if it is one), `localhost` (DNS) and
                                          `127.0.0.1` (IP); extended key usage serverAuth
                                          + clientAuth (it serves its listener and
                                          presents itself to its peers)
    DIR/client.pem, DIR/client-key.pem    CN = kvstore-client; clientAuth only, so it is
                                          accepted on the client routes with
                                          `tls.client_auth: required` but never as a peer
Keys are EC P-256 (fast handshakes, small certificates), PKCS#8 PEM without a password,
created with mode 0600 (no window where they are readable); certificates 0644. Leaf
certificates last 825 days (the longest clients such as Apple's accept), start 5
minutes in the past (clock skew). An existing CA is never replaced unless `force`:
replacing it invalidates every certificate a running cluster uses.

Imports: the standard library, cryptography, kvstore.errors, kvstore.config.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvstore.config import ClusterConfig
from kvstore.errors import ConfigError

LEAF_DAYS = 825
CA_DAYS = 3650
SKEW = dt.timedelta(minutes=5)
CLIENT_NAME = "kvstore-client"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str, unit: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvstore"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def host_name(host: str) -> x509.GeneralName:
    """A URL host as a subject alternative name: an IP address if it is one, else DNS."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host.lower())


def node_sans(host: str) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in (host_name(host), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        if n not in out:
            out.append(n)
    return out


def make_ca(cluster_name: str, *, now: dt.datetime | None = None,
            days: int = CA_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    now = now or dt.datetime.now(dt.UTC)
    key = _key()
    name = _name(f"kvstore CA ({cluster_name})", "ca")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - SKEW).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, unit: str,
              sans: list[x509.GeneralName], usages: list[x509.ObjectIdentifier], *,
              now: dt.datetime | None = None, days: int = LEAF_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    now = now or dt.datetime.now(dt.UTC)
    key = _key()
    b = (x509.CertificateBuilder()
         .subject_name(_name(cn, unit)).issuer_name(ca_cert.subject)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - SKEW).not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                      crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a temporary file created with `mode`, then rename it over `path`
    (a key is never readable by others, not even for a moment)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def init_certs(cfg: ClusterConfig, out_dir: str | os.PathLike[str], *, force: bool = False,
               now: dt.datetime | None = None) -> list[Path]:
    """Make the CA, every node's certificate and the client certificate in `out_dir`
    (created if needed). Returns the files written, CA first. ConfigError (nothing
    written) when a CA is already there and not `force`."""
    d = Path(out_dir)
    ca_pem, ca_key_pem = d / "ca.pem", d / "ca-key.pem"
    if not force and (ca_pem.exists() or ca_key_pem.exists()):
        raise ConfigError(f"{ca_pem if ca_pem.exists() else ca_key_pem} exists: pass --force to replace the CA "
                          "(every certificate it signed stops working)")
    clash = sorted({n.id for n in cfg.cluster.nodes} & {"ca", "client"})
    if clash:
        raise ConfigError(f"cluster.nodes: a node with id {clash[0]!r} would overwrite {d / (clash[0] + '.pem')}; "
                          "rename the node")
    if d.exists() and not d.is_dir():
        raise ConfigError(f"{d}: not a directory")
    d.mkdir(parents=True, exist_ok=True)
    now = now or dt.datetime.now(dt.UTC)
    written: list[Path] = []

    def save(name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        _write(d / f"{name}-key.pem", _key_pem(key), 0o600)
        _write(d / f"{name}.pem", _cert_pem(cert), 0o644)
        written.extend([d / f"{name}.pem", d / f"{name}-key.pem"])

    ca_key, ca_cert = make_ca(cfg.cluster.name, now=now)
    save("ca", ca_key, ca_cert)
    node_usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    for n in cfg.cluster.nodes:
        save(n.id, *make_leaf(ca_key, ca_cert, n.id, "node", node_sans(n.host), node_usage, now=now))
    save("client", *make_leaf(ca_key, ca_cert, CLIENT_NAME, "client", [], [ExtendedKeyUsageOID.CLIENT_AUTH],
                              now=now))
    return written


__all__ = ["CA_DAYS", "CLIENT_NAME", "LEAF_DAYS", "host_name", "init_certs", "make_ca", "make_leaf", "node_sans"]
