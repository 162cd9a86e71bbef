"""What a running job tells the head, as JSON records in Ray's KV store under its Ray job's id (one per placement):

    progress  rank 0's last steps, rewritten after every step (`zeromix submit --follow` draws them)
    result    the driver's summary once the job has finished (the whole of it is zeromix-result.json)
    failure   why a rank failed (worker_group.RankFailed.record): the scheduler decides on a restart from it
    move      the scheduler's request to stop at the next step with a checkpoint (it places the job again)
    lost      the boxes of an outer-step job whose processes the driver saw die, with the life of each that was
              lost (its ranks may be started again: another life): the others go on without them

The job's log stays for people: it is never parsed. Ray is imported inside the functions: the CLI reads records
after its auth settings are in the environment (Ray reads them once, at import).
"""

from __future__ import annotations

import json
from collections import deque
from typing import Literal

NAMESPACE = "zeromix-jobs"
KEPT_STEPS = 64  # steps in one progress record: a follower reading once a second misses none below 64 steps/s
Kind = Literal["progress", "result", "failure", "move", "lost"]


def put(attempt: str, kind: Kind, record) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(f"{attempt}/{kind}", json.dumps(record), overwrite=True, namespace=NAMESPACE)


def get(attempt: str, kind: Kind):
    """The record, or None: not written (yet), or the attempt is unknown."""
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(f"{attempt}/{kind}", namespace=NAMESPACE)
    return None if raw is None else json.loads(raw)


def lost_boxes(attempt: str) -> dict[int, int]:
    """The boxes the driver reported lost, each with the life of it that was lost (outer steps: box 0's leader asks
    while it waits for the boxes); none outside a job the scheduler launched."""
    import ray

    record = get(attempt, "lost") if attempt and ray.is_initialized() else None
    return {int(box): life for box, life in (record or {}).items()}


class Progress:
    """Rank 0's steps, as a follower reads them."""

    def __init__(self, attempt: str):
        self.attempt, self.recent = attempt, deque(maxlen=KEPT_STEPS)

    @classmethod
    def for_rank(cls, attempt: str, rank: int) -> Progress | None:
        """Rank 0 of a job the scheduler launched; None elsewhere (the other ranks, local launches, benchmarks)."""
        import ray

        return cls(attempt) if rank == 0 and attempt and ray.is_initialized() else None

    def post(self, step: dict) -> None:
        self.recent.append(step)
        put(self.attempt, "progress", list(self.recent))

    def stop_requested(self) -> bool:
        """The scheduler asked this placement to stop with a checkpoint (read once a step, beside the post)."""
        return get(self.attempt, "move") is not None
