"""Where quota state lives in Redis: one key per (stream, tenant), the tenant as Redis Cluster hash tag.

Rule: tenant ids never contain braces (the contract's tenant id is ``[A-Za-z0-9._:-]{1,64}``), so every key of a
tenant, whatever the stream, is in one cluster slot.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.crc import key_slot


def state_key(prefix: str, stream: str, tenant: str) -> str:
    """``prefix:q:stream:{tenant}``: the tenant is the Redis Cluster hash tag (tenant ids contain no braces)."""
    return f"{prefix}:q:{stream}:{{{tenant}}}"


def judged_prefix(prefix: str, stream: str) -> str:
    """``prefix:qj:stream:``: where the quota script keeps each event's verdict until its batch commits."""
    return f"{prefix}:qj:{stream}:"


def judged_key(prefix: str, stream: str, tenant: str, digest: bytes) -> bytes:
    """``prefix:qj:stream:{tenant}<digest>``: one event's verdict, in its tenant's slot (the state key's)."""
    return f"{judged_prefix(prefix, stream)}{{{tenant}}}".encode() + digest


def state_key_pattern(prefix: str) -> str:
    """A ``SCAN MATCH`` pattern for every state key under ``prefix``."""
    return f"{prefix}:q:*"


def parse_key(prefix: str, key: str) -> tuple[str, str] | None:
    """``(stream, tenant)`` of a ``state_key``, or None."""
    head = f"{prefix}:q:"
    if not key.startswith(head) or not key.endswith("}"):
        return None
    stream, sep, tenant = key[len(head):-1].partition(":{")
    return (stream, tenant) if sep else None


def group_by_slot(keys: Sequence[str | bytes]) -> dict[int, list[int]]:
    """Indices of ``keys`` per Redis Cluster slot: one script call per slot (a script's keys share a slot)."""
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(key_slot(k.encode() if isinstance(k, str) else k), []).append(i)
    return groups
