"""Where tests find the external tools they run (promtool, prometheus)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def which(name: str) -> str | None:
    """``name`` on PATH, else in this interpreter's virtualenv bin (where `make tools` puts promtool and prometheus)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
