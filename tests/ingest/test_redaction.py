"""ingest.redaction: the one implementation of redaction (URLs, free text, health-endpoint answers)."""

from __future__ import annotations

import pytest

from ingest.redaction import redact, redact_text

SECRET = "pw-Zq8!x@y/z:w"


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql://u:se@cr/et:x@h/db?sslmode=require", "postgresql://u:***@h/db?sslmode=require"),
    ("redis://:secret@h:6379/0", "redis://:***@h:6379/0"),
    ("rediss://user:secret@h:6380/0?ssl_ca_certs=/ca.pem", "rediss://user:***@h:6380/0?ssl_ca_certs=/ca.pem"),
    ("postgresql://h/db?user=u&password=secret&sslpassword=secret2", "postgresql://h/db?user=u&password=***&sslpassword=***"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("127.0.0.1:9092", "127.0.0.1:9092"),
])
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert redact(redact(url)) == shown


def test_redact_text_masks_urls_and_password_assignments() -> None:
    text = f"cannot connect to postgresql://u:{SECRET}@h/db (password={SECRET}) via redis://:{SECRET}@r/0"
    out = redact_text(text)
    assert SECRET not in out and "postgresql://u:***@h/db" in out and "password=***" in out


def test_hidden_urls_and_every_secret_keyword() -> None:
    text = f"connect postgresql://u:{SECRET}@db:5432/x failed; password={SECRET} token: t0k secret=s3 pwd=p"
    out = redact_text(text, hide_urls=True)
    assert out == "connect <url> failed; password=*** token: *** secret=*** pwd=***"
    assert redact_text(out, hide_urls=True) == out


def test_text_without_secrets_is_unchanged() -> None:
    plain = "kafka is unreachable at 127.0.0.1:9092 (KafkaConnectionError: timed out)"
    assert redact_text(plain) == plain == redact(plain)
