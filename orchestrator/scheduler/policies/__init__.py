"""Placement policies: which queued job gets which free cards this round. Each is one small class with one
method, `allocate(PolicyInput) -> Decision`, so the baselines and the default run through the same
scheduler and simulator code (Gavel's shape).

    fifo-first-fit     arrival order, the first free cards that fit, blind to card type: what plain Ray
                       placement-group requests give
    max-min-fairness   Gavel-style max-min fairness: equal shares of the cards, each job's share on the cards
                       where its normalised throughput is highest
    gain               heterogeneity-aware (the default): a card goes where it gains most, a job waits for
                       better cards when that ends it sooner, small jobs backfill without delaying the head job
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

from orchestrator.errors import InputError
from orchestrator.inventory import Card
from orchestrator.planner import Plan
from orchestrator.scheduler.host_ram import HostRam
from orchestrator.scheduler.links import NetworkLinks
from orchestrator.scheduler.table import QueuedJob, ThroughputTable


@dataclass(frozen=True)
class RunningJob:
    id: str
    cards: tuple[str, ...]
    est_end: float  # an estimate, from its plan
    submitted_at: float = 0.0  # when it entered the queue
    job: QueuedJob | None = None  # its spec, as the table plans it, when a policy may move it (see Scheduler._running)
    est_step_s: float = 0.0  # its plan's step time (an estimate)


@dataclass(frozen=True)
class PolicyInput:
    now: float
    queue: tuple[QueuedJob, ...]  # arrival order
    free: tuple[Card, ...]  # usable now, in the cluster's listing order
    running: tuple[RunningJob, ...]
    table: ThroughputTable
    host_ram: HostRam | None = None  # what the running jobs' plans use of each box's RAM (None: not counted)
    links: NetworkLinks | None = None  # which running jobs span boxes, through whose links (None: not counted)

    @property
    def free_ids(self) -> frozenset[str]:
        return frozenset(c.card_id for c in self.free)

    @cached_property
    def priorities(self) -> tuple[int, ...]:
        """The queued jobs' priorities, each once, lowest first (aging weighs a job against them, for every job)."""
        return tuple(sorted({job.priority for job in self.queue}))

    def holder(self, card_id: str) -> RunningJob | None:
        return next((r for r in self.running if card_id in r.cards), None)


@dataclass(frozen=True)
class Assignment:
    job_id: str
    plan: Plan  # planned on exactly the cards it receives


@dataclass(frozen=True)
class Move:
    """Stop a running job with a checkpoint and place it again, for `cards` (held for it while it saves)."""

    reason: str  # one line, into the job's events
    cards: tuple[str, ...] = ()


@dataclass
class Decision:
    assignments: list[Assignment] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)  # job id -> why it waits, one line
    turns: tuple[str, ...] = ()  # the queued jobs in the order this policy served them (aged priority first); () = arrival order
    moves: dict[str, Move] = field(default_factory=dict)  # running job id -> the move it should make


class Policy(Protocol):
    name: str

    def allocate(self, x: PolicyInput) -> Decision: ...


POLICY_NAMES = ("gain", "fifo-first-fit", "max-min-fairness")


def policy(name: str) -> Policy:
    from orchestrator.scheduler.policies.fifo import FifoFirstFit
    from orchestrator.scheduler.policies.gain import Gain
    from orchestrator.scheduler.policies.maxmin import MaxMinFairness

    known = {p.name: p for p in (Gain, FifoFirstFit, MaxMinFairness)}
    if name not in known:
        raise InputError("command line", "--policy", name, f"one of {', '.join(POLICY_NAMES)}")
    return known[name]()


def clock(t: float) -> str:
    import time

    return time.strftime("%H:%M", time.localtime(t))


def why_waiting(job: QueuedJob, x: PolicyInput, lead: str = "") -> str:
    """One line: the cards it needs and who holds them until when (estimates), or why it fits nowhere."""
    best = x.table.best(job)
    if not best.plan:
        return f"fits nowhere in this cluster: {best.why_not}"
    need = f"needs {' + '.join(f'{r.card.card_id} {r.card.short_name}' for r in best.plan.ranks)}"
    held: dict[str, list[str]] = {}
    for rank in best.plan.ranks:
        owner = x.holder(rank.card.card_id)
        if owner:
            held.setdefault(owner.id, []).append(rank.card.card_id)
    owners = "; ".join(f"{' + '.join(cards)} held by job {job_id} " + (f"until about {clock(end)}" if end > x.now else
                                                                        f"past its estimated end, {clock(end)}")
                       for job_id, cards in held.items() for end in [x.holder(cards[0]).est_end])
    return "; ".join(part for part in (lead, need, owners + " (estimate)" if owners else "") if part)
