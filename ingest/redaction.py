"""Redaction: the one place that masks secrets in text shown to people.

Rule: text shown to people — logs, error messages (``ServiceUnavailable``, settings errors), ``ingest status``,
reprs of the configuration, health-endpoint bodies — passes through ``redact`` (one URL or setting value) or
``redact_text`` (free text) first. Both leave text without secrets unchanged and are idempotent.
"""

from __future__ import annotations

import re

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
_QUERY_SECRET = re.compile(r"(?i)([?&][^=&#\s]*pass[^=&#\s]*=)[^&#\s]*")
_KEY_VALUE_SECRET = re.compile(
    r"(?i)\b((?:ssl)?password|passwd|pwd|secret|token)(\s*[=:]\s*)(?!\*\*\*)[^\s&,;)]+")


def redact(url: str) -> str:
    """``url`` with the password of its user info and of any ``*pass*=`` query parameter replaced by ``***``
    (a value that is not a URL: with ``password=...``-style values masked).

    The user info ends at the last ``@``, so a password containing ``@``, ``/`` or ``:`` is still masked."""
    if "://" not in url:
        return _KEY_VALUE_SECRET.sub(r"\1\2***", url)
    scheme, rest = url.split("://", 1)
    if "@" in rest:
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        rest = f"{user}:***@{host}" if ":" in creds else f"{user}@{host}"
    return _QUERY_SECRET.sub(r"\1***", f"{scheme}://{rest}")


def redact_text(text: str, *, hide_urls: bool = False) -> str:
    """``text`` (an error message, a log line) with every URL redacted — or, with ``hide_urls``, replaced by
    ``<url>`` (for answers to unauthenticated callers) — and ``password=...``-style values masked."""
    urls = _URL.sub("<url>" if hide_urls else lambda m: redact(m.group(0)), text)
    return _KEY_VALUE_SECRET.sub(r"\1\2***", urls)
