"""The daemon's stores: one client per URL, opened lazily, and the run's remote ``latest``.

Constructors do no I/O, so opening a store for a URL a client named only validates it. The
remote ``latest`` is written under one lock per store and run, and only forwards: two uploads
finishing out of order never point it at the older checkpoint. Every remote store is opened with
the daemon's store options (encryption, storage class), and probed once for what it can do
(``probe``: logged, shown in ``status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import CkptdError, TransientStorageError
from ..storage import Store, is_local, join_key, local_path, open_store
from ..storage.capabilities import Capabilities
from ..storage.options import StoreOptions, url_options

log = logging.getLogger("ckptd.stores")


class StoreSet:
    def __init__(
        self,
        root: str,
        opener: Callable[[str], Store] | None = None,
        options: StoreOptions | None = None,
    ) -> None:
        self.root = root
        self.options = options or StoreOptions()
        self._open = opener or self._open_with_options
        self._stores: dict[str, Store] = {}
        self._caps: dict[str, Capabilities] = {}
        self._latest: dict[str, int] = {}
        self._latest_lock = asyncio.Lock()
        self._pace: Callable[[int], Awaitable[None]] | None = None

    def _open_with_options(self, url: str) -> Store:
        return open_store(url, None if is_local(url) else self.options)

    def manifest_options(self, url: str | None) -> dict[str, Any]:
        """The ``store_options`` a checkpoint uploaded to ``url`` records (none for the root)."""
        if url is None or self.is_root(url) or is_local(url):
            return {}
        return url_options(url, self.options).as_dict()  # the run's URL may set its own

    async def probe(self, url: str) -> Capabilities | None:
        """Ask the store at ``url`` what it can do (once; cached by the store) and log it; None
        when it cannot be asked now (it is asked again at its first write)."""
        try:
            caps = await self.get(url).capabilities()
        except TransientStorageError as e:
            log.warning("could not probe %s yet (%s); probing at its first write", url, e)
            return None
        if self._caps.get(url) != caps:
            self._caps[url] = caps
            (log.info if not caps.missing() else log.warning)("%s", caps.summary(url))
        return caps

    def capabilities(self) -> dict[str, dict[str, Any]]:
        """Probed capabilities per store URL, for ``status``."""
        return {url: caps.as_dict() for url, caps in self._caps.items()}

    def get(self, url: str) -> Store:
        store = self._stores.get(url)
        if store is None:
            store = self._stores[url] = self._open(url)
            store.pace = self._pace
        return store

    def limit(self, pace: Callable[[int], Awaitable[None]] | None) -> None:
        """Make every store (open or opened later) await ``pace`` before sending a part."""
        self._pace = pace
        for store in self._stores.values():
            store.pace = pace

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
