"""The type-blind baseline: what plain Ray placement-group requests give.

Jobs in arrival order; each takes the first free cards, in the cluster's listing order, that pass its
constraints and fit it (the planner still tunes DeepSpeed to whatever it got). No reservation: a later job
that fits starts ahead of an earlier one that does not, as Ray grants pending groups in no fixed order.
"""

from __future__ import annotations

from orchestrator.planner.filters import DEFAULT_FILTERS
from orchestrator.scheduler.policies import Assignment, Decision, PolicyInput, why_waiting


class FifoFirstFit:
    name = "fifo-first-fit"

    def allocate(self, x: PolicyInput) -> Decision:
        decision, free = Decision(), list(x.free)
        for job in x.queue:
            count = job.spec.gpus.bounds[0]
            eligible = [c for c in free if all(f.check(job.spec, c).ok for f in DEFAULT_FILTERS)]
            for start in range(len(eligible) - count + 1):  # first fit: slide along the listing
                outcome = x.table.plan(job, frozenset(c.card_id for c in eligible[start:start + count]))
                if outcome.plan:
                    decision.assignments.append(Assignment(job.id, outcome.plan))
                    free = [c for c in free if c.card_id not in outcome.cards]
                    break
            else:
                decision.waiting[job.id] = why_waiting(job, x)
        return decision
