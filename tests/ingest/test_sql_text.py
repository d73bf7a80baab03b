"""No SQL text is built from input (docs/security.md): every value interpolated into SQL text is an identifier
quoted by ``ident``, an ``int``, or one of the reviewed expressions below, each with the reason it is safe.

The check reads the source (no database): for each call of an asyncpg query method whose SQL argument is an
f-string, ``%``-formatted, ``+``-concatenated or ``.format``-ed, every interpolated expression must be allowed.
A new f-string query with a value in it fails here; bind the value as ``$n`` instead, or quote an identifier
with ``ident``. SQL assembled earlier in a variable or a helper (``Filters.where``, ``Grant.sql``) is reviewed
by hand: such helpers only emit ``$n`` placeholders and ``ident``-quoted names.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*ROOT.glob("ingest/**/*.py"), *ROOT.glob("consumers/**/*.py"), *ROOT.glob("scripts/*.py")])
QUERY_METHODS = {"execute", "executemany", "fetch", "fetchval", "fetchrow", "copy_from_query", "prepare", "cursor"}
SAFE_CALLS = {"ident", "_quote_one", "int", "len"}  # quoted identifiers, integers, placeholder numbers ($n)

# (file, expression) -> why it is safe. Keep this list short; prefer ident() or a bound parameter.
REVIEWED = {
    ("ingest/maintenance.py", "self.lock_timeout_ms"): "int() in __init__",
    ("ingest/ledger.py", "_KEY_DIGEST"): "the constant DIGEST expression over $1 and unnest columns",
    ("ingest/partitions.py", "cols"): "ident()-quoted column names from the catalog",
    ("ingest/partitions.py", "start.isoformat()"): "a datetime computed by plan(), never input (DDL bound)",
    ("ingest/partitions.py", "end.isoformat()"): "a datetime computed by plan(), never input (DDL bound)",
    ("ingest/offsets.py", "UNSET"): "the constant -1",
    ("ingest/dlq.py", "_ENTRY_COLUMNS"): "a constant column list",
    ("ingest/dlq.py", "_REPLAY_ORDER"): "a constant column list",
    ("ingest/dlq.py", "filters.where(params)"): "conditions with $n placeholders; values appended to params",
    ("ingest/dlq.py", "where"): "Filters.where output: $n placeholders only",
    ("ingest/dlq.py", "sendable"): "one of the two constant _SENDABLE conditions",
    ("ingest/dlq.py", "_PURGEABLE"): "constant retention conditions with $n placeholders",
    ("ingest/roles.py", "', '.join(_KEYWORDS)"): "constant pg_roles column names",
    ("ingest/roles.py", "_options(wanted)"): "constant role attribute keywords",
    ("ingest/roles.py", "_options(changes)"): "constant role attribute keywords",
    ("ingest/roles.py", "verifier"): "a SCRAM verifier computed here and matched against _VERIFIER (base64)",
    ("ingest/roles.py", "owner_q"): "ident(owner)",
    ("ingest/roles.py", "kind"): "VIEW/MATERIALIZED VIEW/SEQUENCE/TABLE/ROUTINE from a CASE in the query",
    ("ingest/roles.py", "name"): "regclass/regprocedure text: quoted by Postgres itself",
    ("ingest/roles.py", "s"): "_quote_one(schema)",
    ("ingest/roles.py", "w"): "ident(roles.writer)",
    ("ingest/roles.py", "r"): "ident(roles.reader)",
    ("ingest/roles.py", "db"): "_quote_one(current_database())",
}


def _sql_argument(call: ast.Call) -> ast.expr | None:
    func = call.func
    if isinstance(func, ast.Attribute) and func.attr in QUERY_METHODS and call.args:
        return call.args[0]
    return None


def _interpolated(node: ast.expr) -> list[ast.expr] | None:
    """Expressions formatted into ``node`` when it is built SQL text, else None."""
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.FormattedValue)]
    if isinstance(node, ast.IfExp):
        return [*(_interpolated(node.body) or []), *(_interpolated(node.orelse) or [])]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
        return [node.right]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return [node.left, node.right]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return [*node.args, *(k.value for k in node.keywords)]
    return None


def _allowed(path: str, expr: ast.expr) -> bool:
    if isinstance(expr, ast.Constant):
        return True
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id in SAFE_CALLS:
        return True
    if isinstance(expr, ast.JoinedStr):  # nested f-string: its own parts must be allowed
        return all(_allowed(path, v.value) for v in expr.values if isinstance(v, ast.FormattedValue))
    return (path, ast.unparse(expr)) in REVIEWED


def violations() -> list[str]:
    out = []
    for file in SOURCES:
        path = file.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(file.read_text("utf-8"), path)):
            if not isinstance(node, ast.Call) or (sql := _sql_argument(node)) is None:
                continue
            parts = _interpolated(sql)
            for expr in parts or []:
                if not _allowed(path, expr):
                    out.append(f"{path}:{node.lineno}: {ast.unparse(expr)}")
    return out


def test_no_query_interpolates_anything_but_quoted_identifiers_or_reviewed_constants() -> None:
    assert violations() == []


def test_the_check_catches_an_interpolated_value(tmp_path: Path) -> None:
    tree = ast.parse('conn.fetch(f"SELECT * FROM t WHERE tenant_id = \'{tenant}\'")\n'
                     'conn.execute("DELETE FROM t WHERE k = %s" % key)\n'
                     'conn.execute("SELECT {}".format(x))\n'
                     'conn.fetch(f"SELECT * FROM {ident(table)} WHERE n = {int(n)}")\n')
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _sql_argument(n) is not None]
    bad = [ast.unparse(e) for c in calls for e in _interpolated(_sql_argument(c)) or []  # type: ignore[arg-type]
           if not _allowed("x.py", e)]
    assert bad == ["tenant", "key", "x"]


def test_every_reviewed_entry_is_still_used() -> None:
    used = set()
    for file in SOURCES:
        path = file.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(file.read_text("utf-8"), path)):
            if isinstance(node, ast.Call) and (sql := _sql_argument(node)) is not None:
                used |= {(path, ast.unparse(e)) for e in _interpolated(sql) or []}
    assert set(REVIEWED) - used == set()
