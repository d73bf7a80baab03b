"""Kafka SASL/TLS client options, connection URL checks and redacted errors (no broker needed: the TLS handshakes here
are against a local asyncio TLS server using test-made certificates)."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from consumers.settings import from_env
from ingest import consumer as consumer_mod
from ingest import kafka_options
from ingest.config import Config, KafkaSecurity
from ingest.consumer import StreamConsumer
from ingest.metrics import Metrics
from ingest.publisher import Publisher
from ingest.security import (
    SecurityError,
    check_database_url,
    check_kafka,
    check_redis_url,
    kafka_security,
    ssl_context,
)
from ingest.services import ServiceUnavailable, with_database
from tests.certs import Pair, make_ca, make_cert

SECRET = "pw-Zq8!x@y/z:w"
DEFAULTS = from_env({})


def kafka(**fields: Any) -> KafkaSecurity:
    """The default Kafka security settings with ``fields`` replaced."""
    return dataclasses.replace(DEFAULTS.kafka_security, **fields)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Pair]]:
    d = tmp_path_factory.mktemp("pki")
    ca, other = make_ca(d, "ca"), make_ca(d, "other-ca")
    yield {
        "ca": ca, "other": other,
        "server": make_cert(d, ca, "server", cn="127.0.0.1", san="IP:127.0.0.1,DNS:localhost"),
        "client": make_cert(d, ca, "client", cn="ingest", client=True),
        "client_enc": make_cert(d, ca, "client-enc", cn="ingest", client=True, key_password="k3y"),
    }


# -- kafka_security -------------------------------------------------------------------------------------------

def test_plaintext_has_no_sasl_and_no_tls() -> None:
    assert kafka_security(kafka()) == {"security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_plaintext_passes_the_credentials_without_tls(mechanism: str) -> None:
    sec = kafka(protocol="SASL_PLAINTEXT", sasl_mechanism=mechanism, sasl_username="u", sasl_password=SECRET)
    check_kafka(sec)
    assert kafka_security(sec) == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": mechanism,
                                   "sasl_plain_username": "u", "sasl_plain_password": SECRET}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_ssl_passes_credentials_and_a_verifying_context(mechanism: str, pki: dict[str, Pair]) -> None:
    sec = kafka(protocol="SASL_SSL", sasl_mechanism=mechanism, sasl_username="u", sasl_password=SECRET,
                        ssl_cafile=str(pki["ca"].cert))
    check_kafka(sec)
    opts = kafka_security(sec)
    ctx = opts.pop("ssl_context")
    assert opts == {"security_protocol": "SASL_SSL", "sasl_mechanism": mechanism, "sasl_plain_username": "u",
                    "sasl_plain_password": SECRET}
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_ssl_context_loads_the_test_ca_only(pki: dict[str, Pair]) -> None:
    ctx = ssl_context(kafka(protocol="SSL", ssl_cafile=str(pki["ca"].cert)))
    assert [dict(c["subject"][0])["commonName"] for c in ctx.get_ca_certs()] == ["ca"]
    assert not ssl_context(kafka(protocol="SSL", ssl_cafile=str(pki["ca"].cert),
                                         ssl_check_hostname=False)).check_hostname


def test_ssl_without_ca_file_uses_the_system_store() -> None:
    ctx = ssl_context(kafka(protocol="SSL"))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


async def _handshake(pki: dict[str, Pair], client: ssl.SSLContext, *, require_client_cert: bool = False,
                     host: str = "127.0.0.1") -> None:
    """A real TLS handshake between ``client`` and a local server presenting the test server certificate."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki["server"].cert, pki["server"].key)
    if require_client_cert:
        server_ctx.verify_mode = ssl.CERT_REQUIRED
        server_ctx.load_verify_locations(pki["ca"].cert)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=host), 5)
        assert await reader.read(2) == b"ok"
        writer.close()
    finally:
        server.close()


async def test_the_context_verifies_a_real_server(pki: dict[str, Pair]) -> None:
    await _handshake(pki, ssl_context(kafka(protocol="SSL", ssl_cafile=str(pki["ca"].cert))))


async def test_a_wrong_ca_fails_the_handshake(pki: dict[str, Pair]) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        await _handshake(pki, ssl_context(kafka(protocol="SSL", ssl_cafile=str(pki["other"].cert))))


async def test_a_wrong_host_name_fails_unless_hostname_checks_are_off(pki: dict[str, Pair]) -> None:
    sec = kafka(protocol="SSL", ssl_cafile=str(pki["ca"].cert))
    with pytest.raises(ssl.SSLCertVerificationError, match=r"mismatch|match"):
        await _handshake(pki, ssl_context(sec), host="kafka.example.com")
    off = kafka(protocol="SSL", ssl_cafile=str(pki["ca"].cert), ssl_check_hostname=False)
    await _handshake(pki, ssl_context(off), host="kafka.example.com")


@pytest.mark.parametrize("which", ["client", "client_enc"])
async def test_client_certificates_pass_mutual_tls(pki: dict[str, Pair], which: str) -> None:
    sec = kafka(protocol="SSL", ssl_cafile=str(pki["ca"].cert), ssl_certfile=str(pki[which].cert),
                        ssl_keyfile=str(pki[which].key), ssl_key_password="k3y" if which == "client_enc" else "")
    check_kafka(sec)
    await _handshake(pki, ssl_context(sec), require_client_cert=True)


# -- check_kafka: bad combinations are refused with the setting's name -----------------------------------------

def _name(field: str) -> str:
    return f"<{field}>"


@pytest.mark.parametrize(("sec", "message"), [
    (kafka(protocol="TLS"), "<protocol> must be one of"),
    (kafka(protocol="SASL_SSL", sasl_username="u", sasl_password="p"), "<sasl_mechanism> must be one of"),
    (kafka(protocol="SASL_SSL", sasl_mechanism="GSSAPI", sasl_username="u", sasl_password="p"),
     "<sasl_mechanism> must be one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
    (kafka(protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_password="p"),
     "<sasl_username> is required with <protocol>=SASL_SSL"),
    (kafka(protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u"),
     "<sasl_password> is required with <protocol>=SASL_PLAINTEXT"),
    (kafka(protocol="PLAINTEXT", sasl_mechanism="PLAIN"), "<sasl_mechanism> is set but <protocol>=PLAINTEXT"),
    (kafka(protocol="SSL", sasl_username="u"), "<sasl_username> is set but <protocol>=SSL does not use SASL"),
    (kafka(protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u", sasl_password="p",
                   ssl_cafile="/etc/hosts"), "<ssl_cafile> is set but <protocol>=SASL_PLAINTEXT does not use TLS"),
    (kafka(protocol="SSL", ssl_cafile="/nonexistent/ca.pem"), "<ssl_cafile>: no such file '/nonexistent/ca.pem'"),
    (kafka(protocol="SSL", ssl_keyfile="/etc/hosts"), "<ssl_keyfile> is set without <ssl_certfile>"),
])
def test_bad_combinations_are_refused(sec: KafkaSecurity, message: str) -> None:
    with pytest.raises(SecurityError, match=message):
        check_kafka(sec, _name)


def test_a_file_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(SecurityError, match="do not load"):
        check_kafka(kafka(protocol="SSL", ssl_cafile=str(junk)), _name)


def test_a_key_that_does_not_match_or_needs_a_password_is_refused(pki: dict[str, Pair]) -> None:
    mismatched = kafka(protocol="SSL", ssl_certfile=str(pki["client"].cert), ssl_keyfile=str(pki["server"].key))
    with pytest.raises(SecurityError, match="do not load"):
        check_kafka(mismatched, _name)
    locked = kafka(protocol="SSL", ssl_certfile=str(pki["client_enc"].cert),
                           ssl_keyfile=str(pki["client_enc"].key), ssl_key_password="wrong")
    with pytest.raises(SecurityError, match="<ssl_key_password>"):
        check_kafka(locked, _name)


def test_check_messages_never_contain_the_password() -> None:
    sec = kafka(protocol="PLAINTEXT", sasl_password=SECRET)
    with pytest.raises(SecurityError) as err:
        check_kafka(sec)
    assert SECRET not in str(err.value)


# -- every Kafka client gets the options ------------------------------------------------------------------------

def _sasl_ssl(pki: dict[str, Pair]) -> Config:
    return dataclasses.replace(DEFAULTS, kafka_bootstrap="127.0.0.1:1", kafka_security=kafka(
        protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-256", sasl_username="u", sasl_password=SECRET,
        ssl_cafile=str(pki["ca"].cert)))


def _client_security(client: Any) -> tuple[str, str | None, ssl.SSLContext | None]:
    return client._security_protocol, client._sasl_mechanism, client._ssl_context


async def test_aiokafka_accepts_the_options_for_every_client_kind(pki: dict[str, Pair]) -> None:
    cfg = _sasl_ssl(pki)
    producer = AIOKafkaProducer(**kafka_options.producer(cfg, client_id="p"))
    consumer = AIOKafkaConsumer(**kafka_options.consumer(cfg, client_id="c"))
    admin = AIOKafkaAdminClient(**kafka_options.admin(cfg, client_id="a"))
    for client in (producer.client, consumer._client, admin._client):
        protocol, mechanism, ctx = _client_security(client)
        assert (protocol, mechanism) == ("SASL_SSL", "SCRAM-SHA-256") and isinstance(ctx, ssl.SSLContext)
    await producer.stop()
    await consumer.stop()
    await admin.close()


async def test_publisher_and_stream_consumer_use_the_config(pki: dict[str, Pair],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from consumers import streams

    cfg = _sasl_ssl(pki)
    pub = Publisher(cfg, topic="t", contract=streams.WEBHOOK.contract(cfg))
    assert _client_security(pub._producer.client)[:2] == ("SASL_SSL", "SCRAM-SHA-256")
    await pub._producer.stop()

    seen: dict[str, Any] = {}
    monkeypatch.setattr(consumer_mod, "AIOKafkaConsumer", lambda **kw: seen.update(kw))
    sc = StreamConsumer(config=cfg, stream="webhook", topic="t", group="g", pipeline=None,  # type: ignore[arg-type]
                        pool=None, metrics=Metrics(), offsets_table="consumer_offsets",
                        changes_table="offset_changes")  # type: ignore[arg-type]
    sc.build_consumer()
    assert seen["security_protocol"] == "SASL_SSL" and seen["sasl_plain_password"] == SECRET
    assert isinstance(seen["ssl_context"], ssl.SSLContext) and seen["bootstrap_servers"] == "127.0.0.1:1"


# -- URLs -------------------------------------------------------------------------------------------------------

def test_database_urls(pki: dict[str, Pair]) -> None:
    ca = str(pki["ca"].cert)
    check_database_url(f"postgresql://u:p@h:5432/db?sslmode=verify-full&sslrootcert={ca}")
    check_database_url("postgres://h/db?sslmode=require")
    for url, message in [
        ("mysql://h/db", "must be a postgresql:// URL"),
        ("postgresql://h/db?sslmode=verify", "sslmode must be one of"),
        ("postgresql://h/db?sslmode=verify-ca&sslrootcert=/nonexistent.pem", "sslrootcert: no such file"),
        (f"postgresql://h/db?sslmode=verify-ca&sslrootcert={ca}&sslkey={ca}", "sslkey is set without sslcert"),
    ]:
        with pytest.raises(SecurityError, match=message):
            check_database_url(url)


def test_redis_urls(pki: dict[str, Pair]) -> None:
    ca = str(pki["ca"].cert)
    check_redis_url(f"rediss://user:pw@h:6380/0?ssl_ca_certs={ca}")
    check_redis_url("redis://:pw@h:6379/0")
    for url, message in [
        ("http://h", "must be a redis://"),
        (f"redis://h/0?ssl_ca_certs={ca}", "ssl_ca_certs needs a rediss://"),
        ("rediss://h/0?ssl_ca_certs=/nonexistent.pem", "ssl_ca_certs: no such file"),
        (f"rediss://h/0?ssl_keyfile={ca}", "ssl_keyfile is set without ssl_certfile"),
    ]:
        with pytest.raises(SecurityError, match=message):
            check_redis_url(url)


def test_with_database_keeps_credentials_and_tls_parameters() -> None:
    url = "postgresql://u:p%40ss@db.example.com:5432/ingest?sslmode=verify-full&sslrootcert=/run/ca/root.crt"
    assert with_database(url, "postgres") == (
        "postgresql://u:p%40ss@db.example.com:5432/postgres?sslmode=verify-full&sslrootcert=/run/ca/root.crt")


# -- redaction where text is shown (ingest.redaction: tests/ingest/test_redaction.py) -------------------------

def test_config_repr_hides_every_password() -> None:
    cfg = dataclasses.replace(DEFAULTS, database_url=f"postgresql://u:{SECRET}@h/db",
                              redis_url=f"rediss://u:{SECRET}@r:6380/0",
                              kafka_security=kafka(protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u",
                                                   sasl_password=SECRET, ssl_key_password=SECRET))
    text = repr(cfg)
    assert SECRET not in text and str(cfg) == text
    assert "postgresql://u:***@h/db" in text and "sasl_username='u'" in text


def test_service_unavailable_is_one_redacted_line_with_a_useful_hint() -> None:
    err = OSError(f"boom\nat postgresql://u:{SECRET}@h/db")
    text = str(ServiceUnavailable("postgres", f"postgresql://u:{SECRET}@h/db", err))
    assert SECRET not in text and "\n" not in text and text.startswith("postgres is unreachable at postgresql://u:***@h/db")
    tls = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    assert "TLS failed: check the CA file" in str(ServiceUnavailable("redis", "rediss://h", tls))
