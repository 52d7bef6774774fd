"""Stopping the background tasks of the blocks (sync loops, subscriptions)."""

from __future__ import annotations

import asyncio

__all__ = ["stop"]


async def stop(task: asyncio.Task[None] | None, *, grace: float = 1.0) -> None:
    """Cancel *task* and wait for it, at most *grace* seconds.

    A client library may hold on to a cancelled call for a while (a cluster client
    retrying a node, say): closing must not hang on it.
    """
    if task is None or task.done():
        return
    task.cancel()
    await asyncio.wait({task}, timeout=grace)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: nobody else will
