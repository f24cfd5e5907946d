"""Webhook deliveries: the worker POSTs a job's end to the URL its submitter gave.

The GPU loop only enqueues. A dispatcher thread hands due deliveries to a small pool of
delivery threads (`concurrency`), at most `owner_concurrency` of them for one API key's
jobs at a time and the keys taken in turn; and at most `host_concurrency` attempts are
connected to one resolved address at a time, whatever names lead there (a wildcard
allow-list gives a key any number of names for one receiver). A slow receiver, or a key's
many of them, holds its own slots and no one else's. An attempt whose address is at its
limit gives its thread back and waits a moment; it is not counted as an attempt.
Each attempt is signed afresh:

    X-Inversion-Timestamp: <unix seconds>
    X-Inversion-Signature: sha256=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>
    X-Inversion-Job: <job id>

Each attempt first applies webhook_policy (scheme, port, every resolved address), then
connects to the addresses it checked, with the original Host header and, for https, the
certificate verified against the host name. It has one deadline for all of it (connect,
TLS, request, status line and headers; the body is never read): a receiver that drips
bytes is cut off there.

A failed attempt (connection error, deadline, 5xx, 408 or 429) is retried after backoff_s,
2 x backoff_s, 4 x backoff_s ... until `attempts` tries are spent; a refused URL or address
and any other 4xx are final. Redirects are not followed. Deliveries still pending when the
worker exits are lost (it waits a few seconds for them).
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import hmac
import http.client
import itertools
import json
import logging
import queue
import socket
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ddim_inversion import webhook_policy
from ddim_inversion.webhook_policy import IPAddress, Target, WebhookRefused
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429})

ADDRESS_BUSY_WAIT_S = 0.25
"""How long a delivery whose address is at its limit waits before it is tried again."""


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256 over `{timestamp}.{body}`."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


class DeliveryFailed(Exception):
    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class Deadline:
    """Ends an attempt at a fixed moment, whatever call it is blocked in.

    A socket timeout bounds each read, not their sum: a receiver sending a byte now and
    then would hold the attempt for ever. At the deadline a timer shuts the watched socket
    down, which wakes any read or write blocked on it with an error.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        """Seconds left; TimeoutError once there are none."""
        left = self.at - time.monotonic()
        if left <= 0 or self.expired:
            raise TimeoutError(f"the {self.seconds:g} s deadline passed")
        return left

    def watch(self, sock: socket.socket) -> None:
        """Shut `sock` down at the deadline (at once if it has passed)."""
        with self._lock:
            self._sock = sock
            if self.expired:
                self._shut()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            self._shut()

    def _shut(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):  # already closed by the other side
                # The plain socket's shutdown, also for TLS: it only wakes the blocked call.
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def cancel(self) -> None:
        """Stop the timer; call before the socket is closed (its descriptor may be reused)."""
        with self._lock:
            self._timer.cancel()
            self._sock = None


class PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to an address checked beforehand, never to a fresh lookup.

    The Host header and the TLS server name (SNI, certificate check) are the URL's host;
    only the TCP connection goes to `addresses`, tried in turn within the deadline.
    """

    def __init__(
        self,
        target: Target,
        addresses: list[IPAddress],
        deadline: Deadline,
        context: ssl.SSLContext | None,
    ) -> None:
        super().__init__(target.host, target.port, timeout=deadline.remaining())
        self.default_port = webhook_policy.SCHEMES[target.scheme]  # Host: omits it then
        self.addresses = addresses
        self.deadline = deadline
        self.context = context if target.scheme == "https" else None

    def connect(self) -> None:
        error: OSError = OSError("no address to connect to")
        for address in self.addresses:
            try:
                sock = socket.create_connection(
                    (str(address), self.port), timeout=self.deadline.remaining()
                )
                break
            except OSError as exc:
                error = exc
        else:
            raise error
        self.sock = sock
        self.deadline.watch(sock)
        sock.settimeout(self.deadline.remaining())
        if self.context is not None:
            tls = self.context.wrap_socket(
                sock, server_hostname=self.host, do_handshake_on_connect=False
            )
            self.sock = tls
            self.deadline.watch(tls)
            tls.do_handshake()


def post(
    target: Target,
    addresses: list[IPAddress],
    body: bytes,
    headers: dict[str, str],
    timeout_s: float,
    context: ssl.SSLContext | None = None,
) -> None:
    """One attempt within `timeout_s` in all; returns on 2xx, else DeliveryFailed."""
    deadline = Deadline(timeout_s)
    connection = None
    try:
        connection = PinnedConnection(target, addresses, deadline, context)
        connection.request("POST", target.path, body=body, headers=headers)
        status = connection.getresponse().status
        # A cut connection can end the headers early as if they were complete: not an answer.
        deadline.remaining()
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if deadline.expired or isinstance(exc, TimeoutError):  # socket timeouts: the rest
            raise DeliveryFailed(f"no answer within the {timeout_s:g} s deadline") from None
        raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from None
    finally:
        deadline.cancel()
        if connection is not None:
            connection.close()
    if not 200 <= status < 300:
        retryable = status >= 500 or status in RETRYABLE_STATUS
        raise DeliveryFailed(f"HTTP {status}", retryable=retryable)


@dataclass(order=True)
class Delivery:
    due: float
    seq: int
    target: Target = field(compare=False)
    job_id: str = field(compare=False)
    body: bytes = field(compare=False)
    attempt: int = field(default=0, compare=False)
    owner: str = field(default="", compare=False)
    """The job's API key (its hash); "" for the anonymous owner, which has no own bound."""


class AddressSlots:
    """Attempts connected to each address now; at most `limit` per address."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._busy: Counter[IPAddress] = Counter()

    def take(self, addresses: list[IPAddress]) -> bool:
        """A slot on every address an attempt may connect to, or none (False) if one is full."""
        with self._lock:
            if any(self._busy[a] >= self.limit for a in addresses):
                return False
            self._busy.update(addresses)
            return True

    def give(self, addresses: list[IPAddress]) -> None:
        with self._lock:
            self._busy.subtract(addresses)


@dataclass
class Finished:
    """A pool thread's word to the dispatcher: the delivery, and its retry if any."""

    delivery: Delivery
    retry: Delivery | None


class WebhookSender:
    """Delivers job ends from a small pool of threads; `send` never blocks."""

    def __init__(
        self,
        secret: str = "",
        attempts: int = 5,
        backoff_s: float = 1.0,
        timeout_s: float = 5.0,
        concurrency: int = 4,
        host_concurrency: int = 2,
        owner_concurrency: int = 2,
        ports: Iterable[int] = webhook_policy.DEFAULT_PORTS,
        allow_private: bool = False,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.secret = secret.encode()
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self.host_concurrency = host_concurrency
        self.owner_concurrency = owner_concurrency
        self._addresses = AddressSlots(host_concurrency)
        self.ports = tuple(ports)
        self.allow_private = allow_private
        self.context = context or ssl.create_default_context()
        self._inbox: queue.Queue[Delivery | Finished] = queue.Queue()
        self._work: queue.Queue[Delivery] = queue.Queue()
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._pending = 0
        self.delivered = 0
        self.dropped = 0
        if not secret:
            log.warning("INVERSION_WEBHOOK_SECRET is empty: webhook deliveries go unsigned")

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> WebhookSender:
        return cls(
            settings.webhook_secret,
            attempts=settings.webhook_attempts,
            backoff_s=settings.webhook_backoff_s,
            timeout_s=settings.webhook_timeout_s,
            concurrency=settings.webhook_concurrency,
            host_concurrency=settings.webhook_host_concurrency,
            owner_concurrency=settings.webhook_owner_concurrency,
            ports=settings.webhook_allowed_ports,
            allow_private=settings.webhook_allow_private,
        )

    def send(self, url: str, job_id: str, payload: dict[str, Any], owner: str = "") -> None:
        """Queue the delivery of `payload` (JSON) to `url` for a job of `owner`; starts the
        threads on first use."""
        try:
            target = webhook_policy.parse(url, self.ports)
        except WebhookRefused as exc:
            log.warning("webhook of job %s refused: %s", job_id, exc)
            self._count(delivered=False)
            return
        body = json.dumps(payload, separators=(",", ":"), default=str).encode()
        with self._lock:
            self._pending += 1
            if not self._threads:
                self._start()
        delivery = Delivery(time.monotonic(), next(self._seq), target, job_id, body, owner=owner)
        self._inbox.put(delivery)

    def _count(self, delivered: bool) -> None:
        with self._lock:  # pool threads settle deliveries concurrently
            if delivered:
                self.delivered += 1
            else:
                self.dropped += 1

    def _start(self) -> None:
        self._threads.append(threading.Thread(target=self._dispatch, name="webhooks", daemon=True))
        for n in range(self.concurrency):
            name = f"webhooks-{n}"
            self._threads.append(threading.Thread(target=self._deliver, name=name, daemon=True))
        for thread in self._threads:
            thread.start()

    def flush(self, timeout_s: float) -> bool:
        """Wait until nothing is pending (or the timeout); whether everything was settled."""
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._pending

    def headers(self, job_id: str, body: bytes) -> dict[str, str]:
        timestamp = str(int(time.time()))
        out = {
            "Content-Type": "application/json",
            "User-Agent": "ddim-inversion-webhooks/1",
            "X-Inversion-Timestamp": timestamp,
            "X-Inversion-Job": job_id,
            "Connection": "close",
        }
        if self.secret:
            out["X-Inversion-Signature"] = sign(self.secret, timestamp, body)
        return out

    def addresses(self, target: Target) -> list[IPAddress]:
        """The policy's checks of the target's addresses; DeliveryFailed if refused."""
        try:
            return webhook_policy.resolve(target, self.allow_private)
        except WebhookRefused as exc:
            raise DeliveryFailed(f"refused: {exc}", retryable=False) from None
        except OSError as exc:  # the name does not resolve (now): try again later
            raise DeliveryFailed(f"cannot resolve {target.host}: {exc}") from None

    def _settle(self, delivery: Delivery) -> Delivery | None:
        """Try once; the delivery to retry later, or None once settled."""
        delivery.attempt += 1
        try:
            addresses = self.addresses(delivery.target)
            if not self._addresses.take(addresses):
                delivery.attempt -= 1  # not tried: the address is busy with others
                delivery.due = time.monotonic() + ADDRESS_BUSY_WAIT_S
                return delivery
            try:
                body = delivery.body
                headers = self.headers(delivery.job_id, body)
                post(delivery.target, addresses, body, headers, self.timeout_s, self.context)
            finally:
                self._addresses.give(addresses)
        except DeliveryFailed as exc:
            return self._failed(delivery, exc)
        except Exception as exc:  # never let one delivery stop a thread
            log.exception("webhook of job %s failed unexpectedly: %s", delivery.job_id, exc)
            self._count(delivered=False)
            return None
        self._count(delivered=True)
        return None

    def _failed(self, delivery: Delivery, exc: DeliveryFailed) -> Delivery | None:
        if exc.retryable and delivery.attempt < self.attempts:
            delay = self.backoff_s * 2 ** (delivery.attempt - 1)
            log.info(
                "webhook of job %s failed (%s); retrying in %.1f s", delivery.job_id, exc, delay
            )
            delivery.due = time.monotonic() + delay
            return delivery
        log.warning(
            "webhook of job %s dropped after %d attempts: %s",
            delivery.job_id,
            delivery.attempt,
            exc,
        )
        self._count(delivered=False)
        return None

    def _deliver(self) -> None:
        while True:
            delivery = self._work.get()
            self._inbox.put(Finished(delivery, self._settle(delivery)))

    def _dispatch(self) -> None:
        waiting: list[Delivery] = []  # a heap by due time
        ready: dict[str, deque[Delivery]] = {}  # due, by owner, owners in turn
        busy: Counter[str] = Counter()  # deliveries in threads per owner
        while True:
            timeout = max(0.0, waiting[0].due - time.monotonic()) if waiting else None
            try:
                item = self._inbox.get(timeout=timeout)
            except queue.Empty:
                item = None
            if isinstance(item, Delivery):
                heapq.heappush(waiting, item)
            elif isinstance(item, Finished):
                busy[item.delivery.owner] -= 1
                if item.retry is not None:
                    heapq.heappush(waiting, item.retry)
                else:
                    with self._lock:
                        self._pending -= 1
            while waiting and waiting[0].due <= time.monotonic():
                due = heapq.heappop(waiting)
                ready.setdefault(due.owner, deque()).append(due)
            self._hand_out(ready, busy)

    def _hand_out(self, ready: dict[str, deque[Delivery]], busy: Counter[str]) -> None:
        """Give free threads the ready deliveries, one owner after another in turn."""
        progress = True
        while progress and ready:
            progress = False
            for owner in list(ready):
                if busy.total() >= self.concurrency:
                    return
                # The anonymous owner (auth disabled) is the only one: no bound of its own.
                if owner and busy[owner] >= self.owner_concurrency:
                    continue
                self._work.put(ready[owner].popleft())
                busy[owner] += 1
                progress = True
                # The owner goes to the back of the turn, or leaves it when it has no more.
                rest = ready.pop(owner)
                if rest:
                    ready[owner] = rest
