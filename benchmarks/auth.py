"""JWT validation with a warm key cache, next to bare PyJWT, in one run.

For RS256, ES256 and EdDSA, validations per second of:

* ``jwt.decode`` with the key in hand (the floor: signature and claims, nothing else);
* PyJWT's ``PyJWKClient.get_signing_key_from_jwt`` + ``jwt.decode`` (warm cache);
* ``resilient``'s ``JWTValidator.validate`` (warm cache, every header check).

The keys come from a :class:`resilient.testing.LocalIssuer` over loopback HTTP; the cache
is warmed before timing, so the figures are the cost of validation, not of fetching.
Every figure is the median of ``--repeat`` runs; contenders alternate within each run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import jwt

from benchmarks._common import Cell, Machine, Report, Section, run_cli
from resilient.auth import JWKSClient, JWTValidator
from resilient.testing import LocalIssuer

PACKAGES = ["resilient-asgi", "pyjwt", "cryptography"]
ALGORITHMS = ("RS256", "ES256", "EdDSA")


def per_second(call: Callable[[], object], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        call()
    return count / (time.perf_counter() - start)


async def per_second_async(validator: JWTValidator, token: str, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        await validator.validate(token)
    return count / (time.perf_counter() - start)


async def bench(repeat: int, count: int) -> Section:
    rows: list[list[Cell]] = []
    raw: dict[str, dict[str, list[float]]] = {}
    with LocalIssuer(max_age=3600) as issuer:
        jwks = JWKSClient(issuer.jwks_url)
        validator = JWTValidator(jwks, issuer=issuer.issuer, audience="api")
        pyjwk_client = jwt.PyJWKClient(issuer.jwks_url)
        for alg in ALGORITHMS:
            token = issuer.mint(alg=alg)
            key = issuer.public_key(issuer.kid(alg))
            await validator.validate(token)  # warm

            def bare(token: str = token, key: object = key, alg: str = alg) -> object:
                return jwt.decode(token, key, algorithms=[alg], audience="api")  # type: ignore[arg-type]

            def pyjwk(token: str = token, alg: str = alg) -> object:
                signing = pyjwk_client.get_signing_key_from_jwt(token)
                return jwt.decode(token, signing.key, algorithms=[alg], audience="api")

            pyjwk()  # warm
            samples: dict[str, list[float]] = {"bare": [], "pyjwk": [], "resilient": []}
            for _ in range(repeat):
                samples["bare"].append(per_second(bare, count))
                samples["pyjwk"].append(per_second(pyjwk, count))
                samples["resilient"].append(await per_second_async(validator, token, count))
            medians = {name: statistics.median(values) for name, values in samples.items()}
            raw[alg] = samples
            rows.append(
                [
                    alg,
                    medians["bare"],
                    medians["pyjwk"],
                    medians["resilient"],
                    f"{100 * (medians['resilient'] / medians['bare'] - 1):+.1f}%",
                ]
            )
    headers = [
        "algorithm",
        "jwt.decode, key in hand (/s)",
        "PyJWKClient + jwt.decode (/s)",
        "JWTValidator (/s)",
        "JWTValidator vs bare",
    ]
    return Section(
        key="validations",
        title="Validations per second, warm key cache",
        headers=headers,
        rows=rows,
        raw=raw,
        chart=[1, 2, 3],
    )


async def main_async(args: argparse.Namespace) -> Report:
    count = 50 if args.quick else 2000
    print("auth section...", file=sys.stderr, flush=True)
    machine = Machine.probe(PACKAGES)
    section = await bench(args.repeat, count)
    parts = ["# JWT validation benchmarks", "", "## Machine", "", machine.markdown(), ""]
    parts += [f"## {section.title}", ""]
    parts += [section.markdown(), ""]
    parts.append(
        f"Medians of {args.repeat} runs of {count} validations. Rerun: `python dev.py bench "
        f"auth{' --quick' if args.quick else ''} --repeat {args.repeat}`."
    )
    return Report(markdown="\n".join(parts), machine=machine, sections=[section])


def main(argv: list[str] | None = None) -> int:
    return run_cli("auth", __doc__, main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
