"""The quota algorithm, twice: GCRA rate + burst and a per-UTC-day cap, in Python and as a Redis Lua script.

Both versions are kept here side by side; change them together (tests/integration/test_quota.py runs both on
the same inputs against a real Redis and checks they agree, state and expiry included). Rules of both:
- A call judges, per key, ``count`` events arriving in order at one instant ``now`` (µs since the epoch) and
  admits the first k = min(count, events that fit the GCRA tolerance, what is left of today's cap).
- Only the k admitted events advance the theoretical arrival time (TAT) and today's count: denied events
  consume nothing (they are only counted as denied).
- A key's state is the string ``"tat day used denied"`` (µs, UTC day number, today's admitted and denied
  events); it expires when both its TAT and its UTC day have passed, plus one hour.
Redis runs ``SCRIPT`` (the quota stage); the Python version serves the fail-open fallback (``LocalLimiter``)
and the usage the operator commands show.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from ingest.quota.limits import US, Limits

DAY_US = 86_400 * US


class State(NamedTuple):
    """One tenant's state on one stream: GCRA theoretical arrival time (µs), UTC day number, today's admitted
    and denied counts."""

    tat: float
    day: int
    used: int
    denied: int


# -- Python ------------------------------------------------------------------------------------------------------
def judge(state: State | None, now_us: int, count: int, limits: Limits) -> tuple[int, State]:
    """How many of ``count`` events (in order, all at ``now_us``) are admitted, and the new state.

    Same arithmetic as the Lua script: k = min(count, events that fit the GCRA tolerance, what is left of
    today's cap); only the k admitted events advance the TAT and the day counter."""
    day = now_us // DAY_US
    tat = now_us if state is None else max(state.tat, now_us)
    used = denied = 0
    if state is not None and state.day == day:
        used, denied = state.used, state.denied
    k = count
    interval = limits.interval_us
    if interval > 0:
        k = min(k, math.floor((limits.tolerance_us - (tat - now_us)) / interval + 1e-9))
    if limits.per_day > 0:
        k = min(k, limits.per_day - used)
    k = max(k, 0)
    return k, State(math.ceil(tat + k * interval), day, used + k, denied + count - k)


def state_ttl_ms(state: State, now_us: int) -> int:
    """Keep a state until both its TAT and its UTC day have passed (+1 h), so idle tenants cost no memory."""
    until = max(state.tat, (state.day + 1) * DAY_US)
    return math.ceil((until - now_us) / 1000) + 3_600_000


def parse_state(value: bytes | str | None) -> State | None:
    """A ``State`` from a state key's value (``GET``), or None when the key is absent."""
    if value is None:
        return None
    tat, day, used, denied = (value.decode() if isinstance(value, bytes) else value).split()
    return State(float(tat), int(day), int(used), int(denied))


class LocalLimiter:
    """The script's work in this process: states in a dict instead of Redis keys. Used only in fail-open mode
    while Redis is away; keys are tenants (one stream per limiter)."""

    def __init__(self) -> None:
        self.states: dict[str, State] = {}

    def decide(self, batch: Sequence[tuple[str, int, Limits]], now_us: int) -> list[int]:
        """Admitted counts per ``(key, count, limits)``, like one script call at ``now_us``."""
        out = []
        for tenant, count, limits in batch:
            k, self.states[tenant] = judge(self.states.get(tenant), now_us, count, limits)
            out.append(k)
        if len(self.states) > 100_000:
            self.states = {t: s for t, s in self.states.items() if state_ttl_ms(s, now_us) > 3_600_000}
        return out


# -- Lua ---------------------------------------------------------------------------------------------------------
# KEYS[i]: one tenant's state, the string "tat day used denied" (µs, UTC day number, today's admitted and
# denied events). ARGV[1]: now in µs, or '' to use Redis TIME (one clock for every process). ARGV[2]: the event
# count per key, space-separated. ARGV[3]: the limit profile per key (1-based, space-separated). ARGV[4]: the
# prefix of judgement keys, or '' for none. ARGV[5]: their TTL in seconds. ARGV[6]: with judgements, the events'
# digests (16 bytes each, count[i] of them per key, in KEYS order). ARGV[7..]: profiles as triples T (µs/event,
# 0 = no rate), tau (µs), daily cap (0 = none). Few arguments whatever the batch: most tenants share a profile.
# Without judgements it returns per key how many of its events, in order, are admitted. With judgements each
# event's verdict is kept under ARGV[4] .. '{tenant}' .. digest (the tenant's hash tag: the state key's slot):
# an event judged before is given its earlier verdict and costs nothing again, and the reply per key is one
# character per event, '1' admitted or '0' denied. ``script_args`` builds ARGV.
SCRIPT = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local day = math.floor(now / 86400000000)
local next_day = (day + 1) * 86400000000
local counts, which, profiles = {}, {}, {}
for c in string.gmatch(ARGV[2], '%d+') do counts[#counts + 1] = tonumber(c) end
for p in string.gmatch(ARGV[3], '%d+') do which[#which + 1] = tonumber(p) end
for a = 7, #ARGV, 3 do
  profiles[#profiles + 1] = {tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])}
end
local judged, judged_ttl, digests, at = ARGV[4], tonumber(ARGV[5]), ARGV[6], 1
local out = {}
for i = 1, #KEYS do
  local count, prof = counts[i], profiles[which[i]]
  local interval, tau, cap = prof[1], prof[2], prof[3]
  local earlier, names, fresh = {}, {}, count
  if judged ~= '' then
    local base = judged .. string.match(KEYS[i], '{[^{}]*}$')
    fresh = 0
    for e = 1, count do
      names[e] = base .. string.sub(digests, at, at + 15)
      at = at + 16
      earlier[e] = redis.call('GET', names[e])
      if not earlier[e] then fresh = fresh + 1 end
    end
  end
  local tat, used, denied = now, 0, 0
  local v = redis.call('GET', KEYS[i])
  if v then
    local t, d, u, x = string.match(v, '(%S+) (%S+) (%S+) (%S+)')
    tat = tonumber(t) or now
    if tat < now then tat = now end
    if tonumber(d) == day then used, denied = tonumber(u), tonumber(x) end
  end
  local k = fresh
  if interval > 0 then
    local fit = math.floor((tau - (tat - now)) / interval + 1e-9)
    if fit < k then k = fit end
  end
  if cap > 0 and cap - used < k then k = cap - used end
  if k < 0 then k = 0 end
  if judged == '' or fresh > 0 then
    tat = math.ceil(tat + k * interval)
    local keep = next_day
    if tat > keep then keep = tat end
    redis.call('SET', KEYS[i], string.format('%.0f %d %d %d', tat, day, used + k, denied + fresh - k),
               'PX', math.ceil((keep - now) / 1000) + 3600000)
  end
  if judged == '' then
    out[i] = k
  else
    local verdicts, left = {}, k
    for e = 1, count do
      local verdict = earlier[e]
      if not verdict then
        if left > 0 then verdict, left = '1', left - 1 else verdict = '0' end
        redis.call('SET', names[e], verdict, 'EX', judged_ttl)
      end
      verdicts[e] = verdict
    end
    out[i] = table.concat(verdicts)
  end
end
return out
"""


def script_args(now_us: int | None, batch: Sequence[tuple[int, Limits]],
                judged: tuple[str, int, Sequence[bytes]] | None = None) -> list[str | bytes]:
    """ARGV of one ``SCRIPT`` call for ``(count, limits)`` per key, in KEYS order; ``now_us`` None = Redis TIME.
    ``judged`` = (judgement key prefix, TTL in seconds, the events' digests in KEYS order, ``count`` per key)
    makes the call idempotent per event (see the script's header).

    Floats are sent with ``repr`` (exact round trip), so the script computes with the very values Python does."""
    profiles: dict[Limits, int] = {}
    which = [profiles.setdefault(lim, len(profiles) + 1) for _, lim in batch]
    table = [a for lim in profiles for a in (repr(lim.interval_us), repr(lim.tolerance_us), str(lim.per_day))]
    prefix, ttl, digests = judged if judged is not None else ("", 0, ())
    return ["" if now_us is None else str(now_us), " ".join(str(c) for c, _ in batch),
            " ".join(map(str, which)), prefix, str(ttl), b"".join(digests), *table]
