"""`ingest dlq` commands (to be filled in)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add the `dlq` commands to ``sub``."""
