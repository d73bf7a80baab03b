"""The human view of the status document."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    sign, s = ("-" if seconds < 0 else "+"), abs(int(seconds))
    d, rem = divmod(s, 86400)
    return f"{sign}{d}d {rem // 3600}h" if d else f"{sign}{rem // 3600}h {rem % 3600 // 60}m"


def render(doc: Mapping[str, Any]) -> str:
    """The human view of ``snapshot``'s document."""
    lines = [f"ingest status  {doc['generated_at']}"]
    svc = []
    for name, s in doc["services"].items():
        svc.append(f"{name} ok {s['latency_ms']} ms{' tls' if s.get('tls') else ''}" if s["ok"] else f"{name} DOWN")
    lines.append("services: " + " | ".join(svc))
    lines += [f"  {name}: {s['error']}" for name, s in doc["services"].items() if not s["ok"]]
    for name, st in doc["streams"].items():
        lines.append("")
        members = st.get("members")
        mtext = "n/a" if members is None else str(len(members))
        lines.append(f"[{name}] topic {st['topic']}  group {st['group']} ({st.get('group_state') or 'n/a'}, "
                     f"{mtext} members)  lag {st['total_lag'] if st['total_lag'] is not None else 'n/a'}")
        for m in members or []:
            parts = "n/a" if m["partitions"] is None else ",".join(map(str, m["partitions"])) or "-"
            lines.append(f"  member {m['member_id']}  client {m['client_id'] or 'n/a'}  host {m['host'] or 'n/a'}"
                         f"  partitions {parts}")
        if st.get("members_error"):
            lines.append(f"  members: {st['members_error']}")
        if st.get("error"):
            lines.append(f"  postgres: {st['error']}")
        if st["partitions"]:
            lines.append("  partition      stored         end         lag")
            for r in st["partitions"]:
                flag = f"  position outside the log: {r['mismatch']}" if r.get("mismatch") else ""
                lines.append(f"  {r['partition']:>9} {_n(r['stored_offset']):>11} {_n(r['end_offset']):>11} "
                             f"{_n(r['lag']):>11}{flag}")
        lm = st.get("last_minute")
        if lm:
            ps = lm["per_second"]
            lines.append(f"  last minute: stored {lm['stored']} ({ps['stored']}/s)  rejected {lm['rejected']} "
                         f"({ps['rejected']}/s)  quota_exceeded {lm['quota_exceeded']} ({ps['quota_exceeded']}/s)"
                         "  duplicates n/a (not in Postgres)")
            dl = st["dead_letters_last_hour"]
            lines.append("  dead letters (1h): " + (", ".join(f"{k} {v}" for k, v in dl.items()) or "none"))
            top = st["top_tenants_by_volume"]
            lines.append("  top tenants (1h): " + (", ".join(f"{t['tenant_id']} {t['stored']}" for t in top)
                                                   or "none"))
            qt = st["top_tenants_by_quota_rejections"]
            lines.append("  quota rejections (1h): " + (", ".join(f"{t['tenant_id']} {t['rejected']}" for t in qt)
                                                        or "none"))
        cov = st.get("partition_coverage")
        if cov:
            missing = f"{len(cov['missing'])} missing ranges" if cov["missing"] else "no gaps"
            lines.append(f"  partitions: {cov['partitions']} ({cov['granularity']}), covered until "
                         f"{cov['last_end'] or 'n/a'} ({_dur(cov['ahead_seconds'])}), {missing}, "
                         f"DEFAULT rows {_n(cov['default_rows'])}")
    return "\n".join(lines)


def _n(v: int | None) -> str:
    return "-" if v is None else str(v)
