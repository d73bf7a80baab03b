"""SQL identifier quoting. Values are always bound parameters; identifiers come only from configuration."""

from __future__ import annotations


def ident(name: str) -> str:
    """Quote a possibly schema-qualified identifier (``a.b`` -> ``"a"."b"``)."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))
