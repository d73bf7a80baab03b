"""ingest dev: which addresses it may start services on, and that it stops exactly what it recorded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ingest import devservices as dev


def test_addresses_come_from_the_settings() -> None:
    assert dev.address_of("postgres", "postgresql://u:p@127.0.0.1/ingest") == dev.Address("postgres", "127.0.0.1", 5432)
    assert dev.address_of("redis", "redis://localhost:6380/0") == dev.Address("redis", "localhost", 6380)
    assert dev.address_of("kafka", "127.0.0.2:9093,127.0.0.3:9094") == dev.Address("kafka", "127.0.0.2", 9093)
    assert dev.address_of("kafka", "[::1]:9092") == dev.Address("kafka", "::1", 9092)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.3.2.1", True), ("localhost", True), ("::1", True),
    ("10.0.0.5", False), ("postgres", False), ("db.example.com", False), ("0.0.0.0", False),
])
def test_only_loopback_addresses_count_as_this_machine(host: str, loopback: bool) -> None:
    assert dev.is_loopback(host) is loopback


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_stop_ends_the_recorded_process_and_forgets_it(tmp_path: Path) -> None:
    proc = _sleeper()
    entry = dev.Started("redis", proc.pid, "127.0.0.1:1", sys.executable, str(tmp_path), str(tmp_path / "r.log"))
    dev._record(tmp_path, entry)
    assert dev.load(tmp_path) == {"redis": entry} and dev.running(entry)
    assert dev.stop(entry, tmp_path).startswith("stopped")
    assert proc.wait(5) is not None and dev.load(tmp_path) == {}
    assert not (tmp_path / dev.STATE_FILE).exists()


def test_a_reused_pid_running_another_program_is_left_alone(tmp_path: Path) -> None:
    proc = _sleeper()
    try:
        entry = dev.Started("postgres", proc.pid, "127.0.0.1:1", "/nonexistent/postgres", str(tmp_path), "")
        dev._record(tmp_path, entry)
        assert not dev.running(entry)
        assert dev.stop(entry, tmp_path) == "was no longer running"
        assert proc.poll() is None  # untouched
        assert dev.load(tmp_path) == {}
    finally:
        proc.kill()
        proc.wait()


def test_dev_up_starts_nothing_for_an_address_elsewhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from consumers import cli

    started = []
    monkeypatch.setattr(dev, "answering", lambda address: False)
    monkeypatch.setattr(dev, "start", lambda *a, **k: started.append(a))
    monkeypatch.setattr(cli.logs, "setup", lambda *_a, **_k: None)
    monkeypatch.setenv("INGEST_DEV_DIR", str(tmp_path))
    monkeypatch.setenv("INGEST_DATABASE_URL", "postgresql://db.internal:5432/ingest")
    assert cli.main(["dev", "up", "postgres"]) == 3
    out, err = capsys.readouterr()
    assert started == [] and "not on this machine: not started" in out
    assert err.count("\n") == 1 and "postgres at db.internal:5432" in err
