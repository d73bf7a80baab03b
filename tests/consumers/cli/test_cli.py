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
