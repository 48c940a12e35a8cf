"""The command-line client: `kvstore get/put/delete/status/watch-status/ring`, and the
parsing conventions every `kvstore` subcommand shares (CommandParser, UsageError).

kvstore/cli.py builds the one `kvstore` parser: it registers these subcommands with
add_client_commands() and runs them with run_namespace(). main() here is the same client
without the server's commands (`python -m kvstore.client.cli`): it needs nothing but the
client library.

Client options (--url, --token, --json, --timeout) may stand before or after the
subcommand: the top-level parser and every client subparser both know them (the
top-level ones under a `top_` dest); a value given after the subcommand wins, --url
values add up. Environment: KVSTORE_URL (comma-separated), KVSTORE_TOKEN (or the older
KVSTORE_CLIENT_TOKEN).

Exit codes (CONTRACT §8), the same with and without --json: 0 ok; 1 key not found;
2 bad usage or config; 3 unavailable, timeout, unreachable or indeterminate; 4
precondition failed (compare-and-set mismatch, create-only on an existing key). Any other
failure is 1 as well (CONTRACT §1). An error is one line on stderr (`kvstore: ...`); with
--json it is one JSON object {"error", "message", "exit_code", ...} on stderr and results
are JSON on stdout.

Imports: argparse, asyncio, json, re, sys and the client library (no server modules).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, NoReturn, TextIO, cast

from kvstore.errors import (
    BadRequest,
    ConfigError,
    Forbidden,
    KVError,
    NotFound,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
    VersionMismatch,
)

from .aio import AsyncClient
from .errors import Conflict
from .options import ACKS, CONSISTENCIES, READ_PREFERENCES, Acks, Consistency, ReadPreference
from .results import NodeStatus, Result
from .wire import DEFAULT_URL, parse_urls

COMMANDS = ("get", "put", "delete", "ls", "watch", "status", "watch-status", "ring")

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_FAILURE = 1          # anything that is none of the finer codes
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_PRECONDITION = 4

DEFAULT_TIMEOUT_S = 5.0

CLIENT_EPILOG = f"""\
environment:
  KVSTORE_URL             node URLs, comma-separated (when no --url is given;
                          default {DEFAULT_URL})
  KVSTORE_TOKEN           client token (when no --token is given; the older
                          KVSTORE_CLIENT_TOKEN works too)

exit codes:
  0 ok; 1 key not found; 2 bad usage or config; 3 unavailable, timeout, unreachable
  or indeterminate (a write that may or may not have been applied); 4 precondition
  failed (--if-match mismatch, --create on an existing key)
"""


# ---- parsing ----------------------------------------------------------------------------

class UsageError(Exception):
    """A bad command line (exit code 2). `prog` is the command whose --help explains it."""

    def __init__(self, message: str, prog: str = "kvstore") -> None:
        super().__init__(message)
        self.message = message
        self.prog = prog


class CommandParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one plain line) instead of printing usage and
    exiting; no abbreviated options (`--time` is not `--timeout`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(plain_usage_message(message), self.prog)

    def unknown_leading_option(self, argv: Sequence[str]) -> str | None:
        """An option before the subcommand that this parser does not know (argparse would
        take its value for the subcommand and complain about that instead)."""
        i = 0
        while i < len(argv):
            tok = argv[i]
            if tok in ("-", "--") or not tok.startswith("-"):
                return None
            action = self._option_string_actions.get(tok.split("=", 1)[0])
            if action is None:
                return tok
            i += 1 if ("=" in tok or action.nargs == 0) else 2
        return None


def _option_name(name: str) -> str:
    return name.split("/")[0]


def plain_usage_message(message: str) -> str:
    """argparse's wording -> the one kvstore uses ("missing KEY", "--url: needs a value")."""
    m = re.fullmatch(r"the following arguments are required: (.+)", message)
    if m:
        return f"missing {m[1]}"
    m = re.fullmatch(r"argument (\S+): expected one argument", message)
    if m:
        return f"{_option_name(m[1])}: needs a value"
    m = re.fullmatch(r"argument (\S+): invalid choice: (.+?) \(choose from (.+)\)", message, re.S)
    if m:
        choices = m[3].replace("'", "")
        if m[1] in ("COMMAND", "command"):
            return f"unknown command {m[2]} (one of: {choices})"
        return f"{_option_name(m[1])}: invalid value {m[2]} (one of: {choices})"
    m = re.fullmatch(r"argument (\S+): (.+)", message, re.S)
    if m:
        return f"{_option_name(m[1])}: {m[2]}"
    return message


def _urls_arg(text: str) -> list[str]:
    try:
        return parse_urls(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _seconds_arg(text: str) -> float:
    t = text.strip()
    scale = 1.0
    if t.endswith("ms"):
        t, scale = t[:-2], 0.001
    elif t.endswith("s"):
        t = t[:-1]
    try:
        v = float(t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds (5, 2.5s, 500ms), got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return v


def _count_arg(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def add_client_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--url/--token/--json/--timeout on `parser`. All default to SUPPRESS, so a namespace
    carries only what was given; `top` stores them under top_* (merged by
    args_from_namespace: the subcommand's value wins, --url values add up)."""
    pre = "top_" if top else ""
    g = parser.add_argument_group("client options (before or after the command)")
    g.add_argument("--url", dest=pre + "url", action="append", type=_urls_arg, metavar="URL",
                   default=argparse.SUPPRESS,
                   help="a node URL (http://HOST:PORT); repeat it or separate with commas for "
                        f"several (env KVSTORE_URL; default {DEFAULT_URL})")
    g.add_argument("--token", dest=pre + "token", metavar="TOKEN", default=argparse.SUPPRESS,
                   help="client token, sent as 'Authorization: Bearer TOKEN' (env KVSTORE_TOKEN)")
    g.add_argument("--cacert", dest=pre + "cacert", metavar="FILE", default=argparse.SUPPRESS,
                   help="trust this CA for https:// nodes (env KVSTORE_CACERT), e.g. certs/ca.pem")
    g.add_argument("--cert", dest=pre + "cert", metavar="FILE", default=argparse.SUPPRESS,
                   help="client certificate for nodes with tls.client_auth (env KVSTORE_CERT)")
    g.add_argument("--key", dest=pre + "tls_key", metavar="FILE", default=argparse.SUPPRESS,
                   help="the client certificate's key (env KVSTORE_KEY)")
    g.add_argument("--json", dest=pre + "json", action="store_true", default=argparse.SUPPRESS,
                   help="machine-readable output: results as JSON on stdout, an error as one "
                        "JSON object on stderr")
    g.add_argument("--timeout", dest=pre + "timeout", type=_seconds_arg, metavar="SECONDS",
                   default=argparse.SUPPRESS,
                   help=f"total deadline of the command, retries included (default {DEFAULT_TIMEOUT_S:g})")


def add_client_commands(sub: Any) -> None:
    """Register the client subcommands on `sub` (the result of add_subparsers)."""

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=summary, description=description,
                                                    epilog=CLIENT_EPILOG)
        add_client_options(p, top=False)
        return p

    acks_help = "acknowledgement level of this write: " + " | ".join(ACKS) + " (default: the cluster's)"

    p = command("get", "print the value of KEY (raw bytes) to stdout",
                "Print the value of KEY to stdout, byte for byte (exit 1 if it does not exist).")
    p.add_argument("key", metavar="KEY", help="the key")
    p.add_argument("--consistency", choices=CONSISTENCIES,
                   help="leader: linearizable (the default with --read-preference leader); "
                        "local: the answering node's own, possibly stale, copy")
    p.add_argument("--read-preference", choices=READ_PREFERENCES, default="leader",
                   help="which node serves the read (default leader)")

    p = command("put", "store VALUE under KEY",
                "Store VALUE under KEY and print its new version.")
    p.add_argument("key", metavar="KEY", help="the key")
    p.add_argument("value", metavar="VALUE", help="the value; - reads it from stdin (binary-safe)")
    pre = p.add_mutually_exclusive_group()
    pre.add_argument("--if-match", metavar="VERSION",
                     help="only if the key's current version is VERSION (compare-and-set; exit 4 if not)")
    pre.add_argument("--create", action="store_true",
                     help="only if the key does not exist yet (If-None-Match: *; exit 4 if it does)")
    p.add_argument("--acks", choices=ACKS, help=acks_help)
    p.add_argument("--ttl", type=_seconds_arg, metavar="SECONDS",
                   help="the key expires after SECONDS (a put without --ttl clears an earlier one)")

    p = command("delete", "delete KEY (an absent key is not an error)",
                "Delete KEY. Deleting an absent key is not an error.")
    p.add_argument("key", metavar="KEY", help="the key")
    p.add_argument("--if-match", metavar="VERSION",
                   help="only if the key's current version is VERSION (exit 4 if not)")
    p.add_argument("--acks", choices=ACKS, help=acks_help)

    p = command("ls", "list the keys under PREFIX (all keys without one)",
                "List the keys under PREFIX in byte order, one per line (with --values: key, tab, value "
                "as UTF-8 with escapes). Pages through any number of keys with bounded memory.")
    p.add_argument("key", metavar="PREFIX", nargs="?", default="", help="the key prefix (default: every key)")
    p.add_argument("--values", action="store_true", help="print each key's value too")
    p.add_argument("--limit", type=_count_arg, metavar="N", help="stop after N keys")
    p.add_argument("--consistency", choices=CONSISTENCIES, help="leader (linearizable pages) or local")

    p = command("watch", "print every change under PREFIX as it happens",
                "Print every change of a key under PREFIX (put, delete, expire) as it happens, until "
                "Ctrl-C (or --count changes); resumes by itself after a disconnect or a failover.")
    p.add_argument("key", metavar="PREFIX", nargs="?", default="", help="the key prefix (default: every key)")
    p.add_argument("--from", dest="from_token", metavar="TOKEN",
                   help="start after this change token (the last one printed) instead of now")
    p.add_argument("--count", type=_count_arg, metavar="N", help="stop after N changes")

    command("status", "the cluster as a table: node, role, term, state, lag",
            "Print the cluster as a table: each node's role, term, state and replication lag.")

    p = command("watch-status", "the status table, refreshed until Ctrl-C",
                "Print the status table again every --interval seconds until Ctrl-C (or --count times).")
    p.add_argument("--count", type=_count_arg, metavar="N", help="stop after N tables")
    p.add_argument("--interval", type=_seconds_arg, default=1.0, metavar="SECONDS",
                   help="seconds between tables (default 1)")

    p = command("ring", "which nodes hold KEY (leaderless mode)",
                "Print the replicas of KEY and its coordinator (leaderless mode: GET /ring).")
    p.add_argument("key", metavar="KEY", help="the key")


def build_parser(prog: str = "kvstore") -> CommandParser:
    """The client commands alone (kvstore/cli.py builds the full `kvstore` parser)."""
    p = CommandParser(prog=prog, description="kvstore command-line client", epilog=CLIENT_EPILOG)
    add_client_options(p, top=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser, title="commands")
    add_client_commands(sub)
    return p


def parse_namespace(parser: argparse.ArgumentParser, argv: Sequence[str],
                    commands: Sequence[str]) -> argparse.Namespace:
    """Parse argv; UsageError for anything wrong, naming the subcommand whose --help helps.
    SystemExit(0) after --help or --version (argparse prints them)."""
    if isinstance(parser, CommandParser):
        unknown = parser.unknown_leading_option(argv)
        if unknown is not None:
            raise UsageError(f"unknown option {unknown!r}", parser.prog)
    ns, extra = parser.parse_known_args(list(argv))
    command = getattr(ns, "command", None)
    if extra:
        prog = f"{parser.prog} {command}" if command else parser.prog
        first = extra[0]
        if first.startswith("-") and first != "-":
            raise UsageError(f"unknown option {first!r}", prog)
        raise UsageError(f"unexpected argument {first!r}", prog)
    if not command:
        raise UsageError(f"missing command (one of: {', '.join(commands)})", parser.prog)
    return ns


@dataclass
class Args:
    """A client command, resolved from the command line and the environment."""

    command: str
    positionals: list[str]
    urls: list[str] = field(default_factory=lambda: [DEFAULT_URL])
    token: str | None = None
    json: bool = False
    timeout: float = DEFAULT_TIMEOUT_S
    count: int | None = None
    interval: float = 1.0
    if_match: str | None = None
    create: bool = False
    consistency: Consistency | None = None
    acks: Acks | None = None
    read_preference: ReadPreference = "leader"
    ttl: float | None = None
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    values: bool = False
    limit: int | None = None
    from_token: str | None = None

    @property
    def prog(self) -> str:
        return f"kvstore {self.command}"


def args_from_namespace(ns: argparse.Namespace, env: Mapping[str, str]) -> Args:
    """Merge the options given before and after the subcommand with the environment."""
    command = str(ns.command)
    prog = f"kvstore {command}"
    urls: list[str] = []
    for group in [*getattr(ns, "top_url", []), *getattr(ns, "url", [])]:
        urls.extend(u for u in group if u not in urls)
    if not urls and env.get("KVSTORE_URL", "").strip():
        try:
            urls = parse_urls(env["KVSTORE_URL"])
        except ConfigError as e:
            raise UsageError(f"KVSTORE_URL: {e.message}", prog) from None
    token = getattr(ns, "token", None) or getattr(ns, "top_token", None) \
        or env.get("KVSTORE_TOKEN") or env.get("KVSTORE_CLIENT_TOKEN") or None
    positionals = [getattr(ns, name) for name in ("key", "value") if getattr(ns, name, None) is not None]
    return Args(
        command=command, positionals=positionals, urls=urls or [DEFAULT_URL], token=token,
        json=bool(getattr(ns, "json", False) or getattr(ns, "top_json", False)),
        timeout=float(getattr(ns, "timeout", getattr(ns, "top_timeout", DEFAULT_TIMEOUT_S))),
        count=getattr(ns, "count", None), interval=float(getattr(ns, "interval", 1.0)),
        if_match=getattr(ns, "if_match", None), create=bool(getattr(ns, "create", False)),
        consistency=cast("Consistency | None", getattr(ns, "consistency", None)),
        acks=cast("Acks | None", getattr(ns, "acks", None)),
        read_preference=cast(ReadPreference, getattr(ns, "read_preference", "leader")),
        ttl=getattr(ns, "ttl", None), values=bool(getattr(ns, "values", False)),
        cacert=getattr(ns, "cacert", None) or getattr(ns, "top_cacert", None) or env.get("KVSTORE_CACERT") or None,
        cert=getattr(ns, "cert", None) or getattr(ns, "top_cert", None) or env.get("KVSTORE_CERT") or None,
        key=getattr(ns, "tls_key", None) or getattr(ns, "top_tls_key", None) or env.get("KVSTORE_KEY") or None,
        limit=getattr(ns, "limit", None), from_token=getattr(ns, "from_token", None),
    )


def wants_json(argv: Sequence[str]) -> bool:
    """--json among the options (before a `--`): errors are then JSON too, usage errors included."""
    argv = list(argv)
    return "--json" in (argv[:argv.index("--")] if "--" in argv else argv)


def parse_args(argv: Sequence[str], env: Mapping[str, str]) -> Args:
    """The command line of the client commands -> Args (UsageError if it is wrong)."""
    return args_from_namespace(parse_namespace(build_parser(), argv, COMMANDS), env)


# ---- errors -----------------------------------------------------------------------------

def exit_code_for(e: KVError) -> int:
    if isinstance(e, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(e, VersionMismatch):
        return EXIT_PRECONDITION
    if isinstance(e, (Unavailable, Timeout)):          # NotLeader, IndeterminateError included
        return EXIT_UNAVAILABLE
    if isinstance(e, (ConfigError, BadRequest, Unauthorized, Forbidden, TooLarge)):
        return EXIT_USAGE
    return EXIT_FAILURE


def error_text(e: KVError, args: Args) -> str:
    """What went wrong, in the CLI's words (the library's message inside)."""
    key = args.positionals[0] if args.positionals else ""
    if isinstance(e, NotFound):
        return f"not found: {key}"
    if isinstance(e, VersionMismatch):
        what = "the key already exists" if args.create else "version mismatch"
        return f"{what}: {e.message}"
    if isinstance(e, Conflict):
        return f"{key} has {len(e.siblings)} concurrent versions (siblings); --json shows them all"
    if isinstance(e, ConfigError):
        return f"{e.message} (see {args.prog} --help)"
    if isinstance(e, Unauthorized):
        return f"unauthorized: {e.message} (give --token or set KVSTORE_TOKEN)"
    if isinstance(e, Forbidden):
        return f"forbidden: {e.message} (this token's role or key prefixes do not allow it)"
    if isinstance(e, Timeout):
        return f"indeterminate: {e.message}"
    if isinstance(e, Unavailable):
        return f"unavailable: {e.message}"
    if isinstance(e, (BadRequest, TooLarge)):
        return f"rejected: {e.message}"
    return f"error: {e.message}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _write_error(err: TextIO, *, as_json: bool, code: str, message: str, exit_code: int,
                 details: Mapping[str, Any] | None = None) -> int:
    if as_json:
        obj = {"error": code, "message": message, "exit_code": exit_code}
        obj.update((k, v) for k, v in (details or {}).items() if k not in obj)
        err.write(json.dumps(obj, default=str) + "\n")
    else:
        err.write(f"kvstore: {_one_line(message)}\n")
    err.flush()
    return exit_code


def report_error(e: KVError, args: Args, err: TextIO) -> int:
    code = exit_code_for(e)
    details = dict(e.details)
    if args.positionals:
        details.setdefault("key", args.positionals[0])
    return _write_error(err, as_json=args.json, code=e.code, message=error_text(e, args),
                        exit_code=code, details=details)


def report_usage(e: UsageError, *, as_json: bool, err: TextIO) -> int:
    """`kvstore: WHAT (see kvstore CMD --help)`, or one JSON object with --json."""
    if as_json:
        return _write_error(err, as_json=True, code="usage", message=e.message, exit_code=EXIT_USAGE,
                            details={"help": f"{e.prog} --help"})
    return _write_error(err, as_json=False, code="usage", message=f"{e.message} (see {e.prog} --help)",
                        exit_code=EXIT_USAGE)


# ---- output -----------------------------------------------------------------------------

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


# ---- commands ---------------------------------------------------------------------------

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
                raise ConfigError("this cluster is not in leaderless mode (it has no /ring endpoint)") from None
            continue
        info = reply.payload()
        if args.json or not isinstance(info, dict):
            out.write(json.dumps(info) + "\n")
        else:
            pref = info.get("preference_list") or info.get("owners") or []
            out.write(f"{args.positionals[0]}: replicas {', '.join(map(str, pref))}"
                      f"; coordinator {info.get('coordinator')}\n")
        return EXIT_OK
    raise last or Unavailable("no node answered")


def _read_value(raw: str, stdin: IO[Any]) -> bytes:
    if raw != "-":
        return raw.encode("utf-8", errors="surrogateescape")
    buf = getattr(stdin, "buffer", None)
    if buf is not None:
        return bytes(buf.read())
    data = stdin.read()
    return data if isinstance(data, bytes) else str(data).encode("utf-8")


async def _run(args: Args, stdin: IO[Any], out: TextIO, err: TextIO) -> int:
    client = AsyncClient(args.urls, args.token, args.timeout, attempt_timeout=min(2.0, args.timeout),
                         read_preference=args.read_preference, cacert=args.cacert, cert=args.cert, key=args.key)
    try:
        if args.command in ("status", "watch-status"):
            return await _status(client, args, out, err)
        if args.command == "ring":
            return await _ring(client, args, out)
        if args.command == "ls":
            return await _ls(client, args, out)
        if args.command == "watch":
            return await _watch(client, args, out)
        # Fail fast with one clear line when no URL answers at all (a typo'd --url
        # should not wait out the whole retry deadline).
        await client.status()
        key = args.positionals[0]
        if args.command == "get":
            try:
                res = await client.get(key, consistency=args.consistency)
            except Conflict as e:
                if not args.json:
                    raise
                sibs = [{"version": sb.version, "deleted": sb.value is None, **_value_json(sb.value)}
                        for sb in e.siblings]
                out.write(json.dumps({"key": key, "siblings": sibs, "context": e.context}) + "\n")
                return EXIT_OK
            if args.json:
                out.write(json.dumps(_result_json(res, with_value=True)) + "\n")
            else:
                _write_bytes(out, res.value or b"")
            return EXIT_OK
        if args.command == "put":
            data = _read_value(args.positionals[1], stdin)
            if args.create:
                res = await client.create(key, data, acks=args.acks)
            else:
                res = await client.put(key, data, if_match=args.if_match, acks=args.acks, ttl=args.ttl)
        else:
            res = await client.delete(key, if_match=args.if_match, acks=args.acks)
        if args.json:
            out.write(json.dumps(_result_json(res, with_value=False)) + "\n")
        else:
            out.write(f"OK version={res.version}\n" if res.version else "OK\n")
        return EXIT_OK
    finally:
        await client.close()


def _text(value: bytes | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "backslashreplace").encode("unicode_escape").decode("ascii")


async def _ls(client: AsyncClient, args: Args, out: TextIO) -> int:
    n = 0
    page = min(1000, args.limit) if args.limit else 1000
    async for e in client.scan(args.positionals[0] if args.positionals else "", limit=page,
                               keys_only=not args.values, consistency=args.consistency):
        if args.json:
            row: dict[str, Any] = {"key": e.key, "version": e.version}
            if args.values:
                row.update(_value_json(e.value))
            if e.ttl is not None:
                row["ttl"] = e.ttl
            out.write(json.dumps(row) + "\n")
        elif args.values:
            out.write(f"{e.key}\t{_text(e.value)}\n")
        else:
            out.write(e.key + "\n")
        n += 1
        if args.limit and n >= args.limit:
            break
    out.flush()
    return EXIT_OK


async def _watch(client: AsyncClient, args: Args, out: TextIO) -> int:
    n = 0
    async for ev in client.watch(args.positionals[0] if args.positionals else "", from_token=args.from_token):
        if args.json:
            row: dict[str, Any] = {"type": ev.type, "key": ev.key, "version": ev.version, "token": ev.token}
            if ev.value is not None:
                row.update(_value_json(ev.value))
            out.write(json.dumps(row) + "\n")
        else:
            tail = f" {_text(ev.value)}" if ev.type == "put" else ""
            out.write(f"{ev.type} {ev.key}{tail}  (token {ev.token})\n")
        out.flush()
        n += 1
        if args.count and n >= args.count:
            break
    return EXIT_OK


async def _status(client: AsyncClient, args: Args, out: TextIO, err: TextIO) -> int:
    if args.command == "status":
        rows = await client.cluster_overview()
        out.write((json.dumps(_rows_json(rows)) if args.json else format_table(rows)) + "\n")
        return EXIT_OK
    tty = out.isatty() if hasattr(out, "isatty") else False
    n = 0
    code = EXIT_OK
    while args.count is None or n < args.count:
        if n:
            await asyncio.sleep(args.interval)
        n += 1
        stamp = time.strftime("%H:%M:%S")
        try:
            rows = await client.cluster_overview()
        except KVError as e:
            # one frame failed: say so in the stream and go on; the exit code is that of
            # the last frame
            code = exit_code_for(e)
            text = (json.dumps({"time": stamp, "error": e.code, "message": e.message, "exit_code": code})
                    if args.json else f"{stamp}  {error_text(e, args)}")
        else:
            code = EXIT_OK
            if args.json:
                text = json.dumps({"time": stamp, "nodes": _rows_json(rows)})
            else:
                text = f"{stamp}  kvstore cluster ({', '.join(args.urls)})\n{format_table(rows)}\n"
        if tty and not args.json:
            out.write("\x1b[H\x1b[2J")
        out.write(text + "\n")
        out.flush()
    return code


def run(args: Args, *, stdin: IO[Any] | None = None, stdout: TextIO | None = None,
        stderr: TextIO | None = None) -> int:
    """Run one client command; every failure becomes its exit code and one line (or one
    JSON object) on stderr, never a traceback."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    inp = stdin or sys.stdin
    try:
        return asyncio.run(_run(args, inp, out, err))
    except KVError as e:
        return report_error(e, args, err)
    except KeyboardInterrupt:
        if args.command in ("watch-status", "watch"):
            return EXIT_OK
        return _write_error(err, as_json=args.json, code="interrupted", message="interrupted", exit_code=130)
    except OSError as e:  # e.g. a closed stdout pipe, an unreadable stdin
        return _write_error(err, as_json=args.json, code="os_error",
                            message=f"error: {type(e).__name__}: {e}", exit_code=EXIT_FAILURE)


def run_namespace(ns: argparse.Namespace, *, argv: Sequence[str], env: Mapping[str, str] | None = None,
                  stdin: IO[Any] | None = None, stdout: TextIO | None = None,
                  stderr: TextIO | None = None) -> int:
    """Run a client command parsed by kvstore/cli.py's parser."""
    err = stderr or sys.stderr
    try:
        args = args_from_namespace(ns, os.environ if env is None else env)
    except UsageError as e:
        return report_usage(e, as_json=wants_json(argv), err=err)
    return run(args, stdin=stdin, stdout=stdout, stderr=err)


def _exit_status(e: SystemExit) -> int:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)


def main(argv: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None,
         stdin: IO[Any] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """The client commands on their own (`python -m kvstore.client.cli get KEY ...`)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if (args_list and not args_list[0].startswith("-") and args_list[0] not in COMMANDS
            and any(a in COMMANDS for a in args_list[1:])):
        args_list = args_list[1:]  # the program name (kvstore, a path to it, ...)
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        with contextlib.redirect_stdout(out):          # where argparse prints --help
            ns = parse_namespace(build_parser(), args_list, COMMANDS)
    except UsageError as e:
        return report_usage(e, as_json=wants_json(args_list), err=err)
    except SystemExit as e:
        return _exit_status(e)
    return run_namespace(ns, argv=args_list, env=env, stdin=stdin, stdout=out, stderr=err)


if __name__ == "__main__":
    sys.exit(main())
