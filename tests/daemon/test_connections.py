"""The client server in-process: a dropped client leaves nothing registered behind."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from ckptd.daemon.connections import Client, ClientServer


async def test_a_drop_while_reading_unregisters_the_fd_before_closing_it() -> None:
    """Before: drop() closed a socket its reader still waited on; the fd number, soon another
    client's, stayed registered with the loop and the reader task died on fd -1."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[Any]] = []

    def spawn(coro: Any) -> asyncio.Task[Any]:
        tasks.append(loop.create_task(coro))
        return tasks[-1]

    async def dispatch(client: Client, msg: dict[str, Any], reader: Any) -> None:
        raise AssertionError("no message is sent")

    dropped: list[int] = []
    server = ClientServer("/unused", gid=None, dispatch=dispatch,
                          on_drop=lambda c: dropped.append(c.id), spawn=spawn)  # fmt: skip
    a, b = socket.socketpair()
    a.setblocking(False)
    client = Client(1, a, server.drop)
    server.clients[1] = client
    client.reader = spawn(server._serve(client))
    for _ in range(5):
        await asyncio.sleep(0)  # the reader is waiting for data now
    fd = a.fileno()
    assert fd in loop._selector.get_map()  # type: ignore[attr-defined]
    server.drop(client)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert fd not in loop._selector.get_map()  # type: ignore[attr-defined]
    assert dropped == [1] and not server.clients
    assert all(t.cancelled() or t.exception() is None for t in tasks)
    b.close()
