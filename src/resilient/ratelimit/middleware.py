"""``RateLimitMiddleware``: rate limits at the edge of an ASGI application."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from math import ceil
from typing import Literal

from resilient._asgi import ASGIApp, Message, Receive, Scope, Send
from resilient._routing import PathPattern
from resilient.errors import BackendError, BackendUnavailable, ConfigurationError
from resilient.keys import KeyFunc, as_key_func, by_ip
from resilient.problem import send_problem
from resilient.ratelimit.core import Decision, Policy, decision_of, validate_cost, validate_policies
from resilient.ratelimit.limiter import RateLimiter
from resilient.ratelimit.store import Admit

__all__ = ["RateLimitMiddleware", "Rule"]

_Headers = list[tuple[bytes, bytes]]
_ALL_METHODS = frozenset[str]()
# The quota headers of the hot path, kept by (remaining, reset seconds): a busy key comes
# back to the same few pairs, and formatting them costs more than a lookup.
_HEADER_CACHE_SIZE = 1024


class Rule:
    """Which requests a set of policies applies to, and what they count against.

    *policies* are checked together, atomically: a request denied by one is charged to
    none. *path* is an exact path, a route template (``"/api/users/{id}"``) or a prefix
    (``"/api/*"``); ``None`` matches every path. *methods* restricts the rule to those
    HTTP methods. *key* turns the request into the key to count (default: the client's
    IP, :func:`~resilient.by_ip`); a request it yields no key for is not limited by this
    rule. *cost* is what one request charges. *name* scopes the counters (default: from
    the methods and path), so two rules never share a counter by accident.

    >>> from resilient import SlidingWindow
    >>> Rule(SlidingWindow("5/minute"), path="/api/login", methods=["POST"])
    Rule(SlidingWindow('5/minute'), path='/api/login', methods=['POST'])
    """

    __slots__ = (
        "_pattern",
        "_policy_field",
        "_policy_header",
        "_scope",
        "_state_prefixes",
        "cost",
        "key",
        "methods",
        "name",
        "path",
        "policies",
    )

    def __init__(
        self,
        *policies: Policy,
        path: str | None = None,
        methods: Iterable[str] | None = None,
        key: KeyFunc | Callable[[Scope], str | None] | None = None,
        cost: int = 1,
        name: str | None = None,
    ) -> None:
        validate_policies(policies)
        validate_cost(cost, policies)
        if isinstance(methods, str):
            methods = [methods]
        if methods is not None:
            methods = list(methods)
            if not all(isinstance(m, str) and m for m in methods):
                msg = f"methods must be HTTP method names, not {methods!r}"
                raise ConfigurationError(msg)
        if name is not None and not isinstance(name, str):
            msg = f"a rule's name must be a string, not {name!r}"
            raise ConfigurationError(msg)
        self.policies = policies
        self.path = path
        self.methods = frozenset(m.upper() for m in methods) if methods else _ALL_METHODS
        self.key = by_ip() if key is None else as_key_func(key)
        self.cost = cost
        methods_label = ",".join(sorted(self.methods)) or "*"
        self.name = name or f"{methods_label} {path or '*'}"
        self._scope = f"{self.name}|"
        self._pattern = None if path is None else PathPattern(path)
        self._policy_header = ", ".join(
            f'"{p.name}";q={p.capacity};w={math.ceil(p.window)}' for p in policies
        ).encode()
        self._policy_field = (b"ratelimit-policy", self._policy_header)
        self._state_prefixes = {p.id: f'"{p.name}";r='.encode() for p in policies}

    def applies(self, method: str, path: str) -> bool:
        """Return whether this rule applies to a request for *method* and *path*."""
        if self.methods and method not in self.methods:
            return False
        return self._pattern is None or self._pattern.matches(path)

    def __repr__(self) -> str:
        parts = [repr(p) for p in self.policies]
        if self.path is not None:
            parts.append(f"path={self.path!r}")
        if self.methods:
            parts.append(f"methods={sorted(self.methods)!r}")
        if self.cost != 1:
            parts.append(f"cost={self.cost}")
        return f"Rule({', '.join(parts)})"


HeaderStyle = Literal["ietf", "legacy", "both", "none"]


class RateLimitMiddleware:
    """Pure ASGI middleware applying :class:`Rule` s with a :class:`~resilient.RateLimiter`.

    Every rule that applies to a request is checked, in order; the first denial answers
    ``429 Too Many Requests`` with ``Retry-After`` and an RFC 9457 problem body, and the
    application is not called. (Rules are charged one after another: a request denied by
    a later rule has been charged by the earlier ones; put policies that must be charged
    all-or-nothing into one rule.)

    *headers* chooses the quota headers added to allowed and denied responses: ``"ietf"``
    (default) the ``RateLimit-Policy`` and ``RateLimit`` fields of the IETF httpapi draft,
    ``"legacy"`` the ``X-RateLimit-Limit/Remaining/Reset`` trio, ``"both"``, or ``"none"``.
    Paths matching *exempt* patterns are never limited. When the limiter's backend fails
    and it fails closed, the answer is ``503`` with ``Retry-After``; never a 500.

    >>> from resilient import RateLimiter, SlidingWindow
    >>> async def app(scope, receive, send): ...
    >>> app = RateLimitMiddleware(app, limiter=RateLimiter(), rules=[
    ...     Rule(SlidingWindow("5/minute"), path="/api/login", methods=["POST"]),
    ... ])
    """

    __slots__ = (
        "_admits",
        "_exempt",
        "_header_cache",
        "_ietf",
        "_legacy",
        "_no_headers",
        "_only",
        "app",
        "limiter",
        "rules",
    )

    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: RateLimiter,
        rules: Sequence[Rule],
        exempt: Iterable[str] = (),
        headers: HeaderStyle = "ietf",
    ) -> None:
        if not isinstance(limiter, RateLimiter):
            msg = f"limiter must be a RateLimiter, not {limiter!r}"
            raise ConfigurationError(msg)
        if headers not in ("ietf", "legacy", "both", "none"):
            msg = f"headers must be 'ietf', 'legacy', 'both' or 'none', not {headers!r}"
            raise ConfigurationError(msg)
        if isinstance(rules, Rule) or not isinstance(rules, Iterable):
            msg = f"rules must be a list of Rule objects, not {rules!r}"
            raise ConfigurationError(msg)
        rules = tuple(rules)
        for rule in rules:
            if not isinstance(rule, Rule):
                msg = f"rules must be Rule objects, not {rule!r}"
                raise ConfigurationError(msg)
        self.app = app
        self.limiter = limiter
        self.rules = tuple(rules)
        self._exempt = tuple(PathPattern(p) for p in exempt)
        self._ietf = headers in ("ietf", "both")
        self._legacy = headers in ("legacy", "both")
        self._no_headers = headers == "none"
        self._header_cache: dict[tuple[int, int], tuple[tuple[bytes, bytes], ...]] = {}
        # Per rule of one policy, the limiter's prepared hit, which admits at once (no
        # coroutine, no Decision) where the backend allows it; None elsewhere.
        self._admits: tuple[Admit | None, ...] = tuple(
            limiter.admitter(rule.policies[0], cost=rule.cost, prefix=rule._scope)
            if len(rule.policies) == 1
            else None
            for rule in self.rules
        )
        # The hot path, when that is the whole job: one rule of one policy.
        self._only: tuple[Rule, Admit] | None = None
        if len(self.rules) == 1 and self._admits[0] is not None:
            self._only = (self.rules[0], self._admits[0])

    async def __call__(  # noqa: PLR0911 (the per-request path, kept in one frame)
        self, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Handle one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if self._exempt and any(pattern.matches(path) for pattern in self._exempt):
            await self.app(scope, receive, send)
            return
        only = self._only
        if only is None:
            await self._check_rules(scope, receive, send, path)
            return
        rule, admit = only
        # The hot path: one rule of one policy, admitted at once. Rule.applies, inlined.
        if (rule.methods and scope["method"] not in rule.methods) or (
            rule._pattern is not None and not rule._pattern.matches(path)
        ):
            await self.app(scope, receive, send)
            return
        # key.__call__(scope), not key(scope): it skips the slot wrapper that calling an
        # object goes through, which costs as much again as the call itself.
        value = rule.key.__call__(scope)
        if value is None:
            await self.app(scope, receive, send)
            return
        # Admitted at once as the policy's Charge; None when denied, which the full check
        # below answers (and records a block for), as it does a failing backend.
        try:
            fields = admit(value)
        except BackendError:
            fields = None
        if fields is None:
            await self._check_rules(scope, receive, send, path)
            return
        if self._no_headers:
            await self.app(scope, receive, send)
            return
        # No Decision: the headers depend on the two numbers alone, and are cached by them.
        remaining = fields[1]
        reset = -(-fields[2] // 1000)  # reset_after_ms in whole seconds, rounded up
        extra = self._header_cache.get((remaining, reset))
        if extra is None:
            extra = self._cache_headers(rule, rule.policies[0], remaining, reset)

        def send_with_headers(message: Message) -> Awaitable[None]:
            # _with_headers, inlined: one call less per request.
            if message["type"] == "http.response.start":
                # A new list: the app's own may be shared (a constant, a cached response).
                message["headers"] = [*message.get("headers", ()), *extra]
            return send(message)

        await self.app(scope, receive, send_with_headers)

    async def _check_rules(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        """Check every rule that applies, in order, and answer or call the application."""
        method: str = scope["method"]
        limiter = self.limiter
        applied: list[tuple[Rule, Decision]] = []
        for rule, admit in zip(self.rules, self._admits, strict=True):
            if not rule.applies(method, path):
                continue
            value = rule.key.__call__(scope)
            if value is None:
                continue
            try:
                fields = None if admit is None else admit(value)
            except BackendError:
                fields = None  # left to the full check, which applies the limiter's policy
            if fields is not None:
                policy = rule.policies[0]
                decision = decision_of(policy, True, fields[1], fields[2], 0)
            else:
                try:
                    name = rule._scope + value
                    decision = await limiter.hit(name, *rule.policies, cost=rule.cost)
                except BackendUnavailable as exc:
                    await self._unavailable(send, exc)
                    return
            if not decision.allowed:
                await self._deny(send, rule, decision, applied)
                return
            if not decision.degraded:
                applied.append((rule, decision))
        extra = self._headers(applied) if applied else []  # empty too when headers are off
        await self.app(scope, receive, _with_headers(send, extra) if extra else send)

    async def _unavailable(self, send: Send, exc: BackendUnavailable) -> None:
        retry = str(max(1, math.ceil(exc.retry_after))).encode()
        await send_problem(
            send,
            503,
            "The rate limiter cannot reach its backend; try again shortly.",
            headers=[(b"retry-after", retry)],
        )

    async def _deny(
        self, send: Send, rule: Rule, decision: Decision, applied: list[tuple[Rule, Decision]]
    ) -> None:
        retry = max(1, math.ceil(decision.retry_after))
        headers = [(b"retry-after", str(retry).encode())]
        headers += self._headers([*applied, (rule, decision)])
        await send_problem(
            send,
            429,
            f"Rate limit {decision.policy.name!r} exceeded; retry in {retry} s.",
            headers=headers,
            extra={"retry_after": retry},
        )

    def _cache_headers(
        self, rule: Rule, policy: Policy, remaining: int, reset: int
    ) -> tuple[tuple[bytes, bytes], ...]:
        """Return and remember the hot path's headers for *remaining* and *reset* seconds.

        Only the hot path uses the cache, and it is taken only with one rule of one
        policy, so those two numbers are all the headers depend on.
        """
        cache = self._header_cache
        if len(cache) >= _HEADER_CACHE_SIZE:
            cache.clear()  # many distinct quotas: start over rather than track their age
        headers = cache[remaining, reset] = tuple(
            self._single_headers(rule, policy, policy.capacity, remaining, reset)
        )
        return headers

    def _single_headers(
        self, rule: Rule, policy: Policy, limit: int, remaining: int, reset: int
    ) -> _Headers:
        """Return the headers of one rule of one policy (*reset*: whole seconds)."""
        if self._ietf:
            state = b"%s%d;t=%d" % (rule._state_prefixes[policy.id], remaining, reset)
            headers: _Headers = [rule._policy_field, (b"ratelimit", state)]
        else:
            headers = []
        if self._legacy:
            headers += [
                (b"x-ratelimit-limit", str(limit).encode()),
                (b"x-ratelimit-remaining", str(remaining).encode()),
                (b"x-ratelimit-reset", str(reset).encode()),
            ]
        return headers

    def _headers(self, applied: list[tuple[Rule, Decision]]) -> _Headers:
        if len(applied) == 1 and not applied[0][1].details:
            rule, d = applied[0]
            return self._single_headers(rule, d.policy, d.limit, d.remaining, ceil(d.reset_after))
        headers: _Headers = []
        if self._ietf:
            policy_fields: list[bytes] = []
            state_fields: list[bytes] = []
            for rule, decision in applied:
                policy_fields.append(rule._policy_header)
                prefixes = rule._state_prefixes
                for d in decision.details or (decision,):
                    fields = (prefixes[d.policy.id], d.remaining, ceil(d.reset_after))
                    state_fields.append(b"%s%d;t=%d" % fields)
            headers.append((b"ratelimit-policy", b", ".join(policy_fields)))
            headers.append((b"ratelimit", b", ".join(state_fields)))
        if self._legacy:
            binding = min((d for _, d in applied), key=lambda d: (d.allowed, d.remaining))
            headers.append((b"x-ratelimit-limit", str(binding.limit).encode()))
            headers.append((b"x-ratelimit-remaining", str(binding.remaining).encode()))
            reset = math.ceil(binding.reset_after)
            headers.append((b"x-ratelimit-reset", str(reset).encode()))
        return headers


def _with_headers(send: Send, extra: Sequence[tuple[bytes, bytes]]) -> Send:
    """Return *send* adding *extra* header fields to the response's start."""

    def send_with_headers(message: Message) -> Awaitable[None]:
        # A plain function returning send's awaitable: no coroutine frame per message.
        if message["type"] == "http.response.start":
            # A new list: the app's own may be shared (a constant, a cached response).
            message["headers"] = [*message.get("headers", ()), *extra]
        return send(message)

    return send_with_headers
