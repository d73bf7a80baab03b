"""Connection settings: Kafka SASL/TLS, TLS parameters in URLs, the NAME_FILE rule, and no secret in errors."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest

from consumers.settings import SETTINGS, SettingsError, from_env

SECRET = "s3cr3t-Pw/x@y"
ENC = quote(SECRET, safe="")  # as it must appear in a URL


@pytest.fixture
def ca(tmp_path: Path) -> str:
    from tests.certs import make_ca

    return str(make_ca(tmp_path, "ca").cert)


def test_kafka_security_defaults_to_plaintext() -> None:
    sec = from_env({}).kafka_security
    assert (sec.protocol, sec.sasl_mechanism, sec.ssl_cafile, sec.ssl_check_hostname) == ("PLAINTEXT", "", "", True)


def test_sasl_ssl_scram_settings(ca: str) -> None:
    sec = from_env({"INGEST_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "INGEST_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                    "INGEST_KAFKA_SASL_USERNAME": "ingest", "INGEST_KAFKA_SASL_PASSWORD": SECRET,
                    "INGEST_KAFKA_SSL_CA_FILE": ca, "INGEST_KAFKA_SSL_CHECK_HOSTNAME": "false"}).kafka_security
    assert (sec.protocol, sec.sasl_mechanism, sec.sasl_username, sec.sasl_password) == (
        "SASL_SSL", "SCRAM-SHA-512", "ingest", SECRET)
    assert sec.ssl_cafile == ca and sec.ssl_check_hostname is False


@pytest.mark.parametrize(("env", "message"), [
    ({"INGEST_KAFKA_SECURITY_PROTOCOL": "TLS"}, "INGEST_KAFKA_SECURITY_PROTOCOL='TLS' is invalid"),
    ({"INGEST_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "INGEST_KAFKA_SASL_USERNAME": "u",
      "INGEST_KAFKA_SASL_PASSWORD": SECRET}, "INGEST_KAFKA_SASL_MECHANISM must be one of"),
    ({"INGEST_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "INGEST_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
      "INGEST_KAFKA_SASL_PASSWORD": SECRET},
     "INGEST_KAFKA_SASL_USERNAME is required with INGEST_KAFKA_SECURITY_PROTOCOL=SASL_SSL"),
    ({"INGEST_KAFKA_SASL_MECHANISM": "PLAIN"},
     "INGEST_KAFKA_SASL_MECHANISM is set but INGEST_KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use SASL"),
    ({"INGEST_KAFKA_SECURITY_PROTOCOL": "SSL", "INGEST_KAFKA_SSL_CA_FILE": "/nonexistent/ca.pem"},
     "INGEST_KAFKA_SSL_CA_FILE: no such file '/nonexistent/ca.pem'"),
    ({"INGEST_KAFKA_SSL_CA_FILE": "/nonexistent/ca.pem"},
     "INGEST_KAFKA_SSL_CA_FILE is set but INGEST_KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use TLS"),
    ({"INGEST_DATABASE_URL": f"postgresql://u:{ENC}@h/db?sslmode=verify-full&sslrootcert=/nonexistent.pem"},
     "INGEST_DATABASE_URL: sslrootcert: no such file '/nonexistent.pem'"),
    ({"INGEST_DATABASE_URL": f"postgresql://u:{ENC}@h/db?sslmode=strict"}, "INGEST_DATABASE_URL: sslmode must be"),
    ({"INGEST_REDIS_URL": f"redis://u:{ENC}@h/0?ssl_ca_certs=/x.pem"},
     "INGEST_REDIS_URL: ssl_ca_certs needs a rediss://"),
    ({"INGEST_REDIS_URL": f"rediss://u:{ENC}@h/0?ssl_ca_certs=/nonexistent.pem"},
     "INGEST_REDIS_URL: ssl_ca_certs: no such file"),
])
def test_bad_connection_settings_fail_at_startup_without_the_secret(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message) as err:
        from_env(env)
    assert SECRET not in str(err.value) and ENC not in str(err.value)


def test_an_invalid_value_is_shown_with_its_password_masked() -> None:
    with pytest.raises(SettingsError) as err:
        from_env({"INGEST_REDIS_URL": f"http://u:{ENC}@h/0"})
    assert ENC not in str(err.value) and "INGEST_REDIS_URL" in str(err.value)


@pytest.mark.parametrize("name", ["INGEST_DATABASE_URL", "INGEST_REDIS_URL"])
def test_a_password_that_breaks_the_url_is_refused_without_showing_it(name: str) -> None:
    scheme = "postgresql" if "DATABASE" in name else "redis"
    with pytest.raises(SettingsError, match=f"{name}: cannot be parsed: percent-encode") as err:
        from_env({name: f"{scheme}://u:{SECRET}@h:1234/x"})  # a raw / and @ in the password
    assert "s3cr3t" not in str(err.value)


# -- NAME_FILE ----------------------------------------------------------------------------------------------------

def test_every_setting_can_come_from_a_file(tmp_path: Path) -> None:
    db, pw, rows = tmp_path / "db", tmp_path / "pw", tmp_path / "rows"
    db.write_text(f"postgresql://ingest:{ENC}@db:5432/ingest?sslmode=require\n")  # as `echo ... > file` writes
    pw.write_text(SECRET)
    rows.write_text("100\n")
    cfg = from_env({"INGEST_DATABASE_URL_FILE": str(db), "INGEST_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                    "INGEST_KAFKA_SASL_MECHANISM": "PLAIN", "INGEST_KAFKA_SASL_USERNAME": "u",
                    "INGEST_KAFKA_SASL_PASSWORD_FILE": str(pw), "INGEST_BATCH_MAX_ROWS_FILE": str(rows)})
    assert cfg.database_url == f"postgresql://ingest:{ENC}@db:5432/ingest?sslmode=require"
    assert cfg.kafka_security.sasl_password == SECRET and cfg.batch.max_rows == 100


def test_only_one_trailing_newline_is_removed(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text(" pass word \n\n")
    cfg = from_env({"INGEST_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "INGEST_KAFKA_SASL_MECHANISM": "PLAIN",
                    "INGEST_KAFKA_SASL_USERNAME": "u", "INGEST_KAFKA_SASL_PASSWORD_FILE": str(pw)})
    assert cfg.kafka_security.sasl_password == " pass word \n"


def test_an_empty_file_means_the_default(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("")
    assert from_env({"INGEST_REDIS_URL_FILE": str(empty)}).redis_url == "redis://127.0.0.1:6379/0"


def test_value_and_file_together_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "url"
    f.write_text("redis://h/0")
    with pytest.raises(SettingsError, match="INGEST_REDIS_URL and INGEST_REDIS_URL_FILE are both set"):
        from_env({"INGEST_REDIS_URL": "redis://other/0", "INGEST_REDIS_URL_FILE": str(f)})


def test_an_unreadable_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="INGEST_KAFKA_SASL_PASSWORD_FILE='/nonexistent/pw' cannot be read"):
        from_env({"INGEST_KAFKA_SASL_PASSWORD_FILE": "/nonexistent/pw"})
    with pytest.raises(SettingsError, match="cannot be read"):
        from_env({"INGEST_DATABASE_URL_FILE": str(tmp_path)})  # a directory


def test_no_setting_name_is_another_ones_file_variant() -> None:
    names = {s.env for s in SETTINGS}
    assert not {n for n in names if n.endswith("_FILE") and n[:-5] in names}


def test_config_repr_shows_no_secret() -> None:
    cfg = from_env({"INGEST_DATABASE_URL": f"postgresql://u:{ENC}@h/db", "INGEST_REDIS_URL": f"redis://:{ENC}@h/0",
                    "INGEST_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "INGEST_KAFKA_SASL_MECHANISM": "PLAIN",
                    "INGEST_KAFKA_SASL_USERNAME": "u", "INGEST_KAFKA_SASL_PASSWORD": SECRET})
    assert SECRET not in repr(cfg) and SECRET not in f"{cfg}"
