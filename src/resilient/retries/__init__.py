"""Retries: jittered exponential backoff on tenacity, ``Retry-After``, deadlines, budgets.

* :func:`retry`: a decorator for ``def`` and ``async def``, and ``.attempts()`` for blocks;
* :class:`RetryBudget`: caps retries at a share of calls, shared between callers;
* :mod:`~resilient.retries.core`: the pure jitter formulas and ``Retry-After`` parsing.

Importing this package does not import tenacity: the first failure that is retried does.
"""

from __future__ import annotations

from resilient.retries.budget import RetryBudget
from resilient.retries.options import RetryOn, RetryOptions
from resilient.retries.policy import Attempt, Attempts, Retry, retry

__all__ = ["Attempt", "Attempts", "Retry", "RetryBudget", "RetryOn", "RetryOptions", "retry"]
