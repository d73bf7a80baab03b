"""A small TCP fault-injection proxy: one instance per upstream, run by its own asyncio loop in a daemon thread.

API (every method is synchronous and thread-safe, callable from plain and from async tests; never call one from
inside the proxy's own loop)::

    proxy = Proxy(("127.0.0.1", 5432)).start()     # or: with Proxy(...) as proxy:
    proxy.address                                   # "127.0.0.1:<port>" (port=0: the OS picks a free one)
    proxy.delay(50, UP)                             # sleep 50 ms before forwarding each chunk (UP, DOWN, BOTH)
    proxy.stall(DOWN, seconds=3)                    # stop forwarding (sockets stay open) until resume() / 3 s
    proxy.resume()                                  # end stalls
    proxy.cut()                                     # abort every current connection with RST; returns how many
    proxy.refuse(); proxy.refuse(False)             # new connections are reset at once / accepted again
    proxy.heal()                                    # pass mode: no delay, stall, refusal, trigger or filter
    proxy.only("ingest-webhook-host-123")           # faults apply only to connections whose Kafka client id
                                                    # contains this text (None: every connection)
    t = proxy.on(pg_query("COMMIT;"), HOLD, skip=3) # act on the 4th client->server chunk containing the pattern
    t.wait(10) / await t.wait_async(10)             # True once it fired; then t.release() for HOLD
    proxy.close()

Directions: ``UP`` is client -> server, ``DOWN`` server -> client. Trigger actions on a matching connection:
``CUT_BEFORE`` forwards the bytes before the pattern, then aborts the connection (the server never sees it);
``CUT_AFTER`` forwards it and aborts the connection as soon as the server answers, dropping the answer (the
ambiguous-commit case; ``t.done`` is set then); ``HOLD`` freezes the connection in both directions before
forwarding the chunk, until ``t.release()`` or ``hold_timeout``. A Kafka request starts with int32 size, int16
api_key, int16 api_version, int32 correlation_id and an int16-length client id, read from a connection's first
bytes for ``only``. ``proxy.events`` lists what the proxy did, with times, for failure messages.

Postgres patterns: asyncpg sends BEGIN, COMMIT and COPY as simple queries on every use (``pg_query("COMMIT;")``,
``b'COPY "webhook_events"'``), but a parameterised statement's SQL text only in its first Parse on a connection
(later uses name the prepared statement), so match the former.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TypeVar

UP, DOWN, BOTH = "up", "down", "both"
CUT_BEFORE, CUT_AFTER, HOLD = "cut_before", "cut_after", "hold"
_T = TypeVar("_T")


def pg_query(sql: str) -> bytes:
    """The Postgres simple-query ('Q') message carrying ``sql`` (asyncpg sends BEGIN, COMMIT and COPY so)."""
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", len(body) + 4) + body


def kafka_client_id(head: bytes) -> str | None:
    """The client id of a Kafka request starting ``head``; None until enough bytes arrived; "" if not Kafka."""
    if len(head) < 14:
        return None
    size, api_key, _version, _corr, length = struct.unpack("!ihhih", head[:14])
    if size < 10 or not 0 <= api_key < 1000 or length < -1:
        return ""
    if length <= 0:
        return ""
    if len(head) < 14 + length:
        return None
    return head[14:14 + length].decode("utf-8", "replace")


def _directions(direction: str) -> tuple[str, ...]:
    if direction not in (UP, DOWN, BOTH):
        raise ValueError(f"direction must be {UP!r}, {DOWN!r} or {BOTH!r}")
    return (UP, DOWN) if direction == BOTH else (direction,)


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Trigger:
    """Acts on client->server bytes containing ``pattern``: see the module docstring."""

    def __init__(self, pattern: bytes, action: str, *, skip: int, times: int, hold_timeout: float) -> None:
        if action not in (CUT_BEFORE, CUT_AFTER, HOLD) or not pattern:
            raise ValueError(f"unknown action {action!r} or empty pattern")
        self.pattern, self.action, self.skip, self.times = pattern, action, skip, times
        self.hold_timeout = hold_timeout
        self.matches = 0  # occurrences seen, skipped ones included
        self.fired_count = 0
        self.fired = threading.Event()  # the action started (a HOLD is holding, a cut happened)
        self.done = threading.Event()  # the action finished (HOLD released, CUT_AFTER dropped the answer)
        self._released = threading.Event()

    def wait(self, timeout: float = 30.0) -> bool:
        """True once the trigger fired (blocks this thread at most ``timeout`` seconds)."""
        return self.fired.wait(timeout)

    async def wait_async(self, timeout: float = 30.0) -> bool:
        return await asyncio.to_thread(self.fired.wait, timeout)

    def release(self) -> None:
        """End a HOLD: the held bytes are forwarded and the connection flows again."""
        self._released.set()

    @property
    def active(self) -> bool:
        return self.fired_count < self.times


class _Link:
    """One proxied connection."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client, self.server = client, server
        self.head = b""
        self.client_id: str | None = None
        self.tail = b""
        self.held = False
        self.drop_reply: Trigger | None = None
        self.closed = False

    def close(self, *, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        for w in (self.client, self.server):
            if reset:
                _rst(w)
            else:
                w.close()


class Proxy:
    """Listens on ``host:port`` and forwards each connection to ``upstream``; faults as the docstring says."""

    def __init__(self, upstream: tuple[str, int], *, host: str = "127.0.0.1", port: int = 0,
                 name: str = "proxy") -> None:
        self.upstream, self.host, self.port, self.name = upstream, host, port, name
        self.events: list[tuple[float, str]] = []
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"proxy-{name}", daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._delay = {UP: 0.0, DOWN: 0.0}
        self._stalled = {UP: False, DOWN: False}
        self._stall_timer: asyncio.TimerHandle | None = None
        self._refusing = False
        self._only: str | None = None
        self._triggers: list[Trigger] = []
        self._changed = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> Proxy:
        self._thread.start()
        self._call(lambda: None)
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, self.host, self.port), self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def close(self) -> None:
        """Stop listening, release holds, abort every connection and stop the thread."""
        if not self._thread.is_alive():
            return
        for t in self._triggers:
            t.release()

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for link in list(self._links):
                link.close(reset=True)
            self._bump()
            await asyncio.sleep(0.05)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connections(self) -> int:
        """Connections open right now."""
        return self._call(lambda: len(self._links))

    # -- controls ----------------------------------------------------------------------------------------------
    def heal(self) -> None:
        """Pass mode: clear delays, stalls, refusal, the client-id filter; disarm triggers and release holds."""
        for t in self._triggers:
            t.release()

        def do() -> None:
            self._delay = {UP: 0.0, DOWN: 0.0}
            self._set_stall((UP, DOWN), False)
            self._refusing, self._only, self._triggers = False, None, []
        self._call(do, "heal")

    def delay(self, ms: float, direction: str = BOTH) -> None:
        """Wait ``ms`` before forwarding each chunk in ``direction`` (0 removes the delay)."""
        def do() -> None:
            for d in _directions(direction):
                self._delay[d] = ms / 1000
        self._call(do, f"delay {ms} ms {direction}")

    def stall(self, direction: str = BOTH, seconds: float | None = None) -> None:
        """Stop forwarding in ``direction`` (sockets stay open) until ``resume`` or for ``seconds``."""
        def do() -> None:
            self._set_stall(_directions(direction), True)
            if seconds is not None:
                self._stall_timer = self._loop.call_later(seconds, self._set_stall, (UP, DOWN), False)
        self._call(do, f"stall {direction}" + (f" for {seconds} s" if seconds is not None else ""))

    def resume(self, direction: str = BOTH) -> None:
        """End a stall."""
        self._call(lambda: self._set_stall(_directions(direction), False), f"resume {direction}")

    def cut(self) -> int:
        """Abort every current (selected) connection with RST; return how many."""
        def do() -> int:
            links = [link for link in self._links if self._selected(link)]
            for link in links:
                link.close(reset=True)
            self._bump()
            return len(links)
        n = self._call(do)
        self._note(f"cut {n} connection(s)")
        return n

    def refuse(self, on: bool = True) -> None:
        """Reset new connections at once (``on``), or accept them again."""
        def do() -> None:
            self._refusing = on
        self._call(do, "refuse" if on else "accept")

    def only(self, client_id: str | None) -> None:
        """Apply delay, stall, cut and triggers only to connections whose Kafka client id contains ``client_id``."""
        def do() -> None:
            self._only = client_id
        self._call(do, f"only client id ~ {client_id!r}")

    def on(self, pattern: bytes, action: str, *, skip: int = 0, times: int = 1,
           hold_timeout: float = 60.0) -> Trigger:
        """Arm a trigger: ``action`` on the (skip+1)-th chunk (of selected connections, client -> server) that
        contains ``pattern``, and on the next ones until it acted ``times`` times."""
        trigger = Trigger(pattern, action, skip=skip, times=times, hold_timeout=hold_timeout)
        self._call(lambda: self._triggers.append(trigger), f"on {pattern[:40]!r} {action} skip={skip}")
        return trigger

    # -- internals (proxy loop only) ---------------------------------------------------------------------------
    def _call(self, fn: Callable[[], _T], note: str | None = None) -> _T:
        async def run() -> _T:
            return fn()
        result = asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)
        if note:
            self._note(note)
        return result

    def _note(self, what: str) -> None:
        self.events.append((time.monotonic(), what))

    def _bump(self) -> None:
        """Wake every pump waiting for a state change."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _set_stall(self, directions: tuple[str, ...], stalled: bool) -> None:
        if self._stall_timer is not None and not stalled:
            self._stall_timer.cancel()
            self._stall_timer = None
        for d in directions:
            self._stalled[d] = stalled
        self._bump()

    def _selected(self, link: _Link) -> bool:
        return self._only is None or (link.client_id is not None and self._only in link.client_id)

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._refusing:
            _rst(cwriter)
            return
        try:
            sreader, swriter = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 5)
        except (OSError, TimeoutError):
            _rst(cwriter)  # upstream down: the client sees its connection reset
            return
        link = _Link(cwriter, swriter)
        self._links.add(link)
        try:
            await asyncio.gather(self._pump(link, creader, swriter, UP), self._pump(link, sreader, cwriter, DOWN))
        finally:
            self._links.discard(link)
            link.close()

    async def _pump(self, link: _Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str) -> None:
        try:
            while not link.closed:
                data: bytes | None = await src.read(65536)
                if not data:
                    break
                if direction == UP:
                    data = await self._inspect(link, data)
                elif link.drop_reply is not None:
                    self._drop(link)
                    break
                if data is None or not await self._gate(link, direction):
                    break
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            link.close()

    async def _gate(self, link: _Link, direction: str) -> bool:
        """Wait while the link is held or its direction stalled; apply the delay. False if the link closed."""
        delayed = False
        while not link.closed:
            changed = self._changed
            if link.held or (self._selected(link) and self._stalled[direction]):
                await changed.wait()
                continue
            if not delayed and self._selected(link) and self._delay[direction] > 0:
                await asyncio.sleep(self._delay[direction])
                delayed = True
                continue
            return True
        return False

    def _drop(self, link: _Link) -> None:
        """The server answered a CUT_AFTER chunk: drop the answer and abort the connection."""
        trigger, link.drop_reply = link.drop_reply, None
        link.close(reset=True)
        self._bump()
        if trigger is not None:
            trigger.done.set()
            self._note(f"{trigger.action}: answer dropped, connection cut")

    async def _inspect(self, link: _Link, data: bytes) -> bytes | None:
        """Read the client id from a connection's first bytes; run the triggers on client->server ``data``."""
        if link.client_id is None:
            link.head += data[:1024 - len(link.head)]
            link.client_id = kafka_client_id(link.head)
            if link.client_id is None and len(link.head) >= 1024:
                link.client_id = ""
        triggers = [t for t in self._triggers if t.active]
        if not triggers:
            link.tail = b""
            return data
        window = link.tail + data
        longest = max(len(t.pattern) for t in triggers)
        link.tail = window[-(longest - 1):] if longest > 1 else b""
        if not self._selected(link):
            return data
        for t in triggers:
            at = max(0, len(window) - len(data) - len(t.pattern) + 1)  # only matches that end in ``data``
            while t.active and (at := window.find(t.pattern, at)) >= 0:
                t.matches += 1
                at += 1
                if t.matches <= t.skip:
                    continue
                return await self._act(link, t, data, at - 1 - (len(window) - len(data)))
        return data

    async def _act(self, link: _Link, t: Trigger, data: bytes, offset: int) -> bytes | None:
        t.fired_count += 1
        self._note(f"{t.action} on {t.pattern[:40]!r} (match {t.matches})")
        if t.action == CUT_BEFORE:
            before = data[:max(0, offset)]
            if before and await self._gate(link, UP):
                link.server.write(before)
                with contextlib.suppress(OSError):
                    await link.server.drain()
            link.close(reset=True)
            self._bump()
            t.fired.set()
            t.done.set()
            return None
        if t.action == CUT_AFTER:
            link.drop_reply = t
            t.fired.set()
            return data
        link.held = True
        self._bump()
        t.fired.set()
        await asyncio.to_thread(t._released.wait, t.hold_timeout)
        link.held = False
        self._bump()
        t.done.set()
        self._note(f"hold on {t.pattern[:40]!r} released")
        return data
