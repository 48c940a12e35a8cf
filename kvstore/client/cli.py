"""The command-line client: `kvstore get/put/delete/status/watch-status`.

kvstore/cli.py hands the FULL argv here (global options may stand before or after the
subcommand). Exit codes: 0 ok; 2 bad usage (one line); 1 any other failure (one line
on stderr, never a traceback).

Imports: the client library, asyncio, json, os, sys.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from kvstore.errors import ConfigError, KVError, NotFound, Unavailable

from .aio import AsyncClient
from .errors import Conflict
from .results import NodeStatus, Result
from .wire import DEFAULT_URL

COMMANDS = ("get", "put", "delete", "status", "watch-status", "ring")
_VALUE_OPTS = {"--url", "--token", "--timeout", "--count", "--interval", "--if-match",
               "--consistency", "--acks", "--read-preference"}
_FLAG_OPTS = {"--json", "--help", "-h"}

USAGE = """\
usage: kvstore [--url URL]... [--token TOKEN] [--json] [--timeout SECONDS] COMMAND ...

commands:
  get KEY                 print the value of KEY (raw bytes) to stdout
  put KEY VALUE|-         store VALUE (- reads it from stdin)
  delete KEY              delete KEY (deleting an absent key is not an error)
  status                  the cluster as a table: node, role, term, state, lag
  watch-status            the same table, refreshed every second until Ctrl-C

options (before or after the command):
  --url URL               a node URL; repeat for several (env KVSTORE_URL, comma-separated;
                          default http://127.0.0.1:7001)
  --token TOKEN           client token (env KVSTORE_CLIENT_TOKEN)
  --json                  machine-readable output
  --timeout SECONDS       total deadline of one command, retries included (default 5)
  --if-match VERSION      put/delete: only if the key's version is VERSION (compare-and-set)
  --consistency LEVEL     get: leader | local
  --acks LEVEL            put/delete: async | semi-sync | sync
"""


class UsageError(Exception):
    """Bad command line: exit code 2."""


@dataclass
class Args:
    command: str
    positionals: list[str]
    urls: list[str] = field(default_factory=list)
    token: str | None = None
    json: bool = False
    timeout: float = 5.0
    count: int | None = None
    interval: float = 1.0
    if_match: str | None = None
    consistency: str | None = None
    acks: str | None = None
    read_preference: str | None = None
    help: bool = False


def parse_args(argv: list[str], env: dict[str, str]) -> Args:
    argv = list(argv)
    if (argv and not argv[0].startswith("-") and argv[0] not in COMMANDS
            and any(a in COMMANDS for a in argv[1:])):
        argv = argv[1:]  # the program name (kvstore, a path to it, ...)
    opts: dict[str, list[str]] = {}
    flags: set[str] = set()
    positionals: list[str] = []
    i = 0
    only_positionals = False
    while i < len(argv):
        tok = argv[i]
        i += 1
        if only_positionals or tok == "-" or not tok.startswith("-"):
            positionals.append(tok)
            continue
        if tok == "--":
            only_positionals = True
            continue
        name, eq, inline = tok.partition("=")
        if name in _FLAG_OPTS and not eq:
            flags.add(name)
        elif name in _VALUE_OPTS:
            if eq:
                value = inline
            elif i < len(argv):
                value = argv[i]
                i += 1
            else:
                raise UsageError(f"{name}: needs a value")
            opts.setdefault(name, []).append(value)
        else:
            raise UsageError(f"unknown option {tok!r} (see kvstore --help)")
    if "--help" in flags or "-h" in flags:
        return Args(command="", positionals=[], help=True)
    if not positionals:
        raise UsageError(f"missing command (one of: {', '.join(COMMANDS)})")
    command, rest = positionals[0], positionals[1:]
    if command not in COMMANDS:
        raise UsageError(f"unknown command {command!r} (one of: {', '.join(COMMANDS)})")
    expected = {"get": (["KEY"], 1), "delete": (["KEY"], 1), "put": (["KEY", "VALUE"], 2),
                "status": ([], 0), "watch-status": ([], 0), "ring": (["KEY"], 1)}[command]
    names, n = expected
    if len(rest) < n:
        raise UsageError(f"{command}: missing {names[len(rest)]} "
                         f"(usage: kvstore {command} {' '.join(names)})".replace(" )", ")"))
    if len(rest) > n:
        raise UsageError(f"{command}: unexpected argument {rest[n]!r}")

    def single(name: str) -> str | None:
        vals = opts.get(name)
        if vals and len(vals) > 1:
            raise UsageError(f"{name}: given more than once")
        return vals[0] if vals else None

    urls: list[str] = []
    for u in opts.get("--url", []):
        urls.extend(p.strip() for p in u.split(",") if p.strip())
    if not urls:
        urls = [p.strip() for p in env.get("KVSTORE_URL", "").split(",") if p.strip()] or [DEFAULT_URL]
    args = Args(command=command, positionals=rest, urls=urls, json="--json" in flags,
                token=single("--token") or env.get("KVSTORE_CLIENT_TOKEN") or None,
                if_match=single("--if-match"), consistency=single("--consistency"),
                acks=single("--acks"), read_preference=single("--read-preference"))
    timeout = single("--timeout")
    if timeout is not None:
        args.timeout = _positive_float("--timeout", timeout)
    interval = single("--interval")
    if interval is not None:
        args.interval = _positive_float("--interval", interval)
    count = single("--count")
    if count is not None:
        if not count.isdigit() or int(count) < 1:
            raise UsageError(f"--count: must be a positive integer, got {count!r}")
        args.count = int(count)
    if args.consistency is not None and args.consistency not in ("leader", "local"):
        raise UsageError(f"--consistency: must be leader or local, got {args.consistency!r}")
    if args.read_preference is not None and args.read_preference not in ("leader", "any", "sticky", "nearest"):
        raise UsageError(f"--read-preference: must be leader, any, sticky or nearest, got {args.read_preference!r}")
    if args.acks is not None and args.acks not in ("async", "semi-sync", "sync"):
        raise UsageError(f"--acks: must be async, semi-sync or sync, got {args.acks!r}")
    return args


def _positive_float(name: str, text: str) -> float:
    try:
        v = float(text.rstrip("s"))
    except ValueError:
        raise UsageError(f"{name}: must be a number of seconds, got {text!r}") from None
    if not v > 0:
        raise UsageError(f"{name}: must be positive, got {text!r}")
    return v


# ---- output -------------------------------------------------------------------------

def _write_bytes(out: TextIO, data: bytes) -> None:
    buf = getattr(out, "buffer", None)
    out.flush()
    if buf is not None:
        buf.write(data)
        buf.flush()
    else:
        out.write(data.decode("utf-8", errors="surrogateescape"))
        out.flush()


def _value_json(value: bytes | None) -> dict[str, Any]:
    if value is None:
        return {"value": None}
    try:
        return {"value": value.decode("utf-8"), "value_b64": base64.b64encode(value).decode()}
    except UnicodeDecodeError:
        return {"value": None, "value_b64": base64.b64encode(value).decode()}


def _result_json(res: Result, *, with_value: bool) -> dict[str, Any]:
    d: dict[str, Any] = {"key": res.key, "version": res.version, "token": res.token, "node": res.node}
    if with_value:
        d.update(_value_json(res.value))
    return d


def format_table(rows: list[NodeStatus]) -> str:
    header = ["NODE", "URL", "ROLE", "TERM", "STATE", "LAG_ENTRIES", "LAG_MS", "LEADER"]
    body: list[list[str]] = []
    for r in rows:
        lag_ms = "-" if r.lag_ms is None else (f"{r.lag_ms:.0f}" if isinstance(r.lag_ms, float) else str(r.lag_ms))
        body.append([
            r.id, r.url, r.role or ("unreachable" if not r.reachable else "-"),
            "-" if r.term is None else str(r.term),
            r.state if r.reachable or r.state != "up" else "unreachable",
            "-" if r.lag_entries is None else str(r.lag_entries),
            lag_ms, "*" if r.is_leader else "",
        ])
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    for row in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _rows_json(rows: list[NodeStatus]) -> list[dict[str, Any]]:
    return [{"id": r.id, "url": r.url, "role": r.role, "term": r.term, "state": r.state,
             "lag_entries": r.lag_entries, "lag_ms": r.lag_ms, "leader": r.is_leader,
             "reachable": r.reachable, "applied": r.applied} for r in rows]


# ---- commands -----------------------------------------------------------------------

async def _ring(client: AsyncClient, args: Args, out: TextIO) -> int:
    """kvstore ring KEY: where a key lives (leaderless mode; GET /ring?key=KEY)."""
    from urllib.parse import quote
    last: KVError | None = None
    for url in args.urls:
        try:
            reply = await client._send("GET", url, "/ring?key=" + quote(args.positionals[0], safe=""),
                                       write=False, timeout=min(2.0, args.timeout))
        except KVError as e:
            last = e
            if e.details.get("status") == 404:
                raise ConfigError("ring: this cluster is not in leaderless mode (no /ring endpoint)") from None
            continue
        info = reply.payload()
        if args.json or not isinstance(info, dict):
            out.write(json.dumps(info) + "\n")
        else:
            pref = info.get("preference_list") or info.get("owners") or []
            out.write(f"{args.positionals[0]}: replicas {', '.join(map(str, pref))}"
                      f"; coordinator {info.get('coordinator')}\n")
        return 0
    raise last or Unavailable("no node answered")


async def _run(args: Args, stdin: Any, out: TextIO) -> int:
    options: dict[str, Any] = {"attempt_timeout": min(2.0, args.timeout)}
    if args.read_preference:
        options["read_preference"] = args.read_preference
    client = AsyncClient(args.urls, args.token, args.timeout, **options)
    try:
        if args.command in ("status", "watch-status"):
            return await _status(client, args, out)
        if args.command == "ring":
            return await _ring(client, args, out)
        # Fail fast with one clear line when no URL answers at all (a typo'd --url
        # should not wait out the whole retry deadline).
        await client.status()
        key = args.positionals[0]
        if args.command == "get":
            try:
                res = await client.get(key, consistency=args.consistency)
            except Conflict as e:
                if not args.json:
                    raise Conflict(f"{key} has {len(e.siblings)} concurrent versions (siblings); "
                                   "--json shows them all") from e
                sibs = [{"version": sb.version, "deleted": sb.value is None, **_value_json(sb.value)}
                        for sb in e.siblings]
                out.write(json.dumps({"key": key, "siblings": sibs, "context": e.context}) + "\n")
                return 0
            if args.json:
                out.write(json.dumps(_result_json(res, with_value=True)) + "\n")
            else:
                _write_bytes(out, res.value or b"")
            return 0
        if args.command == "put":
            raw = args.positionals[1]
            if raw == "-":
                data = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode()
            else:
                data = raw.encode("utf-8", errors="surrogateescape")
            res = await client.put(key, data, if_match=args.if_match, acks=args.acks)
        else:
            res = await client.delete(key, if_match=args.if_match, acks=args.acks)
        if args.json:
            out.write(json.dumps(_result_json(res, with_value=False)) + "\n")
        else:
            out.write(f"OK version={res.version}\n" if res.version else "OK\n")
        return 0
    finally:
        await client.close()


async def _status(client: AsyncClient, args: Args, out: TextIO) -> int:
    if args.command == "status":
        rows = await client.cluster_overview()
        out.write((json.dumps(_rows_json(rows)) if args.json else format_table(rows)) + "\n")
        return 0
    tty = out.isatty() if hasattr(out, "isatty") else False
    n = 0
    code = 0
    while args.count is None or n < args.count:
        if n:
            await asyncio.sleep(args.interval)
        n += 1
        stamp = time.strftime("%H:%M:%S")
        try:
            rows = await client.cluster_overview()
        except KVError as e:
            code = 1
            text = json.dumps({"time": stamp, "error": e.message}) if args.json else f"{stamp}  error: {e.message}"
        else:
            code = 0
            if args.json:
                text = json.dumps({"time": stamp, "nodes": _rows_json(rows)})
            else:
                text = f"{stamp}  kvstore cluster ({', '.join(args.urls)})\n{format_table(rows)}\n"
        if tty and not args.json:
            out.write("\x1b[H\x1b[2J")
        out.write(text + "\n")
        out.flush()
    return code


def main(argv: list[str] | None = None, *, env: dict[str, str] | None = None,
         stdin: Any = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    env = dict(os.environ) if env is None else env
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    stdin = stdin or sys.stdin
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, env)
    except UsageError as e:
        err.write(f"kvstore: {e}\n")
        return 2
    if args.help:
        out.write(USAGE)
        return 0
    try:
        return asyncio.run(_run(args, stdin, out))
    except ConfigError as e:
        err.write(f"kvstore: {e.message}\n")
        return 2
    except NotFound:
        err.write(f"kvstore: not found: {args.positionals[0] if args.positionals else ''}\n")
        return 1
    except Conflict as e:
        err.write(f"kvstore: {e.message}\n")
        return 1
    except KVError as e:
        err.write(f"kvstore: error: {e.message}\n")
        return 1
    except KeyboardInterrupt:
        if args.command == "watch-status":
            return 0
        err.write("kvstore: interrupted\n")
        return 130
    except (OSError, ValueError) as e:  # e.g. a closed stdout pipe, an undecodable stdin
        err.write(f"kvstore: error: {type(e).__name__}: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
