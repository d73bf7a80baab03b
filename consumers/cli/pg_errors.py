"""One line for a Postgres error that reached the top of a command: which role, through which setting, lacks what.

Operator commands connect with ``maintenance_url`` (the owner's URL, ``INGEST_MAINTENANCE_DATABASE_URL``, or
``INGEST_DATABASE_URL`` when that is unset). Run from a consumer's container that holds only the writer's URL, they
meet ``permission denied``; the line names the role and the object and says which URL to set.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import asyncpg

from ingest.config import Config, maintenance_url

_DENIED = re.compile(r"permission denied for (?P<kind>[a-z ]+?) (?P<name>\S+)$")
_OWNER = re.compile(r"must be owner of (?P<kind>[a-z ]+?) (?P<name>\S+)$")


def role_and_setting(config: Config) -> tuple[str, str]:
    """The role operator commands log in as, and the setting its URL came from."""
    setting = "INGEST_MAINTENANCE_DATABASE_URL" if config.maintenance_database_url else "INGEST_DATABASE_URL"
    return urlsplit(maintenance_url(config)).username or "(the URL's default user)", setting


def one_line(exc: asyncpg.PostgresError, config: Config) -> str:
    """``exc`` as one line without a traceback; a privilege error names the role and what it lacks."""
    text = " ".join(str(exc).split())
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        role, setting = role_and_setting(config)
        if m := _DENIED.search(text):
            lacks = f"a privilege on {m['kind']} {m['name']} (Postgres: {text})"
        elif m := _OWNER.search(text):
            lacks = f"ownership of {m['kind']} {m['name']} (Postgres: {text})"
        else:
            lacks = f"a privilege (Postgres: {text})"
        return (f'postgres: role "{role}" (from {setting}) lacks {lacks}; this command needs the owner role: set '
                "INGEST_MAINTENANCE_DATABASE_URL to the owner's URL (docs/security.md)")
    return f"postgres: {text} (SQLSTATE {exc.sqlstate})"
