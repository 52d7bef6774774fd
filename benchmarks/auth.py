"""JWT validation, next to bare PyJWT, in one run: with a cold key set, then a warm one.

Cold: milliseconds to the first validation that must fetch the key set, for PyJWT's
``PyJWKClient`` (+ ``jwt.decode``), ``resilient``'s ``SyncJWKSClient`` and ``JWKSClient``
(+ their validators):

* on a new client (the first validation after start-up), and
* on a client in use whose keys expired (``PyJWKClient(cache_jwk_set=False)``, and our
  clients with ``min_ttl=max_ttl=0``: every validation fetches).

Warm: for RS256, ES256 and EdDSA, validations per second of:

* ``jwt.decode`` with the key in hand (the floor: signature and claims, nothing else);
* PyJWT's ``PyJWKClient.get_signing_key_from_jwt`` + ``jwt.decode`` (warm cache);
* ``resilient``'s ``JWTValidator.validate`` (warm cache, every header check).

The keys come from a :class:`resilient.testing.LocalIssuer` over loopback HTTP. Cold
figures are medians of ``10 * --repeat`` validations, contenders in turn; warm ones the
median of ``--repeat`` runs, contenders alternating within each run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import jwt

from benchmarks._common import Cell, Machine, Report, Section, run_cli
from resilient.auth import JWKSClient, JWTValidator, SyncJWKSClient, SyncJWTValidator
from resilient.testing import LocalIssuer

PACKAGES = ["resilient-asgi", "pyjwt", "cryptography"]
ALGORITHMS = ("RS256", "ES256", "EdDSA")
SECTIONS = ("cold", "validations")


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


def milliseconds(start: float) -> float:
    return (time.perf_counter() - start) * 1000


async def cold(rounds: int) -> tuple[Section, float]:
    """The cold section, and the first validation of the process's first ``JWKSClient``."""
    samples: dict[str, dict[str, list[float]]] = {
        name: {"new": [], "in use": []} for name in ("pyjwk", "sync", "async")
    }
    with LocalIssuer(max_age=3600) as issuer:
        url, token, iss = issuer.jwks_url, issuer.mint(), issuer.issuer

        async def new_async() -> float:
            async with JWKSClient(url) as jwks:
                start = time.perf_counter()
                await JWTValidator(jwks, issuer=iss, audience="api").validate(token)
                return milliseconds(start)

        def new_sync() -> float:
            with SyncJWKSClient(url) as jwks:
                start = time.perf_counter()
                SyncJWTValidator(jwks, issuer=iss, audience="api").validate(token)
                return milliseconds(start)

        def pyjwk(client: jwt.PyJWKClient) -> float:
            start = time.perf_counter()
            key = client.get_signing_key_from_jwt(token)
            jwt.decode(token, key.key, algorithms=["RS256"], audience="api")
            return milliseconds(start)

        first = await new_async()  # before anything else made a client in this process
        async with JWKSClient(url, min_ttl=0, max_ttl=0) as jwks:
            with SyncJWKSClient(url, min_ttl=0, max_ttl=0) as sync_jwks:
                in_use = JWTValidator(jwks, issuer=iss, audience="api")
                sync_in_use = SyncJWTValidator(sync_jwks, issuer=iss, audience="api")
                uncached = jwt.PyJWKClient(url, cache_jwk_set=False)
                for _ in range(rounds):
                    samples["pyjwk"]["new"].append(pyjwk(jwt.PyJWKClient(url)))
                    samples["sync"]["new"].append(new_sync())
                    samples["async"]["new"].append(await new_async())
                    samples["pyjwk"]["in use"].append(pyjwk(uncached))
                    start = time.perf_counter()
                    sync_in_use.validate(token)
                    samples["sync"]["in use"].append(milliseconds(start))
                    start = time.perf_counter()
                    await in_use.validate(token)
                    samples["async"]["in use"].append(milliseconds(start))
    labels = {
        "pyjwk": "PyJWKClient + jwt.decode",
        "sync": "SyncJWKSClient + SyncJWTValidator",
        "async": "JWKSClient + JWTValidator",
    }
    rows: list[list[Cell]] = [
        [
            labels[name],
            statistics.median(figures["new"]),
            statistics.median(figures["in use"]),
        ]
        for name, figures in samples.items()
    ]
    section = Section(
        key="cold",
        title="Cold key set: milliseconds to the first validation",
        headers=["contender", "new client (ms)", "client in use, keys expired (ms)"],
        rows=rows,
        raw={labels[name]: figures for name, figures in samples.items()},
        chart=[1, 2],
    )
    return section, first


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
    rounds = 3 if args.quick else 10 * args.repeat
    only = args.only or SECTIONS
    machine = Machine.probe(PACKAGES)
    parts = ["# JWT validation benchmarks", "", "## Machine", "", machine.markdown(), ""]
    sections: list[Section] = []
    if "cold" in only:
        print("auth: cold section...", file=sys.stderr, flush=True)
        section, first = await cold(rounds)
        sections.append(section)
        parts += [f"## {section.title}", "", section.markdown(), ""]
        parts.append(
            f"Medians of {rounds} validations each, contenders in turn. The process's first "
            f"`JWKSClient` took {first:.1f} ms to its first validation."
        )
        parts.append("")
    if "validations" in only:
        print("auth: validations section...", file=sys.stderr, flush=True)
        section = await bench(args.repeat, count)
        sections.append(section)
        parts += [f"## {section.title}", "", section.markdown(), ""]
        parts.append(f"Medians of {args.repeat} runs of {count} validations.")
        parts.append("")
    parts.append(
        f"Rerun: `python dev.py bench auth{' --quick' if args.quick else ''} "
        f"--repeat {args.repeat}`."
    )
    return Report(markdown="\n".join(parts), machine=machine, sections=sections)


def main(argv: list[str] | None = None) -> int:
    return run_cli("auth", __doc__, main_async, argv, sections=SECTIONS)


if __name__ == "__main__":
    sys.exit(main())
