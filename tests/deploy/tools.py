"""Where the deploy tests find their external tools."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def which(name: str) -> str | None:
    """``name`` on PATH, else in this interpreter's virtualenv bin (where `make tools` puts promtool)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
