"""Key functions: request scopes in, keys out; proxies trusted only as far as configured."""

from __future__ import annotations

import gc
import hashlib
import ipaddress
import tracemalloc
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    BaseUser,
    SimpleUser,
)
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from resilient import ConfigurationError
from resilient._asgi import Scope
from resilient.keys import (
    FirstOf,
    KeyFunc,
    as_key_func,
    by_header,
    by_ip,
    by_user,
    constant,
)

PROXY = "10.0.0.1"
CLIENT = "203.0.113.7"


def scope(peer: str | None = CLIENT, *headers: tuple[str, str], **extra: Any) -> Scope:
    """An HTTP scope from *peer* carrying *headers* (names lowercased, as servers do)."""
    result: Scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "client": None if peer is None else (peer, 4711),
        "headers": [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers],
    }
    result.update(extra)
    return result


proxied = by_ip(
    trusted_proxies=["10.0.0.0/8", "2001:db8:ffff::/48"],
    forwarded_headers=["forwarded", "x-forwarded-for"],
)


# --- by_ip: the direct peer -------------------------------------------------------------


def test_the_direct_peer_is_the_client_without_trusted_proxies() -> None:
    assert by_ip()(scope(CLIENT)) == "ip:203.0.113.7"


@pytest.mark.parametrize(
    "client", [None, (), ("", 0), [None, 0]], ids=["none", "empty", "blank", "no-host"]
)
def test_no_peer_address_yields_no_key(client: Any) -> None:
    assert by_ip()(scope(client=client)) is None


def test_a_scope_without_client_yields_no_key() -> None:
    assert by_ip()({"type": "http", "headers": []}) is None


def test_a_peer_that_is_not_an_ip_is_the_key_as_given() -> None:
    assert by_ip()(scope("testclient")) == "ip:testclient"


def test_a_peer_that_is_not_an_ip_never_unlocks_forwarding_headers() -> None:
    key = by_ip(trusted_proxies=["0.0.0.0/0", "::/0"])
    assert key(scope("testclient", ("x-forwarded-for", CLIENT))) == "ip:testclient"


def test_spoofed_x_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    spoofed = scope(CLIENT, ("x-forwarded-for", "198.51.100.1, 10.0.0.2"))
    assert proxied(spoofed) == "ip:203.0.113.7"


def test_spoofed_forwarded_from_an_untrusted_peer_is_ignored() -> None:
    spoofed = scope(CLIENT, ("forwarded", "for=198.51.100.1"))
    assert proxied(spoofed) == "ip:203.0.113.7"


def test_a_trusted_peer_without_forwarding_headers_is_the_client() -> None:
    assert proxied(scope(PROXY)) == "ip:10.0.0.1"


def test_a_trusted_peer_has_its_forwarding_headers_read_on_every_request() -> None:
    key = by_ip(trusted_proxies=["10.0.0.0/8"])
    assert key(scope(PROXY, ("x-forwarded-for", CLIENT))) == "ip:203.0.113.7"
    assert key(scope(PROXY, ("x-forwarded-for", "198.51.100.1"))) == "ip:198.51.100.1"
    assert key(scope(PROXY)) == "ip:10.0.0.1"


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        (CLIENT, "ip:203.0.113.7"),
        ("2001:db8::1", "ip:2001:db8::/64"),
        ("testclient", "ip:testclient"),
    ],
)
def test_a_peer_seen_before_gets_the_same_key(peer: str, expected: str) -> None:
    key = by_ip()
    assert [key(scope(peer)) for _ in range(3)] == [expected] * 3
    assert key(scope(client=[peer, 4711])) == expected  # a list, as some servers give


def test_the_peers_remembered_are_bounded() -> None:
    """A flood of new peers keeps the memory a key function holds bounded: what it holds
    after 60,000 new peers is about what it held after 12,000 (each by_ip() remembers the
    latest few thousand), while every peer still gets its own key."""
    key = by_ip()

    def flood(start: int, count: int) -> int:
        for i in range(start, start + count):
            host = str(ipaddress.IPv4Address(0x0A000000 + i))
            assert key(scope(host)) == f"ip:{host}"
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        after_some = flood(0, 12_000) - before
        after_many = flood(12_000, 48_000) - before
    finally:
        tracemalloc.stop()
    assert after_some > 0
    assert after_many < 1.5 * after_some
    assert key(scope("10.0.0.0")) == "ip:10.0.0.0"


# --- by_ip: walking the chain -------------------------------------------------------------


def test_the_rightmost_untrusted_hop_is_the_client() -> None:
    request = scope(PROXY, ("x-forwarded-for", f"198.51.100.1, {CLIENT}"))
    assert proxied(request) == "ip:203.0.113.7"


def test_a_chain_of_trusted_proxies_is_skipped() -> None:
    request = scope(PROXY, ("x-forwarded-for", f"198.51.100.1, {CLIENT}, 10.1.1.1, 10.2.2.2"))
    assert proxied(request) == "ip:203.0.113.7"


def test_when_every_hop_is_trusted_the_leftmost_is_the_client() -> None:
    request = scope(PROXY, ("x-forwarded-for", "10.3.3.3, 10.2.2.2"))
    assert proxied(request) == "ip:10.3.3.3"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-forwarded-for", f"{CLIENT}, not-an-ip, 10.2.2.2"),
        ("x-forwarded-for", f"{CLIENT}, unknown, 10.2.2.2"),
        ("forwarded", f"for={CLIENT}, for=unknown, for=10.2.2.2"),
        ("forwarded", f"for={CLIENT}, for=_hidden, for=10.2.2.2"),
        ("forwarded", f"for={CLIENT}, for=_hidden:_port, for=10.2.2.2"),
        ("forwarded", f"for={CLIENT}, proto=https, for=10.2.2.2"),
        ("forwarded", f"for={CLIENT}, for=1.2.3.4;for=5.6.7.8, for=10.2.2.2"),
        ("forwarded", f'for={CLIENT}, for="1.2.3.4" junk, for=10.2.2.2'),
        ("forwarded", f"for={CLIENT}, for=1.2.3.4:http, for=10.2.2.2"),
    ],
    ids=[
        "xff-garbage",
        "xff-unknown",
        "unknown",
        "obfuscated",
        "obfuscated-port",
        "no-for",
        "two-fors",
        "junk-after-quote",
        "bad-port",
    ],
)
def test_a_garbage_hop_stops_the_walk_at_the_last_trusted_proxy(name: str, value: str) -> None:
    assert proxied(scope(PROXY, (name, value))) == "ip:10.2.2.2"


def test_a_garbage_hop_next_to_the_peer_leaves_the_peer_as_the_client() -> None:
    assert proxied(scope(PROXY, ("x-forwarded-for", f"{CLIENT}, garbage"))) == "ip:10.0.0.1"


def test_garbage_left_of_the_client_does_not_matter() -> None:
    request = scope(PROXY, ("forwarded", f'for=unknown;x="a,b", for={CLIENT}, for=10.2.2.2'))
    assert proxied(request) == "ip:203.0.113.7"


def test_an_unterminated_quote_makes_the_rest_of_its_line_garbage() -> None:
    request = scope(PROXY, ("forwarded", f'for="198.51.100.1, for={CLIENT}'))
    assert proxied(request) == "ip:10.0.0.1"


def test_an_unterminated_quote_does_not_reach_into_the_next_line() -> None:
    request = scope(PROXY, ("forwarded", 'for="198.51.100.1'), ("forwarded", f"for={CLIENT}"))
    assert proxied(request) == "ip:203.0.113.7"


def test_forwarded_wins_over_x_forwarded_for() -> None:
    request = scope(PROXY, ("x-forwarded-for", "198.51.100.1"), ("forwarded", f"for={CLIENT}"))
    assert proxied(request) == "ip:203.0.113.7"


def test_a_blank_forwarded_header_falls_back_to_x_forwarded_for() -> None:
    request = scope(PROXY, ("forwarded", " "), ("x-forwarded-for", CLIENT))
    assert proxied(request) == "ip:203.0.113.7"


def test_x_forwarded_for_lines_are_read_in_order() -> None:
    request = scope(
        PROXY,
        ("x-forwarded-for", f"198.51.100.1, {CLIENT}"),
        ("x-forwarded-for", "10.2.2.2"),
    )
    assert proxied(request) == "ip:203.0.113.7"


def test_forwarded_lines_and_elements_are_read_in_order() -> None:
    request = scope(
        PROXY,
        ("forwarded", "for=198.51.100.1"),
        ("forwarded", f"for={CLIENT};proto=https, for=10.2.2.2"),
        ("forwarded", "for=10.3.3.3"),
    )
    assert proxied(request) == "ip:203.0.113.7"


def test_forwarded_quoted_ipv6_with_a_port() -> None:
    request = scope(PROXY, ("forwarded", 'for="[2001:db8:cafe::17]:4711"'))
    assert proxied(request) == "ip:2001:db8:cafe::/64"


def test_forwarded_quoted_ipv6_without_a_port() -> None:
    request = scope(PROXY, ("forwarded", 'for="[2001:db8:cafe::17]"'))
    assert proxied(request) == "ip:2001:db8:cafe::/64"


def test_forwarded_ipv4_with_a_port() -> None:
    request = scope(PROXY, ("forwarded", f'for="{CLIENT}:4711", for={CLIENT}:80'))
    assert proxied(request) == "ip:203.0.113.7"


def test_forwarded_parameter_names_are_case_insensitive() -> None:
    request = scope(PROXY, ("forwarded", f"proto=https;For={CLIENT};BY=10.0.0.1"))
    assert proxied(request) == "ip:203.0.113.7"


def test_forwarded_quoted_values_may_hold_commas_and_escapes() -> None:
    request = scope(PROXY, ("forwarded", f'host="a,b\\"c";for="{CLIENT}"'))
    assert proxied(request) == "ip:203.0.113.7"


def test_forwarded_tolerates_spaces_around_pairs() -> None:
    request = scope(PROXY, ("forwarded", f"for = {CLIENT} ; proto=https ,for=10.2.2.2"))
    assert proxied(request) == "ip:203.0.113.7"


def test_x_forwarded_for_accepts_ports_and_bracketed_ipv6() -> None:
    assert proxied(scope(PROXY, ("x-forwarded-for", f"{CLIENT}:5555"))) == "ip:203.0.113.7"
    bracketed = scope(PROXY, ("x-forwarded-for", "[2001:db8::1]:5555"))
    assert proxied(bracketed) == "ip:2001:db8::/64"


def test_empty_list_elements_are_ignored() -> None:
    assert proxied(scope(PROXY, ("x-forwarded-for", f"{CLIENT},, 10.2.2.2,"))) == ("ip:203.0.113.7")
    assert proxied(scope(PROXY, ("forwarded", f"for={CLIENT},,for=10.2.2.2,"))) == (
        "ip:203.0.113.7"
    )


def test_trusted_ipv6_proxies_are_skipped() -> None:
    request = scope("2001:db8:ffff::1", ("forwarded", f'for={CLIENT}, for="[2001:db8:ffff::2]"'))
    assert proxied(request) == "ip:203.0.113.7"


def test_forwarded_headers_can_restrict_which_header_is_read() -> None:
    key = by_ip(trusted_proxies=["10.0.0.0/8"], forwarded_headers=["X-Forwarded-For"])
    request = scope(PROXY, ("forwarded", "for=198.51.100.1"), ("x-forwarded-for", CLIENT))
    assert key(request) == "ip:203.0.113.7"


def test_forwarded_headers_may_name_another_list_header() -> None:
    key = by_ip(trusted_proxies=["10.0.0.0/8"], forwarded_headers="x-real-ip")
    assert key(scope(PROXY, ("x-real-ip", CLIENT))) == "ip:203.0.113.7"


def test_by_default_a_clients_own_forwarded_header_is_not_read() -> None:
    # Proxies that append to X-Forwarded-For pass Forwarded through: it is the client's.
    key = by_ip(trusted_proxies=["10.0.0.0/8"])
    request = scope(PROXY, ("forwarded", "for=198.51.100.1"), ("x-forwarded-for", CLIENT))
    assert key(request) == "ip:203.0.113.7"
    assert key(scope(PROXY, ("forwarded", "for=198.51.100.1"))) == "ip:10.0.0.1"


def test_no_forwarded_headers_means_the_peer_is_always_the_client() -> None:
    key = by_ip(trusted_proxies=["10.0.0.0/8"], forwarded_headers=())
    assert key(scope(PROXY, ("x-forwarded-for", CLIENT))) == "ip:10.0.0.1"


@pytest.mark.parametrize("name", ["", "x forwarded", "x:forwarded", 3])
def test_forwarded_headers_entries_must_be_header_names(name: Any) -> None:
    with pytest.raises(ConfigurationError, match="forwarded_headers"):
        by_ip(forwarded_headers=[name])


# --- by_ip: address forms -----------------------------------------------------------------


def test_ipv6_clients_are_grouped_by_their_64() -> None:
    assert by_ip()(scope("2001:db8:1:2:aaaa::1")) == "ip:2001:db8:1:2::/64"
    assert by_ip()(scope("2001:db8:1:2:bbbb::9")) == "ip:2001:db8:1:2::/64"


def test_ipv6_prefix_128_keeps_the_whole_address() -> None:
    assert by_ip(ipv6_prefix=128)(scope("2001:db8:1:2::1")) == "ip:2001:db8:1:2::1"


def test_ipv6_prefix_sets_the_group_size() -> None:
    assert by_ip(ipv6_prefix=48)(scope("2001:db8:1:2::1")) == "ip:2001:db8:1::/48"


def test_ipv6_zone_ids_do_not_split_a_client() -> None:
    assert by_ip(ipv6_prefix=128)(scope("fe80::1%eth0")) == "ip:fe80::1"


def test_ipv4_addresses_are_never_masked() -> None:
    assert by_ip(ipv6_prefix=8)(scope(CLIENT)) == "ip:203.0.113.7"


def test_ipv4_mapped_peers_count_as_ipv4() -> None:
    assert by_ip()(scope("::ffff:203.0.113.7")) == "ip:203.0.113.7"


def test_ipv4_mapped_hops_count_as_ipv4() -> None:
    assert proxied(scope(PROXY, ("x-forwarded-for", "::ffff:203.0.113.7"))) == "ip:203.0.113.7"


def test_an_ipv4_mapped_peer_matches_an_ipv4_trusted_proxy() -> None:
    assert proxied(scope("::ffff:10.0.0.1", ("x-forwarded-for", CLIENT))) == "ip:203.0.113.7"


def test_an_ipv4_mapped_trusted_proxy_matches_an_ipv4_peer() -> None:
    key = by_ip(trusted_proxies=["::ffff:10.0.0.0/104"])
    assert key(scope(PROXY, ("x-forwarded-for", CLIENT))) == "ip:203.0.113.7"


def test_trusted_proxies_may_be_single_addresses() -> None:
    key = by_ip(trusted_proxies=["10.0.0.1", "2001:db8::1"])
    assert key(scope(PROXY, ("x-forwarded-for", CLIENT))) == "ip:203.0.113.7"
    assert key(scope("2001:db8::1", ("x-forwarded-for", CLIENT))) == "ip:203.0.113.7"
    assert key(scope("10.0.0.2", ("x-forwarded-for", CLIENT))) == "ip:10.0.0.2"


def test_a_single_string_of_trusted_proxies_is_one_entry() -> None:
    key = by_ip(trusted_proxies="10.0.0.0/8")
    assert key(scope(PROXY, ("x-forwarded-for", CLIENT))) == "ip:203.0.113.7"


@pytest.mark.parametrize(
    "entry", ["10.0.0.256", "proxy.internal", "10.0.0.1/8", "2001:db8::/129", "", "10.0.0.0/"]
)
def test_invalid_trusted_proxies_entries_are_refused_by_name(entry: str) -> None:
    with pytest.raises(ValueError, match="trusted_proxies entry") as error:
        by_ip(trusted_proxies=["10.0.0.0/8", entry])
    assert repr(entry) in str(error.value)


def test_non_string_trusted_proxies_entries_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="strings"):
        by_ip(trusted_proxies=[167772161])  # type: ignore[list-item]


@pytest.mark.parametrize("prefix", [0, 129, -64, True, 64.0, "64"])
def test_ipv6_prefix_out_of_range_is_refused(prefix: Any) -> None:
    with pytest.raises(ValueError, match="ipv6_prefix"):
        by_ip(ipv6_prefix=prefix)


def test_by_ip_reads_like_its_construction() -> None:
    assert repr(by_ip()) == "by_ip()"
    key = by_ip(
        trusted_proxies=["10.0.0.0/8", "::1"],
        ipv6_prefix=56,
        forwarded_headers=["forwarded", "x-forwarded-for"],
    )
    assert repr(key) == (
        "by_ip(trusted_proxies=['10.0.0.0/8', '::1/128'], ipv6_prefix=56, "
        "forwarded_headers=['forwarded', 'x-forwarded-for'])"
    )


def test_repeated_requests_get_the_same_key() -> None:
    request = scope(PROXY, ("x-forwarded-for", f"2001:db8::5, {CLIENT}"))
    assert {proxied(request) for _ in range(3)} == {"ip:203.0.113.7"}


# --- by_ip: properties --------------------------------------------------------------------

HEADER_NAMES = [b"forwarded", b"x-forwarded-for", b"x-real-ip", b"host"]
# Characters that matter to the parsers, so that random values hit their corner cases.
JUNK = st.text(
    alphabet=st.sampled_from(list('for=FOR;,"\\[]:_ \t.0123456789abcdef/unknown%')),
    max_size=60,
)
# Chains of real addresses, in both headers' syntaxes, mixed with junk.
hops = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses().map(lambda a: f"for={a}" if a.version == 4 else f'for="[{a}]:80"'),
    st.sampled_from([PROXY, "for=10.0.0.2", "unknown", "for=_hidden"]),
    JUNK,
)
chains = st.lists(hops, max_size=5).map(", ".join)
header_values = st.one_of(st.binary(max_size=80), JUNK, chains).map(
    lambda v: v if isinstance(v, bytes) else v.encode("latin-1")
)
header_lists = st.lists(st.tuples(st.sampled_from(HEADER_NAMES), header_values), max_size=6)
peers = st.one_of(
    st.none(),
    st.ip_addresses().map(str),
    st.sampled_from([PROXY, "10.9.9.9", "2001:db8:ffff::1", "::ffff:10.0.0.1", "testclient"]),
    st.text(max_size=20),
)
TRUSTED = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:ffff::/48")]


def is_trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in TRUSTED)


# Clients: any address that is not one of `proxied`'s trusted proxies.
clients = st.ip_addresses().filter(lambda address: not is_trusted(address))


def untrusted(peer: str) -> bool:
    try:
        return not is_trusted(ipaddress.ip_address(peer))
    except ValueError:
        return True


untrusted_peers = st.one_of(
    clients.map(str),
    st.sampled_from(["testclient", "", "unix:/run/app.sock", "::ffff:203.0.113.7"]),
    st.text(max_size=20).filter(untrusted),
)


@given(peer=peers, headers=header_lists)
def test_by_ip_never_raises_and_returns_an_ip_key_or_none(
    peer: str | None, headers: list[tuple[bytes, bytes]]
) -> None:
    for key in (by_ip(), proxied, by_ip(trusted_proxies=["0.0.0.0/0", "::/0"])):
        result = key({"type": "http", "client": (peer, 1), "headers": headers})
        assert result is None or result.startswith("ip:")


@given(peer=untrusted_peers, headers=header_lists)
def test_headers_never_change_the_key_of_an_untrusted_peer(
    peer: str, headers: list[tuple[bytes, bytes]]
) -> None:
    with_headers = proxied({"type": "http", "client": (peer, 1), "headers": headers})
    assert with_headers == proxied({"type": "http", "client": (peer, 1), "headers": []})


def forwarded_node(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return f"for={address}" if address.version == 4 else f'for="[{address}]"'


@given(client=clients, junk=JUNK)
def test_a_client_cannot_choose_its_key_through_x_forwarded_for(
    client: ipaddress.IPv4Address | ipaddress.IPv6Address, junk: str
) -> None:
    # The trusted proxy appends the address it saw to whatever the client sent.
    request = scope(PROXY, ("x-forwarded-for", f"{junk}, {client}"))
    assert proxied(request) == by_ip()(scope(str(client)))


@given(client=clients, junk=JUNK)
def test_a_client_cannot_choose_its_key_through_forwarded(
    client: ipaddress.IPv4Address | ipaddress.IPv6Address, junk: str
) -> None:
    # Junk on the same line can at worst make the proxy's element unreadable: the key is
    # then the proxy's, never an address of the client's choosing.
    same_line = scope(PROXY, ("forwarded", f"{junk}, {forwarded_node(client)}"))
    assert proxied(same_line) in {by_ip()(scope(str(client))), "ip:10.0.0.1"}
    new_line = scope(PROXY, ("forwarded", junk), ("forwarded", forwarded_node(client)))
    assert proxied(new_line) == by_ip()(scope(str(client)))


# --- by_header ----------------------------------------------------------------------------


def test_by_header_hashes_the_value_by_default() -> None:
    digest = hashlib.blake2b(b"secret-key", digest_size=16).hexdigest()
    key = by_header("X-API-Key")
    assert key(scope(CLIENT, ("x-api-key", "secret-key"))) == f"header:x-api-key:{digest}"


def test_by_header_never_shows_the_secret() -> None:
    result = by_header("X-API-Key")(scope(CLIENT, ("x-api-key", "secret-key")))
    assert result is not None
    assert "secret" not in result


def test_by_header_keeps_the_value_when_not_hashed() -> None:
    key = by_header("X-Tenant", hashed=False)
    assert key(scope(CLIENT, ("x-tenant", "acme"))) == "header:x-tenant:acme"


def test_by_header_matches_the_name_case_insensitively() -> None:
    key = by_header("x-TENANT", hashed=False)
    assert key(scope(CLIENT, ("X-Tenant", "acme"))) == "header:x-tenant:acme"


def test_by_header_uses_the_first_occurrence() -> None:
    request = scope(CLIENT, ("x-tenant", "acme"), ("x-tenant", "other"))
    assert by_header("X-Tenant", hashed=False)(request) == "header:x-tenant:acme"


def test_by_header_strips_surrounding_whitespace() -> None:
    raw = by_header("X-Tenant", hashed=False)
    assert raw(scope(CLIENT, ("x-tenant", " \tacme "))) == "header:x-tenant:acme"
    hashed = by_header("X-Tenant")
    assert hashed(scope(CLIENT, ("x-tenant", " acme"))) == hashed(
        scope(CLIENT, ("x-tenant", "acme"))
    )


def test_by_header_decodes_values_as_latin_1() -> None:
    key = by_header("X-Tenant", hashed=False)
    request = scope(CLIENT)
    request["headers"] = [(b"x-tenant", b"caf\xe9")]
    assert key(request) == "header:x-tenant:café"


@pytest.mark.parametrize(
    "headers", [[], [("x-other", "v")], [("x-tenant", "")], [("x-tenant", "  ")]]
)
def test_by_header_without_a_value_yields_no_key(headers: list[tuple[str, str]]) -> None:
    assert by_header("X-Tenant")(scope(CLIENT, *headers)) is None


@pytest.mark.parametrize("name", ["", "X API Key", "x-api-key:", "clé", None])
def test_by_header_needs_a_header_name(name: Any) -> None:
    with pytest.raises(ValueError, match="header name"):
        by_header(name)


def test_by_header_reads_like_its_construction() -> None:
    assert repr(by_header("X-API-Key")) == "by_header('X-API-Key')"
    assert repr(by_header("X-Tenant", hashed=False)) == "by_header('X-Tenant', hashed=False)"


# --- by_user ------------------------------------------------------------------------------


class User:
    def __init__(self, authenticated: bool = True, **attributes: object) -> None:
        self.is_authenticated = authenticated
        for name, value in attributes.items():
            setattr(self, name, value)


@pytest.mark.parametrize("attribute", ["identity", "id", "username", "display_name"])
def test_by_user_keys_by_each_identity_attribute(attribute: str) -> None:
    user = User()
    setattr(user, attribute, "alice")
    assert by_user()(scope(user=user)) == "user:alice"


def test_by_user_prefers_identity_then_id_then_username_then_display_name() -> None:
    user = User(display_name="Alice A.", username="alice", id=42, identity="u-1")
    assert by_user()(scope(user=user)) == "user:u-1"
    assert by_user()(scope(user=User(display_name="Alice A.", username="alice", id=42))) == (
        "user:42"
    )
    assert by_user()(scope(user=User(display_name="Alice A.", username="alice"))) == ("user:alice")


def test_by_user_skips_empty_identity_attributes() -> None:
    assert by_user()(scope(user=User(identity="", id=None, username="alice"))) == "user:alice"


def test_by_user_ignores_an_unauthenticated_user() -> None:
    assert by_user()(scope(user=User(authenticated=False, identity="alice"))) is None


def test_by_user_without_a_user_yields_no_key() -> None:
    assert by_user()(scope()) is None


def test_by_user_without_any_identity_yields_no_key() -> None:
    assert by_user()(scope(user=User())) is None


def test_by_user_reads_starlette_users() -> None:
    assert by_user()(scope(user=SimpleUser("alice"))) == "user:alice"


def test_by_user_skips_identities_a_user_class_leaves_unimplemented() -> None:
    class Partial(BaseUser):
        is_authenticated = True
        id = 7

    assert by_user()(scope(user=Partial())) == "user:7"


def test_by_user_reads_like_its_construction() -> None:
    assert repr(by_user()) == "by_user()"


# --- constant -----------------------------------------------------------------------------


def test_constant_gives_every_request_the_same_key() -> None:
    key = constant("search")
    assert key(scope(CLIENT)) == key(scope("198.51.100.1")) == "const:search"
    assert key({}) == "const:search"


@pytest.mark.parametrize("value", ["", None, 3])
def test_constant_needs_a_non_empty_string(value: Any) -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        constant(value)


def test_constant_reads_like_its_construction() -> None:
    assert repr(constant("search")) == "constant('search')"


# --- composition --------------------------------------------------------------------------


def test_or_falls_back_when_the_first_yields_no_key() -> None:
    key = by_user() | by_ip()
    assert key(scope(CLIENT)) == "ip:203.0.113.7"


def test_or_uses_the_first_key_found() -> None:
    key = by_user() | by_ip()
    assert key(scope(CLIENT, user=User(id=42))) == "user:42"


def test_or_yields_no_key_when_none_does() -> None:
    assert (by_user() | by_header("X-API-Key"))(scope(CLIENT)) is None


def test_or_accepts_a_plain_callable_on_the_right() -> None:
    key = by_user() | (lambda s: "tenant:acme")
    assert key(scope(CLIENT)) == "tenant:acme"


def test_or_accepts_a_plain_callable_on_the_left() -> None:
    def tenant(s: Scope) -> str | None:
        return None

    key = tenant | by_ip()
    assert key(scope(CLIENT)) == "ip:203.0.113.7"
    assert repr(key) == "test_or_accepts_a_plain_callable_on_the_left.<locals>.tenant | by_ip()"


def test_or_refuses_what_is_not_callable() -> None:
    with pytest.raises(TypeError):
        by_ip() | "ip"  # type: ignore[operator]


def test_or_flattens_nested_combinations() -> None:
    a, b, c = by_user(), by_header("X-API-Key"), by_ip()
    left = (a | b) | c
    right = a | (b | c)
    assert isinstance(left, FirstOf)
    assert isinstance(right, FirstOf)
    assert left.funcs == right.funcs == (a, b, c)


def test_combinations_read_like_their_construction() -> None:
    key = by_user() | by_header("X-API-Key") | by_ip(trusted_proxies=["10.0.0.0/8"])
    assert repr(key) == "by_user() | by_header('X-API-Key') | by_ip(trusted_proxies=['10.0.0.0/8'])"


def test_first_of_builds_the_same_fallback() -> None:
    key = FirstOf(by_user(), lambda s: None, by_ip())
    assert key(scope(CLIENT)) == "ip:203.0.113.7"
    assert repr(FirstOf(by_ip())) == "FirstOf(by_ip())"


def test_first_of_needs_a_key_function() -> None:
    with pytest.raises(ValueError, match="at least one"):
        FirstOf()


def test_as_key_func_returns_key_functions_unchanged() -> None:
    key = by_ip()
    assert as_key_func(key) is key


def test_as_key_func_wraps_a_plain_callable() -> None:
    key = as_key_func(lambda s: s["path"])
    assert isinstance(key, KeyFunc)
    assert key(scope(CLIENT)) == "/"


def test_as_key_func_refuses_what_is_not_callable() -> None:
    with pytest.raises(ValueError, match="callable"):
        as_key_func("ip")  # type: ignore[arg-type]


def test_a_wrapped_callable_must_return_a_string_or_none() -> None:
    key = as_key_func(lambda s: 42)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="must return a str or None"):
        key(scope(CLIENT))


def test_key_func_can_be_subclassed() -> None:
    class ByPath(KeyFunc):
        def __call__(self, scope: Scope) -> str | None:
            return f"path:{scope['path']}"

    assert (by_user() | ByPath())(scope(CLIENT)) == "path:/"


# --- on real scopes -----------------------------------------------------------------------


class HeaderAuth(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        name = conn.headers.get("x-user")
        return None if name is None else (AuthCredentials(["authenticated"]), SimpleUser(name))


async def show_keys(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "ip": proxied(request.scope),
            "user": (by_user() | by_ip())(request.scope),
            "api": by_header("X-API-Key", hashed=False)(request.scope),
        }
    )


app = Starlette(
    routes=[Route("/keys", show_keys)],
    middleware=[Middleware(AuthenticationMiddleware, backend=HeaderAuth())],
)


async def keys_seen(client: tuple[str, int], headers: dict[str, str]) -> Any:
    transport = httpx.ASGITransport(app=app, client=client)
    async with httpx.AsyncClient(transport=transport, base_url="http://example") as http:
        response = await http.get("/keys", headers=headers)
    return response.json()


async def test_keys_on_a_request_through_a_trusted_proxy() -> None:
    headers = {"x-forwarded-for": f"198.51.100.1, {CLIENT}", "x-api-key": "k1", "x-user": "ann"}
    assert await keys_seen((PROXY, 1234), headers) == {
        "ip": "ip:203.0.113.7",
        "user": "user:ann",
        "api": "header:x-api-key:k1",
    }


async def test_keys_on_an_anonymous_request_from_an_untrusted_peer() -> None:
    headers = {"forwarded": "for=198.51.100.1"}
    assert await keys_seen((CLIENT, 1234), headers) == {
        "ip": "ip:203.0.113.7",
        "user": "ip:203.0.113.7",
        "api": None,
    }


async def test_keys_on_a_test_client_peer() -> None:
    assert (await keys_seen(("testclient", 50000), {}))["ip"] == "ip:testclient"
