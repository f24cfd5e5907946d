"""RQ's own worker, as the contract tests run it beside the service's code."""

from __future__ import annotations

from rq import SimpleWorker

from worker.rq_worker import PUBSUB_POLL_S


class RQsWorker(SimpleWorker):
    """RQ's SimpleWorker, its pub/sub thread polling as the service's worker's does. RQ's
    own polls every 60 s, and its exit joins the thread (redis-py's `stop()`): each
    `work(burst=True)` would last a minute, and records it wrote, which hold timestamps,
    would be a minute older than the ones they are compared with."""

    def subscribe(self) -> None:
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=PUBSUB_POLL_S, daemon=True, exception_handler=self._pubsub_exception_handler
        )
