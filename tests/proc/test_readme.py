"""The README's quick starts, run as a user pastes them, against a real local cluster.

The README marks its blocks with an HTML comment on the line before the fence:

- `<!-- tested -->`: run. A shell block runs line by line (bash, from the repository
  root); each line must exit 0, and a trailing comment `# -> TEXT` says what it prints:
  the output must contain TEXT, where `...` stands for anything and runs of whitespace
  compare equal. A Python block runs as one script; its `# -> TEXT` comments must appear
  in its output in that order.
- `<!-- tested: background -->`: a command the README runs "in another terminal" (a
  watch). It is started, given time to connect, left running while the next tested
  block runs, and must then print its `# -> TEXT`.
- `<!-- checked -->`: blocks that need Docker or run for minutes (compose, chaos): each
  command must at least parse — the chaos flags exist in `kvstore chaos --help` and its
  config is valid; `docker compose ... config` accepts the compose files when Docker
  Compose is installed.

The cluster is the one `make run` starts: `kvstore cluster up` on the Makefile's CONFIG,
from a copy whose ports 7001-7003 (HTTP) and 6381-6383 (Redis protocol) are replaced by
free ones, in the blocks too, so a `make run` of the user's own never collides. The CLI's
default URL (http://127.0.0.1:7001) becomes the first node's through KVSTORE_URL, and
`.venv/bin/` the virtualenv running this test; nothing else of the README's text is
changed, and PATH holds no `kvstore`, so a bare `kvstore` in the README would fail here
as it does on a fresh machine.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from tests.proc.harness import free_ports, http_json, wait_for

pytestmark = [pytest.mark.proc, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
HTTP_PORTS = (7001, 7002, 7003)
RESP_PORTS = (6381, 6382, 6383)
MARK = re.compile(r"^<!--\s*(tested|tested:\s*background|checked)\s*-->\s*$")


# ---- reading the README ------------------------------------------------------------------
@dataclass
class Line:
    command: str
    expect: list[str] = field(default_factory=list)


@dataclass
class Block:
    kind: str            # tested | background | checked
    lang: str
    text: str
    lineno: int

    def lines(self) -> list[Line]:
        """Shell commands with their `# -> TEXT` expectations (continuations joined; a
        comment-only line `# -> TEXT` adds to the command before it)."""
        out: list[Line] = []
        pending = ""
        for raw in self.text.splitlines():
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1] + " "
                continue
            raw, pending = pending + raw, ""
            cmd, comment = split_comment(raw)
            expect = comment[2:].strip() if comment.startswith("->") else None
            if cmd.strip():
                out.append(Line(cmd.strip()))
            if expect is not None:
                assert out, f"README line {self.lineno}: an expectation before any command"
                out[-1].expect.append(expect)
        return out

    def python_expectations(self) -> list[str]:
        return [c[2:].strip() for c in (split_comment(ln)[1] for ln in self.text.splitlines())
                if c.startswith("->")]


def split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of one shell or Python line: the comment starts at a `#` outside
    quotes that begins the line or follows whitespace."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1:].strip()
    return line, ""


def readme_blocks() -> list[Block]:
    lines = README.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = MARK.match(lines[i].strip())
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        assert j < len(lines) and lines[j].startswith("```"), \
            f"README line {i + 1}: {lines[i].strip()} must stand right before a fenced block"
        lang = lines[j][3:].strip()
        k = j + 1
        while not lines[k].startswith("```"):
            k += 1
        kind = "background" if "background" in m.group(1) else m.group(1)
        blocks.append(Block(kind, lang, "\n".join(lines[j + 1:k]), j + 2))
        i = k + 1
    return blocks


def matches(expected: str, output: str, start: int = 0) -> int | None:
    """End of the first match of `expected` in output[start:] (`...` = anything,
    whitespace runs equal), or None."""
    norm = " ".join(output.split())
    pattern = r".*?".join(re.escape(" ".join(part.split())) for part in expected.split("..."))
    m = re.compile(pattern, re.S).search(norm, start)
    return m.end() if m else None


# ---- the cluster ---------------------------------------------------------------------------
@dataclass
class ReadmeCluster:
    http: dict[int, int]      # README port -> test port
    resp: dict[int, int]
    proc: subprocess.Popen[bytes]
    out: Path
    node_pids: list[int]

    def rewrite(self, text: str) -> str:
        for old, new in (*self.http.items(), *self.resp.items()):
            text = re.sub(rf"(?<![0-9]){old}(?![0-9])", str(new), text)
        return text.replace(".venv/bin/", f"{BIN}/")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http[7001]}"

    def env(self) -> dict[str, str]:
        path = [d for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                if d and not (Path(d) / "kvstore").exists()]
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
        env.update(PATH=os.pathsep.join(path), KVSTORE_URL=self.url, PYTHONUNBUFFERED="1")
        return env


def makefile_config() -> str:
    m = re.search(r"^CONFIG\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert m, "the Makefile has no CONFIG default"
    return m.group(1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReadmeCluster]:
    tmp = tmp_path_factory.mktemp("readme")
    ports = free_ports(6)
    http = dict(zip(HTTP_PORTS, ports[:3]))
    resp = dict(zip(RESP_PORTS, ports[3:]))
    text = (ROOT / makefile_config()).read_text()
    for old, new in (*http.items(), *resp.items()):
        assert f"127.0.0.1:{old}" in text, f"{makefile_config()} no longer uses port {old}: update this test"
        text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
    cfg = tmp / "cluster.yaml"
    cfg.write_text(text)
    out = tmp / "cluster-up.out"
    with open(out, "wb") as f:
        # `make run` is `.venv/bin/kvstore cluster up --config $(CONFIG)`
        proc = subprocess.Popen([str(BIN / "kvstore"), "cluster", "up", "--config", str(cfg),
                                 "--data-dir", str(tmp / "data")],
                                stdout=f, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True)
    c = ReadmeCluster(http, resp, proc, out, [])
    try:
        def up() -> bool:
            assert proc.poll() is None, f"kvstore cluster up exited:\n{out.read_text()}"
            return len(re.findall(r"pid=(\d+)", out.read_text())) == 3
        wait_for(up, 60, "kvstore cluster up to print its three nodes")
        c.node_pids = [int(p) for p in re.findall(r"pid=(\d+)", out.read_text())]
        # every node ready: a leader known and reachable from each of them
        for port in http.values():
            wait_for(lambda: http_json(f"http://127.0.0.1:{port}/ready", timeout=1.0)[0] == 200, 30,
                     f"node on port {port} to be ready")
        yield c
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)          # Ctrl-C, as the README says
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for pid in c.node_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---- running the blocks ----------------------------------------------------------------------
def _established(session: int, ports: set[int]) -> bool:
    """Does a process of this session have an established TCP connection to one of ports?"""
    inodes: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3]) != session:
                continue
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except (OSError, IndexError, ValueError):
            continue
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "01" and cols[9] in inodes and int(cols[2].rsplit(":", 1)[1], 16) in ports:
                return True
    return False


def run_shell(c: ReadmeCluster, line: Line, where: str) -> str:
    cmd = c.rewrite(line.command)
    if cmd.startswith("redis-cli") and shutil.which("redis-cli") is None:
        return _redis_cli_stand_in(cmd, where)
    try:
        p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=ROOT, env=c.env(),
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{where}: `{line.command}` did not finish within 60 s; it printed:\n{e.stdout!r}\n{e.stderr!r}")
    assert p.returncode == 0, f"{where}: `{line.command}` exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.stdout


def _redis_cli_stand_in(cmd: str, where: str) -> str:
    """What `redis-cli -p PORT ARGS...` prints (non-interactive), through redis-py, for
    machines without redis-cli: the same command reaches the same port."""
    from redis.connection import Connection

    args = shlex.split(cmd)[1:]
    assert args[0] == "-p", f"{where}: the test understands only `redis-cli -p PORT ...`"
    conn = Connection(port=int(args[1]), decode_responses=True)
    try:
        conn.connect()
        conn.send_command(*args[2:])
        reply = conn.read_response()
    finally:
        conn.disconnect()
    return "" if reply is None else f"{reply}\n"


def check_expectations(line: Line, output: str, where: str) -> None:
    for exp in line.expect:
        assert matches(exp, output) is not None, \
            f"{where}: `{line.command}` should print {exp!r}; it printed:\n{output}"


def test_make_run_and_the_readme_use_the_config_this_test_starts() -> None:
    text = README.read_text()
    assert makefile_config() in text, "the README should name the config `make run` starts"
    for target in ("run", "test", "docs"):
        assert re.search(rf"^{target}:", (ROOT / "Makefile").read_text(), re.M), f"no `make {target}`"
    for cmd in ("make run", "make test"):
        assert cmd in text


def test_readme_marks_a_tested_quick_start_for_each_way_of_using_kvstore() -> None:
    blocks = readme_blocks()
    tested = "\n".join(b.text for b in blocks if b.kind in ("tested", "background"))
    for needle in ("curl -X PUT", "curl -N", "from kvstore.client import Client", ".venv/bin/kvstore get",
                   ".venv/bin/kvstore watch", ".venv/bin/kvstore status", "redis-cli -p"):
        assert needle in tested, f"no tested README block uses {needle!r}"
    checked = "\n".join(b.text for b in blocks if b.kind == "checked")
    assert "kvstore chaos" in checked and "docker compose" in checked
    # every example calls the CLI where it is installed: a bare `kvstore` is "command not found"
    for b in blocks:
        for ln in (b.lines() if b.lang in ("sh", "bash", "") else []):
            assert not re.match(r"kvstore\b", ln.command), f"README line {b.lineno}: bare `kvstore` in {ln.command!r}"


def test_readme_quick_starts_work_as_written(cluster: ReadmeCluster, tmp_path: Path) -> None:
    background: list[tuple[Block, subprocess.Popen[bytes], Path]] = []
    ran = 0
    for block in readme_blocks():
        where = f"README line {block.lineno}"
        if block.kind == "checked":
            continue
        if block.kind == "background":
            for i, line in enumerate(block.lines()):
                out = tmp_path / f"bg-{block.lineno}-{i}.out"
                with open(out, "wb") as f:
                    p = subprocess.Popen(["bash", "-c", "exec " + cluster.rewrite(line.command)], cwd=ROOT,
                                         env=cluster.env(), stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)
                background.append((block, p, out))
                wait_for(lambda: p.poll() is None and _established(p.pid, set(cluster.http.values())), 20,
                         f"{where}: `{line.command}` to connect")
            time.sleep(1.5)     # connected: give the watch a moment to subscribe
            continue
        if block.lang == "python":
            script = tmp_path / f"readme-{block.lineno}.py"
            script.write_text(cluster.rewrite(block.text))
            try:
                p = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=cluster.env(),
                                   capture_output=True, text=True, timeout=60)
            except subprocess.TimeoutExpired as e:
                pytest.fail(f"{where}: the Python example did not finish within 60 s; it printed:\n"
                            f"{e.stdout!r}\n{e.stderr!r}")
            assert p.returncode == 0, f"{where}: the Python example exited {p.returncode}\n{p.stdout}\n{p.stderr}"
            pos = 0
            for exp in block.python_expectations():
                end = matches(exp, p.stdout, pos)
                assert end is not None, f"{where}: the Python example should print {exp!r} (in order); " \
                                        f"it printed:\n{p.stdout}"
                pos = end
        else:
            for line in block.lines():
                check_expectations(line, run_shell(cluster, line, where), where)
        ran += 1
        # the background commands started before this block must have seen its changes
        for bg, p, out in background:
            for line in bg.lines():
                for exp in line.expect:
                    wait_for(lambda: matches(exp, out.read_text(errors="replace")) is not None, 15,
                             f"README line {bg.lineno}: `{line.command}` to print {exp!r} "
                             f"(it printed: {out.read_text(errors='replace')!r})")
            os.killpg(p.pid, signal.SIGINT)          # Ctrl-C
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        background.clear()
    assert not background, "a background block must be followed by a tested block"
    assert ran >= 5


def test_readme_chaos_commands_parse() -> None:
    help_text = subprocess.run([str(BIN / "kvstore"), "chaos", "--help"], capture_output=True, text=True,
                               timeout=60, cwd=ROOT).stdout
    lines = [ln for b in readme_blocks() if b.kind == "checked" for ln in b.lines() if "kvstore chaos" in ln.command]
    assert lines
    for ln in lines:
        args = shlex.split(ln.command)
        for a in args:
            if a.startswith("--"):
                assert re.search(rf"{re.escape(a.split('=')[0])}\b", help_text), \
                    f"README: `kvstore chaos` has no option {a}"
        cfg = args[args.index("--config") + 1]
        p = subprocess.run([str(BIN / "kvstore"), "config", "check", cfg], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, f"README: chaos config {cfg}: {p.stderr}"


def _compose() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and subprocess.run([*cmd, "version"], capture_output=True).returncode == 0:
            return cmd
    return None


def test_readme_docker_commands_parse() -> None:
    lines = [ln.command for b in readme_blocks() if b.kind == "checked" for ln in b.lines()
             if ln.command.startswith("docker compose")]
    assert lines
    assert (ROOT / "docker-compose.yml").is_file() and (ROOT / "Dockerfile").is_file()
    compose = _compose()
    for cmd in lines:
        args = shlex.split(cmd)[2:]
        files = [args[i + 1] for i, a in enumerate(args) if a == "-f"]
        for f in files:
            assert (ROOT / f).is_file(), f"README: {f} does not exist"
        if compose is None:
            continue       # no Docker Compose here: the files exist, which is all we can check
        opts = [a for i, a in enumerate(args) if a in ("-p", "-f") or (i and args[i - 1] in ("-p", "-f"))]
        p = subprocess.run([*compose, *opts, "config", "-q"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, f"README: `{cmd}`: {' '.join(compose)} config rejects it:\n{p.stderr}"
