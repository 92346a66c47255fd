"""Reads shared by concurrent requests of one API process (and event loop).

`Batched(url, fn).get(key)`: a request that finds no read in flight starts one; requests arriving
meanwhile wait for the next, which reads all their keys with one `fn(connection, keys)` (one
statement), and requests for the same key share its result. Every answer comes from a read that
started after its request arrived, so a client reads its own writes (and a revoked key is refused by
the next request, in every process), a process has at most one such read in flight per reader, and N
concurrent requests cost a few statements per round trip instead of N."""
from __future__ import annotations

import asyncio
import weakref
from typing import Callable, Generic, Hashable, TypeVar

from sqlalchemy.exc import DataError

from .session import read

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")


class Batched(Generic[K, V]):
    MAX_KEYS = 500  # per statement

    def __init__(self, url: str, fn: Callable[..., dict[K, V]]):
        self.url, self.fn = url, fn
        self.pending: dict[K, list[asyncio.Future]] = {}
        self.busy = False

    async def get(self, key: K) -> V | None:
        """fn's value for `key`, None when fn returned none for it."""
        future = asyncio.get_running_loop().create_future()
        self.pending.setdefault(key, []).append(future)
        if not self.busy:
            self.busy = True
            asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.pending:
                keys = list(self.pending)[:self.MAX_KEYS]
                batch = {key: self.pending.pop(key) for key in keys}
                try:
                    values = await read(self.url, self.fn, keys)
                except Exception as exc:  # noqa: BLE001
                    if len(keys) == 1 or not isinstance(exc, DataError):  # all get it (503 etc.)
                        self._settle(batch, exc=exc)
                        continue
                    # A value the database refuses (a NUL character in a string) is one request's key:
                    # each key on its own, so the error (422) reaches only the requests it belongs to.
                    for key in keys:
                        try:
                            self._settle({key: batch[key]}, await read(self.url, self.fn, [key]))
                        except Exception as exc:  # noqa: BLE001
                            self._settle({key: batch[key]}, exc=exc)
                    continue
                self._settle(batch, values)
        finally:
            self.busy = False

    @staticmethod
    def _settle(batch: dict, values: dict | None = None, exc: BaseException | None = None) -> None:
        for key, futures in batch.items():
            for f in futures:
                if not f.done():
                    if exc is not None:
                        f.set_exception(exc)
                    else:
                        f.set_result(values.get(key))


_per_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict]" = weakref.WeakKeyDictionary()


def per_loop(key: tuple, make: Callable[[], T]) -> T:
    """One object per event loop and key (its futures and tasks belong to that loop)."""
    objects = _per_loop.setdefault(asyncio.get_running_loop(), {})
    if key not in objects:
        objects[key] = make()
    return objects[key]
