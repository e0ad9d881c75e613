"""Per-tenant requests- and tokens-per-minute limits, shared by every router replica through Redis.

A sliding window counter (as Cloudflare and Envoy's global rate limiting do): per tenant and per limit, one
counter for the current minute and one for the previous; the rate is ``previous x (1 - elapsed fraction) +
current``. The check and the increment are one Lua script, so replicas never both admit the last slot.

Without Redis, or while Redis is unreachable, each replica enforces the limits on its own counters (the
effective limit is then per replica) and ``tandem:router_ratelimit_shared`` says 0.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
import redis.exceptions

from tandem.router.tenants import Tenant

logger = logging.getLogger(__name__)

WINDOW_S = 60

# KEYS: requests (current, previous), tokens (current, previous). ARGV: request limit, token limit (0: none),
# weight of the previous window, tokens to add, TTL. Returns {admitted, request rate, token rate}.
_SCRIPT = """
local function rate(cur, prev, weight)
  return tonumber(redis.call('GET', prev) or '0') * weight + tonumber(redis.call('GET', cur) or '0')
end
local weight = tonumber(ARGV[3])
local req_rate = rate(KEYS[1], KEYS[2], weight)
local tok_rate = rate(KEYS[3], KEYS[4], weight)
local req_limit, tok_limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if (req_limit > 0 and req_rate + 1 > req_limit) or (tok_limit > 0 and tok_rate >= tok_limit) then
  return {0, tostring(req_rate), tostring(tok_rate)}
end
redis.call('INCRBY', KEYS[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('INCRBY', KEYS[3], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[5])
return {1, tostring(req_rate + 1), tostring(tok_rate + tonumber(ARGV[4]))}
"""

_CHARGE = """
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a request is admitted, and what the x-ratelimit-* headers say."""

    admitted: bool
    limit: str | None  # which limit refused it: "requests" | "tokens"
    retry_after_s: int
    headers: dict[str, str]


class RateLimiter:
    """Admits or refuses requests per tenant; ``shared`` tells whether Redis counters are in use right now."""

    def __init__(self, redis_url: str | None, on_shared: Callable[[bool], None] = lambda shared: None,
                 clock: Callable[[], float] = time.time, retry_redis_s: float = 2.0) -> None:
        self._redis = (aioredis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=1.0)
                       if redis_url else None)
        self._on_shared = on_shared
        self._clock = clock
        self._retry_redis_s = retry_redis_s
        self._redis_down_until = 0.0
        self._local: dict[str, int] = {}
        self.shared = False
        on_shared(False)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    def _keys(self, tenant: str, now: float) -> tuple[list[str], float]:
        window = int(now // WINDOW_S)
        weight = 1.0 - (now % WINDOW_S) / WINDOW_S
        keys = [f"tandem:ratelimit:{tenant}:{kind}:{w}" for kind in ("requests", "tokens") for w in (window, window - 1)]
        return keys, weight

    async def admit(self, tenant: Tenant, tokens: int) -> Decision:
        """Check both limits and, if admitted, count the request and its ``tokens`` (prompt tokens so far)."""
        if tenant.requests_per_minute is None and tenant.tokens_per_minute is None:
            return Decision(True, None, 0, {})
        now = self._clock()
        keys, weight = self._keys(tenant.name, now)
        args = [tenant.requests_per_minute or 0, tenant.tokens_per_minute or 0, weight, tokens, WINDOW_S * 2 + 5]
        result = await self._shared(lambda r: r.eval(_SCRIPT, 4, *keys, *args))
        if result is None:
            result = self._local_admit(keys, args)
        admitted, req_rate, tok_rate = int(result[0]), float(result[1]), float(result[2])
        return self._decision(tenant, bool(admitted), req_rate, tok_rate, now, keys, weight)

    async def charge(self, tenant: Tenant, tokens: int) -> None:
        """Add tokens known only later (the completion) to the tenant's token window."""
        if tenant.tokens_per_minute is None or tokens <= 0:
            return
        keys, _ = self._keys(tenant.name, self._clock())
        if await self._shared(lambda r: r.eval(_CHARGE, 1, keys[2], tokens, WINDOW_S * 2 + 5)) is None:
            self._local[keys[2]] = self._local.get(keys[2], 0) + tokens

    async def _shared(self, call):
        """Run ``call`` on Redis; None when there is no Redis or it is down (then counters are per replica)."""
        if self._redis is None or time.monotonic() < self._redis_down_until:
            return None
        try:
            result = await call(self._redis)
        except (redis.exceptions.RedisError, OSError) as exc:
            if self.shared or self._redis_down_until == 0.0:
                logger.warning("rate limits fall back to per-replica counters: Redis unreachable (%s)", exc)
            self._redis_down_until = time.monotonic() + self._retry_redis_s
            self._set_shared(False)
            return None
        if not self.shared:
            logger.info("rate limits are shared through Redis")
        self._set_shared(True)
        return result

    def _set_shared(self, shared: bool) -> None:
        self.shared = shared
        self._on_shared(shared)

    def _local_admit(self, keys: list[str], args: list) -> tuple[int, float, float]:
        req_limit, tok_limit, weight, tokens = args[0], args[1], args[2], args[3]
        req_rate = self._local.get(keys[1], 0) * weight + self._local.get(keys[0], 0)
        tok_rate = self._local.get(keys[3], 0) * weight + self._local.get(keys[2], 0)
        if (req_limit and req_rate + 1 > req_limit) or (tok_limit and tok_rate >= tok_limit):
            return 0, req_rate, tok_rate
        self._local[keys[0]] = self._local.get(keys[0], 0) + 1
        self._local[keys[2]] = self._local.get(keys[2], 0) + tokens
        if len(self._local) > 4096:  # drop windows older than the previous one
            window = int(self._clock() // WINDOW_S)
            self._local = {k: v for k, v in self._local.items() if int(k.rsplit(":", 1)[1]) >= window - 1}
        return 1, req_rate + 1, tok_rate + tokens

    def _decision(self, tenant: Tenant, admitted: bool, req_rate: float, tok_rate: float, now: float,
                  keys: list[str], weight: float) -> Decision:
        headers: dict[str, str] = {}
        elapsed = now % WINDOW_S
        reset = f"{math.ceil(WINDOW_S - elapsed)}s"
        refused_by: str | None = None
        retry = 0
        for kind, limit, rate in (("requests", tenant.requests_per_minute, req_rate),
                                  ("tokens", tenant.tokens_per_minute, tok_rate)):
            if limit is None:
                continue
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(limit - rate)))
            headers[f"x-ratelimit-reset-{kind}"] = reset
            over = rate + 1 > limit if kind == "requests" else rate >= limit
            if not admitted and over and refused_by is None:
                refused_by = kind
                retry = math.ceil(WINDOW_S - elapsed)  # a new window: the current one's count starts to fade
        return Decision(admitted, refused_by, max(1, retry) if not admitted else 0, headers)
