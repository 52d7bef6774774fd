"""Benchmarks of resilient against its peer libraries: ``python -m benchmarks``."""

# Every benchmark module, in the order the benchmark page presents them.
MODULES = (
    "ratelimit",
    "backend",
    "idempotency",
    "breaker",
    "cache",
    "retry",
    "auth",
    "ecommerce_load",
    "memory_bound",
)
