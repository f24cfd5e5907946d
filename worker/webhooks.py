"""Webhook deliveries: the worker POSTs a job's end to the URL its submitter gave.

Deliveries run on one background thread fed by a queue.Queue, so the GPU loop only
enqueues. Each attempt is signed afresh:

    X-Inversion-Timestamp: <unix seconds>
    X-Inversion-Signature: sha256=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>
    X-Inversion-Job: <job id>

A failed attempt (connection error, timeout, 5xx, 408 or 429) is retried after
backoff_s, 2 x backoff_s, 4 x backoff_s ... until `attempts` tries are spent; any other
4xx is final. Redirects are not followed. Deliveries still pending when the worker exits
are lost (it waits a few seconds for them).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429})


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256 over `{timestamp}.{body}`."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect answers as the 3xx it is: never re-sent elsewhere


_opener = urllib.request.build_opener(_NoRedirect)


class DeliveryFailed(Exception):
    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> None:
    """One attempt; returns on 2xx, else DeliveryFailed (retryable or not)."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _opener.open(request, timeout=timeout_s) as response:
            response.read(1024)
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections
        raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from None
    if not 200 <= status < 300:
        retryable = status >= 500 or status in RETRYABLE_STATUS
        raise DeliveryFailed(f"HTTP {status}", retryable=retryable)


@dataclass(order=True)
class Delivery:
    due: float
    seq: int
    url: str = field(compare=False)
    job_id: str = field(compare=False)
    body: bytes = field(compare=False)
    attempt: int = field(default=0, compare=False)


class WebhookSender:
    """A background thread delivering job ends; `send` never blocks."""

    def __init__(
        self,
        secret: str = "",
        attempts: int = 5,
        backoff_s: float = 1.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.secret = secret.encode()
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self._inbox: queue.Queue[Delivery | None] = queue.Queue()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending = 0
        self.delivered = 0
        self.dropped = 0
        if not secret:
            log.warning("INVERSION_WEBHOOK_SECRET is empty: webhook deliveries go unsigned")

    def send(self, url: str, job_id: str, payload: dict[str, Any]) -> None:
        """Queue the delivery of `payload` (JSON) to `url`; starts the thread on first use."""
        body = json.dumps(payload, separators=(",", ":"), default=str).encode()
        with self._lock:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
                self._thread.start()
        self._inbox.put(Delivery(time.monotonic(), next(self._seq), url, job_id, body))

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
        }
        if self.secret:
            out["X-Inversion-Signature"] = sign(self.secret, timestamp, body)
        return out

    def _attempt(self, delivery: Delivery) -> Delivery | None:
        """Try once; the delivery to retry later, or None once settled."""
        delivery.attempt += 1
        try:
            post(
                delivery.url,
                delivery.body,
                self.headers(delivery.job_id, delivery.body),
                self.timeout_s,
            )
        except DeliveryFailed as exc:
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
            self.dropped += 1
            return None
        except Exception as exc:  # never let one delivery stop the thread
            log.exception("webhook of job %s failed unexpectedly: %s", delivery.job_id, exc)
            self.dropped += 1
            return None
        self.delivered += 1
        return None

    def _run(self) -> None:
        waiting: list[Delivery] = []
        while True:
            timeout = max(0.0, waiting[0].due - time.monotonic()) if waiting else None
            try:
                item = self._inbox.get(timeout=timeout)
                if item is not None:
                    heapq.heappush(waiting, item)
            except queue.Empty:
                pass
            while waiting and waiting[0].due <= time.monotonic():
                retry = self._attempt(heapq.heappop(waiting))
                if retry is not None:
                    heapq.heappush(waiting, retry)
                else:
                    with self._lock:
                        self._pending -= 1
