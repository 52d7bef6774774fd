"""``python -m benchmarks [name | report] [options]``: run one benchmark, or all of them.

* ``python -m benchmarks NAME [options]``: one benchmark module; a full run saves its
  results in ``benchmarks/results/`` (``NAME.md`` and ``NAME.json``);
* ``python -m benchmarks report [options]``: every benchmark (or ``--modules a,b``, or
  none with ``--from-results``), then the benchmark page, ``docs/benchmarks.md``;
* ``python -m benchmarks [options]``: the same as ``report``; with ``--quick``, a smoke
  test of every module instead (nothing saved, no page).
"""

from __future__ import annotations

import importlib
import sys

from benchmarks import MODULES


def main(argv: list[str]) -> int:
    if argv and argv[0] in MODULES:
        module = importlib.import_module(f"benchmarks.{argv[0]}")
        code: int = module.main(argv[1:])
        return code
    if "--quick" in argv:
        for name in MODULES:
            module = importlib.import_module(f"benchmarks.{name}")
            code = module.main(list(argv))
            if code:
                return code
        return 0
    from benchmarks import report

    return report.main(argv[1:] if argv and argv[0] == "report" else argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
