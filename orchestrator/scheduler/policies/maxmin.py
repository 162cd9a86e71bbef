"""Gavel-style max-min fairness, without preemption.

Gavel gives each job an equal share of time on each card type, normalised by how fast the job runs there.
A homelab job is not preempted, so each round the jobs that have had least (the queued ones: nothing, hence
arrival order) choose first, each on the free cards where its normalised throughput is highest, and a job
whose spec allows a range of card counts is held to an equal share of the cluster's cards.
"""

from __future__ import annotations

from dataclasses import replace

from orchestrator.scheduler.policies import Assignment, Decision, PolicyInput, why_waiting


class MaxMinFairness:
    name = "max-min-fairness"

    def allocate(self, x: PolicyInput) -> Decision:
        decision, free = Decision(), set(x.free_ids)
        share = max(1, len(x.table.cluster.cards) // max(1, len(x.queue) + len(x.running)))
        for job in x.queue:
            lo, hi = job.spec.gpus.bounds
            cap = max(lo, min(hi or share, share))
            capped = job if cap == hi else _with_max_cards(job, cap)
            outcome = x.table.plan(capped, frozenset(free))
            if outcome.plan:
                decision.assignments.append(Assignment(job.id, outcome.plan))
                free -= set(outcome.cards)
            else:
                decision.waiting[job.id] = why_waiting(job, x, f"its fair share is {cap} card(s)")
        return decision


def _with_max_cards(job, cap: int):
    gpus = job.spec.gpus.model_copy(update={"max": cap}) if job.spec.gpus.count is None else job.spec.gpus
    return replace(job, spec=job.spec.model_copy(update={"gpus": gpus}))
