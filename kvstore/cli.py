"""The `kvstore` command: argv -> config -> runtime.

`node`, `cluster up`, `config check`, `users` and `certs init` live here; the client subcommands (get/put/
delete/status/watch-status/ring) and the parser conventions (CommandParser: one-line
usage errors, exit code 2) are in kvstore.client.cli, `chaos` in kvstore.chaos.cli.
Exit codes: 0 ok, 2 bad usage/config (one line, no traceback), 1 other failures; the
client commands' finer codes are in kvstore.client.cli.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import subprocess
import threading
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kvstore.client.cli import CommandParser as _Parser
from kvstore.config import ClusterConfig, load_config
from kvstore.errors import ConfigError, KVError

SERVER_COMMANDS = ("node", "cluster", "config", "users", "certs", "chaos")
CLIENT_COMMANDS = {"get", "put", "delete", "ls", "watch", "status", "watch-status", "ring"}
VALUE_OPTS = {"--url", "--token", "--timeout"}     # top-level options that take a value


def _config_path(arg: str | None) -> str:
    path = arg or os.environ.get("KVSTORE_CONFIG")
    if not path:
        raise ConfigError("--config: required (or set KVSTORE_CONFIG)")
    return path


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not (0 < int(port) < 65536):
        raise ConfigError(f"--listen: expected HOST:PORT, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


# ---- kvstore node ----------------------------------------------------------------------
def cmd_node(args: argparse.Namespace) -> int:
    node_id = args.id or os.environ.get("KVSTORE_NODE_ID")
    if not node_id:
        raise ConfigError("--id: required (or set KVSTORE_NODE_ID)")
    config = load_config(_config_path(args.config), data_dir=args.data_dir)
    spec = config.node(node_id)
    host, port = _parse_listen(args.listen) if args.listen else (spec.host, spec.port)
    from kvstore.runtime.logs import setup_logging

    fmt = args.log_format or getattr(getattr(config, "logging", None), "format", None) or "text"
    log_ctx = setup_logging(node_id, args.log_level, fmt=fmt, mode=config.replication.mode)
    warn = config.quorum_warning()
    if warn:
        logging.getLogger("kvstore").warning(warn)
    from kvstore.security.exposure import check_exposure

    # peers on other hosts with no peer authentication: refused (ConfigError, exit 2)
    # unless security.insecure, which is said loudly
    exposed = check_exposure(config, node_id, host)
    if exposed:
        logging.getLogger("kvstore").warning(exposed)
    # A node holds millions of small long-lived objects (one tuple per key): collect the
    # young generation less often so the cyclic GC does not keep re-walking them.
    gc.set_threshold(50_000, 20, 50)
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # uvloop is Linux-only; the stdlib loop works everywhere
        pass
    return asyncio.run(_serve(config, node_id, host, port, log_ctx))


async def _serve(config: ClusterConfig, node_id: str, host: str, port: int, log_ctx: Any = None) -> int:
    from aiohttp import web

    from kvstore.api.app import create_app
    from kvstore.runtime.node import Node

    log = logging.getLogger("kvstore")
    try:
        node = Node(config, node_id)    # recovery happens when the app starts the node
        node.log_context = log_ctx
    except KVError as e:
        print(f"kvstore node {node_id}: {e.message}", file=sys.stderr)
        return 1
    app = create_app(node)
    # hardening: idle keep-alive connections are closed after 75 s (not aiohttp's hour),
    # at most 100 headers and 16 KiB per header line (a KV-Context of a big cluster fits)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0,
                           keepalive_timeout=75.0, max_headers=100, max_field_size=16384, max_line_size=16384)
    try:
        await runner.setup()      # starts the node: recovery (a corrupt disk is refused here)
    except KVError as e:
        log.critical("cannot start: %s", e.message)
        print(f"kvstore node {node_id}: {e.message}", file=sys.stderr)
        return 1
    from kvstore.security.tls import server_context

    try:
        tls = server_context(config, node_id)     # None without a tls section
    except KVError as e:
        await runner.cleanup()
        print(f"kvstore node {node_id}: {e.message}", file=sys.stderr)
        return 2
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024, ssl_context=tls)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        print(f"kvstore node {node_id}: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return 1
    log.info("listening on %s://%s:%d", "https" if tls else "http", host, port)
    # ---- the Redis protocol (CONTRACT §11): only when the node's entry has `resp` ----
    resp = None
    spec = config.node(node_id)
    if spec.resp_host is not None and spec.resp_port is not None:
        from kvstore.api.resp import check_resp_exposure, start_resp
        try:
            exposed = check_resp_exposure(config, node_id)   # no TLS there yet: loopback only with tls
        except ConfigError as e:
            await runner.cleanup()
            print(f"kvstore: {e.message}", file=sys.stderr)
            return 2
        if exposed:
            log.warning(exposed)
        try:
            resp = await start_resp(node, spec.resp_host, spec.resp_port, config)
        except OSError as e:
            await runner.cleanup()
            print(f"kvstore node {node_id}: cannot listen on {spec.resp} (resp): {e.strerror or e}",
                  file=sys.stderr)
            return 1
    # ---- end of the Redis protocol block ----
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down (signal); exiting within %.0f s", SHUTDOWN_BOUND_S)
    # armed until the process ends: asyncio.run's own clean-up (cancelling leftover tasks,
    # joining the default executor's threads, e.g. a DNS lookup of a dead peer) is bounded too
    _shutdown_watchdog(SHUTDOWN_BOUND_S - 0.5, log)
    try:
        async with asyncio.timeout(SHUTDOWN_BOUND_S - 1.5):
            if resp is not None:            # Redis clients first (bounded: 1 s), then HTTP and the node
                await resp.stop()
            await runner.cleanup()
    except TimeoutError:
        log.error("clean shutdown did not finish within %.1f s; syncing files and exiting",
                  SHUTDOWN_BOUND_S - 1.5)
        os.sync()
        return 1
    return 0


SHUTDOWN_BOUND_S = 5.0   # documented: a node exits within this long after SIGTERM/SIGINT


def _shutdown_watchdog(after_s: float, log: logging.Logger) -> threading.Timer:
    """Last resort for a stuck event loop (a blocking call, a lost cancellation): after
    `after_s` flush every written file to disk (the WAL included) and exit the process."""

    def fire() -> None:
        log.critical("shutdown stuck for %.1f s: syncing files and exiting now", after_s)
        os.sync()
        os._exit(1)

    t = threading.Timer(after_s, fire)
    t.daemon = True
    t.start()
    return t


# ---- kvstore cluster up ----------------------------------------------------------------
def _get_json(url: str, timeout: float = 1.0) -> dict | None:
    import json
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cmd_cluster(args: argparse.Namespace) -> int:
    if args.action != "up":
        raise ConfigError(f"cluster: unknown action {args.action!r} (only 'up')")
    config_path = _config_path(args.config)
    config = load_config(config_path, data_dir=args.data_dir)
    data_root = Path(config.storage.data_dir)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    base = [sys.executable, "-m", "kvstore", "node", "--config", config_path]
    if args.data_dir:
        base += ["--data-dir", args.data_dir]
    stopping = False

    def stop_all(sig: int = signal.SIGTERM) -> None:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(sig)
        deadline = time.monotonic() + 10
        for p in procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        for n in config.cluster.nodes:
            d = data_root / n.id
            d.mkdir(parents=True, exist_ok=True)
            logs[n.id] = d / "node.log"
            f = open(logs[n.id], "ab")
            procs[n.id] = subprocess.Popen(base + ["--id", n.id], stdout=f, stderr=subprocess.STDOUT,
                                           start_new_session=True)
            f.close()
        deadline = time.monotonic() + 30
        pending = {n.id: n.url for n in config.cluster.nodes}
        while pending and not stopping:
            for nid, url in list(pending.items()):
                if procs[nid].poll() is not None:
                    print(f"kvstore: node {nid} exited with code {procs[nid].returncode} while starting; "
                          f"last lines of {logs[nid]}:\n{_tail(logs[nid])}", file=sys.stderr)
                    stop_all()
                    return 1
                if _get_json(url + "/health", 0.5) is not None:
                    del pending[nid]
            if time.monotonic() > deadline:
                print(f"kvstore: nodes {', '.join(pending)} did not answer /health within 30 s", file=sys.stderr)
                stop_all()
                return 1
            time.sleep(0.1)
        # give an election a moment so the roles printed are real
        lead_deadline = time.monotonic() + 3 * config.failure_detector.timeout_ms / 1000.0 + 2
        while not stopping and time.monotonic() < lead_deadline:
            infos = [_get_json(n.url + "/cluster") for n in config.cluster.nodes]
            if config.replication.mode != "single-leader" or any(i and i.get("role") == "leader" for i in infos):
                break
            time.sleep(0.1)
        print(f"cluster {config.cluster.name!r} is up ({config.replication.mode}"
              f"{', acks=' + config.acks if config.replication.mode == 'single-leader' else ''}); "
              f"data in {data_root.resolve()}; Ctrl-C stops it", flush=True)
        for n in config.cluster.nodes:
            info = _get_json(n.url + "/cluster") or {}
            role = info.get("role", "unknown")
            resp = f"  redis={n.resp}" if n.resp else ""
            print(f"{n.id}  {n.url}  {role}{resp}  pid={procs[n.id].pid}  log={logs[n.id]}", flush=True)
        while not stopping:
            for nid, p in procs.items():
                if p.poll() is not None:
                    print(f"kvstore: node {nid} exited unexpectedly (code {p.returncode}); stopping the "
                          f"cluster. Last lines of {logs[nid]}:\n{_tail(logs[nid])}", file=sys.stderr)
                    stop_all()
                    return 1
            time.sleep(0.2)
        print("stopping the cluster...", flush=True)
        stop_all()
        return 0
    finally:
        if any(p.poll() is None for p in procs.values()):
            stop_all()


# ---- kvstore config check ---------------------------------------------------------------
def cmd_config(args: argparse.Namespace) -> int:
    """`kvstore config check FILE`: every problem of FILE and of the KVSTORE_<SECTION>__<KEY>
    variables, one per line (`FILE:LINE: key: problem`) on stderr, exit 2; else
    `FILE: ok (<mode>, <n> nodes)` on stdout, exit 0."""
    from kvstore.config import check_file

    path = args.file or args.config or os.environ.get("KVSTORE_CONFIG")
    if not path:
        raise ConfigError("config check: the cluster file is required (kvstore config check FILE)")
    config, problems = check_file(path)
    if problems or config is None:
        for problem in problems:
            print(problem.render(path), file=sys.stderr)
        print(f"{path}: {len(problems)} problem{'' if len(problems) == 1 else 's'}", file=sys.stderr)
        return 2
    print(f"{path}: ok ({config.replication.mode}, {len(config.cluster.nodes)} nodes)")
    warn = config.quorum_warning()
    if warn:
        print(f"{path}: warning: {warn}", file=sys.stderr)
    return 0


# ---- kvstore users add|remove|list ------------------------------------------------------
def cmd_users(args: argparse.Namespace) -> int:
    """`kvstore users add FILE NAME --role ROLE [--prefix P]`: the new token is the LAST line
    of stdout (shown once; the file keeps its scrypt hash only). Adding an existing NAME
    replaces it with a new token (rotation). `remove FILE NAME` revokes; `list FILE` shows."""
    from kvstore.security import users

    if args.action == "add":
        if not args.name:
            raise ConfigError("users add: NAME is required (kvstore users add FILE NAME --role ROLE)")
        if not args.role:
            raise ConfigError("users add: --role is required (read, readwrite or admin)")
        token, replaced = users.add_user(args.file, args.name, args.role, args.prefix)
        scope = f", keys under {args.prefix!r}" if args.prefix else ""
        verb = "replaced" if replaced else "added"
        print(f"{verb} user {args.name!r} (role {args.role}{scope}) in {args.file}; its token, shown "
              "only now (nodes reload the file within a second):")
        print(token, flush=True)
        return 0
    if args.action == "remove":
        if not args.name:
            raise ConfigError("users remove: NAME is required (kvstore users remove FILE NAME)")
        if not users.remove_user(args.file, args.name):
            print(f"kvstore: no user {args.name!r} in {args.file}", file=sys.stderr)
            return 1
        print(f"removed user {args.name!r} from {args.file}")
        return 0
    if args.name or args.role or args.prefix:
        raise ConfigError("users list: takes only FILE")
    records = users.read_records(args.file)
    print(f"{'NAME':<24} {'ROLE':<10} {'PREFIX':<24} CREATED")
    for r in records.values():
        print(f"{r.name:<24} {r.role.value:<10} {(r.prefix or '-'):<24} {r.created or '-'}")
    return 0


# ---- kvstore certs init ---------------------------------------------------------------------
def cmd_certs(args: argparse.Namespace) -> int:
    """`kvstore certs init DIR --config FILE [--force]`: a CA, a certificate per node of
    FILE and a client certificate in DIR (kvstore/security/certs.py)."""
    from kvstore.security.certs import init_certs

    config = load_config(_config_path(args.config))
    written = init_certs(config, args.dir, force=args.force)
    for path in written:
        print(path)
    print(f"{len(written)} files in {args.dir}: ca.pem is the cluster's CA (give it to clients as --cacert); "
          "keep the *-key.pem files private", flush=True)
    return 0


# ---- dispatch --------------------------------------------------------------------------
def _subcommand(argv: list[str]) -> str | None:
    """The first word of argv that is not an option or the value of a top-level option."""
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in VALUE_OPTS:
            skip = True
            continue
        if a.startswith("-"):
            continue
        return a
    return None


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in logging.getLevelNamesMapping():
        raise argparse.ArgumentTypeError(
            f"must be one of debug, info, warning, error, critical; got {text!r}")
    return level


def _version() -> str:
    from kvstore import __version__
    return __version__


_EPILOG = """\
Run `kvstore COMMAND --help` for the options of a command.

exit codes:
  0 ok; 2 bad usage or bad config (one line on stderr); 1 any other failure.
  Client commands: 1 key not found; 3 unavailable, timeout, unreachable or
  indeterminate; 4 precondition failed (--if-match, --create).
"""


def build_parser() -> argparse.ArgumentParser:
    from kvstore.client.cli import add_client_commands, add_client_options

    p = _Parser(prog="kvstore", description="kvstore: a replicated key-value store", epilog=_EPILOG)
    p.add_argument("--version", action="version", version=f"kvstore {_version()}",
                   help="print the version and exit")
    add_client_options(p, top=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, title="commands")
    n = sub.add_parser("node", help="run one node in the foreground",
                       description="Run one node of the cluster in the foreground until SIGTERM/SIGINT.")
    n.add_argument("--config", metavar="FILE", help="the cluster file (env KVSTORE_CONFIG)")
    n.add_argument("--id", help="this node's id in the cluster file (env KVSTORE_NODE_ID)")
    n.add_argument("--listen", metavar="HOST:PORT",
                   help="listen address (default: the host and port of this node's URL)")
    n.add_argument("--data-dir", metavar="DIR",
                   help="replaces storage.data_dir: the node's files go in DIR/<id>")
    n.add_argument("--log-level", type=_log_level, metavar="LEVEL",
                   help="debug | info | warning | error | critical (env KVSTORE_LOG_LEVEL; default info)")
    n.add_argument("--log-format", choices=("text", "json"), default=None,
                   help="text lines, or one JSON object per line (default text)")
    c = sub.add_parser("cluster", help="cluster up: run every node of a config as local processes",
                       description="Start every node of FILE as a local child process, print each "
                                   "node's URL and role once ready, stop them all on Ctrl-C.")
    c.add_argument("action", choices=["up"], help="up: start the cluster")
    c.add_argument("--config", metavar="FILE", help="the cluster file (env KVSTORE_CONFIG)")
    c.add_argument("--data-dir", metavar="DIR", help="replaces storage.data_dir")
    cc = sub.add_parser("config", help="config check FILE: list every problem of a cluster file",
                        description="Check a cluster file: exit 0 if it is valid, else 2 with every "
                                    "problem listed.")
    cc.add_argument("action", choices=["check"], help="check: validate the file")
    cc.add_argument("file", nargs="?", metavar="FILE", help="the cluster file (or --config, or KVSTORE_CONFIG)")
    cc.add_argument("--config", metavar="FILE", help="the cluster file")
    u = sub.add_parser("users", help="users add|remove|list FILE: client users and their tokens",
                       description="Manage the users file (security.users_file). `add` prints the new "
                                   "token as the last line of stdout and stores only its hash; adding an "
                                   "existing NAME replaces it (a new token).")
    u.add_argument("action", choices=["add", "remove", "list"], help="add, remove or list users")
    u.add_argument("file", metavar="FILE", help="the users file (created by the first add, mode 0600)")
    u.add_argument("name", nargs="?", metavar="NAME", help="the user's name (add, remove)")
    u.add_argument("--role", choices=["read", "readwrite", "admin"],
                   help="read: GET, scans, watch; readwrite: also PUT/DELETE/batch; admin: also /admin/*")
    u.add_argument("--prefix", metavar="P", help="limit the user to keys that start with P")
    ce = sub.add_parser("certs", help="certs init DIR --config FILE: a CA and certificates for tls",
                        description="Write a new CA (DIR/ca.pem, DIR/ca-key.pem), a certificate per node "
                                    "(DIR/ID.pem, DIR/ID-key.pem) and a client certificate "
                                    "(DIR/client.pem, DIR/client-key.pem).")
    ce.add_argument("action", choices=["init"], help="init: make the certificates")
    ce.add_argument("dir", metavar="DIR", help="where to write them (created if needed)")
    ce.add_argument("--config", metavar="FILE", help="the cluster file (env KVSTORE_CONFIG)")
    ce.add_argument("--force", action="store_true", help="replace an existing CA in DIR")
    # `kvstore chaos` has its own parser (kvstore/chaos/cli.py; `kvstore chaos --help`):
    # main() hands it the arguments before argparse sees them.
    sub.add_parser("chaos", help="run a workload while injecting faults, then check the history",
                   add_help=False)
    add_client_commands(sub)
    return p


def _exit_status(e: SystemExit) -> int:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


def main(argv: list[str] | None = None) -> int:
    from kvstore.client import cli as client_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if _subcommand(argv) == "chaos":
            from kvstore.chaos.cli import main as chaos_main
            i = argv.index("chaos")
            try:
                return chaos_main(argv[:i] + argv[i + 1:])
            except SystemExit as e:      # its --help
                return _exit_status(e)
        parser = build_parser()
        try:
            args = client_cli.parse_namespace(parser, argv, [*SERVER_COMMANDS, *client_cli.COMMANDS])
            if args.command == "node" and not args.log_level and os.environ.get("KVSTORE_LOG_LEVEL"):
                try:
                    _log_level(os.environ["KVSTORE_LOG_LEVEL"])
                except argparse.ArgumentTypeError as e:
                    raise client_cli.UsageError(f"KVSTORE_LOG_LEVEL: {e}", "kvstore node") from None
        except client_cli.UsageError as e:
            return client_cli.report_usage(e, as_json=client_cli.wants_json(argv), err=sys.stderr)
        except SystemExit as e:          # --help, --version
            return _exit_status(e)
        if args.command in CLIENT_COMMANDS:
            return client_cli.run_namespace(args, argv=argv)
        if args.command == "node":
            return cmd_node(args)
        if args.command == "cluster":
            return cmd_cluster(args)
        if args.command == "config":
            return cmd_config(args)
        if args.command == "users":
            return cmd_users(args)
        if args.command == "certs":
            return cmd_certs(args)
        raise ConfigError(f"unknown command {args.command!r}")
    except ConfigError as e:
        print(f"kvstore: {e.message}", file=sys.stderr)
        return 2
    except KVError as e:
        print(f"kvstore: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
