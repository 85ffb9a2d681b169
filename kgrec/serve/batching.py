"""Micro-batching of concurrent requests onto one compute thread.

The service answers every recommender call on one worker thread (the recommender's lazy caches are built there,
and on a 2-core machine one busy thread per process is the most a core can give). Requests that arrive while that
thread is busy wait in a queue; when it is free, everything waiting of one kind is handed over as *one* batch
(``Recommender.recommend_batch`` / ``search_batch``), so the per-call costs (the (items, dim) products, the
feature build, the LightGBM call, Python overhead) are paid once per batch instead of once per request. With one
client at a time a batch is one request, and it waits at most one ``gather_ms`` step for company.

Why wait at all: when a batch is answered, its clients' next requests arrive a moment later, after the compute
thread has already taken whatever else was queued (often a single request). Left alone, the clients split into
cohorts that never merge again (a batch of 1, then one of 15, ...), and a batch of one costs nearly as much as a
batch of sixteen (a BERT forward of one query: ~20 ms; of sixteen: ~35 ms). So before a batch starts, the batcher
keeps yielding to the event loop in steps of ``gather_ms`` while new requests are still arriving (at most
``max_gather_steps`` steps, and never once ``max_batch`` requests are waiting).
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

logger = logging.getLogger(__name__)

BatchFn = Callable[[Sequence[Any]], Sequence[Any]]


@dataclass
class _Pending:
    fn: BatchFn
    items: list[Any] = field(default_factory=list)
    futures: list[asyncio.Future] = field(default_factory=list)


class MicroBatcher:
    """Queue of calls answered on one worker thread, batching those of the same kind.

    ``await batcher.submit(key, fn, item)``: ``fn(items) -> results`` (same length and order) is called on the
    worker thread with every item queued under ``key`` since the last call, at most ``max_batch`` at a time. A
    result that is an ``Exception`` is raised to its own caller only; an exception raised by ``fn`` goes to every
    caller of that batch. ``await batcher.run(fn, *args)`` runs one unbatched call on the same thread (so every
    recommender call is serialised, as the recommender requires).

    Args:
        max_batch: largest batch handed to ``fn`` (bounds the memory of one call and the wait of the first caller).
    """

    def __init__(self, max_batch: int = 32, gather_ms: float = 1.0, max_gather_steps: int = 3):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if gather_ms < 0 or max_gather_steps < 0:
            raise ValueError(f"gather_ms and max_gather_steps must be >= 0, got {gather_ms}, {max_gather_steps}")
        self.max_batch = max_batch
        self.gather_s = gather_ms / 1e3
        self.max_gather_steps = max_gather_steps
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kgrec-compute")
        self._pending: dict[Hashable, _Pending] = {}
        self._draining = False
        self.batches = 0  # batches run (for tests and logs)
        self.items = 0  # items answered in batches

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the compute thread (unbatched)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(*args))

    async def submit(self, key: Hashable, fn: BatchFn, item: Any) -> Any:
        """Queue ``item`` for a batched ``fn`` call under ``key``; returns its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        pending = self._pending.setdefault(key, _Pending(fn))
        pending.items.append(item)
        pending.futures.append(fut)
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                await asyncio.sleep(0)  # let requests already parsed by the event loop join this batch
                await self._gather()
                key = next(iter(self._pending))
                pending = self._pending[key]
                items, futures = pending.items[: self.max_batch], pending.futures[: self.max_batch]
                del pending.items[: self.max_batch], pending.futures[: self.max_batch]
                if not pending.items:
                    del self._pending[key]
                else:  # fairness: other kinds go first next time
                    self._pending[key] = self._pending.pop(key)
                try:
                    results = await loop.run_in_executor(self._executor, pending.fn, items)
                    if len(results) != len(items):
                        raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
                except Exception as exc:  # noqa: BLE001 - handed to the callers, who answer with their own status
                    for fut in futures:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                self.batches += 1
                self.items += len(items)
                for fut, res in zip(futures, results):
                    if fut.done():  # the client went away
                        continue
                    if isinstance(res, Exception):
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)
        finally:
            self._draining = False

    def _queued(self) -> int:
        return sum(len(p.items) for p in self._pending.values())

    async def _gather(self) -> None:
        """Yield in ``gather_s`` steps while requests keep arriving (see the module docstring)."""
        if self.gather_s <= 0:
            return
        n = self._queued()
        for _ in range(self.max_gather_steps):
            if n >= self.max_batch:
                return
            await asyncio.sleep(self.gather_s)
            now = self._queued()
            if now == n:  # nothing new during a whole step: the rest are not coming soon
                return
            n = now

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
