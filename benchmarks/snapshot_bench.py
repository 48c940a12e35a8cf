"""Snapshot write + read of a big single-leader image (the restart cost of a node's state).

  .venv/bin/python benchmarks/snapshot_bench.py [--keys 1000000] [--value-bytes 100] [--rounds 3]
                                                [--kvsnap2-rev HEAD] [--json FILE]

Per round, each in a FRESH process (so peak RSS is that of one restart, not of the
benchmark): write a --keys image the way a core hands it over (lazy rows over a copied
map — a generator of row tuples, and snapshot.MapRows; the file is fsynced), then restart: `FileLog.open()` on that data dir and build the
key/value map from the rows, as the single-leader core does. Prints seconds, file size
and peak RSS (medians over the rounds).

With --kvsnap2-rev REV the previous format's module is taken from git
(REV:kvstore/storage/snapshot.py, KVSNAP2) and measured the same way: write_snapshot, then
read_snapshot (the old Node.open_storage path), for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(r'''
    import asyncio, gc, json, os, random, resource, sys, time
    from pathlib import Path
    sys.path.insert(0, ROOT)

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3

    def cpu():
        return time.process_time()   # this process's CPU time: steadier than wall time on a shared machine

    def make_data(n, size):
        rng = random.Random(7)
        blob = rng.randbytes(size + 4096)
        return {f"key-{i:09d}": (blob[i % 4096: i % 4096 + size], (1 << 40) | (i + 1)) for i in range(n)}

    out = {}
    d = Path(DIR)
    if WHAT == "write-new":
        from kvstore.protocol.messages import SnapshotImage
        from kvstore.storage import snapshot as snap
        data = make_data(N, SIZE)
        gc.freeze()
        t0, c0 = time.perf_counter(), cpu()
        copy = dict(data)                       # what the core hands over: a copy, rows made lazily
        image = SnapshotImage("single-leader", N, 1, {"kv": ((k, v, ver) for k, (v, ver) in copy.items()),
                                                      "dedup": []}, {"term_starts": [[1, 1]]})
        f = snap.write_image(d / "snapshots", image)
        out = {"write_s": time.perf_counter() - t0, "write_cpu_s": cpu() - c0, "bytes": f.size_bytes}
        t0, c0 = time.perf_counter(), cpu()
        copy = dict(data)                       # the same map handed over column-wise (snapshot.MapRows)
        image = SnapshotImage("single-leader", N, 1, {"kv": snap.MapRows(copy, 2), "dedup": []},
                              {"term_starts": [[1, 1]]})
        g = snap.write_image(d / "maprows", image)
        out["write_maprows_s"] = time.perf_counter() - t0
        out["write_maprows_cpu_s"] = cpu() - c0
        assert g.path.read_bytes() == f.path.read_bytes()
        g.path.unlink()
    elif WHAT == "read-new":
        from kvstore.storage.log import FileLog
        t0, c0 = time.perf_counter(), cpu()
        async def main():
            flog = FileLog(d, mode="single-leader", fsync="always", fsync_interval_ms=100,
                           segment_bytes_max=64 << 20)
            rec = await flog.open()
            await flog.close()
            return rec
        rec = asyncio.run(main())
        t1 = time.perf_counter()
        gc.disable()
        keys, vals, vers = rec.image.sections["kv"].columns
        state = dict(zip(keys, zip(vals, vers)))
        del rec, keys, vals, vers
        gc.enable(); gc.freeze()
        t2 = time.perf_counter()
        assert len(state) == N
        out = {"read_s": t1 - t0, "load_s": t2 - t1, "restart_s": t2 - t0, "restart_cpu_s": cpu() - c0,
               "peak_rss_mb": peak_mb(), "rss_after_mb": rss_mb()}
    elif WHAT == "write-old":
        import importlib.util
        spec = importlib.util.spec_from_file_location("kvsnap2", OLD)
        old = importlib.util.module_from_spec(spec); sys.modules["kvsnap2"] = old; spec.loader.exec_module(old)
        data = make_data(N, SIZE)
        gc.freeze()
        t0, c0 = time.perf_counter(), cpu()
        copy = dict(data)
        meta = old.write_snapshot(d / "snapshots", N, 1, copy, [])
        out = {"write_s": time.perf_counter() - t0, "write_cpu_s": cpu() - c0, "bytes": meta.path.stat().st_size}
    elif WHAT == "read-old":
        import importlib.util
        spec = importlib.util.spec_from_file_location("kvsnap2", OLD)
        old = importlib.util.module_from_spec(spec); sys.modules["kvsnap2"] = old; spec.loader.exec_module(old)
        t0, c0 = time.perf_counter(), cpu()
        gc.disable()
        loaded = old.read_snapshot(old.latest_snapshot(d / "snapshots"))
        state = loaded.data
        del loaded
        gc.enable(); gc.freeze()
        t2 = time.perf_counter()
        assert len(state) == N
        out = {"read_s": t2 - t0, "load_s": 0.0, "restart_s": t2 - t0, "restart_cpu_s": cpu() - c0,
               "peak_rss_mb": peak_mb(), "rss_after_mb": rss_mb()}
    print(json.dumps(out))
''')


def child(what: str, d: Path, n: int, size: int, old: str = "") -> dict[str, Any]:
    code = (f"ROOT={str(ROOT)!r}; DIR={str(d)!r}; WHAT={what!r}; N={n}; SIZE={size}; OLD={old!r}\n" + CHILD)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{what} failed:\n{res.stderr}")
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def measure(label: str, n: int, size: int, rounds: int, old: str = "") -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    kind = "old" if old else "new"
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="kv-snapbench-") as tmp:
            d = Path(tmp)
            w = child(f"write-{kind}", d, n, size, old)
            r = child(f"read-{kind}", d, n, size, old)
            runs.append({**w, **r})
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    fast = (f"; MapRows {med['write_maprows_s']:.2f} s, CPU {med['write_maprows_cpu_s']:.2f} s"
            if "write_maprows_s" in med else "")
    print(f"{label:8s} {n:,} keys x {size} B: write {med['write_s']:.2f} s (CPU {med['write_cpu_s']:.2f} s{fast}), "
          f"file {med['bytes'] / 1e6:.1f} MB; restart {med['restart_s']:.2f} s (CPU {med['restart_cpu_s']:.2f} s; "
          f"read {med['read_s']:.2f} s + build map {med['load_s']:.2f} s), peak RSS {med['peak_rss_mb']:.0f} MB, "
          f"RSS after {med['rss_after_mb']:.0f} MB  [median of {rounds}]", flush=True)
    return {"label": label, "keys": n, "value_bytes": size, "median": med, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--value-bytes", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kvsnap2-rev", default="", help="also measure KVSNAP2 from this git revision")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    results = [measure("KVSNAP3", args.keys, args.value_bytes, args.rounds)]
    if args.kvsnap2_rev:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.kvsnap2_rev}:kvstore/storage/snapshot.py"],
                             capture_output=True, text=True, check=True).stdout
        if 'MAGIC = b"KVSNAP2\\n"' not in src:
            raise SystemExit(f"{args.kvsnap2_rev}:kvstore/storage/snapshot.py is not the KVSNAP2 module")
        with tempfile.NamedTemporaryFile("w", suffix="_kvsnap2.py", delete=False) as f:
            f.write(src)
        try:
            results.append(measure("KVSNAP2", args.keys, args.value_bytes, args.rounds, old=f.name))
        finally:
            os.unlink(f.name)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "python": sys.version.split()[0],
                                         "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
