"""SQL injection attempts through every field that reaches Postgres (docs/security.md, "No SQL from input").

Everything here runs as the superuser on purpose: an injected statement would succeed, so only bound parameters,
identifier quoting and validation stand between these values and the database. Each value must be stored
verbatim (or refused with a clear error where the contract or the CLI forbids it), no table, schema, function,
policy or role may appear or disappear, and the stream must keep flowing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from consumers import cli, quotas
from ingest import ledger, roles
from ingest.config import Config
from ingest.services import create_pool
from tests.integration.helpers import drain, publish, publish_raw
from tests.integration.test_security_roles import drop_roles

# Printable ASCII (allowed in idempotency keys), each an attempt at breaking out of a literal, an identifier, a
# dollar quote, a format string or a comment.
ASCII = [
    "'; DROP TABLE dedupe_ledger; --",
    '"; DROP TABLE webhook_events; --',
    "' OR '1'='1",
    "Robert'); DROP TABLE quota_overrides;--",
    "$$; DROP TABLE dead_letters; $$",
    "$1 $2 $tag$ DROP SCHEMA public CASCADE $tag$",
    "\\'; DROP TABLE consumer_offsets; --\\",
    "\\\\' E'\\x27' U&'\\0027'",
    "%s %(x)s %% {} {0} {tenant_id} ${1}",
    "'||(SELECT current_user)||'",
    "/* */ ; COPY dead_letters TO PROGRAM 'touch /tmp/ingest-pwned'; --",
    "'; CREATE ROLE pwned SUPERUSER LOGIN; --",
    "x' ; SELECT pg_sleep(30); --",
    "; \" ' ` $ \\ % { } ( ) -- /* */ :: ?",
]
# Unicode without NUL or control characters (allowed in event_type, source, actor_id, resource, payloads).
UNICODE = [
    "\u2019; DROP TABLE webhook_events; \u2014",  # typographic quote and dash
    "\u02bc OR \u02bc1\u02bc=\u02bc1",  # modifier-letter apostrophes
    "日本語'テナント\"",
    "🎉'); DROP TABLE audit_events;--🎉",
    "Ω≈ç√∫ \u2028 \u00a0 \ufeff",
    "\u202eevil\u202c'",
]
NASTY = ASCII + UNICODE


async def catalog(db: asyncpg.Connection) -> list[Any]:
    """Relations (partitions aside), schemas, functions, policies and triggers of the test database."""
    return [tuple(r) for r in await db.fetch(
        r"""SELECT 'rel', n.nspname || '.' || c.relname || ':' || c.relkind::text FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
              AND c.relname !~ '_p[0-9]{8}$'
            UNION ALL SELECT 'schema', nspname FROM pg_namespace
            UNION ALL SELECT 'fn', oid::regprocedure::text FROM pg_proc WHERE pronamespace = 'public'::regnamespace
            UNION ALL SELECT 'policy', tablename || '.' || policyname || ':' || qual FROM pg_policies
            UNION ALL SELECT 'trigger', tgrelid::regclass::text || '.' || tgname FROM pg_trigger WHERE NOT tgisinternal
            ORDER BY 1, 2""")]


async def no_stray_roles(db: asyncpg.Connection) -> None:
    assert await db.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = 'root'") is True
    assert await db.fetch(
        "SELECT rolname FROM pg_roles WHERE rolname ~ '[^a-z0-9_]' OR rolname ILIKE '%pwned%'") == []


async def ingest(config: Config, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """An ``ingest`` command through the real parser and handler, in this event loop; (exit code, out, err)."""
    capsys.readouterr()
    try:
        args = cli.build_parser().parse_args(list(argv))
    except SystemExit as exc:
        out, err = capsys.readouterr()
        return int(exc.code or 0), out, err
    code = int(await args.handler(args, config) or 0)
    out, err = capsys.readouterr()
    return code, out, err


def webhook(tenant: str, key: str, text: str, now: datetime) -> dict[str, Any]:
    return {"tenant_id": tenant, "idempotency_key": key, "event_type": text[:128], "source": text[:64],
            "occurred_at": now.isoformat(), "payload": {text: text, "nested": [text, {text: [text]}], "k": key},
            "headers": {text: text}}


def audit(tenant: str, key: str, text: str, now: datetime) -> dict[str, Any]:
    return {"tenant_id": tenant, "idempotency_key": key, "action": text[:128], "actor_id": text,
            "occurred_at": now.isoformat(), "resource": text, "ip": "10.0.0.1", "metadata": {text: [text]}}


async def test_hostile_values_are_stored_verbatim_and_change_nothing_else(
        config: Config, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]) -> None:
    before = await catalog(db)
    now = datetime.now(UTC)
    hooks = [webhook("t-inj", key, key, now) for key in ASCII]
    hooks += [webhook("t-inj", f"u{i}", text, now) for i, text in enumerate(UNICODE)]
    audits = [audit("t-inj", key, key, now) for key in ASCII]
    audits += [audit("t-inj", f"u{i}", text, now) for i, text in enumerate(UNICODE)]
    # Tenant ids the contract refuses: dead-lettered with the tenant, key and bytes exactly as sent.
    bad = [(t.encode(), json.dumps(webhook(t, t[:255] if t.isascii() else "k", "x", now)).encode()) for t in NASTY]

    await publish(config, "webhook", [webhook("t-ok", f"before-{i}", "fine", now) for i in range(5)])
    await publish(config, "webhook", hooks)
    await publish_raw(config, "webhook", bad)
    await publish(config, "audit", audits)
    await publish(config, "webhook", [webhook("t-ok", f"after-{i}", "fine", now) for i in range(5)])
    totals = await drain(config)
    assert totals["webhook"].stored == len(hooks) + 10 and totals["audit"].stored == len(audits)

    # Stored verbatim, every text column and every JSON key and value.
    got = {r["idempotency_key"]: r for r in await db.fetch(
        "SELECT idempotency_key, event_type, source, payload, headers FROM webhook_events WHERE tenant_id = 't-inj'")}
    assert set(got) == {e["idempotency_key"] for e in hooks}
    for e in hooks:
        r = got[e["idempotency_key"]]
        assert (r["event_type"], r["source"]) == (e["event_type"], e["source"])
        assert (json.loads(r["payload"]), json.loads(r["headers"])) == (e["payload"], e["headers"])
    got = {r["idempotency_key"]: r for r in await db.fetch(
        "SELECT idempotency_key, action, actor_id, resource, metadata FROM audit_events WHERE tenant_id = 't-inj'")}
    assert set(got) == {e["idempotency_key"] for e in audits}
    for e in audits:
        r = got[e["idempotency_key"]]
        assert (r["action"], r["actor_id"], r["resource"]) == (e["action"], e["actor_id"], e["resource"])
        assert json.loads(r["metadata"]) == e["metadata"]
    for stream, sent in (("webhook", hooks), ("audit", audits)):  # each key claimed exactly as sent
        keys = [("t-inj", e["idempotency_key"]) for e in sent]
        assert await ledger.holds(db, "dedupe_ledger", stream, keys) == set(keys)
    dead = await db.fetch("SELECT tenant_id, kafka_key, raw FROM dead_letters ORDER BY id")
    assert sorted((r["tenant_id"], r["kafka_key"], r["raw"]) for r in dead) == sorted(
        (k.decode(), k, v) for k, v in bad)
    # The stream kept flowing: what came after the hostile records is stored too.
    assert await db.fetchval("SELECT count(*) FROM webhook_events WHERE tenant_id = 't-ok'") == 10

    # `ingest dlq list/replay --tenant T`: the filter is a bound value, matching exactly one entry per tenant.
    for tenant in NASTY[:6] + UNICODE[-2:]:
        code, out, err = await ingest(config, capsys, "dlq", "list", "--tenant", tenant, "--json")
        assert code == 0, err
        listed = json.loads(out)
        assert listed["total"] == 1 and [e["tenant_id"] for e in listed["entries"]] == [tenant]
        code, out, err = await ingest(config, capsys, "dlq", "replay", "--tenant", tenant, "--dry-run", "--json")
        assert code == 0, err
        assert json.loads(out)["would_send"] == 1, out
    for probe in ("x' OR 'a'='a", "%", "' OR tenant_id IS NOT NULL OR '"):
        code, out, _ = await ingest(config, capsys, "dlq", "list", "--tenant", probe, "--json")
        assert code == 0 and json.loads(out)["total"] == 0, probe
    for argv in (("dlq", "show", "1; DROP TABLE dead_letters"), ("dlq", "list", "--since", "1h'; DROP TABLE x; --"),
                 ("dlq", "list", "--reason", "invalid' OR '1'='1"), ("dlq", "list", "--stream", "webhook'--")):
        code, _, err = await ingest(config, capsys, *argv)
        assert code == 2, argv

    # `ingest quota set|get|unset|reset TENANT`: tenant ids outside the contract are refused before any query.
    for tenant in ASCII[:5] + UNICODE[:2]:
        for argv in (("quota", "set", tenant, "--per-day", "1"), ("quota", "unset", tenant),
                     ("quota", "get", tenant), ("quota", "reset", tenant)):
            code, _, err = await ingest(config, capsys, *argv)
            assert code == 2 and "invalid tenant id" in err, (argv, err)
    pool = await create_pool(config.database_url, max_size=1)
    try:
        async with pool.acquire() as conn:
            for tenant in NASTY:
                with pytest.raises(ValueError, match="invalid tenant id"):
                    await quotas.set_override(conn, tenant, per_day=1)
    finally:
        await pool.close()
    assert await db.fetchval("SELECT count(*) FROM quota_overrides") == 0
    code, _, err = await ingest(config, capsys, "quota", "set", "a:b.c-d_E9", "--per-day", "7")
    assert code == 0, err
    assert await db.fetch("SELECT tenant_id, per_day FROM quota_overrides") == [("a:b.c-d_E9", 7)]

    assert await catalog(db) == before
    await no_stray_roles(db)
    assert not await asyncio.to_thread(os.path.exists, "/tmp/ingest-pwned")


async def test_role_prefixes_are_validated_and_passwords_never_reach_sql(
        config: Config, env: dict[str, str], db: asyncpg.Connection, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    before = await catalog(db)
    prefixes: Sequence[str] = [*NASTY, "", "UPPER", "9lives", "pg", "pg_x", "a" * 42, "a-b", "a b", "a.b",
                               "ingest\n", "ingest;"]
    for prefix in prefixes:
        with pytest.raises(roles.RoleError, match="invalid role prefix"):
            roles.Roles.from_prefix(prefix)
        code, _, err = await ingest(config, capsys, "migrate", "--roles", prefix)
        assert code == 2 and "invalid role prefix" in err, (prefix, err)
    # The real command line too (one process: its exit code and message).
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumers.cli", "migrate", "--roles", 'x"; DROP ROLE root; --',
        env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err_bytes = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2 and b"invalid role prefix" in err_bytes
    await no_stray_roles(db)

    # A hostile password travels only as a SCRAM verifier; a password that is not printable ASCII is refused.
    r = roles.Roles.from_prefix(f"t{uuid.uuid4().hex[:12]}")
    password = "'; DROP ROLE root; -- $$ \\ %s {}"
    (tmp_path / "pw").write_text(password + "\n")
    (tmp_path / "bad").write_text("caf\u00e9\n")
    try:
        code, _, err = await ingest(config, capsys, "migrate", "--roles", r.owner.removesuffix("_owner"),
                                    "--reader-password-file", str(tmp_path / "bad"))
        assert code == 2 and "printable ASCII" in err
        assert await db.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = $1", r.reader) == 0
        code, _, err = await ingest(config, capsys, "migrate", "--roles", r.owner.removesuffix("_owner"),
                                    "--owner-password-file", str(tmp_path / "pw"))
        assert code == 0, err
        verifier = await db.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", r.owner)
        salt = base64.b64decode(verifier.split("$")[1].split(":")[1])
        assert verifier == roles.scram_verifier(password, salt=salt)
        await no_stray_roles(db)
    finally:
        await drop_roles(config.database_url, r)
    assert await catalog(db) == before
