"""ingest.quota.keys: the tenant is the hash tag of its state keys, so a tenant's keys share one cluster slot."""

from __future__ import annotations

from ingest.quota.keys import group_by_slot, parse_key, state_key


def test_keys_carry_the_tenant_as_hash_tag() -> None:
    k = state_key("ingest", "webhook", "org:7.a-b")
    assert k == "ingest:q:webhook:{org:7.a-b}"
    assert parse_key("ingest", k) == ("webhook", "org:7.a-b")
    assert parse_key("ingest", "ingest:dd:webhook:x") is None
    groups = group_by_slot([state_key("p", "webhook", "t1"), state_key("p", "audit", "t1"),
                            state_key("p", "webhook", "t2")])
    assert sorted(map(sorted, groups.values()))[0][:2] == [0, 1]  # one tenant, one slot, whatever the stream
    assert sum(len(v) for v in groups.values()) == 3
