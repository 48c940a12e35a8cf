"""Deterministic simulation of a kvstore cluster: the REAL node shell on virtual time.

FoundationDB / TigerBeetle style (STYLE.md §4 tier 2, §7): nothing here re-implements
the node loop. `kvstore.runtime.node.Node` runs unchanged; the simulator only swaps
what is behind its seams:

  time       `SimLoop` (sim_time.py): an asyncio event loop whose clock is virtual. Its
             selector never blocks: `select(timeout)` advances the clock by `timeout`,
             so the node's own timers (`asyncio.sleep`, `asyncio.timeout`, `call_later`)
             run on simulated time, as fast as the CPU allows. Nothing scheduled and
             nothing ready while a caller still waits: `SimDeadlock`.
  clock      `SimClock` (sim_time.py, the Clock protocol): `monotonic()` is the loop's
             time (frozen while the node is paused; optionally not catching up after the
             pause, like a suspended VM), `wall_ms()` a virtual epoch + loop time + a
             per-node skew and jumps the scenario sets.
  network    `SimNetwork` / `SimTransport` (sim_net.py, the Transport protocol): seeded
             per-link delays, drops, duplicates, reordering, partitions (symmetric or
             one-way); every batch goes through the real msgpack codec, so no node ever
             shares an object with another.
  disk       `SimDisk` / `SimLog` (sim_disk.py, the Log protocol): in memory; flushes
             take simulated time; a crash keeps exactly what was durable (optionally a
             torn prefix of an in-flight flush); snapshots in the real snapshot format.
  clients    `Client` (sim_client.py): calls `Node.write` / `Node.read` (what the HTTP API
             calls) with the client library's retry rules; every operation an `OpRecord`.
  cluster    `Simulation` (sim_cluster.py): N real Nodes on one SimLoop, clients, a seeded nemesis
             (crash + restart on the same disk, pause, partitions, clock jumps, disk
             wipe), observers that check invariants after every step, a trace and its
             digest. One seed -> one run, replayable.

Pure of real I/O: no os, time, socket, threading, no executor, no global random (the
layer test, tests/test_layering.py, checks every sim module). asyncio itself IS imported
by the sim modules — on purpose, and only because the loop is virtual.

Imports: the sim_* modules.
"""

from __future__ import annotations

from kvstore.transport.sim_time import EPOCH_MS, SimClock, SimDeadlock, SimLoop
from kvstore.transport.sim_disk import DiskWeather, SimDisk, SimLog
from kvstore.transport.sim_net import NetWeather, SimNetwork, SimTransport
from kvstore.transport.sim_client import Client, OpRecord
from kvstore.transport.sim_cluster import (
    NemesisOptions,
    Observer,
    SimFailure,
    SimNode,
    Simulation,
    Trace,
    cluster_config,
)

__all__ = [
    "EPOCH_MS",
    "Client",
    "DiskWeather",
    "NemesisOptions",
    "NetWeather",
    "Observer",
    "OpRecord",
    "SimClock",
    "SimDeadlock",
    "SimDisk",
    "SimFailure",
    "SimLog",
    "SimLoop",
    "SimNetwork",
    "SimNode",
    "SimTransport",
    "Simulation",
    "Trace",
    "cluster_config",
]
