"""The start-up rule of CONTRACT §10: a node whose cluster reaches beyond this machine
must authenticate its peers.

"Beyond this machine": a node URL (its own included) whose host is not loopback
(`localhost`, `*.localhost`, 127.0.0.0/8, ::1), or a listen address that is not. Such a
node with no peer authentication — no `tls`, no `security.cluster_secret_file`, no
`security.cluster_token` — would let anyone who can reach its port replicate, vote and
read every key over /internal/*, so it refuses to start unless `security.insecure: true`,
which turns the refusal into a warning. Hostnames are not resolved (no DNS at start-up):
a name counts as another host.

Imports: the standard library, kvstore.errors, kvstore.config.
"""

from __future__ import annotations

import ipaddress

from kvstore.config import ClusterConfig
from kvstore.errors import ConfigError


def is_loopback(host: str) -> bool:
    h = host.strip("[]").lower().rstrip(".")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def has_peer_auth(config: ClusterConfig) -> bool:
    sec = config.security
    return config.tls is not None or bool(sec.cluster_secret_file) or bool(sec.cluster_token)


def has_client_auth(config: ClusterConfig) -> bool:
    return bool(config.security.users_file or config.security.client_token or
                (config.tls is not None and config.tls.client_auth == "required"))


def check_exposure(config: ClusterConfig, node_id: str, listen_host: str | None = None) -> str | None:
    """None when nothing is exposed or everything exposed is authenticated; a warning
    (one line, for the log) when it runs exposed by choice; ConfigError (one line: the
    node must not start) when peers on other hosts have no peer authentication and
    `security.insecure` is not true. `listen_host` is the address of `--listen`, if given."""
    remote = [n for n in config.cluster.nodes if not is_loopback(n.host)]
    where = ", ".join(f"{n.id} at {n.url}" for n in remote[:3]) + (" ..." if len(remote) > 3 else "")
    if listen_host is not None and not is_loopback(listen_host):
        where = f"{where}; " if where else ""
        where += f"listening on {listen_host}"
    if not where:
        return None
    warnings = []
    if not has_peer_auth(config):
        if not config.security.insecure:
            raise ConfigError(
                f"node {node_id}: refusing to start: the cluster reaches other hosts ({where}) and its peers "
                "are not authenticated; set security.cluster_secret_file (or a tls section), or "
                "security.insecure: true to run this way anyway")
        warnings.append(f"security.insecure: the cluster reaches other hosts ({where}) with no peer "
                        "authentication: anyone who can reach a node's port can act as a peer")
    if not has_client_auth(config):
        warnings.append("no client authentication (security.users_file): anyone who can reach a node's port "
                        "can read and write every key")
    return "; ".join(warnings) or None


__all__ = ["check_exposure", "has_client_auth", "has_peer_auth", "is_loopback"]
