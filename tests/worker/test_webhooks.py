"""The worker's webhook sender against real local receivers, with names resolved by a hook.

`webhook_policy.resolver` stands in for DNS: a test makes an allowed name answer 127.0.0.1,
as a rebound or hostile record would. Names end in `.test`, which real DNS never resolves,
so a delivery that looked the name up again instead of using the checked address fails.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Iterator

import pytest

from ddim_inversion import webhook_policy
from tests.conftest import EVENT_GUARD_S, wait_for
from tests.webhook_receivers import DripReceiver, Receiver, self_signed
from worker.settings import WorkerSettings
from worker.webhooks import WebhookSender


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Host name -> the addresses the resolver hook answers; every lookup is counted."""
    answers: dict[str, list[str]] = {}

    def resolve(host: str, port: int) -> list[str]:
        answers.setdefault("lookups", []).append(host)
        return answers[host]

    monkeypatch.setattr(webhook_policy, "resolver", resolve)
    return answers


@pytest.fixture
def closing() -> Iterator[Callable[..., object]]:
    made: list[object] = []

    def keep(thing: object) -> object:
        made.append(thing)
        return thing

    yield keep
    for thing in made:
        thing.close()  # type: ignore[attr-defined]


def sender(**options: object) -> WebhookSender:
    return WebhookSender("s3cret", attempts=2, backoff_s=0.01, timeout_s=10, **options)


def test_a_name_that_resolves_inside_is_refused_unless_private_targets_are_allowed(
    lookups, closing
):
    receiver = closing(Receiver())
    lookups["hooks.example.test"] = ["127.0.0.1"]
    url = f"http://hooks.example.test:{receiver.port}/hook?k=1"

    refusing = sender(ports=(receiver.port,))
    refusing.send(url, "job-1", {"id": "job-1"})
    assert refusing.flush(EVENT_GUARD_S)
    assert (refusing.delivered, refusing.dropped, receiver.calls) == (0, 1, [])
    assert lookups["lookups"] == ["hooks.example.test"], "refused at once: not retried"

    allowing = sender(ports=(receiver.port,), allow_private=True)
    allowing.send(url, "job-2", {"id": "job-2"})
    assert allowing.flush(EVENT_GUARD_S)
    assert (allowing.delivered, allowing.dropped) == (1, 0)
    (headers, body), *_ = receiver.calls
    # Connected to the checked address, yet asked for the URL's own host and path.
    assert headers["host"] == f"hooks.example.test:{receiver.port}"
    assert json.loads(body) == {"id": "job-2"} and headers["x-inversion-job"] == "job-2"
    assert lookups["lookups"].count("hooks.example.test") == 2, "one lookup per attempt"


def test_one_inside_address_among_public_ones_refuses_the_name(lookups, closing):
    receiver = closing(Receiver())
    lookups["mixed.example.test"] = ["93.184.216.34", "127.0.0.1"]
    webhooks = sender(ports=(receiver.port,))
    webhooks.send(f"http://mixed.example.test:{receiver.port}/", "job-1", {})
    assert webhooks.flush(EVENT_GUARD_S)
    assert (webhooks.delivered, webhooks.dropped, receiver.calls) == (0, 1, [])


def test_ports_are_checked_at_delivery(lookups, closing):
    """The worker's own list decides, whatever the gateway accepted (or Redis holds)."""
    receiver = closing(Receiver())
    webhooks = sender(allow_private=True)  # ports 80 and 443 only
    webhooks.send(receiver.url, "job-1", {})
    assert webhooks.flush(EVENT_GUARD_S)
    assert (webhooks.delivered, webhooks.dropped, receiver.calls) == (0, 1, [])
    assert "lookups" not in lookups, "refused before any lookup or connection"

    for url in ("ftp://127.0.0.1/x", "http://u:p@127.0.0.1/x", "not a url"):
        webhooks.send(url, "job-2", {})
    assert webhooks.dropped == 4 and receiver.calls == []


def test_https_is_verified_against_the_host_name_not_the_address(lookups, closing, tmp_path):
    cert, key = self_signed(tmp_path, "hooks.example.test")
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    receiver = closing(Receiver(tls=server_side))
    lookups["hooks.example.test"] = ["127.0.0.1"]
    lookups["other.example.test"] = ["127.0.0.1"]  # same address, a name the cert lacks
    trusting = ssl.create_default_context(cafile=str(cert))
    webhooks = sender(ports=(receiver.port,), allow_private=True, context=trusting)

    webhooks.send(f"https://hooks.example.test:{receiver.port}/hook", "job-1", {})
    assert webhooks.flush(EVENT_GUARD_S) and webhooks.delivered == 1
    assert receiver.calls[0][0]["host"] == f"hooks.example.test:{receiver.port}"

    webhooks.send(f"https://other.example.test:{receiver.port}/hook", "job-2", {})
    assert webhooks.flush(EVENT_GUARD_S)
    assert (webhooks.delivered, webhooks.dropped, len(receiver.calls)) == (1, 1, 1)

    # And a certificate nobody vouches for is refused by the default context.
    default = sender(ports=(receiver.port,), allow_private=True)
    default.send(f"https://hooks.example.test:{receiver.port}/hook", "job-3", {})
    assert default.flush(EVENT_GUARD_S)
    assert (default.delivered, default.dropped, len(receiver.calls)) == (0, 1, 1)


def test_one_slow_host_holds_only_its_own_slots(closing):
    """Two deliveries to a dripping receiver and one to a fast one, two threads, one per
    address: the fast one goes out while the first drip still holds its thread."""
    drip = closing(DripReceiver(every_s=0.05, address="127.0.0.2"))
    fast = closing(Receiver(observe=lambda: (drip.alive(), drip.connections)))
    webhooks = sender(
        ports=(drip.port, fast.port), allow_private=True, concurrency=2, host_concurrency=1
    )
    webhooks.send(drip.url, "slow-1", {})
    webhooks.send(drip.url, "slow-2", {})
    wait_for(drip.alive, EVENT_GUARD_S, "the first drip")
    webhooks.send(fast.url, "fast", {})
    wait_for(lambda: fast.calls, EVENT_GUARD_S, "the fast delivery")
    assert fast.seen == [(1, 1)], "the second drip waits for its address's one slot"


def test_names_that_lead_to_one_address_share_its_slots(lookups, closing):
    """A wildcard allow-list gives a key any number of names; they all lead to one
    receiver, which still gets `host_concurrency` attempts at once, not one per name."""
    drip = closing(DripReceiver(every_s=0.05))
    fast = closing(Receiver(observe=lambda: (drip.alive(), drip.connections), address="127.0.0.2"))
    names = [f"hook-{n}.tenant.test" for n in range(3)]
    lookups.update({name: ["127.0.0.1"] for name in names} | {"fast.test": ["127.0.0.2"]})
    webhooks = sender(
        ports=(drip.port, fast.port),
        allow_private=True,
        concurrency=4,
        host_concurrency=1,
        owner_concurrency=4,
    )
    for name in names:
        webhooks.send(f"http://{name}:{drip.port}/hook", f"job-{name}", {}, owner="a")
    wait_for(drip.alive, EVENT_GUARD_S, "the first drip")
    webhooks.send(f"http://fast.test:{fast.port}/hook", "fast", {}, owner="a")
    wait_for(lambda: fast.calls, EVENT_GUARD_S, "the fast delivery")
    # Three threads were free for the three names; the address let one connect.
    assert fast.seen == [(1, 1)]


def test_one_owner_cannot_fill_every_delivery_thread(closing):
    """Key A's deliveries to three slow receivers (three addresses) take one thread, its
    bound; key B's delivery gets a thread at once instead of waiting for A's deadlines."""
    drips = [closing(DripReceiver(every_s=0.05, address=f"127.0.0.{n}")) for n in (2, 3, 4)]
    fast = closing(Receiver(observe=lambda: sum(d.alive() for d in drips)))
    webhooks = sender(
        ports=(*(d.port for d in drips), fast.port),
        allow_private=True,
        concurrency=3,
        host_concurrency=1,
        owner_concurrency=1,
    )
    for n, drip in enumerate(drips):
        webhooks.send(drip.url, f"a-{n}", {}, owner="key-a")
    wait_for(lambda: sum(d.alive() for d in drips), EVENT_GUARD_S, "the first drip of key A")
    webhooks.send(fast.url, "b", {}, owner="key-b")
    wait_for(lambda: fast.calls, EVENT_GUARD_S, "key B's delivery")
    # One of A's drips was open when B's call came: A's others waited their turn (without
    # the owner bound all three are open, and B waits for one to reach its deadline).
    assert fast.seen == [1]


def test_an_attempt_ends_at_its_deadline_however_the_bytes_drip(closing):
    drip = closing(DripReceiver(every_s=0.05))
    webhooks = WebhookSender(
        attempts=2, backoff_s=0.01, timeout_s=0.5, ports=(drip.port,), allow_private=True
    )
    webhooks.send(drip.url, "job-1", {})
    assert webhooks.flush(EVENT_GUARD_S), "each attempt was cut at its deadline"
    assert (webhooks.delivered, webhooks.dropped) == (0, 1)
    wait_for(lambda: drip.cut == 2, EVENT_GUARD_S, "the receiver to see both attempts cut")
    assert drip.connections == 2


def test_the_settings_reach_the_sender(monkeypatch):
    monkeypatch.setenv("INVERSION_WEBHOOK_ALLOWED_PORTS", "443,8443")
    monkeypatch.setenv("INVERSION_WEBHOOK_ALLOW_PRIVATE", "true")
    monkeypatch.setenv("INVERSION_WEBHOOK_CONCURRENCY", "3")
    monkeypatch.setenv("INVERSION_WEBHOOK_HOST_CONCURRENCY", "1")
    monkeypatch.setenv("INVERSION_WEBHOOK_OWNER_CONCURRENCY", "3")
    monkeypatch.setenv("INVERSION_WEBHOOK_TIMEOUT_S", "7")
    built = WebhookSender.from_settings(WorkerSettings())
    assert (built.ports, built.allow_private, built.concurrency) == ((443, 8443), True, 3)
    assert (built.host_concurrency, built.owner_concurrency, built.timeout_s) == (1, 3, 7.0)
    for name in ("ALLOWED_PORTS", "ALLOW_PRIVATE"):
        monkeypatch.delenv(f"INVERSION_WEBHOOK_{name}")
    defaults = WebhookSender.from_settings(WorkerSettings())
    assert (defaults.ports, defaults.allow_private) == ((80, 443), False)
