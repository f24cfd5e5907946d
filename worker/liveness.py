"""How a worker shows it is alive, and finds the jobs of workers that are not.

- Its record (`WORKERS_KEY`): the model it serves (under its served name), its batch size
  and a heartbeat, every `heartbeat_s`, so that gateways validate submissions against the
  loaded model and report capacity; the model also in MODELS_KEY, which keeps every model
  ever announced, so that its jobs queue while none of its workers is alive; with the
  tokenizer as `tokenizers` JSON under its content hash, so that gateways count prompt
  tokens without torch.
- RQ's heartbeats: the worker's own, and each running job's execution, which expires
  `lost_after_s` after its worker was last heard from.
- Lost jobs: every `lost_after_s / 2`, RQ's lost-job cleanup (rq_adapter.reap_lost) runs
  again or fails the jobs whose executions expired; their inputs go once failed, and ended
  jobs past their TTL leave RQ's registries.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ddim_inversion.contract import WorkerRecord
from ddim_inversion.keys import MODELS_KEY, THROUGHPUT_KEY, WORKERS_KEY, tokenizer_key
from worker import rq_adapter
from worker.job_state import Running
from worker.lifecycle import forget_failed_inputs
from worker.outages import tolerated
from worker.rq_worker import BaseWorker
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from worker.models import LoadedModel


class Liveness:
    """`worker`'s record, heartbeats and lost-job reaping, each throttled."""

    def __init__(
        self,
        worker: BaseWorker,
        model: LoadedModel,
        settings: WorkerSettings,
        max_batch_size: int,
    ) -> None:
        self.worker = worker
        self.connection = worker.connection
        self.model = model
        self.settings = settings
        self.max_batch_size = max_batch_size
        self._tokenizer: tuple[str, str] | None = None
        self._last_record = 0.0
        self._last_keep_alive = 0.0
        self._last_reap = 0.0

    def beat(self) -> None:
        """Between jobs and around them: RQ's heartbeat, the record, the reaping."""
        self.worker.rq_heartbeat()
        self.publish_record()
        self.reap_lost_jobs()

    def keep_alive(self, batch: Sequence[Running]) -> None:
        """While jobs run: extend their executions, so that only a dead worker's expire."""
        moment = time.monotonic()
        if moment - self._last_keep_alive < self.settings.heartbeat_s:
            return
        self._last_keep_alive = moment
        self.worker.keep_alive(
            (item.job, item.execution)
            for item in batch
            if item.execution is not None and item.stop_code is None
        )
        with tolerated(self.worker.outages):
            self.beat()

    def publish_record(self, force: bool = False) -> None:
        """Tell gateways this worker is alive with its model loaded (throttled)."""
        moment = time.time()
        if not force and moment - self._last_record < self.settings.heartbeat_s:
            return
        info = self.model.info().model_copy(
            update={
                "name": self.settings.served_model_name,
                "tokenizer_key": self.publish_tokenizer(),
            }
        )
        record = WorkerRecord(
            name=self.worker.name,
            model=info,
            heartbeat_at=moment,
            max_batch_size=self.max_batch_size,
        )
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hset(WORKERS_KEY, self.worker.name, record.model_dump_json())
            pipe.hset(MODELS_KEY, info.name, info.model_dump_json())
            pipe.execute()
        self._last_record = moment

    def publish_tokenizer(self) -> str | None:
        """The tokenizer's key, stored once (and again after a Redis without persistence)."""
        if self._tokenizer is None:
            backend = getattr(self.model.tokenizer, "backend_tokenizer", None)
            if backend is None:
                return None
            text = backend.to_str()
            self._tokenizer = (tokenizer_key(hashlib.sha256(text.encode()).hexdigest()), text)
        key, text = self._tokenizer
        if not self.connection.exists(key):
            self.connection.set(key, text)
        return key

    def forget(self) -> None:
        """The worker is going: gateways stop counting on it at once."""
        self.connection.hdel(WORKERS_KEY, self.worker.name)
        self.connection.hdel(THROUGHPUT_KEY, self.worker.name)

    def reap_lost_jobs(self) -> None:
        """Jobs whose worker stopped heartbeating (killed, machine gone) are retried or fail.

        RQ's own cleanup does it: an expired execution is retried while the job has retries
        left (the gateway enqueues with Retry(max_retries)), else it fails with
        AbandonedJobError, which the gateway reports as `worker_lost`. Any live worker runs
        it, every lost_after_s / 2, and then forgets ended jobs past their TTL from the
        registries.
        """
        moment = time.monotonic()
        if moment - self._last_reap < self.settings.lost_after_s / 2:
            return
        self._last_reap = moment
        for queue in self.worker.queues:
            try:
                lost = rq_adapter.reap_lost(queue)
                if lost:
                    forget_failed_inputs(self.connection, lost)
                rq_adapter.drop_expired_entries(self.connection, queue)
            except Exception as exc:  # a reaping hiccup must not stop the worker
                self.worker.log.warning("reaping lost jobs failed: %s", exc)
