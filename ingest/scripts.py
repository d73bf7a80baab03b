"""Lua scripts on a single Redis or a Redis Cluster, at most one round trip per node.

Rule: a script call's keys (declared, and any key it builds from them) share one cluster slot, which callers
ensure with hash tags; ``run`` sends a batch's calls as one ``EVALSHA`` each — directly on a single Redis (one
call: one round trip), in one cluster pipeline otherwise (redis-py sends one round trip per node, in parallel).
A ``NOSCRIPT`` answer (a node restarted empty or failed over) loads the script on every primary and sends those
calls, and only those, once more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

Call = tuple[Sequence[str | bytes], Sequence[str | bytes | int]]
"""(KEYS, ARGV) of one script call."""


async def run(redis: Redis | RedisCluster, script: AsyncScript, calls: Sequence[Call]) -> list[Any]:
    """The replies of ``calls`` to ``script``, in order (see the module rules)."""
    if not isinstance(redis, RedisCluster):
        return [await script(keys=list(keys), args=list(args)) for keys, args in calls]
    replies: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for attempt in (0, 1):
        pipe = redis.pipeline()
        for i in todo:
            keys, args = calls[i]
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        results = await pipe.execute(raise_on_error=False)
        missing = []
        for i, result in zip(todo, results, strict=True):
            if isinstance(result, rx.NoScriptError) and not attempt:
                missing.append(i)  # only these are sent again: the others ran (and may have changed state)
            elif isinstance(result, BaseException):
                raise result
            else:
                replies[i] = result
        if not missing:
            break
        await redis.script_load(script.script)  # on every primary
        todo = missing
    return replies
