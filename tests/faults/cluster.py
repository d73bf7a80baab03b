"""A real Redis Cluster of three masters on loopback, for the fault suite (``LocalCluster``).

``start`` runs three ``redis-server --cluster-enabled yes`` (no persistence, node timeout 2 s) on free ports at
most 55535 (each node's cluster bus listens on its port + 10,000), joins them with ``redis-cli --cluster create
--cluster-replicas 0 --cluster-yes`` and waits until every node reports ``cluster_state:ok``. ``kill(i)`` SIGKILLs a master; ``restart_empty(i)`` starts it again on the same port
with its ``nodes.conf`` (so it takes its slots back) but no data, and waits for the cluster to be ok again.
"""

from __future__ import annotations

import random
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from ingest.broker import listening
from tests.integration.helpers import kill9


def cluster_port(taken: set[int]) -> int:
    """A free port for a cluster node: at most 55535 (its cluster bus listens 10,000 higher, up to 65535), with the
    bus port free too."""
    rng = random.Random()
    while True:
        port = rng.randrange(20_000, 55_535)
        if port in taken:
            continue
        try:
            for p in (port, port + 10_000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port


def _cli(port: int, *args: str, timeout: float = 30) -> str:
    out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=timeout,
                         check=False)
    return out.stdout + out.stderr


class LocalCluster:
    NODE_TIMEOUT_MS = 2000

    def __init__(self, masters: int = 3) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ingest-redis-cluster-"))
        self.ports: list[int] = []
        for _ in range(masters):
            self.ports.append(cluster_port(set(self.ports)))
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * masters

    def url(self, i: int = 0) -> str:
        return f"redis://127.0.0.1:{self.ports[i]}/0"

    def _spawn(self, i: int) -> None:
        port = self.ports[i]
        home = self.root / str(port)
        home.mkdir(exist_ok=True)
        self.procs[i] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS),
             "--save", "", "--appendonly", "no", "--dir", str(home), "--logfile", str(home / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while not listening("127.0.0.1", port):
            proc = self.procs[i]
            assert proc is not None and proc.poll() is None and time.monotonic() < deadline, \
                f"redis-server on {port} did not start: {self._log_tail(home)}"
            time.sleep(0.02)

    @staticmethod
    def _log_tail(home: Path) -> str:
        try:
            return " | ".join((home / "redis.log").read_text(errors="replace").splitlines()[-5:])
        except OSError as exc:
            return f"(no log: {exc})"

    def start(self) -> LocalCluster:
        """Start and join the nodes; on failure stop whatever started, and try once more on other ports (a free
        port can be taken by another process before the server binds it)."""
        for attempt in (0, 1):
            try:
                return self._start()
            except AssertionError:
                self.stop()
                if attempt:
                    raise
                self.root.mkdir(parents=True, exist_ok=True)
                self.ports = [cluster_port(set(self.ports)) for _ in self.ports]
        raise AssertionError("unreachable")

    def _start(self) -> LocalCluster:
        for i in range(len(self.ports)):
            self._spawn(i)
        out = subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                              "--cluster-replicas", "0", "--cluster-yes"],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        self.wait_ok()
        return self

    def wait_ok(self, timeout: float = 30) -> float:
        """Wait until every running node reports ``cluster_state:ok``; return the seconds it took."""
        return self.wait_state("ok", timeout)

    def wait_state(self, state: str, timeout: float = 30) -> float:
        """Wait until every running node reports ``cluster_state:<state>`` (``ok``, or ``fail`` once a master is
        down for the node timeout); return the seconds it took."""
        started = time.monotonic()
        while True:
            states = [_cli(p, "cluster", "info") for i, p in enumerate(self.ports) if self.procs[i] is not None]
            if all(f"cluster_state:{state}" in s for s in states):
                return time.monotonic() - started
            assert time.monotonic() - started < timeout, f"cluster not {state} after {timeout} s: {states}"
            time.sleep(0.1)

    def master_of(self, slot: int) -> int:
        """Index of the node that serves ``slot``."""
        for line in _cli(self.ports[0], "cluster", "nodes").splitlines():
            fields = line.split()
            port = int(fields[1].split(":")[1].split("@")[0])
            for part in fields[8:]:
                lo, _, hi = part.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return self.ports.index(port)
        raise AssertionError(f"no node serves slot {slot}")

    def info(self, i: int, section: str) -> str:
        return _cli(self.ports[i], "info", section)

    def dbsize(self, i: int) -> int:
        return int(_cli(self.ports[i], "dbsize").strip())

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None:
            kill9(proc)
            self.procs[i] = None
        deadline = time.monotonic() + 10
        while listening("127.0.0.1", self.ports[i]):
            assert time.monotonic() < deadline, "redis-server did not stop"
            time.sleep(0.02)

    def restart_empty(self, i: int) -> float:
        """Start node ``i`` again (its cluster config kept, its data gone); seconds until the cluster is ok."""
        self._spawn(i)
        return self.wait_ok()

    def stop(self) -> None:
        for i in range(len(self.ports)):
            self.kill(i)
        subprocess.run(["rm", "-rf", str(self.root)], check=False)
