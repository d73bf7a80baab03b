"""The fault proxy itself, against a plain-socket echo server (fast; no services needed)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import free_port
from tests.faults.proxy import (
    CUT_AFTER,
    CUT_BEFORE,
    DOWN,
    HOLD,
    UP,
    Proxy,
    kafka_client_id,
    pg_query,
)


class Echo:
    """Echoes every chunk back and records what it received (all connections)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.received = b""
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                with self.lock:
                    self.received += data
                try:
                    conn.sendall(data)
                except OSError:
                    return

    def got(self, what: bytes, timeout: float = 2.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if what in self.received:
                    return True
            time.sleep(0.01)
        return False


@pytest.fixture
def echo() -> Iterator[Echo]:
    e = Echo()
    yield e
    e.sock.close()


@pytest.fixture
def proxy(echo: Echo) -> Iterator[Proxy]:
    with Proxy(("127.0.0.1", echo.port), name="test") as p:
        yield p


def connect(p: Proxy) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", p.port), timeout=2)
    s.settimeout(2)
    return s


def roundtrip(s: socket.socket, data: bytes) -> bytes:
    s.sendall(data)
    out = b""
    while len(out) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    return out


def reset_or_eof(s: socket.socket) -> bool:
    """True if the connection was closed by the proxy (RST or FIN) within the socket timeout."""
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def refused(p: Proxy) -> bool:
    """True if a new connection through ``p`` is reset or closed at once (during connect or at first read)."""
    try:
        s = connect(p)
    except ConnectionResetError:
        return True
    with s:
        return reset_or_eof(s)


def test_pass_and_delay(proxy: Proxy) -> None:
    with connect(proxy) as s:
        assert roundtrip(s, b"hello") == b"hello"
        proxy.delay(150, UP)
        started = time.monotonic()
        assert roundtrip(s, b"slow") == b"slow"
        assert time.monotonic() - started >= 0.14
        proxy.heal()
        started = time.monotonic()
        assert roundtrip(s, b"fast") == b"fast"
        assert time.monotonic() - started < 0.14


def test_stall_keeps_the_socket_open_until_resumed(proxy: Proxy) -> None:
    with connect(proxy) as s:
        proxy.stall(DOWN)
        s.settimeout(0.3)
        s.sendall(b"ping")
        with pytest.raises(TimeoutError):
            s.recv(10)
        proxy.resume()
        s.settimeout(2)
        assert s.recv(10) == b"ping"
        proxy.stall(UP, seconds=0.3)
        started = time.monotonic()
        assert roundtrip(s, b"later") == b"later"
        assert time.monotonic() - started >= 0.25


def test_cut_resets_current_connections_only(proxy: Proxy) -> None:
    a, b = connect(proxy), connect(proxy)
    assert roundtrip(a, b"a") == b"a" and roundtrip(b, b"b") == b"b"
    assert proxy.cut() == 2
    assert reset_or_eof(a) and reset_or_eof(b)
    with connect(proxy) as c:
        assert roundtrip(c, b"again") == b"again"
    a.close()
    b.close()


def test_refuse_and_accept(proxy: Proxy) -> None:
    proxy.refuse()
    assert refused(proxy)
    proxy.refuse(False)
    with connect(proxy) as s:
        assert roundtrip(s, b"ok") == b"ok"


def test_upstream_down_resets_the_client() -> None:
    with Proxy(("127.0.0.1", free_port())) as p:
        assert refused(p)


def test_cut_before_never_forwards_the_pattern(proxy: Proxy, echo: Echo) -> None:
    commit = pg_query("COMMIT;")
    t = proxy.on(commit, CUT_BEFORE)
    with connect(proxy) as s:
        s.sendall(b"BEGIN" + commit)
        assert t.wait(2)
        assert reset_or_eof(s)
    assert echo.got(b"BEGIN")
    assert commit not in echo.received


def test_cut_after_forwards_the_pattern_and_drops_the_answer(proxy: Proxy, echo: Echo) -> None:
    t = proxy.on(b"COMMIT", CUT_AFTER, skip=1)
    with connect(proxy) as s:
        assert roundtrip(s, b"1 COMMIT") == b"1 COMMIT"  # skipped
        s.sendall(b"2 COMMIT")
        assert reset_or_eof(s), "the server's answer must not reach the client"
    assert echo.got(b"2 COMMIT")
    assert t.done.wait(2) and t.matches == 2


def test_pattern_split_across_chunks(proxy: Proxy, echo: Echo) -> None:
    t = proxy.on(b"COMMIT", CUT_BEFORE)
    with connect(proxy) as s:
        assert roundtrip(s, b"xxCOM") == b"xxCOM"
        s.sendall(b"MIT")
        assert t.wait(2) and reset_or_eof(s)
    assert not echo.got(b"MIT", timeout=0.2)


def test_hold_freezes_the_connection_until_released(proxy: Proxy, echo: Echo) -> None:
    t = proxy.on(b"COPY", HOLD)
    with connect(proxy) as s:
        s.sendall(b"COPY rows")
        assert t.wait(2)
        assert not echo.got(b"COPY", timeout=0.3)
        t.release()
        assert echo.got(b"COPY rows")
        assert s.recv(100) == b"COPY rows"
    assert t.done.is_set()


def kafka_request(client_id: str) -> bytes:
    cid = client_id.encode()
    body = struct.pack("!hhih", 18, 3, 7, len(cid)) + cid + b"rest"
    return struct.pack("!i", len(body)) + body


def test_kafka_client_id_parsing() -> None:
    assert kafka_client_id(kafka_request("ingest-webhook-h-1")) == "ingest-webhook-h-1"
    assert kafka_client_id(kafka_request("ingest-webhook-h-1")[:16]) is None
    assert kafka_client_id(pg_query("SELECT 1") + b"\0" * 20) == ""


def test_only_filters_faults_by_kafka_client_id(proxy: Proxy) -> None:
    with connect(proxy) as mine, connect(proxy) as other:
        assert roundtrip(mine, kafka_request("ingest-webhook-a-1")) == kafka_request("ingest-webhook-a-1")
        assert roundtrip(other, kafka_request("ingest-webhook-b-2")) == kafka_request("ingest-webhook-b-2")
        proxy.only("-a-1")
        proxy.stall()
        assert roundtrip(other, b"free") == b"free"
        mine.settimeout(0.3)
        mine.sendall(b"stuck")
        with pytest.raises(TimeoutError):
            mine.recv(10)
        assert proxy.cut() == 1
        mine.settimeout(2)
        assert reset_or_eof(mine)
        assert roundtrip(other, b"still") == b"still"
