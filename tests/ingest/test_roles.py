"""Role names, grants and SCRAM verifiers (no database; the integration tests run them against Postgres)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest

from ingest import roles


def test_prefix_is_validated_and_names_are_derived() -> None:
    r = roles.Roles.from_prefix("ingest")
    assert (r.owner, r.writer, r.reader) == ("ingest_owner", "ingest_writer", "ingest_reader")
    assert roles.Roles.from_prefix("_a1").reader == "_a1_reader"
    assert roles.Roles.from_prefix("a" * 41).owner == "a" * 41 + "_owner"  # 47 < 63 bytes
    for bad in ("", "Ingest", "1x", "pg", "pg_x", "a-b", "a.b", "a b", "a;", 'a"', "a" * 42, "ingest\n", "é"):
        with pytest.raises(roles.RoleError):
            roles.Roles.from_prefix(bad)


def test_grants_are_exactly_the_hot_path_and_quote_names() -> None:
    r = roles.Roles.from_prefix("p")
    t = roles.GrantTables(events=("ev",), dead_letters="dl", ledger="lg", offsets="of", offset_changes="oc",
                    quota=("q", "qv"))
    sql = [g.sql() for g in roles.grants(r, t)]
    assert sql == [
        'GRANT INSERT ON TABLE "ev" TO "p_writer"',
        'GRANT SELECT ON TABLE "lg" TO "p_writer"',
        'GRANT INSERT ON TABLE "lg" TO "p_writer"',
        'GRANT DELETE ON TABLE "lg" TO "p_writer"',
        'GRANT SELECT ON TABLE "lg_epochs" TO "p_writer"',
        'GRANT UPDATE ("opened_at") ON TABLE "lg_epochs" TO "p_writer"',
        'GRANT INSERT ON TABLE "dl" TO "p_writer"',
        'GRANT SELECT ON TABLE "of" TO "p_writer"',
        'GRANT INSERT ON TABLE "of" TO "p_writer"',
        'GRANT UPDATE ("next_offset", "updated_at") ON TABLE "of" TO "p_writer"',
        'GRANT INSERT ON TABLE "oc" TO "p_writer"',
        'GRANT SELECT ON TABLE "q" TO "p_writer"',
        'GRANT SELECT ON TABLE "qv" TO "p_writer"',
        'GRANT SELECT ON TABLE "ev" TO "p_reader"',
    ]
    with pytest.raises(roles.RoleError):
        roles.Grant("ALL", "ev", "p_reader").sql()
    assert roles.Grant("SELECT", 'x"; DROP TABLE y; --', "p_reader").sql() == \
        'GRANT SELECT ON TABLE "x""; DROP TABLE y; --" TO "p_reader"'


def test_scram_verifier_matches_rfc_7677() -> None:
    """The verifier's keys authenticate the RFC 7677 exchange (user "user", password "pencil")."""
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    verifier = roles.scram_verifier("pencil", salt=salt, iterations=4096)
    head, keys = verifier.split("$")[1:]
    assert head == "4096:W22ZaJ0SNY7soEsUEjb6gQ=="
    stored_key, server_key = (base64.b64decode(k) for k in keys.split(":"))
    nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    auth = f"n=user,r=rOprNGfwEbeRWgbNEkqO,r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r={nonce}".encode()
    proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    client_key = bytes(a ^ b for a, b in zip(proof, hmac.new(stored_key, auth, "sha256").digest(), strict=True))
    assert hashlib.sha256(client_key).digest() == stored_key  # the server accepts the client's proof
    assert base64.b64encode(hmac.new(server_key, auth, "sha256").digest()).decode() == \
        "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="  # and proves itself with the RFC's signature
    assert roles.scram_verifier("pencil") != roles.scram_verifier("pencil")  # a fresh salt each time


def test_passwords_must_be_printable_ascii(tmp_path: Path) -> None:
    for bad in ("", "caf\u00e9", "tab\there", "nul\x00"):
        with pytest.raises(roles.RoleError):
            roles.scram_verifier(bad)
    (tmp_path / "ok").write_text("'; DROP ROLE x; -- $$\n")
    assert roles.read_password_file(str(tmp_path / "ok")) == "'; DROP ROLE x; -- $$"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(roles.RoleError):
        roles.read_password_file(str(tmp_path / "empty"))
    with pytest.raises(roles.RoleError, match="cannot read"):
        roles.read_password_file(str(tmp_path / "missing"))
