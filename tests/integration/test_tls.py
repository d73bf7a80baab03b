"""Encrypted, authenticated connections against real servers (no mocks).

Per module: a test CA and server certificate (openssl); a PRIVATE Postgres 15 cluster that only accepts TLS
(``hostssl`` with SCRAM passwords or client certificates; no ``hostnossl`` line, so plain connections are refused);
a PRIVATE redis-server listening on a TLS port only, whose default user is disabled (an ACL user with a password);
and a PRIVATE Tansu broker reachable only through a TLS-terminating proxy (Tansu 0.6 cannot serve TLS itself: its
``--cert``/``--key`` options conflict), advertised at the proxy, so every Kafka client connection is TLS-verified
against the test CA. Everything is stopped and deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import ssl
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import asyncpg
import orjson
import pytest
from prometheus_client import generate_latest
from redis.exceptions import NoPermissionError

from consumers import run, settings, streams
from consumers.cli import sample, status
from ingest import broker as broker_mod
from ingest.broker import delete_topics, ensure_topics, listening
from ingest.metrics import Metrics
from ingest.publisher import Publisher
from ingest.services import ServiceUnavailable, connect_redis, create_pool, with_database
from tests.certs import Pair, make_ca, make_cert
from tests.conftest import deployment_env, free_port, stop_process

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_PASSWORD = "pg-Pw!tls/9@x"
REDIS_PASSWORD = "rd-Pw!tls:7@y"
EVENTS = 60


@dataclass(frozen=True)
class Pki:
    ca: Pair
    other_ca: Pair
    server: Pair
    pg_client: Pair


@dataclass(frozen=True)
class Servers:
    pki: Pki
    pg_port: int
    redis_port: int
    kafka: str  # the TLS proxy in front of the private broker

    def pg_url(self, database: str, *, ca: Path | None = None, mode: str = "verify-full",
               password: str = PG_PASSWORD) -> str:
        return (f"postgresql://ingest_tls:{quote(password, safe='')}@127.0.0.1:{self.pg_port}/{database}"
                f"?sslmode={mode}&sslrootcert={ca or self.pki.ca.cert}")

    def redis_url(self, *, ca: Path | None = None, creds: str = f"ingest:{quote(REDIS_PASSWORD, safe='')}@") -> str:
        return f"rediss://{creds}127.0.0.1:{self.redis_port}/0?ssl_ca_certs={ca or self.pki.ca.cert}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("tls")
    ca = make_ca(d, "ingest-test-ca")
    return Pki(ca=ca, other_ca=make_ca(d, "some-other-ca"),
               server=make_cert(d, ca, "server", cn="127.0.0.1", san="IP:127.0.0.1,DNS:localhost"),
               pg_client=make_cert(d, ca, "pg-client", cn="ingest_cert", client=True))


def _as_postgres(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def private_pg(pki: Pki) -> Iterator[int]:
    """A Postgres cluster on a free port that accepts only TLS: SCRAM passwords, or the ``ingest_cert`` user by
    client certificate. Roles: ``ingest_tls`` (password) and ``ingest_cert`` (certificate), both superusers."""
    pg = pwd.getpwnam("postgres")
    root = Path(tempfile.mkdtemp(prefix="ingest-tls-pg-"))
    os.chown(root, pg.pw_uid, pg.pw_gid)
    data, port = root / "data", free_port()
    try:
        out = _as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync",
                           "--no-instructions")
        assert out.returncode == 0, out.stderr
        for src, name in ((pki.server.cert, "server.crt"), (pki.server.key, "server.key"), (pki.ca.cert, "ca.crt")):
            shutil.copy(src, data / name)
            os.chown(data / name, pg.pw_uid, pg.pw_gid)
            os.chmod(data / name, 0o600)
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{root}'\n"
                       "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.crt'\n"
                       "password_encryption = 'scram-sha-256'\nfsync = off\nsynchronous_commit = off\n"
                       "full_page_writes = off\nshared_buffers = 32MB\nmax_connections = 40\n")
        (data / "pg_hba.conf").write_text(
            "local all postgres trust\n"
            "hostssl all ingest_cert 127.0.0.1/32 cert\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n")
        out = _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "30", "start")
        assert out.returncode == 0, out.stdout + out.stderr + (root / "log").read_text()
        sql = (f"CREATE ROLE ingest_tls LOGIN SUPERUSER PASSWORD '{PG_PASSWORD}'; "
               "CREATE ROLE ingest_cert LOGIN SUPERUSER;")
        out = subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-h", str(root), "-p", str(port), "-U",
                              "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        yield port
    finally:
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def private_redis(pki: Pki) -> Iterator[int]:
    """redis-server on a TLS port only; the default user is off; user ``ingest`` has a password and may only use
    keys starting ``t_`` (the test prefixes) with data, script and connection commands."""
    root = Path(tempfile.mkdtemp(prefix="ingest-tls-redis-"))
    port = free_port()
    conf = root / "redis.conf"
    conf.write_text(
        f"port 0\ntls-port {port}\nbind 127.0.0.1\ndir {root}\nsave \"\"\nappendonly no\n"
        f"tls-cert-file {pki.server.cert}\ntls-key-file {pki.server.key}\ntls-ca-cert-file {pki.ca.cert}\n"
        "tls-auth-clients optional\n"
        "user default off\n"
        # least privilege, as docs/connections.md suggests: the test prefixes' keys, data and script commands
        f"user ingest on >{REDIS_PASSWORD} ~t_* resetchannels -@all +@read +@write +@scripting +@connection\n")
    log = root / "log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["redis-server", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            if listening("127.0.0.1", port) or proc.poll() is not None:
                break
            subprocess.run(["sleep", "0.05"])
        if proc.poll() is not None:
            text = log.read_text()
            if "tls" in text.lower():
                pytest.skip(f"this redis-server build has no TLS support: {text.strip()[-200:]}")
            raise AssertionError(f"redis-server did not start: {text}")
        yield port
    finally:
        stop_process(proc)
        shutil.rmtree(root, ignore_errors=True)


class TlsTerminator:
    """Accepts TLS on a port (with the test server certificate) and forwards the bytes to a plain upstream."""

    def __init__(self, pki: Pki, upstream: int) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(pki.server.cert, pki.server.key)
        self.upstream = upstream
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self, port: int) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port, ssl=self.ctx)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self.tasks.discard(task)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture(scope="module")
def private_broker() -> Iterator[tuple[int, int]]:
    """A private Tansu broker on a plain port that advertises another port (the TLS proxy's): both ports."""
    plain, proxied = free_port(), free_port()
    try:
        proc = broker_mod.start_embedded("127.0.0.1", plain, advertised=f"127.0.0.1:{proxied}")
    except ServiceUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield plain, proxied
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
async def tls_kafka(pki: Pki, private_broker: tuple[int, int]) -> AsyncIterator[str]:
    """The private broker behind a TLS proxy: the only address clients can use."""
    plain, proxied = private_broker
    proxy = TlsTerminator(pki, plain)
    await proxy.start(proxied)
    try:
        yield f"127.0.0.1:{proxied}"
    finally:
        await proxy.stop()


@pytest.fixture(scope="module")
def servers(pki: Pki, private_pg: int, private_redis: int, tls_kafka: str) -> Servers:
    return Servers(pki, private_pg, private_redis, tls_kafka)


def _env(servers: Servers, tmp_path: Path) -> dict[str, str]:
    """The deployment's environment; the Postgres and Redis URLs come from mounted-secret style files."""
    uid = uuid.uuid4().hex[:10]
    db_file, redis_file = tmp_path / "database-url", tmp_path / "redis-url"
    db_file.write_text(servers.pg_url(f"ingest_tls_{uid}") + "\n")
    redis_file.write_text(servers.redis_url() + "\n")
    return deployment_env(
        f"t_{uid}", INGEST_KAFKA_BOOTSTRAP=servers.kafka, INGEST_KAFKA_SECURITY_PROTOCOL="SSL",
        INGEST_KAFKA_SSL_CA_FILE=str(servers.pki.ca.cert), INGEST_DATABASE_URL_FILE=str(db_file),
        INGEST_REDIS_URL_FILE=str(redis_file), INGEST_TOPIC_PARTITIONS="2", INGEST_LOG_LEVEL="DEBUG")


def _no_secret(*texts: str) -> None:
    for text in texts:
        for secret in (PG_PASSWORD, REDIS_PASSWORD):
            assert secret not in text and quote(secret, safe="") not in text


async def test_migrate_and_drain_through_tls_everywhere(servers: Servers, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    env = _env(servers, tmp_path)
    cfg = settings.from_env(env)
    assert cfg.database_url.startswith("postgresql://ingest_tls:") and "sslmode=verify-full" in cfg.database_url
    await run.run_migrations(cfg)  # creates the database through the /postgres admin URL: TLS kept
    await run.ensure_all_topics(cfg)
    try:
        events = list(sample.generate("webhook", EVENTS, n_tenants=3, dup_rate=0, seed=7))
        s = streams.WEBHOOK
        async with Publisher(cfg, topic=s.topic_for(cfg), contract=s.contract(cfg)) as pub:
            for e in events:
                await pub.send(e)
        metrics = Metrics(tenant_label_limit=cfg.tenant_label_limit)
        totals = await asyncio.wait_for(
            run.consume(cfg, streams.select("all"), asyncio.Event(), drain=True, metrics=metrics), 60)
        assert totals["webhook"].stored == EVENTS and totals["webhook"].rejected == 0

        conn = await asyncpg.connect(cfg.database_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM webhook_events") == EVENTS
            assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
        finally:
            await conn.close()

        redis = await connect_redis(cfg.redis_url)  # TLS + ACL user
        try:
            hints = [k async for k in redis.scan_iter(match=f"{cfg.redis_prefix}:*", count=1000)]
            assert len(hints) >= EVENTS  # the consumer wrote its dedupe hints through TLS
            with pytest.raises(NoPermissionError):  # the ACL user is confined to its key prefix
                await redis.get("outside-the-prefix")
        finally:
            await redis.aclose()
        exposition = generate_latest(metrics.registry).decode()
        assert "ingest_redis_errors_total 0.0" in exposition

        doc = await status.snapshot(cfg, list(streams.STREAMS.values()))
        assert all(svc["ok"] and svc["tls"] for svc in doc["services"].values()), doc["services"]
        assert doc["streams"]["webhook"]["total_lag"] == 0
        text = status.render(doc)
        assert "postgres ok" in text and " tls" in text
        cli = await asyncio.to_thread(  # the same from the command line, in both formats
            subprocess.run, [sys.executable, "-m", "consumers.cli", "status", "--json"],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert all(svc["tls"] for svc in orjson.loads(cli.stdout)["services"].values())
        cli_text = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "consumers.cli", "status", "--once"],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
        assert cli_text.returncode == 0 and "redis ok" in cli_text.stdout, cli_text.stderr
        _no_secret(orjson.dumps(doc).decode(), text, exposition, caplog.text, repr(cfg), cli.stdout, cli.stderr,
                   cli_text.stdout, cli_text.stderr)
    finally:
        await delete_topics(cfg, [s.topic_for(cfg) for s in streams.STREAMS.values()])


async def test_plain_connections_are_refused(servers: Servers) -> None:
    with pytest.raises(ServiceUnavailable) as pg_err:
        await create_pool(servers.pg_url("postgres", mode="disable"), max_size=1)
    assert "no encryption" in str(pg_err.value) and "check the user, the password and the TLS settings" in str(pg_err.value)

    plain_redis = f"redis://ingest:{quote(REDIS_PASSWORD, safe='')}@127.0.0.1:{servers.redis_port}/0"
    with pytest.raises(ServiceUnavailable, match="if it only accepts TLS, use rediss://") as redis_err:
        await connect_redis(plain_redis)
    anonymous = servers.redis_url(creds="")
    with pytest.raises(ServiceUnavailable, match="AuthenticationError") as anon_err:
        await connect_redis(anonymous)
    wrong = servers.redis_url(creds="ingest:not-the-password@")
    with pytest.raises(ServiceUnavailable, match=r"WRONGPASS|invalid username-password") as wrong_err:
        await connect_redis(wrong)

    with pytest.raises(ServiceUnavailable, match="INGEST_KAFKA_SECURITY_PROTOCOL=SSL") as kafka_err:
        plain = settings.from_env({"INGEST_KAFKA_BOOTSTRAP": servers.kafka})  # PLAINTEXT to a TLS port
        await ensure_topics(plain, ["never"], 1, replication_factor=1, min_insync_replicas=1,
                            request_timeout_ms=3000)
    for err in (pg_err, redis_err, anon_err, wrong_err, kafka_err):
        assert "\n" not in str(err.value)
        _no_secret(str(err.value))


async def test_a_wrong_ca_fails_with_one_clear_line(servers: Servers, tmp_path: Path) -> None:
    other = servers.pki.other_ca.cert
    with pytest.raises(ServiceUnavailable) as pg_err:
        await create_pool(servers.pg_url("postgres", ca=other), max_size=1)
    with pytest.raises(ServiceUnavailable) as redis_err:
        await connect_redis(servers.redis_url(ca=other))
    with pytest.raises(ServiceUnavailable) as kafka_err:
        wrong_ca = settings.from_env({"INGEST_KAFKA_BOOTSTRAP": servers.kafka, "INGEST_KAFKA_SECURITY_PROTOCOL": "SSL",
                                      "INGEST_KAFKA_SSL_CA_FILE": str(other)})
        await ensure_topics(wrong_ca, ["never"], 1, replication_factor=1, min_insync_replicas=1,
                            request_timeout_ms=3000)
    for err in (pg_err, redis_err, kafka_err):
        text = str(err.value)
        assert "certificate verify failed" in text and "TLS failed: check the CA file" in text and "\n" not in text
        _no_secret(text)

    # The CLI says the same in one line on stderr and exits 3.
    env = {**os.environ, **_env(servers, tmp_path), "INGEST_DATABASE_URL_FILE": "",
           "INGEST_DATABASE_URL": servers.pg_url("ingest_tls_cli", ca=other)}
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "consumers.cli", "migrate"], env=env,
                                   capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "postgres is unreachable" in lines[0] and "certificate verify failed" in lines[0]
    _no_secret(proc.stdout, proc.stderr)


async def test_client_certificates(servers: Servers) -> None:
    """Postgres ``cert`` authentication and Redis mutual TLS with a client certificate, from the URL alone."""
    pair = servers.pki.pg_client
    url = (f"postgresql://ingest_cert@127.0.0.1:{servers.pg_port}/postgres?sslmode=verify-full"
           f"&sslrootcert={servers.pki.ca.cert}&sslcert={pair.cert}&sslkey={pair.key}")
    settings.from_env({"INGEST_DATABASE_URL": url})  # accepted by the startup checks
    pool = await create_pool(url, max_size=1)
    try:
        assert await pool.fetchval("SELECT current_user") == "ingest_cert"
        assert await pool.fetchval("SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()") == "/CN=ingest_cert"
    finally:
        await pool.close()
    redis = await connect_redis(servers.redis_url() + f"&ssl_certfile={pair.cert}&ssl_keyfile={pair.key}")
    try:
        assert await redis.ping()
    finally:
        await redis.aclose()


def test_database_urls_derived_for_admin_work_keep_tls(servers: Servers) -> None:
    url = servers.pg_url("ingest")
    assert with_database(url, "postgres") == servers.pg_url("postgres")

