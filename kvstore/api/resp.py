"""The Redis protocol (CONTRACT §11; users' guide: docs/redis.md). A node whose entry in the
cluster file has `resp: "HOST:PORT"` also answers RESP2 there — and RESP3 after
`HELLO 3` — with the same data, options, errors and guarantees as HTTP, through the
NodeAPI only (as api/app.py). redis-cli and Redis client libraries work as they are.

`start_resp(node, host, port, config)` starts the listener after the HTTP site
(kvstore/cli.py) and returns a `RespServer`, duck-compatible with asyncio.Server
(`close()`, `wait_closed()`, `sockets`); `await server.stop()` closes it within
resp_server.STOP_S, well inside the node's 5 s shutdown bound.

The pieces: resp_server.py (listener, connections, framing, pipelining, auth state),
resp_commands.py (GET, SET, MGET, MSET, DEL, EXISTS, INCR/DECR, TTL/EXPIRE, SCAN, KEYS,
DBSIZE), resp_admin.py (PING, ECHO, HELLO, AUTH, QUIT, RESET, SELECT, READONLY, CLIENT,
COMMAND, INFO, ROLE, WAIT, TIME), resp_wire.py (the bytes: replies, the size guard,
inline commands, integers, glob patterns).

No TLS on this port yet: with a `tls` section, `check_resp_exposure` lets it listen on
loopback only unless `security.insecure` (kvstore/cli.py calls it before starting).

Imports: kvstore.api (node_api and the resp modules), kvstore.config/errors/security.
"""

from __future__ import annotations

from kvstore.api.node_api import NodeAPI
from kvstore.api.resp_admin import ADMIN_COMMANDS
from kvstore.api.resp_commands import DATA_COMMANDS
from kvstore.api.resp_server import RespServer, Spec
from kvstore.config import ClusterConfig
from kvstore.errors import ConfigError
from kvstore.security.exposure import is_loopback
from kvstore.security.users import Authenticator


def check_resp_exposure(config: ClusterConfig, node_id: str) -> str | None:
    """The start-up rule for this port (like security.exposure's): it has no TLS yet, so in a
    cluster with a `tls` section it may listen on loopback only — tokens and values would
    otherwise cross the network in plain text — unless `security.insecure: true` (then a
    warning to log). ConfigError (one line: the node must not start) otherwise."""
    spec = config.node(node_id)
    host = spec.resp_host
    if host is None or config.tls is None or is_loopback(host):
        return None
    if not config.security.insecure:
        raise ConfigError(f"node {node_id}: refusing to serve the Redis protocol on {spec.resp}: it has no TLS "
                          "yet and this cluster has a tls section; give resp a loopback address "
                          "(127.0.0.1:PORT), remove it, or set security.insecure: true")
    return (f"security.insecure: the Redis protocol on {spec.resp} has no TLS: tokens and values cross the "
            "network in plain text")


def command_table() -> dict[bytes, Spec]:
    """Every command, by lower-case name."""
    return {**DATA_COMMANDS, **ADMIN_COMMANDS}


async def start_resp(node: NodeAPI, host: str, port: int, config: ClusterConfig, *,
                     auth: Authenticator | None = None) -> RespServer:
    """Listen for Redis clients on HOST:PORT (OSError if the address is taken). `auth`
    defaults to the config's (`security.users_file`, `security.client_token`)."""
    server = RespServer(node, config, host, port, command_table(), auth)
    await server.start()
    return server


__all__ = ["RespServer", "check_resp_exposure", "command_table", "start_resp"]
