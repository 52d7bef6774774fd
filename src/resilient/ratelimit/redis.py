"""The rate-limit store of :class:`~resilient.RedisBackend`: ``lua/ratelimit.lua``."""

from __future__ import annotations

from collections.abc import Sequence

from resilient.backends.redis import Coalescer, RedisBackend, Script
from resilient.ratelimit.core import Outcome, Policy

__all__ = ["RedisRateLimitStore"]

_SCRIPT = Script("resilient.ratelimit.lua", "ratelimit.lua")

_Check = tuple[list[str], str]


class RedisRateLimitStore:
    """Rate-limit state in Redis: one key per (key, policy), one script call per check.

    All keys of a check share the hash tag ``{key}``, so a multi-policy check is one atomic
    script on one cluster node. Concurrent checks on the same hash slot are coalesced into
    one script call (see :class:`~resilient.backends.redis.Coalescer`).
    """

    __slots__ = ("_backend", "_coalescers", "_specs")

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        self._coalescers: dict[int, Coalescer[_Check, list[int]]] = {}
        self._specs: dict[str, str] = {}

    def _spec(self, policy: Policy) -> str:
        spec = self._specs.get(policy.id)
        if spec is None:
            # The algorithm by its code (Algorithm's value), as the script reads it.
            kind = policy.kind.value
            fields = (kind, policy.limit, policy.capacity, policy.period_ms, policy.block_ms)
            spec = self._specs[policy.id] = ",".join(map(str, fields))
        return spec

    async def check(
        self,
        key: str,
        policies: Sequence[Policy],
        cost: int,
        now_ms: int | None,
        consume: bool,
    ) -> list[Outcome]:
        """Check *cost* units of *key* against *policies* in Redis."""
        backend = self._backend
        if len(policies) == 1:
            policy = policies[0]
            keys = [backend.key("rl", key, policy.id)]
            specs = self._spec(policy)
        else:
            keys = [backend.key("rl", key, policy.id) for policy in policies]
            specs = ",".join([self._spec(policy) for policy in policies])
        now = "r" if now_ms is None else now_ms
        arg = f"{now},{1 if consume else 0},{cost},{len(policies)},{specs}"
        slot = backend.slot(keys[0])
        coalescer = self._coalescers.get(slot)
        if coalescer is None:
            coalescer = self._coalescers[slot] = Coalescer(self._send, backend.max_batch)
        flat = await coalescer.submit((keys, arg))
        if len(flat) == 4:
            return [Outcome(flat[0] == 1, flat[1], flat[2], flat[3])]
        return [
            Outcome(flat[i] == 1, flat[i + 1], flat[i + 2], flat[i + 3])
            for i in range(0, len(flat), 4)
        ]

    async def _send(self, checks: list[_Check]) -> list[list[int]]:
        if len(checks) == 1:
            keys, arg = checks[0]
            return [await self._backend.run_script(_SCRIPT, keys, (arg,))]
        all_keys: list[str] = []
        for keys, _ in checks:
            all_keys += keys
        args = [arg for _, arg in checks]
        flat: list[int] = await self._backend.run_script(_SCRIPT, all_keys, args)
        results: list[list[int]] = []
        start = 0
        for keys, _ in checks:
            end = start + 4 * len(keys)
            results.append(flat[start:end])
            start = end
        return results

    async def clear(self, key: str, policies: Sequence[Policy]) -> None:
        """Delete *key*'s state for *policies* (one DEL; the keys share a slot)."""
        backend = self._backend
        keys = [backend.key("rl", key, policy.id) for policy in policies]
        await backend.guard("deleting rate-limit keys", backend.client.delete(*keys))
