"""TLS for a node (CONTRACT §10): the server context of its one listener, the client
context of its peer links, and the checks of a connection's client certificate.

- One listener serves clients and peers, so it always ASKS for a client certificate
  (`CERT_OPTIONAL`): a certificate that is presented must verify against `tls.ca_file`
  or the handshake fails; none is fine at the TLS level. What a route needs is decided
  per request: `/internal/*` a peer certificate (`peer_cert_ok`), the client routes what
  `tls.client_auth` says (`client_auth_ok`).
- Peers: mutual TLS. A node connects with `client_context` (it verifies the peer against
  `ca_file` and the host of the peer's URL, and presents its own certificate).
- A PEER certificate is one signed by `ca_file` whose extended key usage allows
  `serverAuth` (or that has no such extension): a node's certificate serves its
  listener, so it has that; `kvstore certs init` gives `client.pem` only `clientAuth`,
  so the client certificate cannot open `/internal/*`.

TLS 1.2 is the minimum. Paths come from the config (absolute once loaded from a file;
see kvstore.config), with `{id}` replaced by the node's id. The files are checked when
the contexts are built — at node start — with one-line ConfigErrors naming the key and
the file.

Imports: ssl, the standard library, cryptography, kvstore.errors, kvstore.config.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from kvstore.config import ClientAuth, ClusterConfig
from kvstore.errors import ConfigError

MIN_VERSION = ssl.TLSVersion.TLSv1_2


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A node's certificate, key and CA paths, `{id}` filled in."""

    cert_file: Path
    key_file: Path
    ca_file: Path


def node_path(raw: str, node_id: str) -> Path:
    return Path(os.path.expanduser(raw.replace("{id}", node_id)))


def tls_files(cfg: ClusterConfig, node_id: str) -> TlsFiles:
    """The TLS files of `node_id` (ConfigError when the config has no tls section)."""
    if cfg.tls is None:
        raise ConfigError("tls: this cluster file has no tls section")
    t = cfg.tls
    return TlsFiles(node_path(t.cert_file, node_id), node_path(t.key_file, node_id), node_path(t.ca_file, node_id))


def check_files(cfg: ClusterConfig, node_id: str) -> TlsFiles:
    """tls_files(), each one present and readable — else one line naming the key and the file."""
    files = tls_files(cfg, node_id)
    for key in ("cert_file", "key_file", "ca_file"):
        path: Path = getattr(files, key)
        if not path.is_file():
            what = "no such file" if not path.exists() else "not a file"
            raise ConfigError(f"tls.{key}: {path}: {what} (make the certificates with `kvstore certs init "
                              f"DIR --config FILE`)")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"tls.{key}: {path}: not readable by this user")
    return files


def _load(ctx: ssl.SSLContext, files: TlsFiles) -> None:
    try:
        ctx.load_cert_chain(files.cert_file, files.key_file)
    except ssl.SSLError as e:
        raise ConfigError(f"tls.key_file: {files.key_file} does not go with tls.cert_file {files.cert_file}, or "
                          f"one of them is not PEM ({e.reason or e})") from None
    try:
        ctx.load_verify_locations(cafile=files.ca_file)
    except (ssl.SSLError, ValueError) as e:
        raise ConfigError(f"tls.ca_file: {files.ca_file}: not a PEM certificate ({getattr(e, 'reason', None) or e})") \
            from None


def server_context(cfg: ClusterConfig, node_id: str) -> ssl.SSLContext | None:
    """The context of the node's listener (None without a tls section): its certificate,
    TLS 1.2+, and CERT_OPTIONAL against ca_file ALWAYS (peers present their certificate
    on the same port; tls.client_auth is enforced per route)."""
    if cfg.tls is None:
        return None
    files = check_files(cfg, node_id)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    _load(ctx, files)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(cfg: ClusterConfig, node_id: str) -> ssl.SSLContext | None:
    """The context of this node's connections to its peers (None without tls): verifies
    the peer's certificate against ca_file and its URL's host; presents our own."""
    if cfg.tls is None:
        return None
    files = check_files(cfg, node_id)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)     # CERT_REQUIRED, check_hostname
    ctx.minimum_version = MIN_VERSION
    _load(ctx, files)
    return ctx


def _extra(conn: Any, name: str) -> Any:
    """get_extra_info(name) of an aiohttp request (its transport), an asyncio transport
    or a StreamWriter; None when closed or not TLS."""
    if conn is None:
        return None
    if hasattr(conn, "get_extra_info"):
        return conn.get_extra_info(name)
    transport = getattr(conn, "transport", None)
    return transport.get_extra_info(name) if transport is not None else None


def peer_certificate(conn: Any) -> x509.Certificate | None:
    """The client certificate of a TLS connection, if one was presented. Under
    CERT_OPTIONAL Python hands it over only once it verified against ca_file (a bad one
    fails the handshake), so a certificate here is one our CA signed."""
    if not _extra(conn, "peercert"):      # None: no TLS or no certificate; {}: not verified
        return None
    ssl_object = _extra(conn, "ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


def is_node_certificate(cert: x509.Certificate) -> bool:
    """A certificate a node can serve with: extended key usage absent or with serverAuth."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ExtendedKeyUsageOID.SERVER_AUTH in eku


def peer_cert_ok(conn: Any) -> bool:
    """Whether the connection of `conn` (an aiohttp request, a transport, a StreamWriter)
    carries a verified NODE certificate of our CA: the peer check of `/internal/*`."""
    cert = peer_certificate(conn)
    return cert is not None and is_node_certificate(cert)


def client_auth_ok(conn: Any, policy: ClientAuth) -> bool:
    """Whether `tls.client_auth` lets this connection use the client routes: `none` and
    `optional` always (a certificate that was presented has verified at the handshake),
    `required` only with a verified certificate (a client's or a node's)."""
    if policy == "required":
        return peer_certificate(conn) is not None
    return True


def peer_common_name(conn: Any) -> str | None:
    """The subject CN of the connection's verified certificate (for logs)."""
    cert = peer_certificate(conn)
    if cert is None:
        return None
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


__all__ = ["MIN_VERSION", "TlsFiles", "check_files", "client_auth_ok", "client_context", "is_node_certificate",
           "node_path", "peer_cert_ok", "peer_certificate", "peer_common_name", "server_context", "tls_files"]
