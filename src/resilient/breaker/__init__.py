"""Circuit breakers: stop calling a failing dependency, and probe its recovery.

* :mod:`~resilient.breaker.core`: the state machine and its windows (no I/O);
* :class:`CircuitBreaker`: the decorator, context manager and ``call`` forms;
* :class:`BreakerRegistry`: one breaker per key (per downstream host, say).
"""

from __future__ import annotations

from resilient.breaker.circuit import BreakerRegistry, CircuitBreaker
from resilient.breaker.core import State

__all__ = ["BreakerRegistry", "CircuitBreaker", "State"]
