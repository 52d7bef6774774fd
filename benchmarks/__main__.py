"""``python -m benchmarks [name] [options]``: run one benchmark module, or all of them."""

from __future__ import annotations

import importlib
import sys

MODULES = ("ratelimit", "idempotency", "breaker", "cache", "retry", "auth")


def main(argv: list[str]) -> int:
    names = [argv.pop(0)] if argv and argv[0] in MODULES else list(MODULES)
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        code: int = module.main(list(argv))
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
