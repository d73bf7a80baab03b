"""The dedupe ledger: the durable truth of which (stream, tenant, idempotency key) were stored within the window.

Layout (``docs/design.md#dedupe-ledger``):
- A key is kept as a 16-byte digest, the first half of SHA-256 over ``len(stream):stream len(tenant):tenant key``
  (lengths make the encoding unambiguous). Digests are computed by Postgres (``DIGEST``), so the Python and SQL
  sides, and the in-place migration from the text ledger, cannot disagree. Collisions: with n keys in the ledger
  the chance that any two share a digest is about n^2 / 2^129 (1.5e-19 at ten billion keys); a collision would
  count a new event as a duplicate, so the bound is stated in docs/guarantees.md.
- The table is LIST-partitioned by *epoch* (``<ledger>_epochs`` lists them, the value being the epoch's start in
  Unix seconds). New keys go into the newest *opened* epoch; a claim probes every epoch that was still open at
  ``now - window``, so a key is remembered for at least the window and at most the window plus one epoch.
  Expiry drops a whole partition (``roll``): no row is ever deleted for age.

Rules a caller must follow:
- Every transaction that claims takes ``pg_advisory_xact_lock_shared(EPOCH_LOCK)`` in a statement *before* the
  claim (``Writer`` does it in its first statement). Opening an epoch takes the same lock exclusively, so every
  transaction that inserted into the old epoch has committed before any transaction inserts into the new one:
  a key claimed concurrently on both sides of a switch is still seen by one of them.
- ``claim`` and ``unclaim`` run inside the caller's transaction; ``unclaim`` only removes keys this transaction
  claimed (the ones it will not store).
- Partitions are created and dropped by the owner (``roll``, from partition maintenance); the hot path only
  opens an epoch that already exists (``open_due``), which needs UPDATE on ``opened_at`` alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg

from ingest.rows import Key
from ingest.sql import ident

if TYPE_CHECKING:
    from ingest.sql import Conn

log = logging.getLogger(__name__)

EPOCH_LOCK = 0x1E57_0003
"""Advisory lock: shared by every claiming transaction, exclusive while an epoch is opened."""

DIGEST = ("substring(sha256(convert_to(length({s})::text || ':' || {s} || length({t})::text || ':' || {t} || {k},"
          " 'UTF8')) FOR 16)")
"""SQL for a key's digest, over the SQL expressions ``s`` (stream), ``t`` (tenant) and ``k`` (key)."""

_KEY_DIGEST = DIGEST.format(s="$1::text", t="t", k="k")  # over $1 (stream) and unnest($2, $3) AS u(t, k)


def epochs_table(ledger: str) -> str:
    """The table that lists the ledger's epochs (``<ledger>_epochs``)."""
    return f"{ledger}_epochs"


def partition_name(ledger: str, epoch: int) -> str:
    """The partition holding ``epoch`` (``<ledger>_eYYYYMMDDtHHMMSS``, UTC)."""
    return f"{ledger}_e{datetime.fromtimestamp(epoch, UTC):%Y%m%dt%H%M%S}"


def epoch_length(window: timedelta, epochs: int) -> int:
    """Seconds per epoch when the window is cut into ``epochs`` epochs."""
    return max(1, int(window.total_seconds()) // max(1, epochs))


async def claim(conn: Conn, ledger: str, stream: str, keys: Sequence[Key], window: timedelta) -> set[Key]:
    """Insert keys into the open epoch inside the caller's transaction (which holds the shared ``EPOCH_LOCK``);
    return those not seen within the window."""
    if not keys:
        return set()
    rows = await conn.fetch(
        f"""WITH e AS (SELECT max(epoch) AS cur,
                              coalesce(max(epoch) FILTER (WHERE opened_at <= now() - $4::interval), 0) AS lo
                       FROM {ident(epochs_table(ledger))} WHERE opened_at IS NOT NULL),
                 b AS (SELECT t, k, {_KEY_DIGEST} AS d FROM unnest($2::text[], $3::text[]) AS u(t, k)),
                 ins AS (INSERT INTO {ident(ledger)} (digest, epoch)
                         SELECT b.d, (SELECT cur FROM e) FROM b
                         WHERE NOT EXISTS (  -- older epochs still in the window: pruned to those at run time
                             SELECT 1 FROM {ident(ledger)} o WHERE o.digest = b.d
                             AND o.epoch >= (SELECT lo FROM e) AND o.epoch < (SELECT cur FROM e))
                         ON CONFLICT DO NOTHING  -- the open epoch: its primary key decides
                         RETURNING digest)
            SELECT b.t, b.k FROM b JOIN ins ON ins.digest = b.d""",
        stream, [k[0] for k in keys], [k[1] for k in keys], window,
    )
    return {(r[0], r[1]) for r in rows}


async def unclaim(conn: Conn, ledger: str, stream: str, keys: Sequence[Key]) -> None:
    """Remove keys claimed in this transaction whose rows will not be stored (over quota, refused by Postgres)."""
    if keys:
        await conn.execute(
            f"""DELETE FROM {ident(ledger)}
                WHERE epoch = (SELECT max(epoch) FROM {ident(epochs_table(ledger))} WHERE opened_at IS NOT NULL)
                  AND digest = ANY(ARRAY(SELECT {_KEY_DIGEST} FROM unnest($2::text[], $3::text[]) AS u(t, k)))""",
            stream, [k[0] for k in keys], [k[1] for k in keys],
        )


async def open_due(conn: Conn, ledger: str, *, now: datetime | None = None, lock_timeout_ms: int = 10_000) -> bool:
    """Open every created epoch whose start has passed (``now``, default the database's clock), behind the
    exclusive ``EPOCH_LOCK``; return whether one was opened. Run outside any transaction."""
    at = now.timestamp() if now is not None else None
    due = await conn.fetchval(
        f"SELECT count(*) FROM {ident(epochs_table(ledger))} WHERE opened_at IS NULL"
        " AND epoch <= coalesce($1::float8, extract(epoch FROM now()))", at)
    if not due:
        return False
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
        await conn.execute("SELECT pg_advisory_xact_lock($1)", EPOCH_LOCK)
        # clock_timestamp(): after the lock, so every key of the old epoch was committed before this instant.
        opened = await conn.fetchval(
            f"""WITH o AS (UPDATE {ident(epochs_table(ledger))} SET opened_at = clock_timestamp()
                           WHERE opened_at IS NULL AND epoch <= coalesce($1::float8, extract(epoch FROM now()))
                           RETURNING epoch)
                SELECT max(epoch) FROM o""", at)
    if opened is not None:
        log.info("dedupe ledger epoch opened", extra={"epoch": partition_name(ledger, opened)})
    return opened is not None


@dataclass(slots=True)
class Roll:
    """What one ``roll`` did: partitions created and dropped, and the keys the dropped ones held (estimated)."""

    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    keys_dropped: int = 0
    opened: bool = False


async def roll(conn: Conn, ledger: str, *, window: timedelta, epochs: int, now: datetime,
               lock_timeout_ms: int, dry_run: bool = False) -> Roll:
    """Create the current and next epochs' partitions, open those due, drop epochs wholly older than the window.

    Owner only (DDL). Each DDL runs in its own transaction under ``lock_timeout``; a lock timeout on DDL
    propagates (``asyncpg.LockNotAvailableError``) and the next round goes on; one on opening an epoch is only
    logged (writers look for a due epoch every minute)."""
    out = Roll()
    length = epoch_length(window, epochs)
    newest = await conn.fetchval(f"SELECT max(epoch) FROM {ident(epochs_table(ledger))}") or 0
    start = int(now.timestamp()) // length * length
    for epoch in (start, start + length):
        if epoch <= newest:
            continue
        out.created.append(partition_name(ledger, epoch))
        if not dry_run:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
                await conn.execute(f"CREATE TABLE IF NOT EXISTS {ident(partition_name(ledger, epoch))} "
                                   f"PARTITION OF {ident(ledger)} FOR VALUES IN ({int(epoch)})")
                await conn.execute(f"INSERT INTO {ident(epochs_table(ledger))} (epoch) VALUES ($1) ON CONFLICT DO NOTHING", epoch)
    if not dry_run:
        try:
            out.opened = await open_due(conn, ledger, now=now, lock_timeout_ms=lock_timeout_ms)
        except asyncpg.LockNotAvailableError:  # a batch held the epoch lock that long: writers open it later
            log.warning("dedupe ledger epoch not opened: lock timeout; retrying later")
    lo = await conn.fetchval(
        f"SELECT coalesce(max(epoch) FILTER (WHERE opened_at <= $1), 0) FROM {ident(epochs_table(ledger))}"
        " WHERE opened_at IS NOT NULL", now - window)
    expired = await conn.fetch(
        f"SELECT epoch FROM {ident(epochs_table(ledger))} WHERE epoch < $1 AND opened_at IS NOT NULL ORDER BY epoch", lo)
    for (epoch,) in expired:
        name = partition_name(ledger, epoch)
        out.dropped.append(name)
        estimate = await conn.fetchval("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1)",
                                       ident(name))
        out.keys_dropped += max(0, int(estimate or 0))
        if not dry_run:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
                await conn.execute(f"DROP TABLE IF EXISTS {ident(partition_name(ledger, epoch))}")
                await conn.execute(f"DELETE FROM {ident(epochs_table(ledger))} WHERE epoch = $1", epoch)
    return out


async def holds(conn: Conn, ledger: str, stream: str, keys: Sequence[Key]) -> set[Key]:
    """Which of ``keys`` the ledger holds, in any epoch (tools and tests; the hot path uses ``claim``)."""
    if not keys:
        return set()
    rows = await conn.fetch(
        f"""SELECT t, k FROM unnest($2::text[], $3::text[]) AS u(t, k)
            WHERE EXISTS (SELECT 1 FROM {ident(ledger)} WHERE digest = {_KEY_DIGEST})""",
        stream, [k[0] for k in keys], [k[1] for k in keys])
    return {(r[0], r[1]) for r in rows}


async def keys(conn: Conn, ledger: str) -> int:
    """Keys in the ledger, estimated from the planner's statistics (exact counts scan every partition)."""
    n = await conn.fetchval(
        """SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1::regclass""", ident(ledger))
    return int(n)

