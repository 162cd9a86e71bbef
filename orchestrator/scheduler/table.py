"""The planner's throughput table, as the policies see it: how fast a job runs on a set of cards.

Every figure comes from `make_plan`, the same planner `zeromix plan` uses (an estimate), so a policy, the
real scheduler and the simulator rank jobs by the same numbers. A plan depends only on the job's shape and
on which cards are free, so answers are cached by (shape, free cards): a round over 200 queued jobs plans
each distinct shape once per free set, not each job. Within a round the free set only shrinks, so a plan made
on a larger free set whose cards are all still free is the answer again (the planner chose it over those same
cards and more), and a shape that fitted nowhere on a larger set fits nowhere on a smaller one.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from functools import cached_property

from orchestrator.inventory import ClusterSnapshot
from orchestrator.jobspec import JobSpec
from orchestrator.model_facts import ModelFacts, facts_from_config, read_config
from orchestrator.planner import NoPlacement, Plan, make_plan

SHAPE_FIELDS = ("model", "method", "lora", "quant", "seq_len", "global_batch_size", "precision", "gpus", "deepspeed", "sync")


@dataclass(frozen=True)
class QueuedJob:
    """A job as the policies see it."""

    id: str
    spec: JobSpec
    priority: int
    submitted_at: float
    total_steps: int
    memory_caps: tuple[tuple[str, int], ...] = ()  # (card id, MiB): where it ran out of memory, what it may use there
    moved: bool = False  # just stopped with a checkpoint to be placed again (a move): gain places it first

    @cached_property
    def shape(self) -> str:
        """What its plans depend on (jobs alike share them); made once per job: a policy asks for it for every job
        and card set it weighs, a third of a simulated day's CPU time when it was made at each ask. A job whose outer
        steps come every `auto` steps adds its length: H follows it (planner/outer.py), so a short job's plan would
        give a long one an exchange every dozen steps."""
        sync = self.spec.sync
        steps = self.total_steps if sync.mode != "synchronous" and sync.inner_steps == "auto" else None
        return json.dumps([self.spec.model_dump(include=set(SHAPE_FIELDS), mode="json"), self.memory_caps, steps], sort_keys=True)


@dataclass(frozen=True)
class Outcome:
    """A plan, or why there is none."""

    plan: Plan | None
    why_not: str = ""

    @property
    def cards(self) -> tuple[str, ...]:
        return tuple(r.card.card_id for r in self.plan.ranks) if self.plan else ()

    def duration_s(self, total_steps: int) -> float:
        return self.plan.step.step_s * total_steps


class Bounded(OrderedDict):
    """A cache that forgets its least recently used entries beyond `limit`: a scheduler that runs for months
    sees endless shapes and free sets, and must not grow with them."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        if len(self) > self.limit:
            self.popitem(last=False)

    def get_or_make(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        return value


PLAN_CACHE = 20_000  # plans (shape, free cards); one round of 200 queued jobs on 64 cards makes about 2,000
VIEW_CACHE = 2_000  # the cluster as seen with only some cards free
FACTS_CACHE = 500  # parsed model configs
GROUPS_TUNED = 5_000  # per shape, groups of cards whose tuning is kept
LARGER_POOLS_KEPT = 8  # per shape, the latest free sets it was planned on, for the smaller sets that follow in a round


class ThroughputTable:
    def __init__(self, cluster: ClusterSnapshot):
        self.cluster = cluster  # every card, none held: what "best" is measured against
        self._plans: Bounded = Bounded(PLAN_CACHE)  # (shape, free cards) -> Outcome
        self._views: Bounded = Bounded(VIEW_CACHE)  # free cards -> the cluster with all others held
        self._facts: Bounded = Bounded(FACTS_CACHE)  # model path -> ModelFacts
        self._recent: Bounded = Bounded(VIEW_CACHE)  # shape -> deque of (free cards, Outcome), latest last
        self._groups: Bounded = Bounded(PLAN_CACHE)  # the planner's candidate groups, shared by jobs alike (make_plan)
        self._tuned: Bounded = Bounded(VIEW_CACHE)  # shape -> the planner's tuning of each group of cards (make_plan)
        self._best: Bounded = Bounded(PLAN_CACHE)  # (shape, job name, steps) -> the job's plan on every card
        self._every_card = frozenset(c.card_id for c in cluster.cards)

    def facts(self, job: QueuedJob) -> ModelFacts:
        return self._facts.get_or_make(job.spec.model.path, lambda: facts_from_config(read_config(job.spec.model.path)))

    def plan(self, job: QueuedJob, free: frozenset[str]) -> Outcome:
        """The planner's best plan for the job on the `free` cards (the others count as held)."""
        def make() -> Outcome:
            recent = self._recent.get_or_make(job.shape, lambda: deque(maxlen=LARGER_POOLS_KEPT))
            outcome = _from_larger_pool(recent, free)
            if outcome is None:
                view = self._views.get_or_make(free, lambda: self.cluster.with_holders(
                    {c.resource: "another job" for c in self.cluster.cards if c.card_id not in free}))
                try:
                    outcome = Outcome(make_plan(job.spec, self.facts(job), view.with_memory_caps(dict(job.memory_caps)),
                                                job.total_steps, suggest=False, groups_seen=self._groups,
                                                tuned=self._tuned.get_or_make(job.shape, lambda: Bounded(GROUPS_TUNED))))
                except NoPlacement as err:
                    outcome = Outcome(None, str(err))
            recent.append((free, outcome))
            return outcome

        shared = self._plans.get_or_make((job.shape, free), make)  # planned for some job of this shape: make it this job's
        if shared.plan and (shared.plan.job_name, shared.plan.total_steps) != (job.spec.name, job.total_steps):
            return Outcome(replace(shared.plan, job_name=job.spec.name, total_steps=job.total_steps))
        return shared

    def best(self, job: QueuedJob) -> Outcome:
        """On the whole cluster, nothing held: the job's own yardstick (Gavel's normalisation), asked for many times a
        round (kept: `plan` would make it this job's plan afresh at each ask)."""
        return self._best.get_or_make((job.shape, job.spec.name, job.total_steps), lambda: self.plan(job, self._every_card))

    def normalised(self, job: QueuedJob, outcome: Outcome) -> float:
        """Throughput on these cards as a share of the job's best: 1.0 is as fast as it can run here."""
        best = self.best(job)
        if not outcome.plan or not best.plan:
            return 0.0
        return outcome.plan.step.tokens_per_s / best.plan.step.tokens_per_s


def _from_larger_pool(recent: deque, free: frozenset[str]) -> Outcome | None:
    """The outcome planned on a superset of `free` that holds here too: its plan's cards are all still free, or
    it found no plan at all."""
    for pool, outcome in reversed(recent):
        if free <= pool and (outcome.plan is None or set(outcome.cards) <= free):
            return outcome
    return None
