"""Client and SyncSession: the blocking face of AsyncClient. The async client runs on
its own event loop in a daemon thread; each call is submitted to that loop and waited
for. Exceptions are the same KVError classes. Thread-safe: calls from several threads
share the loop (and its connection pools).

Imports: asyncio, threading (random and time for the constructor's types), and the
async client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from typing import Any, TypeVar

from .aio import AsyncClient, BatchOp, MergeFn, Session
from .options import Acks, Consistency, ReadPreference, Value
from .results import NodeStatus, Result, Siblings
from .streams import ScanEntry, WatchEvent
from .wire import DEFAULT_URL

T = TypeVar("T")


class Client:
    """Blocking client with the methods of AsyncClient (same constructor arguments, see
    AsyncClient). Use as a context manager or call close()."""

    def __init__(
        self,
        urls: str | Iterable[str] = DEFAULT_URL,
        token: str | None = None,
        timeout: float = 15.0,
        *,
        attempt_timeout: float = 5.0,
        retry_indeterminate: bool = True,
        read_preference: ReadPreference = "leader",
        use_msgpack: bool = True,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 1.0,
        connections_per_node: int = 64,
        latency_max_age_s: float = 10.0,
        failure_cooldown_s: float = 1.0,
        retry_after_cap_s: float = 0.25,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        cacert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
    ) -> None:
        self._aclient = AsyncClient(
            urls, token, timeout, attempt_timeout=attempt_timeout,
            retry_indeterminate=retry_indeterminate, read_preference=read_preference,
            use_msgpack=use_msgpack, backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s,
            connections_per_node=connections_per_node, latency_max_age_s=latency_max_age_s,
            failure_cooldown_s=failure_cooldown_s, retry_after_cap_s=retry_after_cap_s, rng=rng,
            clock=clock, cacert=cacert, cert=cert, key=key)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, name="kvstore-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        self._closed = False
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future[Any]] = set()   # calls running, from any thread

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        self._loop.run_forever()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._closed:
                coro.close()
                raise RuntimeError("the client is closed")
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
            self._pending.add(fut)
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            if self._closed:
                raise RuntimeError("the client was closed while this call was running (a write may or may "
                                   "not have been applied)") from None
            raise
        finally:
            with self._lock:
                self._pending.discard(fut)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections. A call still running on another thread is cancelled: it
        raises RuntimeError (a write's outcome is then unknown) instead of waiting forever."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            running = list(self._pending)
        for fut in running:
            fut.cancel()
        try:
            asyncio.run_coroutine_threadsafe(self._aclient.close(), self._loop).result(timeout=10)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            pass
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()

    @property
    def async_client(self) -> AsyncClient:
        return self._aclient

    @property
    def leader(self) -> str | None:
        return self._aclient.leader

    def session(self, read_preference: ReadPreference | None = None, token: str | None = None) -> SyncSession:
        return SyncSession(self, self._aclient.session(read_preference, token))

    def get(self, key: str, *, consistency: Consistency | None = None,
            read_preference: ReadPreference | None = None) -> Result:
        return self._call(self._aclient.get(key, consistency=consistency, read_preference=read_preference))

    def get_siblings(self, key: str, *, consistency: Consistency | None = None,
                     read_preference: ReadPreference | None = None) -> Siblings:
        return self._call(self._aclient.get_siblings(key, consistency=consistency,
                                                     read_preference=read_preference))

    def put(self, key: str, value: Value, *, if_match: str | None = None, context: str | None = None,
            acks: Acks | None = None, request_id: str | None = None, ttl: float | None = None) -> Result:
        return self._call(self._aclient.put(key, value, if_match=if_match, context=context, acks=acks,
                                            request_id=request_id, ttl=ttl))

    def scan(self, prefix: str | None = None, *, start: str | None = None, end: str | None = None,
             limit: int = 1000, keys_only: bool = False,
             consistency: Consistency | None = None) -> Iterator[ScanEntry]:
        """Every key under `prefix` (or in [start, end)), page by page as you iterate."""
        it = self._aclient.scan(prefix, start=start, end=end, limit=limit, keys_only=keys_only,
                                consistency=consistency)
        return self._iterate(it)

    def watch(self, prefix: str = "", *, from_token: str | None = None) -> Iterator[WatchEvent]:
        """Changes under `prefix` as they happen (blocks between them); resumes by itself."""
        return self._iterate(self._aclient.watch(prefix, from_token=from_token))

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        nxt = agen.__anext__
        try:
            while True:
                try:
                    yield self._call(nxt())   # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None and not self._closed:
                self._call(aclose())

    def create(self, key: str, value: Value, *, acks: Acks | None = None,
               request_id: str | None = None) -> Result:
        return self._call(self._aclient.create(key, value, acks=acks, request_id=request_id))

    def cas(self, key: str, expected_version: str, value: Value, *, acks: Acks | None = None,
            request_id: str | None = None) -> Result:
        return self._call(self._aclient.cas(key, expected_version, value, acks=acks, request_id=request_id))

    def delete(self, key: str, *, if_match: str | None = None, context: str | None = None,
               acks: Acks | None = None, request_id: str | None = None) -> Result:
        return self._call(self._aclient.delete(key, if_match=if_match, context=context, acks=acks,
                                               request_id=request_id))

    def batch(self, ops: Iterable[BatchOp], *, acks: Acks | None = None,
              request_id: str | None = None) -> Result:
        return self._call(self._aclient.batch(ops, acks=acks, request_id=request_id))

    def resolve(self, key: str, merge_fn: MergeFn) -> Result:
        return self._call(self._aclient.resolve(key, merge_fn))

    def status(self) -> dict[str, Any]:
        return self._call(self._aclient.status())

    def cluster_overview(self) -> list[NodeStatus]:
        return self._call(self._aclient.cluster_overview())

    def refresh(self) -> None:
        self._call(self._aclient.refresh())

    def measure_latencies(self) -> dict[str, float | None]:
        return self._call(self._aclient.measure_latencies())


class SyncSession:
    """Blocking face of a Session (see kvstore.client.aio.Session)."""

    def __init__(self, client: Client, session: Session) -> None:
        self._client = client
        self._session = session

    @property
    def token(self) -> str | None:
        return self._session.token

    @property
    def read_preference(self) -> ReadPreference:
        return self._session.read_preference

    @property
    def sticky_node(self) -> str | None:
        return self._session.sticky_node

    def get(self, key: str, *, consistency: Consistency | None = None) -> Result:
        return self._client._call(self._session.get(key, consistency=consistency))

    def get_siblings(self, key: str, *, consistency: Consistency | None = None) -> Siblings:
        return self._client._call(self._session.get_siblings(key, consistency=consistency))

    def put(self, key: str, value: Value, *, if_match: str | None = None, context: str | None = None,
            acks: Acks | None = None, request_id: str | None = None) -> Result:
        return self._client._call(self._session.put(key, value, if_match=if_match, context=context,
                                                    acks=acks, request_id=request_id))

    def create(self, key: str, value: Value, *, acks: Acks | None = None,
               request_id: str | None = None) -> Result:
        return self._client._call(self._session.create(key, value, acks=acks, request_id=request_id))

    def cas(self, key: str, expected_version: str, value: Value, *, acks: Acks | None = None,
            request_id: str | None = None) -> Result:
        return self._client._call(self._session.cas(key, expected_version, value, acks=acks,
                                                    request_id=request_id))

    def delete(self, key: str, *, if_match: str | None = None, context: str | None = None,
               acks: Acks | None = None, request_id: str | None = None) -> Result:
        return self._client._call(self._session.delete(key, if_match=if_match, context=context,
                                                       acks=acks, request_id=request_id))

    def resolve(self, key: str, merge_fn: MergeFn) -> Result:
        return self._client._call(self._session.resolve(key, merge_fn))


__all__ = ["Client", "SyncSession"]
