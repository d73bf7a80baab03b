"""Connection security: Kafka SASL/TLS client options and checks of connection URLs.

Rules kept here:
- ``kafka_security`` turns the Kafka settings into SASL/TLS client options; ``ingest.kafka_options`` adds them to
  every Kafka client's options (consumer, producer, admin), and nothing else builds client options. The SSL
  context is built anew on each call, so a rotated certificate file is picked up by the next client.
- Postgres and Redis connections are fully described by their URL, TLS parameters and credentials included; code
  that derives another URL from one (another database) must keep its query string.
- Text shown to people (logs, errors, ``ingest status``, reprs) is redacted first: ``ingest.redaction``.
- Error messages of the checks here never contain a URL or a password: only parameter names and file paths.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ingest.config import KafkaSecurity

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
POSTGRES_FILE_PARAMS = ("sslrootcert", "sslcert", "sslkey", "sslcrl")
REDIS_FILE_PARAMS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


class SecurityError(ValueError):
    """A security setting that cannot work; the message names the setting and never contains a secret."""


# -- Kafka --------------------------------------------------------------------------------------------------------

def check_kafka(sec: KafkaSecurity, name: Callable[[str], str] = str) -> None:
    """Raise ``SecurityError`` unless ``sec`` is a usable combination whose files exist and load.

    ``name`` maps a ``KafkaSecurity`` field name to what the message calls it (``consumers.settings`` passes the
    environment variable names)."""
    sasl = sec.protocol.startswith("SASL_")
    tls = sec.protocol.endswith("SSL")
    if sec.protocol not in PROTOCOLS:
        raise SecurityError(f"{name('protocol')} must be one of {', '.join(PROTOCOLS)}")
    if sasl:
        if sec.sasl_mechanism not in SASL_MECHANISMS:
            raise SecurityError(f"{name('sasl_mechanism')} must be one of {', '.join(SASL_MECHANISMS)} "
                                f"with {name('protocol')}={sec.protocol}")
        for field in ("sasl_username", "sasl_password"):
            if not getattr(sec, field):
                raise SecurityError(f"{name(field)} is required with {name('protocol')}={sec.protocol}")
    else:
        for field in ("sasl_mechanism", "sasl_username", "sasl_password"):
            if getattr(sec, field):
                raise SecurityError(f"{name(field)} is set but {name('protocol')}={sec.protocol} does not use SASL "
                                    "(use SASL_SSL or SASL_PLAINTEXT)")
    files = ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
    if not tls:
        for field in (*files, "ssl_key_password"):
            if getattr(sec, field):
                raise SecurityError(f"{name(field)} is set but {name('protocol')}={sec.protocol} does not use TLS "
                                    "(use SSL or SASL_SSL)")
        return
    if sec.ssl_keyfile and not sec.ssl_certfile:
        raise SecurityError(f"{name('ssl_keyfile')} is set without {name('ssl_certfile')}")
    for field in files:
        _readable(getattr(sec, field), name(field))
    try:
        ssl_context(sec)
    except ssl.SSLError as exc:
        raise SecurityError(f"the TLS files of {name('ssl_cafile')}, {name('ssl_certfile')} or "
                            f"{name('ssl_keyfile')} do not load ({exc.reason or exc}): they must be PEM, the key must "
                            f"match the certificate, and an encrypted key needs {name('ssl_key_password')}") from None


def ssl_context(sec: KafkaSecurity) -> ssl.SSLContext:
    """A client context that verifies the broker against ``ssl_cafile`` (the system store when empty) and, unless
    ``ssl_check_hostname`` is off, that its certificate names the host; with a client certificate when given."""
    ctx = ssl.create_default_context(cafile=sec.ssl_cafile or None)
    if sec.ssl_certfile:
        ctx.load_cert_chain(sec.ssl_certfile, sec.ssl_keyfile or None, password=sec.ssl_key_password or None)
    ctx.check_hostname = sec.ssl_check_hostname
    return ctx


def kafka_security(sec: KafkaSecurity) -> dict[str, Any]:
    """The aiokafka keyword arguments for ``sec`` (security protocol, SASL credentials, SSL context); every client
    gets them through ``ingest.kafka_options``. ``sec`` must have passed ``check_kafka`` (``consumers.settings``
    does that at startup)."""
    options: dict[str, Any] = {"security_protocol": sec.protocol}
    if sec.protocol.startswith("SASL_"):
        options.update(sasl_mechanism=sec.sasl_mechanism, sasl_plain_username=sec.sasl_username,
                       sasl_plain_password=sec.sasl_password)
    if sec.protocol.endswith("SSL"):
        options["ssl_context"] = ssl_context(sec)
    return options


# -- Postgres and Redis URLs --------------------------------------------------------------------------------------

def check_database_url(url: str) -> None:
    """Raise ``SecurityError`` unless ``url`` is a ``postgresql://`` URL with a known ``sslmode`` whose
    certificate files (``sslrootcert``, ``sslcert``, ``sslkey``, ``sslcrl``) exist."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise SecurityError("must be a postgresql:// URL")
    _parses(url)
    query = _query(parts.query)
    mode = query.get("sslmode")
    if mode is not None and mode not in SSLMODES:
        raise SecurityError(f"sslmode must be one of {', '.join(SSLMODES)}")
    if "sslkey" in query and "sslcert" not in query:
        raise SecurityError("sslkey is set without sslcert")
    for param in POSTGRES_FILE_PARAMS:
        _readable(query.get(param, ""), param)


def check_redis_url(url: str) -> None:
    """Raise ``SecurityError`` unless ``url`` is a ``redis://``, ``rediss://`` (TLS) or ``unix://`` URL whose TLS
    files (``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``) exist and are only given with ``rediss://``."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise SecurityError("must be a redis://, rediss:// (TLS) or unix:// URL")
    _parses(url)
    query = _query(parts.query)
    given = [p for p in REDIS_FILE_PARAMS if query.get(p)]
    if given and parts.scheme != "rediss":
        raise SecurityError(f"{given[0]} needs a rediss:// (TLS) URL")
    if "ssl_keyfile" in given and "ssl_certfile" not in given:
        raise SecurityError("ssl_keyfile is set without ssl_certfile")
    for param in given:
        _readable(query[param], param)


def _parses(url: str) -> None:
    """Every host of the URL has a numeric port (or none). A raw ``/``, ``?``, ``#`` or ``@`` in a password breaks
    the URL apart, and the client would then fail with an error quoting a piece of the password."""
    hosts = urlsplit(url).netloc.rpartition("@")[2]
    for host in hosts.split(","):
        port = host.rpartition("]")[2].rpartition(":")[2] if ":" in host.rpartition("]")[2] else ""
        if port and not port.isdigit():
            raise SecurityError("cannot be parsed: percent-encode the user name and password "
                                "(e.g. @ as %40, / as %2F, : as %3A, ? as %3F, # as %23)")


def _query(text: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(text, keep_blank_values=True).items()}


def _readable(path: str, what: str) -> None:
    if not path:
        return
    if not os.path.isfile(path):
        raise SecurityError(f"{what}: no such file {path!r}")
    if not os.access(path, os.R_OK):
        raise SecurityError(f"{what}: cannot read {path!r} (permissions)")
