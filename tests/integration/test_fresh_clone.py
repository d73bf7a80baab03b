"""The README's first command on a machine where nothing listens: ``make demo`` in a fresh clone, with Postgres,
Redis and Kafka pointed at free loopback ports, lands the demo's rows; ``ingest dev down`` then leaves nothing
listening.

Cost: the clone's ``.venv`` reuses this virtualenv's installed packages (a ``.pth`` file) instead of installing
them again, so the test takes ~15 s (initdb, three services, the demo) rather than the minute a ``pip install``
adds. It still imports the clone's own code: the clone comes first on its ``sys.path``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _venv_reusing_ours(clone: Path) -> None:
    """``clone/.venv`` with the clone's code first on ``sys.path``, then this virtualenv's packages, and an
    ``ingest`` script newer than pyproject.toml (so the Makefile's set-up step has nothing to do)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(clone / ".venv")], check=True)
    venv_python = clone / ".venv" / "bin" / "python"
    purelib = subprocess.run([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    Path(purelib, "ingest-fresh-clone.pth").write_text(f"{clone}\n{ours}\n")
    script = clone / ".venv" / "bin" / "ingest"
    script.write_text(f"#!{venv_python}\nimport sys\nfrom consumers.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)


@pytest.fixture
def clone() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="ingest-fresh-clone-"))
    root.chmod(0o755)  # under root, the embedded Postgres runs as `nobody`, who must reach its data directory
    try:
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(root / "ingest")], check=True)
        yield root / "ingest"
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_in_a_fresh_clone_lands_rows_and_dev_down_leaves_nothing_listening(clone: Path) -> None:
    _venv_reusing_ours(clone)
    ports = {"postgres": _free_port(), "redis": _free_port(), "kafka": _free_port()}
    assert not any(_listening(p) for p in ports.values())
    env = {
        "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
        "INGEST_DATABASE_URL": f"postgresql://127.0.0.1:{ports['postgres']}/ingest",
        "INGEST_REDIS_URL": f"redis://127.0.0.1:{ports['redis']}/0",
        "INGEST_KAFKA_BOOTSTRAP": f"127.0.0.1:{ports['kafka']}",
    }
    ingest = str(clone / ".venv" / "bin" / "ingest")
    try:
        demo = subprocess.run(["make", "demo"], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
        assert demo.returncode == 0, f"make demo exited {demo.returncode}\n{demo.stdout}\n{demo.stderr}"
        out = demo.stdout
        for service in ports:
            assert re.search(rf"^{service}\s+127\.0\.0\.1:{ports[service]}\s+started", out, re.M), out
        for table in ("webhook_events", "audit_events"):
            rows = re.search(rf"^\s+{table}\s+(\d+) rows", out, re.M)
            assert rows and int(rows[1]) > 1000, out
        assert re.search(r"^dead letters: 6$", out, re.M), out

        status = subprocess.run([ingest, "dev", "status", "--json"], cwd=clone, env=env, capture_output=True,
                                check=True, text=True)
        services = orjson.loads(status.stdout)["services"]
        assert {s["service"]: s["started_by_dev_up"] for s in services} == dict.fromkeys(ports, True)
        assert all(Path(s["data"]).is_relative_to(clone / ".ingest-dev") for s in services if s["service"] != "kafka")
    finally:
        down = subprocess.run([ingest, "dev", "down"], cwd=clone, env=env, capture_output=True, text=True,
                              timeout=120)
    assert down.returncode == 0, down.stderr
    assert [name for name, port in ports.items() if _listening(port)] == []
    assert not (clone / ".ingest-dev" / "started.json").exists()
