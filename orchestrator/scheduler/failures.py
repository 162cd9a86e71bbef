"""How a job's run ended, and what the scheduler does about it: the failure policy, in one place.

What Ray and the job's driver report is classified from typed signals only: Ray's job status, the HTTP status
of the Jobs API (404: Ray has no such job), and the kind the driver wrote in its failure record
(worker_group.RankFailed: "lost" when a rank's process or node died or a collective lost its peer, "oom" for
torch.OutOfMemoryError, anything else a failure of the job itself). Then:

    succeeded, cancelled                   recorded as they are
    moved (stopped with a checkpoint,      queued again with the scheduler's reason, resuming from that checkpoint;
      as the scheduler asked)                not a restart
    lost, or unknown to Ray                queued again, on the cards free then, resuming from its checkpoint
    out of memory on a card                the same, with that card capped for this job (the planner gives it less)
    anything else (a bug, bad data)        failed, with the driver's reason
    restarted MAX_RESTARTS times already   failed, saying so
"""

from __future__ import annotations

from typing import NamedTuple

MAX_ATTEMPTS = 3  # launches that may fail before a job is marked failed
MAX_RESTARTS = 3  # times a job that lost a card or node (or ran out of memory) is placed again
MAX_MOVES = 2  # times the policy may stop a job with a checkpoint to place it again (moves are not restarts)
RETRYABLE_KINDS = ("lost", "oom")


class Ending(NamedTuple):
    """How a running job ended. `retryable`: it lost a card, a node or its memory, not its mind: placing it
    again, on the cards free then, resumes it from its last checkpoint."""

    state: str  # succeeded | failed | cancelled | moved
    reason: str
    retryable: bool = False
    out_of_memory: str | None = None  # the card that ran out of memory, if that was why
    steps_done: int | None = None  # a moved job: the step it stopped after (its checkpoint's)


class Verdict(NamedTuple):
    state: str  # what the job becomes: succeeded | failed | cancelled | queued
    reason: str
    memory_caps: dict[str, int] | None  # the job's caps from now on, when an out-of-memory card changed them


def from_ray(status: str, message: str | None, failure: dict | None, result: dict | None = None, move: dict | None = None) -> Ending:
    """A job Ray says ended (SUCCEEDED, STOPPED or FAILED), with the driver's failure or result record and the
    scheduler's move request when there are."""
    if status == "SUCCEEDED" and result and "stopped_at" in result:
        return Ending("moved", f"moved: stopped after step {result['stopped_at']} of {result['of']} with a checkpoint "
                               f"because {(move or {}).get('reason', 'the scheduler asked')}; placed again, resuming there",
                      steps_done=result["stopped_at"])
    if status == "SUCCEEDED":
        outer = (result or {}).get("outer") or {}
        changes = sorted([(b["step"], f"box(es) {b['boxes']} lost before step {b['step']}") for b in outer.get("boxes_left") or []]
                         + [(b["step"], f"box(es) {b['boxes']} back from step {b['step'] + 1}") for b in outer.get("boxes_back") or []])
        return Ending("succeeded", "; ".join(["finished"] + [text for _, text in changes]))
    if status == "STOPPED":
        return Ending("cancelled", "stopped in Ray")
    if failure is None:
        return Ending("failed", f"failed: {(message or 'see `zeromix logs`').strip().splitlines()[-1][:300]}")
    what = {"lost": "was lost (its process or node died, or a collective lost it)", "oom": "ran out of memory"}.get(failure["kind"], "failed")
    return Ending("failed", f"rank {failure['rank']} on {failure['card']} {what}: {failure['detail'][:200]}",
                  retryable=failure["kind"] in RETRYABLE_KINDS, out_of_memory=failure["card"] if failure["kind"] == "oom" else None)


UNKNOWN_TO_RAY = Ending("failed", "lost: Ray has no record of it (the head restarted?)", retryable=True)


def decide(ending: Ending, restarts: int, plan: dict | None, memory_caps: dict[str, int]) -> Verdict:
    """What a job that ended this way becomes, given how often it was restarted already."""
    if ending.state == "moved":
        return Verdict("queued", ending.reason, None)
    reason, caps = ending.reason, None
    if ending.out_of_memory and plan:
        caps = {**memory_caps, ending.out_of_memory: memory_cap_mib(plan, ending.out_of_memory)}
        reason += f"; {ending.out_of_memory} is planned with at most {caps[ending.out_of_memory]:,} MiB for it from now on"
    if not ending.retryable:
        return Verdict(ending.state, reason, caps)
    if restarts >= MAX_RESTARTS:
        return Verdict(ending.state, f"{reason}; not restarted again (it was restarted {MAX_RESTARTS} times)", caps)
    return Verdict("queued", f"{reason}; placed again on the cards free now, resuming from its last checkpoint "
                             f"(restart {restarts + 1} of {MAX_RESTARTS})", caps)


def memory_cap_mib(plan: dict, card: str) -> int:
    """What a card that ran out of memory may use for the job from now on: the plan's estimate for it less half
    of its activations, so the planner gives it a smaller micro-batch, checkpointing or offload (or other cards)."""
    parts = next(r for r in plan["ranks"] if r["card"] == card)["est_mem_breakdown_gib"]  # 4 significant figures each
    return int((sum(parts.values()) - parts["activations"] / 2) * 1024)
