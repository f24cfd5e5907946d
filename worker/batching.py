"""The worker: an RQ worker that runs compatible queued jobs together through the engine.

Every job still goes through RQ's own lifecycle (started registry, meta, result,
finished / failed / canceled registries), so `rq info` and rq-dashboard see each job;
batching shows only in speed. For each job RQ dequeues:

1. Dequeue: RQ moves the oldest job to its intermediate queue, so the oldest job is
   always in the next batch (gathering.head_of).
2. Gather: the head of the queue is scanned for compatible jobs, which are claimed
   atomically, up to the batch size and each waiting owner's fair share of it, waiting at
   most `max_batch_wait_ms` for more (gathering.gather, fair_share).
3. Start: every job's RQ start, its first progress, its cancel flag and its input, in one
   round trip (lifecycle.start_batch).
4. Run: one engine call; between steps, progress goes to every job's meta, cancels and
   deadlines are checked, and a job that must stop drops out alone (running.Runner).
5. End: each job succeeds, fails or is canceled on its own; an error in a batch of
   several splits it and runs the halves again (running.Runner, ending.Endings).

Meanwhile the worker shows it is alive and reaps the jobs of workers that are not
(liveness.Liveness), and hears cancels on RQ's pub/sub thread.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from ddim_inversion.keys import CANCEL_CHANNEL
from worker.ending import Endings
from worker.fair_share import FairShare, GpuAccount, parse_weights
from worker.gathering import gather, head_of
from worker.lifecycle import start_batch
from worker.liveness import Liveness
from worker.models import LoadedModel
from worker.rq_adapter import Job, Queue
from worker.rq_worker import DEATH_HOOK_S, BaseWorker
from worker.running import CancelRequests, Runner, first_total
from worker.settings import WorkerSettings
from worker.webhooks import WebhookSender


class InversionWorker(BaseWorker):
    """RQ's loop (BaseWorker) around one loaded model: each job it dequeues runs steps 1-5,
    together with the compatible jobs gathered for it."""

    def __init__(
        self,
        queues: Sequence[Queue],
        *,
        model: LoadedModel,
        settings: WorkerSettings,
        max_batch_size: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(queues, execution_ttl_s=settings.lost_after_s, **kwargs)
        self.model = model
        self.settings = settings
        self.max_batch_size = max_batch_size
        self.liveness = Liveness(self, model, settings, max_batch_size)
        self.webhooks = WebhookSender.from_settings(settings)
        self.endings = Endings(self, settings, self.webhooks, self.liveness.keep_alive)
        self.cancels = CancelRequests()
        self.share = FairShare(
            parse_weights(settings.fair_share_weights),
            GpuAccount(settings.fair_share_half_life_s),
        )
        self.runner = Runner(
            self, model, settings, self.endings, self.cancels, self.liveness.keep_alive, self.share
        )
        self.listen(CANCEL_CHANNEL, self.cancels.heard)

    @property
    def batches_run(self) -> int:
        """Engine calls that returned, since the worker started."""
        return self.runner.batches_run

    def run_dequeued(self, job: Job, queue: Queue) -> None:
        """Steps 1 to 5, for the job RQ dequeued and those that join it."""
        head = head_of(job)  # 1.
        wait_s = self.settings.max_batch_wait_ms / 1000.0
        extra = gather(
            self.connection, queue, head, self.model, self.max_batch_size, wait_s, self.share
        )
        batch = [head, *extra]  # 2.
        with self.cancels.watching(batch):
            replies = start_batch(self, queue, batch, first_total(batch))  # 3.
            self.runner.run(batch, replies, queue)  # 4. and 5.

    def beat(self) -> None:
        self.liveness.beat()

    def on_birth(self) -> None:
        self.liveness.publish_record(force=True)

    def on_death(self) -> None:
        self.webhooks.flush(DEATH_HOOK_S)
        self.liveness.forget()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run `ddim-invert worker` or `python -m worker`")
