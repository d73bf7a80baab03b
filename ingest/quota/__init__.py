"""Per-tenant quotas: rate + burst (GCRA) and a per-UTC-day cap per tenant and stream, enforced in Redis.

One module per job:
- ``limits``: what a tenant may do (``Limits``, ``Override``, ``LimitTable``) and ``LimitBook``, which keeps a
  stream's limits current from an ``OverrideSource``;
- ``overrides``: overrides stored in Postgres: polled by consumers (``PostgresOverrides``), written by operators;
- ``gcra``: the algorithm, in Python (``judge``, ``LocalLimiter``) and as the Redis Lua ``SCRIPT``;
- ``keys``: the Redis key of each (stream, tenant) state, and cluster slots;
- ``admin``: usage as operators see it, and its reset;
- ``stage``: ``RedisQuota``, the pipeline stage (one Redis call per batch, outage handling).
The names below are the package's public API. See docs/quotas.md.
"""

from ingest.quota.admin import Usage, usage
from ingest.quota.gcra import DAY_US, SCRIPT, LocalLimiter, State, judge, parse_state, state_ttl_ms
from ingest.quota.keys import group_by_slot, parse_key, state_key
from ingest.quota.limits import (
    ALL_STREAMS,
    US,
    LimitBook,
    Limits,
    LimitTable,
    Override,
    OverrideSource,
    default_limits,
    resolve,
)
from ingest.quota.overrides import OverrideTables, PostgresOverrides
from ingest.quota.stage import Quota, RedisQuota

__all__ = [
    "ALL_STREAMS", "DAY_US", "SCRIPT", "US", "LimitBook", "LimitTable", "Limits", "LocalLimiter", "Override",
    "OverrideSource", "OverrideTables", "PostgresOverrides", "Quota", "RedisQuota", "State", "Usage",
    "default_limits", "group_by_slot", "judge", "parse_key", "parse_state", "resolve", "state_key", "state_ttl_ms",
    "usage",
]
