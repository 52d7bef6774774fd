"""The retry budget's script on :class:`~resilient.RedisBackend` (see :class:`RetryBudget`)."""

from __future__ import annotations

from resilient.backends.redis import Script

__all__ = ["BUDGET"]

BUDGET = Script("resilient.retries.lua", "budget.lua", needs_now=True)
