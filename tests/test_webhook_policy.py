"""webhook_policy: which URLs and addresses a webhook may reach (pure functions, no network)."""

from __future__ import annotations

import ipaddress

import pytest

from ddim_inversion import webhook_policy
from ddim_inversion.webhook_policy import WebhookRefused

REFUSED = {
    # IPv4
    "127.0.0.1": "loopback",
    "127.255.0.9": "loopback",
    "10.1.2.3": "private",
    "172.16.0.1": "private",
    "172.31.255.254": "private",
    "192.168.1.1": "private",
    "169.254.169.254": "link-local",  # cloud metadata
    "169.254.0.1": "link-local",
    "100.64.0.1": "shared",
    "100.127.255.254": "shared",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "0.0.0.0": "unspecified",
    "0.1.2.3": "private",  # "this network"
    "240.0.0.1": "private",  # reserved for future use
    "255.255.255.255": "private",  # broadcast
    "192.0.0.8": "IETF protocol assignment",
    "192.0.2.1": "private",  # documentation
    "198.51.100.7": "private",
    "203.0.113.5": "private",
    "198.18.0.1": "private",  # benchmarking
    # IPv6
    "::1": "loopback",
    "::": "unspecified",
    "fe80::1": "link-local",
    "fe80::1%eth0": "link-local",
    "fc00::1": "private",
    "fd12:3456::1": "private",
    "ff02::1": "multicast",
    "ff0e::1": "multicast",
    "fec0::1": "site-local",
    "2001:db8::1": "private",  # documentation
    "100::1": "private",  # discard-only
    "::7f00:1": "reserved",  # IPv4-compatible 127.0.0.1
    # IPv6 carrying IPv4
    "::ffff:127.0.0.1": "IPv4-mapped",
    "::ffff:169.254.169.254": "IPv4-mapped",
    "::ffff:8.8.8.8": "IPv4-mapped",  # mapped addresses never name a real IPv6 receiver
    "2001::1": "Teredo",
    "2002:7f00:1::": "embedding 127.0.0.1, a loopback",  # 6to4
    "2002:a00:1::1": "embedding 10.0.0.1, a private",
    "64:ff9b::7f00:1": "embedding 127.0.0.1, a loopback",  # NAT64
    "64:ff9b::a9fe:a9fe": "embedding 169.254.169.254, a link-local",
    "64:ff9b:1::a00:1": "local-use NAT64",
}

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "100.63.255.255",  # just below the shared space
    "100.128.0.0",  # just above it
    "172.15.255.255",
    "172.32.0.0",
    "2606:4700::1111",
    "2001:4860:4860::8888",
    "2002:808:808::1",  # 6to4 of a public address
    "64:ff9b::808:808",  # NAT64 of a public address (DNS64 networks)
]


@pytest.mark.parametrize(("text", "reason"), sorted(REFUSED.items()))
def test_inside_addresses_are_refused_with_their_class(text, reason):
    address = ipaddress.ip_address(text)
    assert reason in (webhook_policy.refusal(address) or "")
    with pytest.raises(WebhookRefused, match=reason):
        webhook_policy.check_address(address, allow_private=False)
    webhook_policy.check_address(address, allow_private=True)


@pytest.mark.parametrize("text", PUBLIC)
def test_public_addresses_pass(text):
    address = ipaddress.ip_address(text)
    assert webhook_policy.refusal(address) is None
    webhook_policy.check_address(address, allow_private=False)


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("::ffff:a9fe:a9fe", "::ffff:169.254.169.254"),
        ("example.com", None),
        ("1e100.net", None),
        ("10.0.0.1.example.com", None),
    ],
)
def test_literal_hosts_in_every_form_resolvers_accept(host, address):
    found = webhook_policy.literal(host)
    assert found == (None if address is None else ipaddress.ip_address(address))


def test_parse_splits_a_url_and_applies_scheme_and_port():
    target = webhook_policy.parse("https://Hooks.Example.com/a/b?x=1#frag")
    assert (target.scheme, target.host, target.port, target.path) == (
        "https",
        "hooks.example.com",
        443,
        "/a/b?x=1",
    )
    assert webhook_policy.parse("http://[::1]/").host == "::1"
    assert webhook_policy.parse("http://h.example").path == "/"
    assert webhook_policy.parse("http://h.example:8080/", ports=(8080,)).port == 8080
    for url, reason in [
        ("http://h.example:8080/", "port 8080 is not allowed; allowed: 80, 443"),
        ("https://h.example:22/", "port 22"),
        ("http://h.example:443/", None),  # any allowed port, whatever the scheme
        ("ftp://h.example/", "must be an http or https URL"),
        ("file:///etc/passwd", "must be an http or https URL"),
        ("http:///path", "has no host"),
        ("http://user:pw@h.example/", "user name or password"),
        ("http://h.example:99999/", "not a valid URL"),
        ("http://[::1/", "not a valid URL"),
        ("http://h.example/" + "a" * webhook_policy.MAX_URL_CHARS, "longer than"),
    ]:
        if reason is None:
            webhook_policy.parse(url)
            continue
        with pytest.raises(WebhookRefused, match=reason.replace("?", r"\?")):
            webhook_policy.parse(url)


def test_host_allow_list():
    allowed = ("hooks.example.com", "*.example.org")
    assert webhook_policy.host_allowed("hooks.example.com", allowed)
    assert webhook_policy.host_allowed("a.b.example.org", allowed)
    for host in ("example.org", "evil.com", "hooks.example.com.evil.com", "xexample.org"):
        assert not webhook_policy.host_allowed(host, allowed)


def test_submission_check_refuses_inside_ip_literals_and_other_ports():
    allowed = ("hooks.example.com", "127.0.0.1", "169.254.169.254", "2130706433", "::1")
    check = webhook_policy.check_submission
    assert check("https://hooks.example.com/x", allowed).host == "hooks.example.com"
    for url, reason in [
        ("http://127.0.0.1/x", "loopback"),
        ("http://2130706433/x", "127.0.0.1 is a loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]/x", "loopback"),
        ("https://hooks.example.com:8443/x", "port 8443"),
        ("https://other.example.com/x", "not among the allowed webhook hosts"),
    ]:
        with pytest.raises(WebhookRefused, match=reason):
            check(url, allowed)
    # Explicitly allowed: private targets (tests, closed networks) and listed ports.
    assert check("http://127.0.0.1:8080/x", allowed, ports=(8080,), allow_private=True)
    with pytest.raises(WebhookRefused, match="not enabled"):
        check("https://hooks.example.com/x", ())


def test_resolve_checks_every_address_the_name_has(monkeypatch):
    answers = {"hooks.example.com": ["93.184.216.34", "2606:4700::1111", "93.184.216.34"]}
    monkeypatch.setattr(webhook_policy, "resolver", lambda host, port: answers[host])
    target = webhook_policy.parse("https://hooks.example.com/x")
    assert webhook_policy.resolve(target, allow_private=False) == [
        ipaddress.ip_address("93.184.216.34"),
        ipaddress.ip_address("2606:4700::1111"),
    ]
    # One inside address among public ones refuses the name: no "whichever answers first".
    answers["hooks.example.com"].append("10.0.0.5")
    with pytest.raises(WebhookRefused, match=r"10\.0\.0\.5 is a private address"):
        webhook_policy.resolve(target, allow_private=False)
    assert len(webhook_policy.resolve(target, allow_private=True)) == 3


def test_ports_setting_parsing():
    assert webhook_policy.parse_ports("80, 443,8080") == (80, 443, 8080)
    assert webhook_policy.parse_ports("[8080]") == (8080,)
    assert webhook_policy.parse_ports([443]) == (443,)
    with pytest.raises(ValueError, match=r"1\.\.65535"):
        webhook_policy.parse_ports("0,80")
