"""KeySetCache against a plain model, on random interleavings (hypothesis state machine).

Lookups start, wait and resume in any order, the clock moves, the issuer rotates its keys
and its endpoint goes down and comes back. The machine drives the cache as the JWKS
clients do (one fetch in flight; every caller waiting on it resumes with how it ended) and
checks each decision against a model written from the documented rules, not from the code:

* a lookup of a kid held by fresh keys needs no fetch;
* never two fetches in flight;
* a fetch starts only when the keys expired after a successful fetch, or when the cooldown
  since the last attempt is over (so a flood of unknown kids costs one fetch per cooldown);
* a lookup returns the key iff the cached set holds its kid, and the cached set is the one
  the last successful fetch brought;
* a known kid is served while the keys are servable (fresh, or stale within ``stale_for``),
  whatever the endpoint does; ``KeySetUnavailable`` only once they are not;
* an unknown kid with the cooldown over and no fetch in flight starts a fetch at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from resilient.auth.core import KeySetCache, Lookup, Need, SigningKey
from resilient.errors import KeySetUnavailable, UnknownKey
from resilient.testing import FakeClock

KIDS = ("a", "b", "c", "d")
MIN_TTL, MAX_TTL, DEFAULT_TTL, COOLDOWN, STALE_FOR = 60.0, 600.0, 300.0, 30.0, 900.0
CACHE_CONTROLS = (
    None,
    "max-age=0",
    "max-age=10",
    "max-age=120",
    "public, max-age=3600",
    "no-store",
)


def key(kid: str) -> SigningKey:
    return SigningKey(kid=kid, kty="OKP", crv="Ed25519", alg="EdDSA", key=None)


def model_ttl(cache_control: str | None) -> float:
    """The documented rule: max-age (0 for no-store), else the default, within the bounds."""
    ages = {None: DEFAULT_TTL, "no-store": 0.0}
    age = ages.get(cache_control)
    if age is None:
        age = float(str(cache_control).rsplit("=", 1)[1])
    return min(max(age, MIN_TTL), MAX_TTL)


@dataclass
class Pending:
    """A lookup waiting for the fetch in flight."""

    kid: str
    flow: Lookup
    yields: int = 1


@dataclass
class Model:
    """What the rules say the cache holds: plain values, updated by the machine itself."""

    cached: frozenset[str] = frozenset()
    expires_at: float = float("-inf")
    last_attempt: float | None = None
    last_ok: bool = True
    in_flight: bool = False

    def servable(self, now: float) -> bool:
        return now < self.expires_at + STALE_FOR

    def cooldown_over(self, now: float) -> bool:
        return self.last_attempt is None or now - self.last_attempt >= COOLDOWN


class KeySetCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.cache = KeySetCache(
            min_ttl=MIN_TTL,
            max_ttl=MAX_TTL,
            default_ttl=DEFAULT_TTL,
            refetch_cooldown=COOLDOWN,
            stale_for=STALE_FOR,
        )
        self.model = Model()
        self.issuer: frozenset[str] = frozenset({"a"})
        self.endpoint_up = True
        self.waiting: list[Pending] = []

    @property
    def now(self) -> float:
        return self.clock.monotonic()

    # --- the world -------------------------------------------------------------------

    @rule(seconds=st.sampled_from([0.0, 1.0, 5.0, 29.0, 30.0, 61.0, 300.0, 1000.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(kids=st.frozensets(st.sampled_from(KIDS), min_size=1))
    def rotate(self, kids: frozenset[str]) -> None:
        self.issuer = kids

    @rule()
    def toggle_endpoint(self) -> None:
        self.endpoint_up = not self.endpoint_up

    # --- the callers -----------------------------------------------------------------

    @rule(kid=st.sampled_from(KIDS))
    def look_up(self, kid: str) -> None:
        now, model = self.now, self.model
        fresh = self.cache.fresh_key(kid, now)
        fresh_in_model = now < model.expires_at and kid in model.cached
        assert (fresh is not None) == fresh_in_model
        if fresh is not None:
            return
        flow = self.cache.lookup(kid, self.clock)
        expired_after_success = now >= model.expires_at and model.last_ok
        could_fetch = not model.in_flight and model.cooldown_over(now)
        need = self.step(kid, flow, None)
        if need is None:
            # Finished at once: only when no fetch was due, or none could start.
            assert not (expired_after_success and not model.in_flight)
            assert not (could_fetch and kid not in model.cached)
            return
        self.waiting.append(Pending(kid, flow))

    @precondition(lambda self: self.model.in_flight)
    @rule(cache_control=st.sampled_from(CACHE_CONTROLS))
    def finish_fetch(self, cache_control: str | None) -> None:
        now, model = self.now, self.model
        model.in_flight = False
        failure: KeySetUnavailable | None = None
        if self.endpoint_up:
            ttl = self.cache.ttl_for(cache_control)
            assert ttl == model_ttl(cache_control)
            self.cache.fetched({kid: key(kid) for kid in self.issuer}, ttl, now)
            model.cached, model.expires_at, model.last_ok = self.issuer, now + ttl, True
        else:
            assert self.cache.failed(now) == model.servable(now)
            model.last_ok = False
            failure = KeySetUnavailable("down")
        resumed, self.waiting = self.waiting, []
        for pending in resumed:
            need = self.step(pending.kid, pending.flow, failure)
            if need is not None:
                pending.yields += 1
                assert pending.yields <= 2, "a lookup fetches at most twice"
                self.waiting.append(pending)

    @precondition(lambda self: self.model.in_flight)
    @rule()
    def abandon_fetch(self) -> None:
        """The owner was cancelled: its waiters stay parked until someone fetches again."""
        self.cache.abandoned()
        self.model.in_flight = False
        resumed, self.waiting = self.waiting, []
        for pending in resumed:  # the async driver's waiters see the cancellation too
            pending.flow.close()

    # --- checks ----------------------------------------------------------------------

    def step(self, kid: str, flow: Lookup, failure: KeySetUnavailable | None) -> Need | None:
        """Advance *flow*; check what it did against the model; return its need, if any."""
        now, model = self.now, self.model
        try:
            need = flow.send(failure)  # a new lookup starts with send(None)
        except StopIteration as done:
            found: SigningKey = done.value
            assert found.kid == kid
            assert kid in model.cached
            return None
        except UnknownKey:
            assert kid not in model.cached
            return None
        except KeySetUnavailable:
            assert not model.servable(now)
            return None
        if need is Need.FETCH:
            assert not model.in_flight, "two fetches in flight"
            expired_after_success = now >= model.expires_at and model.last_ok
            assert expired_after_success or model.cooldown_over(now)
            model.in_flight, model.last_attempt = True, now
        else:
            assert need is Need.WAIT
            assert model.in_flight
        return need

    @invariant()
    def known_kids_serve_while_servable(self) -> None:
        now = self.now
        for kid in self.model.cached:
            if not self.model.servable(now):
                break
            expired = now >= self.model.expires_at
            if self.model.in_flight or (
                expired and (self.model.last_ok or self.model.cooldown_over(now))
            ):
                continue  # it would join or start a fetch: checked when that ends
            flow = self.cache.lookup(kid, self.clock)
            found: SigningKey | Need | None = None
            try:
                found = next(flow)
            except StopIteration as done:
                found = done.value
            assert isinstance(found, SigningKey), f"a servable known kid needed {found}"
            assert found.kid == kid

    @invariant()
    def the_cache_agrees_on_its_state(self) -> None:
        assert self.cache.fetching == self.model.in_flight
        assert set(self.cache.keys) == self.model.cached
        assert self.cache.expires_at == self.model.expires_at


KeySetCacheMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40)
TestKeySetCache = KeySetCacheMachine.TestCase
