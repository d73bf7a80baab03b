"""Realistic sample events: several tenants, webhook retries that repeat idempotency keys, audit trails.

Deterministic for a given seed, so tests and the demo can compute exactly what must land.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

_PROVIDERS = {
    "stripe": ["invoice.paid", "charge.succeeded", "customer.subscription.updated", "payment_intent.failed"],
    "github": ["push", "pull_request.opened", "issues.closed", "workflow_run.completed"],
    "shopify": ["orders/create", "orders/paid", "products/update", "refunds/create"],
}
_ACTIONS = ["user.login", "user.logout", "api_key.created", "api_key.revoked", "role.granted", "invoice.viewed"]


def tenants(n: int) -> list[str]:
    """``n`` tenant ids like ``org-0007``."""
    return [f"org-{i:04d}" for i in range(n)]


def webhook(rng: random.Random, tenant: str, i: int, now: datetime) -> dict[str, Any]:
    source = rng.choice(list(_PROVIDERS))
    return {
        "tenant_id": tenant,
        "idempotency_key": f"{source[:2]}_evt_{i:010d}",
        "event_type": rng.choice(_PROVIDERS[source]),
        "source": source,
        "occurred_at": (now - timedelta(seconds=rng.randint(0, 3600))).isoformat(timespec="milliseconds"),
        "payload": {"id": f"obj_{i}", "amount": rng.randint(100, 100000), "currency": "usd",
                    "livemode": False, "items": [{"sku": f"sku-{rng.randint(1, 500)}", "qty": rng.randint(1, 5)}]},
        "headers": {"user-agent": f"{source}-webhooks/1.0", "x-delivery-attempt": "1"},
    }


def audit(rng: random.Random, tenant: str, i: int, now: datetime) -> dict[str, Any]:
    event: dict[str, Any] = {
        "tenant_id": tenant,
        "idempotency_key": f"aud_{i:010d}",
        "action": rng.choice(_ACTIONS),
        "actor_id": f"user_{rng.randint(1, 200)}",
        "occurred_at": (now - timedelta(seconds=rng.randint(0, 3600))).isoformat(timespec="milliseconds"),
        "ip": f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        "metadata": {"user_agent": "Mozilla/5.0", "mfa": rng.random() < 0.7},
    }
    if rng.random() < 0.8:
        event["resource"] = f"api_key:key_{rng.randint(1, 50)}"
    return event


def generate(stream: str, count: int, *, n_tenants: int = 10, dup_rate: float = 0.1, seed: int = 1,
             now: datetime | None = None) -> Iterator[dict[str, Any]]:
    """``count`` events of ``stream``; a ``dup_rate`` share are re-deliveries of an earlier event (a retry may
    carry a different delivery header, but the same tenant and idempotency key)."""
    rng = random.Random(seed)
    now = now or datetime.now(UTC)
    make = webhook if stream == "webhook" else audit
    names = tenants(n_tenants)
    sent: list[dict[str, Any]] = []
    unique = 0
    for _ in range(count):
        if sent and rng.random() < dup_rate:
            retry = dict(rng.choice(sent))
            if "headers" in retry:
                retry["headers"] = {**retry["headers"], "x-delivery-attempt": str(rng.randint(2, 5))}
            yield retry
            continue
        event = make(rng, rng.choice(names), unique, now)
        unique += 1
        if len(sent) < 5000:
            sent.append(event)
        else:
            sent[rng.randrange(5000)] = event
        yield event
