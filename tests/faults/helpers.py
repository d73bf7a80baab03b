"""Helpers of the fault-injection suite: private servers, consumer processes, what was published, the invariant.

- ``PgCluster``: a private PostgreSQL 15 cluster (initdb into a temp dir, run as the ``postgres`` OS user, fsync
  off but synchronous_commit on, trust on 127.0.0.1) with ``start``/``stop(mode)``/``restart(mode)``/``ensure_running``/``url(db)``.
- ``RedisServer``: a private ``redis-server`` (no persistence) with ``stop``/``start``/``restart_empty``/``url``.
- ``Tmpfs``: a size-limited tmpfs mount owned by postgres (for tablespaces that fill up); ``resize``, ``unmount``.
- ``Published`` + ``publish_mix``: publish valid events (with re-delivered duplicates, several tenants) and
  invalid records on purpose, remembering what was sent per stream.
- ``Consumer``: an ``ingest consume`` child process with its own metrics port and a log file: ``metric``,
  ``reached`` / ``at_most`` (metric threshold checks for ``wait_until``), ``http`` (``/readyz``), ``alive``, ``terminate``,
  ``kill``, ``log``, ``client_id``.
- ``progress``, ``wait_until``, ``wait_event``, ``wait_caught_up``, ``wait_positioned`` (bounded polling) and
  ``check_invariants``
  (the assertion every case ends with: each published event stored exactly once or dead-lettered, nothing
  twice, the ledger agrees, stored offsets at the end of every partition).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from prometheus_client.parser import text_string_to_metric_families

from consumers import streams
from consumers.cli import sample
from ingest import ledger
from ingest.broker import listening
from ingest.config import Config
from tests.conftest import free_port
from tests.integration.helpers import kill9, offsets_total, publish_raw, stored_keys

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True, text=True,
                          timeout=timeout, check=False)


class PgCluster:
    """A private Postgres cluster under ``root`` (owned by the postgres OS user); superuser ``root``, trust auth."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.data = root / "data"
        self.logfile = root / "server.log"

    def init(self) -> None:
        shutil.chown(self.root, "postgres", "postgres")
        self.root.chmod(0o700)
        out = _as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "root",
                           "--no-sync", "-E", "UTF8", "--no-locale")
        assert out.returncode == 0, out.stderr
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.root}'\nfsync = off\nfull_page_writes = off\n"
                       "shared_buffers = 32MB\nmax_connections = 100\n")
        # fsync=off only matters if the machine crashes: a killed server (stop -m immediate) loses nothing it
        # acknowledged. synchronous_commit stays on: off would acknowledge commits an immediate stop can lose.

    def _ctl(self, *args: str) -> None:
        out = _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-w",
                           "-t", "60", *args)
        assert out.returncode == 0, f"pg_ctl {' '.join(args)}: {out.stdout}{out.stderr}\n{self.log_tail()}"

    def start(self) -> None:
        self._ctl("start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` (roll back and disconnect sessions) or ``immediate`` (like a crash: recovery at start)."""
        self._ctl("stop", "-m", mode)

    def restart(self, mode: str = "fast") -> None:
        self._ctl("restart", "-m", mode)

    def running(self) -> bool:
        return _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "status").returncode == 0

    def ensure_running(self) -> None:
        if not self.running():
            self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://root@127.0.0.1:{self.port}/{database}"

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        return ""


class RedisServer:
    """A private redis-server on ``port`` without persistence: a restart always comes back empty."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while not listening("127.0.0.1", self.port):
            assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGKILL (no persistence anyway) and wait until the port is closed."""
        if self.proc is not None:
            kill9(self.proc)
            self.proc = None
        deadline = time.monotonic() + 10
        while listening("127.0.0.1", self.port):
            assert time.monotonic() < deadline, "redis-server did not stop"
            time.sleep(0.02)

    def restart_empty(self) -> None:
        self.stop()
        self.start()

    ensure_running = start


class Tmpfs:
    """A tmpfs of ``size`` (mount(8) syntax: 512k, 64m) at ``path``, owned by postgres, mode 700."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=False)
        shutil.chown(path, "postgres", "postgres")
        pw = pwd.getpwnam("postgres")
        uid, gid = pw.pw_uid, pw.pw_gid
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700,uid={uid},gid={gid}", "tmpfs",
                        str(path)], check=True, capture_output=True, timeout=30)
        self.mounted = True

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True,
                       timeout=30)

    def unmount(self) -> None:
        if self.mounted:
            if subprocess.run(["umount", str(self.path)], capture_output=True, timeout=30).returncode != 0:
                subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=30)
            self.mounted = False
        with contextlib.suppress(OSError):
            self.path.rmdir()


@dataclass
class Tablespace:
    """A Postgres tablespace on a ``Tmpfs`` (made by the ``tablespace`` fixture)."""

    name: str
    fs: Tmpfs


# -- what a case published ---------------------------------------------------------------------------------------
@dataclass
class Published:
    """Per stream: Kafka records sent, the valid events (duplicates included) and the invalid values sent."""

    records: Counter[str] = field(default_factory=Counter)
    valid: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    invalid: dict[str, list[bytes]] = field(default_factory=dict)

    def add(self, stream: str, events: Iterable[dict[str, Any]], invalid: Iterable[bytes] = ()) -> None:
        events, invalid = list(events), list(invalid)
        self.valid.setdefault(stream, []).extend(events)
        self.invalid.setdefault(stream, []).extend(invalid)
        self.records[stream] += len(events) + len(invalid)

    def unique(self, stream: str) -> set[tuple[str, str]]:
        return {(e["tenant_id"], e["idempotency_key"]) for e in self.valid.get(stream, [])}


def invalid_record(stream: str, n: int, rng: random.Random, tag: str) -> tuple[bytes, bytes]:
    """A record the consumer must dead-letter (four kinds in turn); unique by ``tag`` and ``n``."""
    make = sample.webhook if stream == "webhook" else sample.audit
    event = make(rng, "org-0001", n, datetime.now(UTC))
    event["idempotency_key"] = f"bad-{tag}-{n}"
    kind = n % 4
    if kind == 0:
        value = orjson.dumps(event)[:-7]  # truncated JSON
    elif kind == 1:
        del event["occurred_at"]  # a required field missing
        value = orjson.dumps(event)
    elif kind == 2:
        event["tenant_id"] = "not a tenant!"  # violates the tenant_id pattern
        value = orjson.dumps(event)
    else:
        event["occurred_at"] = "2001-01-01T00:00:00Z"  # outside the accepted time window
        value = orjson.dumps(event)
    return b"org-0001", value


async def publish_mix(config: Config, published: Published, stream: str, count: int, *, tenants: int = 6,
                      dup_rate: float = 0.1, invalid: int = 8, seed: int = 1, prefix: str = "") -> None:
    """Publish ``count`` valid events (``dup_rate`` of them re-deliveries) of ``tenants`` tenants, keyed by
    tenant, with ``invalid`` records mixed in at random places; record it all in ``published``."""
    rng = random.Random(seed)
    events = list(sample.generate(stream, count, n_tenants=tenants, dup_rate=dup_rate, seed=seed))
    if prefix:
        events = [{**e, "idempotency_key": prefix + e["idempotency_key"]} for e in events]
    records = [(e["tenant_id"].encode(), orjson.dumps(e)) for e in events]
    bad = [invalid_record(stream, i, rng, f"{seed}{prefix}") for i in range(invalid)]
    for rec in bad:
        records.insert(rng.randrange(len(records) + 1), rec)
    await publish_raw(config, stream, records)
    published.add(stream, events, [value for _, value in bad])


# -- consumer processes ------------------------------------------------------------------------------------------
class Consumer:
    """``ingest consume`` as a child process (own process group), metrics on a free port, output in a log file."""

    def __init__(self, env: dict[str, str], stream: str = "all", *extra: str, log_dir: Path,
                 name: str = "consumer") -> None:
        self.name, self.stream = name, stream
        self.metrics_port = free_port()
        self.log_path = log_dir / f"{name}-{self.metrics_port}.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "consumers.cli", "consume", "--stream", stream, *extra],
                env={**os.environ, **env, "INGEST_METRICS_PORT": str(self.metrics_port)},
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def client_id(self, stream: str) -> str:
        """The Kafka client id this process uses for ``stream`` (without INGEST_INSTANCE_ID)."""
        return f"ingest-{stream}-{socket.gethostname()}-{self.proc.pid}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self, tail: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-tail:]
        return ""

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        """Every sample of /metrics, or None when the server does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=3) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
        return out

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none or no answer)."""
        samples = self.scrape() or {}
        want = set(labels.items())
        return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))

    async def ametric(self, name: str, **labels: str) -> float:
        return await asyncio.to_thread(self.metric, name, **labels)

    def reached(self, name: str, n: float, **labels: str) -> Callable[[], Awaitable[bool]]:
        """A ``wait_until`` check: metric ``name`` (summed over ``labels``) is at least ``n``."""
        async def check() -> bool:
            return await self.ametric(name, **labels) >= n
        return check

    def at_most(self, name: str, n: float, **labels: str) -> Callable[[], Awaitable[bool]]:
        """A ``wait_until`` check: metric ``name`` (summed over ``labels``) is at most ``n`` (and it answered)."""
        async def check() -> bool:
            return await asyncio.to_thread(self.scrape) is not None and await self.ametric(name, **labels) <= n
        return check

    def http(self, path: str) -> tuple[int, str]:
        """Status and body of ``GET path`` on the metrics server (``/readyz``, ``/healthz``); 0 if no answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=3) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM the process group and wait; on timeout kill -9 it and fail."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill9(self.proc)
            raise AssertionError(f"{self.name} did not stop within {timeout} s after SIGTERM\n{self.log()}") from None

    async def aterminate(self, timeout: float = 30) -> int:
        return await asyncio.to_thread(self.terminate, timeout)

    def kill(self) -> None:
        kill9(self.proc)


# -- polling and the invariant -------------------------------------------------------------------------------------
async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str,
                     interval: float = 0.1, consumers: Iterable[Consumer] = ()) -> float:
    """Poll ``check`` until it is true (return the seconds it took); fail after ``timeout`` or as soon as one of
    ``consumers`` exited."""
    consumers = list(consumers)
    started = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - started
        for c in consumers:
            if not c.alive():
                raise AssertionError(f"{c.name} exited with {c.proc.returncode} while waiting for {what}\n{c.log()}")
        if time.monotonic() - started > timeout:
            logs = "\n".join(f"--- {c.name}\n{c.log()}" for c in consumers)
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs}")
        await asyncio.sleep(interval)


async def wait_event(event: threading.Event, timeout: float, what: str, consumers: Iterable[Consumer] = ()) -> float:
    """``wait_until`` for a ``threading.Event`` (e.g. ``Trigger.fired``)."""
    async def is_set() -> bool:
        return event.is_set()
    return await wait_until(is_set, timeout, what, interval=0.02, consumers=consumers)


async def progress(url: str, config: Config) -> dict[str, int] | None:
    """Stored offsets (sum over partitions) per stream, or None while Postgres is unreachable."""
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return None
    try:
        return {s: await offsets_total(conn, config, s) for s in streams.STREAMS}
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return None
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


async def wait_caught_up(url: str, config: Config, published: Published, *, consumers: Iterable[Consumer] = (),
                         timeout: float = 60) -> float:
    """Wait until the stored offsets of every stream reach the records published to it."""
    last: dict[str, int] | None = None

    async def done() -> bool:
        nonlocal last
        last = await progress(url, config) or last
        return last is not None and all(last[s] >= published.records[s] for s in streams.STREAMS)

    try:
        return await wait_until(done, timeout, "the stored offsets to reach the end", consumers=consumers)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nprogress {last}, published {dict(published.records)}") from None


async def wait_positioned(url: str, config: Config, stream_names: Iterable[str], *, consumers: Iterable[Consumer] = (),
                          timeout: float = 60) -> float:
    """Wait until every partition of each stream has a stored position (a ``consumer_offsets`` row >= 0 for each of
    ``config.topic_partitions``): from then on the only transactions a consumer commits are its batches'. A case
    that acts on "the n-th COMMIT" must arm its trigger only after this."""
    names = list(stream_names)

    async def positioned() -> bool:
        try:
            conn = await asyncpg.connect(url, timeout=3)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return False
        try:
            for name in names:
                s = streams.STREAMS[name]
                n = await conn.fetchval(
                    "SELECT count(*) FROM consumer_offsets WHERE group_id = $1 AND topic = $2 AND next_offset >= 0",
                    s.group_for(config), s.topic_for(config))
                if n < config.topic_partitions:
                    return False
            return True
        finally:
            await conn.close()

    return await wait_until(positioned, timeout, f"every partition of {names} positioned", consumers=consumers)


async def check_invariants(url: str, config: Config, published: Published, *,
                           dead_lettered_ok: bool = False) -> dict[str, dict[str, int]]:
    """Assert the effectively-once invariant on the database at ``url`` (a direct URL, not a proxy):

    - every unique (tenant, idempotency key) published valid is stored exactly once — or, only with
      ``dead_lettered_ok`` (quota cases), sits in dead_letters instead; nothing else is stored;
    - every record published invalid on purpose is in dead_letters exactly once, and nothing else is;
    - the dedupe ledger holds exactly the stored keys;
    - the stored offsets sum to the records published to each stream (every partition at its end).

    Returns per stream: stored, dead letters, duplicates dropped, offsets."""
    conn = await asyncpg.connect(url, timeout=10)
    problems: list[str] = []
    summary: dict[str, dict[str, int]] = {}
    claimed = 0  # keys the ledger must hold: every stream's stored keys, and nothing else
    try:
        for stream in streams.STREAMS:
            stored = await stored_keys(conn, stream)
            unique = published.unique(stream)
            doubled = sorted(k for k, n in stored.items() if n > 1)
            extra = set(stored) - unique
            missing = unique - set(stored)
            rows = await conn.fetch(
                "SELECT raw, reason, tenant_id, idempotency_key FROM dead_letters WHERE stream = $1", stream)
            want = Counter(published.invalid.get(stream, []))
            got = Counter(bytes(r["raw"]) for r in rows if r["raw"] is not None and bytes(r["raw"]) in want)
            others = [r for r in rows if r["raw"] is None or bytes(r["raw"]) not in want]
            if dead_lettered_ok:
                dead_keys = {(r["tenant_id"], r["idempotency_key"]) for r in others}
                missing -= dead_keys
                if dead_keys & set(stored):
                    problems.append(f"{stream}: keys both stored and dead-lettered: {sorted(dead_keys & set(stored))[:5]}")
            elif others:
                problems.append(f"{stream}: {len(others)} unexpected dead letters, e.g. "
                                f"{[(r['reason'], r['tenant_id'], r['idempotency_key']) for r in others[:5]]}")
            if doubled:
                problems.append(f"{stream}: {len(doubled)} events stored more than once, e.g. {doubled[:5]}")
            if missing:
                problems.append(f"{stream}: {len(missing)} events lost, e.g. {sorted(missing)[:5]}")
            if extra:
                problems.append(f"{stream}: {len(extra)} stored events never published, e.g. {sorted(extra)[:5]}")
            if got != want:
                problems.append(f"{stream}: invalid records: {sum((want - got).values())} not dead-lettered, "
                                f"{sum((got - want).values())} dead-lettered twice")
            unclaimed = set(stored) - await ledger.holds(conn, "dedupe_ledger", stream, list(stored))
            if unclaimed:
                problems.append(f"{stream}: {len(unclaimed)} stored but not in the ledger, e.g. {sorted(unclaimed)[:5]}")
            claimed += len(stored)
            at = await offsets_total(conn, config, stream)
            if at != published.records[stream]:
                problems.append(f"{stream}: stored offsets sum to {at}, published {published.records[stream]} records")
            summary[stream] = {"published": published.records[stream], "stored": sum(stored.values()),
                               "dead_letters": len(rows), "duplicates": published.records[stream] - len(rows)
                               - sum(stored.values()), "offsets": at}
        held = await conn.fetchval("SELECT count(*) FROM dedupe_ledger")
        if held != claimed:
            problems.append(f"the ledger holds {held} keys for {claimed} stored events (claimed but not stored)")
    finally:
        await conn.close()
    assert not problems, "effectively-once invariant violated:\n" + "\n".join(problems)
    return summary
