"""The daemon's stores: one client per URL, opened lazily, and the run's remote ``latest``.

Constructors do no I/O, so opening a store for a URL a client named only validates it. The
remote ``latest`` is written under one lock per store and run, and only forwards: two uploads
finishing out of order never point it at the older checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from ..errors import CkptdError
from ..storage import Store, is_local, join_key, local_path, open_store


class StoreSet:
    def __init__(self, root: str, opener: Callable[[str], Store] = open_store) -> None:
        self.root = root
        self._open = opener
        self._stores: dict[str, Store] = {}
        self._latest: dict[str, int] = {}
        self._latest_lock = asyncio.Lock()

    def get(self, url: str) -> Store:
        store = self._stores.get(url)
        if store is None:
            store = self._stores[url] = self._open(url)
        return store

    def is_root(self, url: str | None) -> bool:
        """Whether ``url`` is the daemon's own root (or none: the root is then the store)."""
        return url is None or (is_local(url) and local_path(url) == self.root)

    def retries(self) -> dict[str, int]:
        """Request retries each store made so far (its own layer of retries), for ``status``."""
        return {url: int(getattr(s, "retries", 0)) for url, s in self._stores.items()}

    async def advance_latest(self, url: str, run: str, tag: str, step: int) -> None:
        """Point ``<run>/latest`` in the store at ``tag`` unless a newer step is there already."""
        key = f"{url}\0{run}"
        async with self._latest_lock:  # check and write as one: never backwards
            if step >= self._latest.get(key, -1):
                await self.get(url).put_bytes(join_key(run, "latest"), (tag + "\n").encode())
                self._latest[key] = step

    async def close(self) -> None:
        for store in self._stores.values():
            with contextlib.suppress(CkptdError, OSError):
                await store.close()


__all__ = ["StoreSet"]
