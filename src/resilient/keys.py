"""Key functions: turn a request into the string a limit counts against.

A key function takes an ASGI HTTP (or WebSocket) scope and returns a key such as
``"ip:203.0.113.7"``, ``"user:42"`` or ``"header:x-api-key:<digest>"``, or ``None`` when
it cannot produce one (no authenticated user, no such header); a request without a key
is not limited by the rule that asked. They are small callable objects, built once and
called on every request, so everything they can work out in advance (parsed networks,
encoded header names) is worked out at construction.

Key functions compose with ``|``, which falls back to the next one when a function
yields ``None``; plain callables ``(scope) -> str | None`` mix in freely::

    key = by_user() | by_header("X-API-Key") | by_ip()

**The trust model for proxies.** :func:`by_ip` starts from the address of the direct
peer, the only address nobody can forge. Forwarding headers (``Forwarded``,
``X-Forwarded-For``) are read only when that peer is one of *trusted_proxies*, because
anyone can send those headers. The chain is then read right to left, since each proxy
appends the address it received the request from: trusted proxies are skipped, and the
first address that is not a trusted proxy is the client. Everything left of it was
written by the client (or by proxies we know nothing about) and is ignored. A hop that
cannot be parsed (garbage, ``unknown``, an obfuscated ``_name``) ends the walk at the
last trusted proxy before it: the key becomes that proxy's address, never an address
from further left. This holds only for the header your proxies actually write: by
default only ``X-Forwarded-For`` is read (what nginx, HAProxy and cloud load balancers
append to); RFC 7239 ``Forwarded`` is read only when named, as in
``by_ip(..., forwarded_headers=["forwarded", "x-forwarded-for"])``, because most proxies
pass a client's own ``Forwarded`` header through untouched.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from typing import TypeAlias

from resilient._asgi import Scope
from resilient.errors import ConfigurationError

__all__ = [
    "FirstOf",
    "KeyFunc",
    "as_key_func",
    "by_header",
    "by_ip",
    "by_user",
    "constant",
]

_Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
_Headers: TypeAlias = list[tuple[bytes, bytes]]

# RFC 9110 token characters: what a header name (and a Forwarded parameter name) is made of.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# The Forwarded header is read with regexes, which keep the scan in C; every quantifier is
# possessive, so no input (the header is the client's to write) can make them backtrack.
# One element: runs of characters that are neither quotes nor commas, and whole quoted
# strings; a comma outside quotes ends it.
_FORWARDED_ELEMENT = re.compile(r'(?:[^",]++|"(?:[^"\\]|\\.)*+")*+')
# One ``name=value`` pair of an element (or none), ended by ``;`` or the element's end.
_FORWARDED_PAIR = re.compile(
    r'[ \t]*+(?:([^=;" \t]++)[ \t]*+=[ \t]*+("(?:[^"\\]|\\.)*+"|[^";]*+))?[ \t]*+(?:;|\Z)'
)
_QUOTED_PAIR = re.compile(r"\\(.)")
_PORT = re.compile(r"[0-9]{1,5}|_[A-Za-z0-9._-]+")
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class KeyFunc(ABC):
    """A request-to-key strategy: ``key(scope)`` returns a string, or ``None``.

    Subclass it and implement :meth:`__call__` to write your own; or pass a plain
    callable wherever a key function is accepted (it is wrapped by :func:`as_key_func`).
    ``a | b`` is a key function that tries *a*, and *b* when *a* yields ``None``.

    >>> key = by_user() | by_ip()
    >>> key
    by_user() | by_ip()
    >>> key({"type": "http", "client": ("203.0.113.7", 4711), "headers": []})
    'ip:203.0.113.7'
    """

    __slots__ = ()

    @abstractmethod
    def __call__(self, scope: Scope) -> str | None:
        """Return the key for the request described by *scope*, or ``None``."""

    def __or__(self, other: KeyFunc | Callable[[Scope], str | None]) -> KeyFunc:
        if not callable(other):
            return NotImplemented
        return FirstOf(self, as_key_func(other))

    def __ror__(self, other: Callable[[Scope], str | None]) -> KeyFunc:
        if not callable(other):
            return NotImplemented
        return FirstOf(as_key_func(other), self)


class FirstOf(KeyFunc):
    """The first key that one of several key functions yields, tried in order.

    This is what ``a | b | c`` builds; nested combinations are flattened, so
    ``(a | b) | c`` and ``a | (b | c)`` are the same three-way fallback.

    >>> FirstOf(by_user(), by_header("X-API-Key"), by_ip())
    by_user() | by_header('X-API-Key') | by_ip()
    """

    __slots__ = ("funcs",)

    def __init__(self, *funcs: KeyFunc | Callable[[Scope], str | None]) -> None:
        if not funcs:
            msg = "FirstOf needs at least one key function"
            raise ConfigurationError(msg)
        flat: list[KeyFunc] = []
        for func in funcs:
            wrapped = as_key_func(func)
            if isinstance(wrapped, FirstOf):
                flat.extend(wrapped.funcs)
            else:
                flat.append(wrapped)
        self.funcs: tuple[KeyFunc, ...] = tuple(flat)

    def __call__(self, scope: Scope) -> str | None:
        """Return the first key that is not ``None``, or ``None`` if every one is."""
        for func in self.funcs:
            key = func(scope)
            if key is not None:
                return key
        return None

    def __repr__(self) -> str:
        if len(self.funcs) == 1:
            return f"FirstOf({self.funcs[0]!r})"
        return " | ".join(repr(func) for func in self.funcs)


class _Callable(KeyFunc):
    __slots__ = ("func",)

    def __init__(self, func: Callable[[Scope], str | None]) -> None:
        self.func = func

    def __call__(self, scope: Scope) -> str | None:
        key = self.func(scope)
        if key is None or isinstance(key, str):
            return key
        # A wrong type would otherwise fail far away, inside a limiter or a Redis client.
        msg = f"the key function {self!r} returned {key!r}; it must return a str or None"
        raise TypeError(msg)

    def __repr__(self) -> str:
        name = getattr(self.func, "__qualname__", None)
        return name if isinstance(name, str) else repr(self.func)


def as_key_func(obj: KeyFunc | Callable[[Scope], str | None]) -> KeyFunc:
    """Return *obj* as a :class:`KeyFunc`: unchanged if it is one, else wrapped.

    The wrapper calls *obj* with the scope, checks that it returned a ``str`` or
    ``None``, and gives it ``|``.

    >>> tenant = as_key_func(lambda scope: scope.get("tenant"))
    >>> key = tenant | by_ip()
    """
    if isinstance(obj, KeyFunc):
        return obj
    if not callable(obj):
        msg = f"a key function must be callable as key(scope), not {obj!r}"
        raise ConfigurationError(msg)
    return _Callable(obj)


# --- by_ip -----------------------------------------------------------------------------


def _normalise(address: _Address) -> _Address:
    """Return the IPv4 address of an IPv4-mapped IPv6 address, else *address* unchanged."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return mapped
    return address


def _parse_network(entry: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(entry, str):
        msg = f"trusted_proxies entries must be strings, not {entry!r}"
        raise ConfigurationError(msg)
    try:
        network = ipaddress.ip_network(entry.strip())
    except ValueError as exc:
        msg = f"trusted_proxies entry {entry!r} is not an IP address or network: {exc}"
        raise ConfigurationError(msg) from None
    if (
        isinstance(network, ipaddress.IPv6Network)
        and network.prefixlen >= 96
        and network.subnet_of(_IPV4_MAPPED)
    ):
        # Peers are normalised to IPv4 before the check, so IPv4-mapped entries must be too.
        base = int(network.network_address) & 0xFFFFFFFF
        return ipaddress.IPv4Network((base, network.prefixlen - 96))
    return network


def _parse_node(value: str) -> _Address | None:
    """Parse one hop (``1.2.3.4``, ``1.2.3.4:80``, ``[2001:db8::1]:80``, ``2001:db8::1``).

    Return ``None`` for anything else: ``unknown``, obfuscated ``_names``, garbage.
    """
    node = value.strip(" \t")
    port: str | None = None
    try:
        if node.startswith("["):
            end = node.find("]")
            if end < 0:
                return None
            rest = node[end + 1 :]
            if rest:
                if rest[0] != ":":
                    return None
                port = rest[1:]
            address: _Address = ipaddress.IPv6Address(node[1:end])
        elif node.count(":") == 1:
            node, port = node.split(":")
            address = ipaddress.IPv4Address(node)
        else:
            address = ipaddress.ip_address(node)
    except ValueError:
        return None
    if port is not None and not _PORT.fullmatch(port):
        return None
    return _normalise(address)


def _forwarded_hops(lines: list[str]) -> Iterator[str | None]:
    """Yield the ``for=`` values of ``Forwarded`` lines right to left; ``None`` for garbage."""
    for line in reversed(lines):
        if '"' not in line:
            yield from (_forwarded_for(e) for e in reversed(line.split(",")) if e.strip(" \t"))
            continue
        elements: list[str | None] = []
        pos, end = 0, len(line)
        while True:
            match = _FORWARDED_ELEMENT.match(line, pos)
            if match is None:  # never: the pattern matches the empty string
                break
            elements.append(match.group())
            pos = match.end()
            if pos >= end:
                break
            if line[pos] == '"':
                # An unterminated quoted string swallows the rest of the line: that is one
                # garbage hop, and nothing to its left can be trusted.
                elements.append(None)
                break
            pos += 1  # the comma
        for element in reversed(elements):
            if element is None:
                yield None
            elif element.strip(" \t"):  # empty list elements are allowed, and ignored
                yield _forwarded_for(element)


def _forwarded_for(element: str) -> str | None:
    """Return the value of one element's ``for`` parameter, or ``None``.

    An element without exactly one ``for`` is a hop we cannot place, so it is garbage.
    """
    found: str | None = None
    pos, end = 0, len(element)
    while pos < end:
        match = _FORWARDED_PAIR.match(element, pos)
        if match is None:
            return None
        pos = match.end()
        name, value = match.group(1, 2)
        if name is None or name.lower() != "for":
            continue
        if found is not None:
            return None
        found = _QUOTED_PAIR.sub(r"\1", value[1:-1]) if value.startswith('"') else value
    return found


def _list_hops(lines: list[str]) -> Iterator[str]:
    """Yield the items of ``X-Forwarded-For``-style lines right to left."""
    for line in reversed(lines):
        for item in reversed(line.split(",")):
            if item.strip(" \t"):  # empty list elements are allowed, and ignored
                yield item


# What a peer or a hop amounts to: (is it a trusted proxy, its key), or None for garbage.
_Hop: TypeAlias = tuple[bool, str] | None

# Parsing and printing addresses with ``ipaddress`` costs microseconds, and the same few
# strings (the proxies, the busiest clients) come back request after request, so each
# by_ip() remembers what it made of the latest ones.
_CACHE_SIZE = 4096
# What nginx, HAProxy, cloud load balancers and CDNs append to. RFC 7239 ``Forwarded`` is
# opt-in: most proxies pass a client's own ``Forwarded`` header through untouched, so
# reading it by default would let the client choose its key.
_FORWARDED_HEADERS = ("x-forwarded-for",)
_CLIENT_TYPES = (tuple, list)  # what an ASGI server may give as scope["client"]


class _ByIP(KeyFunc):
    __slots__ = (
        "_exact",
        "_header_set",
        "_headers",
        "_hop",
        "_mask6",
        "_networks4",
        "_networks6",
        "_peer",
        "_peer_keys",
        "_repr",
        "forwarded_headers",
        "ipv6_prefix",
        "trusted_proxies",
    )

    def __init__(
        self, trusted_proxies: Iterable[str], ipv6_prefix: int, forwarded_headers: Iterable[str]
    ) -> None:
        if isinstance(trusted_proxies, str):
            trusted_proxies = [trusted_proxies]
        if isinstance(forwarded_headers, str):
            forwarded_headers = [forwarded_headers]
        if (
            isinstance(ipv6_prefix, bool)
            or not isinstance(ipv6_prefix, int)
            or not 1 <= ipv6_prefix <= 128
        ):
            msg = f"ipv6_prefix must be an integer from 1 to 128, not {ipv6_prefix!r}"
            raise ConfigurationError(msg)
        header_names = tuple(forwarded_headers)
        for name in header_names:
            if not isinstance(name, str) or not _TOKEN.fullmatch(name):
                msg = f"forwarded_headers entry {name!r} is not an HTTP header name"
                raise ConfigurationError(msg)
        networks = [_parse_network(entry) for entry in trusted_proxies]
        self.trusted_proxies = tuple(networks)
        self.ipv6_prefix = ipv6_prefix
        self.forwarded_headers = tuple(name.lower() for name in header_names)
        self._headers = tuple(name.encode("ascii") for name in self.forwarded_headers)
        self._header_set = frozenset(self._headers)
        self._mask6 = ((1 << 128) - 1) ^ ((1 << (128 - ipv6_prefix)) - 1)
        # Single addresses are a set lookup; networks are (network, mask) integer pairs,
        # which is several times faster than ``address in network``.
        self._exact = frozenset(
            net.network_address for net in networks if net.prefixlen == net.max_prefixlen
        )
        self._networks4 = tuple(
            (int(net.network_address), int(net.netmask))
            for net in networks
            if net.version == 4 and net.prefixlen < 32
        )
        self._networks6 = tuple(
            (int(net.network_address), int(net.netmask))
            for net in networks
            if net.version == 6 and net.prefixlen < 128
        )
        self._peer = lru_cache(maxsize=_CACHE_SIZE)(self._classify_peer)
        self._hop = lru_cache(maxsize=_CACHE_SIZE)(self._classify_hop)
        # The keys of peers that are not trusted proxies, by host: for them the peer is
        # the whole answer, so a request from one seen before costs one dict lookup.
        self._peer_keys: dict[str, str] = {}
        args = []
        if networks:
            args.append(f"trusted_proxies={[str(net) for net in networks]!r}")
        if ipv6_prefix != 64:
            args.append(f"ipv6_prefix={ipv6_prefix}")
        if self.forwarded_headers != _FORWARDED_HEADERS:
            args.append(f"forwarded_headers={list(self.forwarded_headers)!r}")
        self._repr = f"by_ip({', '.join(args)})"

    def __call__(self, scope: Scope) -> str | None:
        """Return ``"ip:<client address>"``, or ``None`` when the peer is unknown."""
        client = scope.get("client")
        # The fast path: a peer seen before that is not a trusted proxy.
        if type(client) is tuple and client:
            host = client[0]
            if type(host) is str:
                known = self._peer_keys.get(host)
                if known is not None:
                    return known
        return self._key(scope, client)

    def _key(self, scope: Scope, client: object) -> str | None:
        # A tuple of types, not ``tuple | list``: that union would be built on every call.
        if not isinstance(client, _CLIENT_TYPES) or not client:
            return None
        host = client[0]
        if not isinstance(host, str) or not host:
            return None
        peer = self._peer(host)
        if peer is None:
            # Not an IP (Starlette's TestClient says "testclient"): the server vouches for
            # it and it is stable, so it is a key; None would silently turn limits off.
            return self._remember(host, f"ip:{host}")
        trusted, key = peer
        if not trusted:
            return self._remember(host, key)
        for text in self._hops(scope):
            hop = None if text is None else self._hop(text)
            if hop is None:
                break  # garbage: keep the last trusted proxy's address
            trusted, hop_key = hop
            if not trusted:
                return hop_key
            key = hop_key
        return key

    def _remember(self, host: str, key: str) -> str:
        known = self._peer_keys
        if len(known) >= _CACHE_SIZE:
            known.clear()  # a flood of new peers: start over rather than track their age
        known[host] = key
        return key

    def _hops(self, scope: Scope) -> Iterator[str | None]:
        """Yield the hops of the first forwarding header the request has, right to left."""
        headers: _Headers = scope.get("headers") or []
        found: dict[bytes, list[str]] = {}
        for name, value in headers:
            if name in self._header_set and value.strip(b" \t"):
                found.setdefault(name, []).append(value.decode("latin-1"))
        for wanted in self._headers:
            lines = found.get(wanted)
            if lines:
                return _forwarded_hops(lines) if wanted == b"forwarded" else _list_hops(lines)
        return iter(())

    def _classify_peer(self, host: str) -> _Hop:
        try:
            address = _normalise(ipaddress.ip_address(host))
        except ValueError:
            return None
        return self._trusted(address), self._render(address)

    def _classify_hop(self, text: str) -> _Hop:
        address = _parse_node(text)
        if address is None:
            return None
        return self._trusted(address), self._render(address)

    def _trusted(self, address: _Address) -> bool:
        if address in self._exact:
            return True
        value = int(address)
        networks = self._networks4 if address.version == 4 else self._networks6
        return any(value & mask == network for network, mask in networks)

    def _render(self, address: _Address) -> str:
        if address.version == 4:
            return f"ip:{address}"
        # Rebuilt from the integer, which also drops any %zone suffix.
        network = ipaddress.IPv6Address(int(address) & self._mask6)
        if self.ipv6_prefix == 128:
            return f"ip:{network}"
        return f"ip:{network}/{self.ipv6_prefix}"

    def __repr__(self) -> str:
        return self._repr


def by_ip(
    *,
    trusted_proxies: Iterable[str] = (),
    ipv6_prefix: int = 64,
    forwarded_headers: Iterable[str] = _FORWARDED_HEADERS,
) -> KeyFunc:
    """Key requests by the client's IP address: ``"ip:<address>"``.

    The client is the direct peer (``scope["client"]``) unless that peer is one of
    *trusted_proxies* (addresses or CIDR networks, IPv4 or IPv6). Only then are the
    forwarding headers read: the first of *forwarded_headers* that the request carries, by
    default ``X-Forwarded-For`` only. Name ``"forwarded"`` to read RFC 7239 ``Forwarded``
    (its ``for=`` parameters), e.g. ``forwarded_headers=["forwarded", "x-forwarded-for"]``;
    any other name is read as a comma-separated list, like ``X-Forwarded-For``. Several
    lines of one header are read in order. The chain is walked right to left, skipping
    trusted proxies; the first other address is the client. A hop that cannot be parsed
    (``unknown``, an obfuscated ``_name``, an element without ``for=``, garbage) stops the
    walk, and the last trusted proxy seen is used instead: nothing left of garbage is
    trusted. When every hop is a trusted proxy, the leftmost one is used. The module
    documentation explains why.

    Your proxies must write the header that is read: a header they pass through
    untouched is the client's to write. That is why ``Forwarded``, which most proxies
    pass through, is read only when you ask for it.

    IPv4-mapped IPv6 addresses (``::ffff:192.0.2.1``) count as their IPv4 address. IPv6
    clients are grouped by their first *ipv6_prefix* bits, shown as a network
    (``"ip:2001:db8:1:2::/64"``): one subscriber usually gets a whole /64, and could
    otherwise dodge its limit by hopping through its own addresses. 128 keeps the whole
    address (``"ip:2001:db8::1"``).

    When the peer is not an IP address (Starlette's ``TestClient`` says
    ``"testclient"``), that literal is the key: the server vouches for it and it is
    stable, whereas ``None`` would silently turn the limit off. When the server reports
    no peer (``client`` missing or ``None``, as on a Unix socket) the result is ``None``.

    >>> key = by_ip(trusted_proxies=["10.0.0.0/8"])
    >>> key({"client": ("10.0.0.5", 4711),
    ...      "headers": [(b"x-forwarded-for", b"198.51.100.1, 203.0.113.7, 10.0.0.9")]})
    'ip:203.0.113.7'

    Raises :class:`~resilient.ConfigurationError` (a ``ValueError``) naming any entry of
    *trusted_proxies* that is not an address or a network (a network with host bits set,
    such as ``10.0.0.1/8``, is refused as a likely typo), or for an *ipv6_prefix*
    outside 1..128.
    """
    return _ByIP(trusted_proxies, ipv6_prefix, forwarded_headers)


# --- by_header, by_user, constant --------------------------------------------------------


class _ByHeader(KeyFunc):
    __slots__ = ("_name", "_prefix", "hashed", "name")

    def __init__(self, name: str, hashed: bool) -> None:
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            msg = f"by_header needs an HTTP header name, not {name!r}"
            raise ConfigurationError(msg)
        self.name = name
        self.hashed = bool(hashed)
        self._name = name.lower().encode("ascii")
        self._prefix = f"header:{name.lower()}:"

    def __call__(self, scope: Scope) -> str | None:
        """Return ``"header:<name>:<value or digest>"``, or ``None`` without a value."""
        headers: _Headers = scope.get("headers") or []
        for name, raw in headers:
            if name == self._name:
                value = raw.strip(b" \t")
                if not value:
                    return None
                if self.hashed:
                    return self._prefix + hashlib.blake2b(value, digest_size=16).hexdigest()
                return self._prefix + value.decode("latin-1")
        return None

    def __repr__(self) -> str:
        hashed = "" if self.hashed else ", hashed=False"
        return f"by_header({self.name!r}{hashed})"


def by_header(name: str, *, hashed: bool = True) -> KeyFunc:
    """Key requests by the value of the header *name*: ``"header:<name>:<value>"``.

    The name is matched case-insensitively; the first occurrence counts, with surrounding
    spaces and tabs removed. A missing or empty header yields ``None``.

    With *hashed* (the default) the value is replaced by its 128-bit BLAKE2b digest in
    hex: such headers usually carry API keys, and secrets must not show up as Redis key
    names, in ``MONITOR`` output or in logs. Pass ``hashed=False`` for values that are
    not secret (a tenant id) to keep them readable.

    >>> key = by_header("X-Tenant", hashed=False)
    >>> key({"headers": [(b"x-tenant", b" acme ")]})
    'header:x-tenant:acme'

    Raises :class:`~resilient.ConfigurationError` if *name* is not a valid header name.
    """
    return _ByHeader(name, hashed)


_IDENTITY_ATTRIBUTES = ("identity", "id", "username", "display_name")


class _ByUser(KeyFunc):
    __slots__ = ()

    def __call__(self, scope: Scope) -> str | None:
        """Return ``"user:<identity>"``, or ``None`` without an authenticated user."""
        user = scope.get("user")
        if user is None or not getattr(user, "is_authenticated", False):
            return None
        for attribute in _IDENTITY_ATTRIBUTES:
            try:
                value = getattr(user, attribute, None)
            except NotImplementedError:  # Starlette's BaseUser leaves them abstract
                continue
            if value is not None:
                identity = str(value)
                if identity:
                    if not identity.isascii():
                        # A lone surrogate cannot be a Redis key: spelled as its escape.
                        identity = identity.encode("utf-8", "backslashreplace").decode("utf-8")
                    return f"user:{identity}"
        return None

    def __repr__(self) -> str:
        return "by_user()"


def by_user() -> KeyFunc:
    """Key requests by the authenticated user: ``"user:<identity>"``.

    The user is ``scope["user"]``, where Starlette's ``AuthenticationMiddleware`` (or any
    middleware following its convention) puts it. It counts only if its
    ``is_authenticated`` is true; its identity is the first of its ``identity``, ``id``,
    ``username`` and ``display_name`` attributes that is present and not empty. Anonymous
    requests yield ``None``, so combine it with a fallback: ``by_user() | by_ip()``.

    >>> class User:
    ...     is_authenticated = True
    ...     id = 42
    >>> by_user()({"user": User()})
    'user:42'
    """
    return _ByUser()


class _Constant(KeyFunc):
    __slots__ = ("_key", "value")

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            msg = f"constant needs a non-empty string, not {value!r}"
            raise ConfigurationError(msg)
        self.value = value
        self._key = f"const:{value}"

    def __call__(self, scope: Scope) -> str:
        """Return ``"const:<value>"``, whatever the request."""
        return self._key

    def __repr__(self) -> str:
        return f"constant({self.value!r})"


def constant(value: str) -> KeyFunc:
    """Key every request the same: ``"const:<value>"``, one limit shared by all clients.

    Use it for a global budget, such as what a fragile downstream service can take.

    >>> constant("search")({})
    'const:search'

    Raises :class:`~resilient.ConfigurationError` if *value* is not a non-empty string.
    """
    return _Constant(value)
