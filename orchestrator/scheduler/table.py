"""The planner's throughput table, as the policies see it: how fast a job runs on a set of cards.

Every figure comes from `make_plan`, the same planner `zeromix plan` uses (an estimate), so a policy, the
real scheduler and the simulator rank jobs by the same numbers. A plan depends only on the job's shape and
on which cards are free, so answers are cached by (shape, free cards): a round over 200 queued jobs plans
each distinct shape once per free set, not each job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from orchestrator.inventory import ClusterSnapshot
from orchestrator.jobspec import JobSpec
from orchestrator.model_facts import ModelFacts, facts_from_config, read_config
from orchestrator.planner import NoPlacement, Plan, make_plan

SHAPE_FIELDS = ("model", "method", "lora", "seq_len", "global_batch_size", "precision", "gpus", "deepspeed")


@dataclass(frozen=True)
class QueuedJob:
    """A job as the policies see it."""

    id: str
    spec: JobSpec
    priority: int
    submitted_at: float
    total_steps: int
    memory_caps: tuple[tuple[str, int], ...] = ()  # (card id, MiB): where it ran out of memory, what it may use there

    @property
    def shape(self) -> str:
        return json.dumps([self.spec.model_dump(include=set(SHAPE_FIELDS), mode="json"), self.memory_caps], sort_keys=True)


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


class ThroughputTable:
    def __init__(self, cluster: ClusterSnapshot):
        self.cluster = cluster  # every card, none held: what "best" is measured against
        self._plans: dict[tuple[str, frozenset[str]], Outcome] = {}
        self._views: dict[frozenset[str], ClusterSnapshot] = {}  # the cluster with all but these cards held
        self._facts: dict[str, ModelFacts] = {}

    def facts(self, job: QueuedJob) -> ModelFacts:
        path = job.spec.model.path
        if path not in self._facts:
            self._facts[path] = facts_from_config(read_config(path))
        return self._facts[path]

    def plan(self, job: QueuedJob, free: frozenset[str]) -> Outcome:
        """The planner's best plan for the job on the `free` cards (the others count as held)."""
        key = (job.shape, free)
        if key not in self._plans:
            if free not in self._views:
                self._views[free] = self.cluster.with_holders({c.resource: "another job" for c in self.cluster.cards if c.card_id not in free})
            try:
                view = self._views[free].with_memory_caps(dict(job.memory_caps))
                self._plans[key] = Outcome(make_plan(job.spec, self.facts(job), view, job.total_steps, suggest=False))
            except NoPlacement as err:
                self._plans[key] = Outcome(None, str(err))
        shared = self._plans[key]  # planned for some job of this shape: make it this job's
        if shared.plan and (shared.plan.job_name, shared.plan.total_steps) != (job.spec.name, job.total_steps):
            return Outcome(replace(shared.plan, job_name=job.spec.name, total_steps=job.total_steps))
        return shared

    def best(self, job: QueuedJob) -> Outcome:
        """On the whole cluster, nothing held: the job's own yardstick (Gavel's normalisation)."""
        return self.plan(job, frozenset(c.card_id for c in self.cluster.cards))

    def normalised(self, job: QueuedJob, outcome: Outcome) -> float:
        """Throughput on these cards as a share of the job's best: 1.0 is as fast as it can run here."""
        best = self.best(job)
        if not outcome.plan or not best.plan:
            return 0.0
        return outcome.plan.step.tokens_per_s / best.plan.step.tokens_per_s
