"""The default policy: heterogeneity-aware placement with backfill.

Each round, jobs in order of priority (plus aging, so nothing starves), then arrival:
  1. The planner's throughput table says how fast the job runs on the free cards and on its best cards
     (normalised per job, as in Gavel). A 1080 Ti is worth little to a bf16 job and much to an fp32 one:
     when a job of the same priority waiting behind gains more from the cards this job would take than
     this job loses by taking others, this job takes the others (comparative advantage).
  2. Start now, or wait for better cards? A job whose best cards free up soon (running jobs' estimated
     ends) waits when it would finish sooner on them than on what is free now.
  3. The first job that cannot start reserves the cards it will get when running jobs end (EASY backfill):
     later jobs may use those cards only if they end before that time (estimates).
  4. No fragmentation: a job that fits on the cards left over in part-used boxes, nearly as fast, goes
     there rather than splitting a whole free box whose cards one job could use together over PCIe.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.scheduler.policies import Assignment, Decision, PolicyInput, RunningJob, clock, why_waiting
from orchestrator.scheduler.table import Outcome, QueuedJob

AGING_PER_HOUR = 6.0  # priority points a queued job gains per hour of waiting
WINDOW = 32  # jobs considered per round, in order; the rest wait their turn
NEARLY_AS_FAST = 0.9  # "nearly as fast" for the fragmentation rule
MIN_SHARE = 0.25  # never start a job below this share of its best speed while running jobs will free cards
RIVALS = 4  # later jobs checked for a better use of this job's cards
SWAP_MARGIN = 0.1  # ... and by how much better it must be
WAIT_MARGIN = 0.9  # wait for better cards only when that ends the job at least 10% sooner (of its run)


@dataclass(frozen=True)
class Reservation:
    job_id: str
    cards: frozenset[str]
    at: float  # when the cards are expected free (an estimate)
    until: float  # when that job is expected to end on them (an estimate)


class Gain:
    name = "gain"

    def allocate(self, x: PolicyInput) -> Decision:
        decision, free = Decision(), set(x.free_ids)
        running = list(x.running)  # grows with this round's starts, so later jobs see when those cards free up
        reservation: Reservation | None = None
        order = sorted(x.queue, key=lambda j: self._urgency(j, x))
        decision.turns = tuple(j.id for j in order)
        for position, job in enumerate(order):
            if position >= WINDOW:
                decision.waiting[job.id] = f"{position} job(s) ahead of it in priority order"
                continue
            best = x.table.best(job)
            if not best.plan:
                decision.waiting[job.id] = why_waiting(job, x)
                continue
            now = self._place(job, x, free, reservation)
            if now is None:
                reservation = reservation or self._reserve(job, x, free)
                lead = ""
                if reservation and reservation.job_id == job.id:
                    lead = f"expected to start about {clock(reservation.at)} (estimate)"
                elif reservation and x.table.plan(job, frozenset(free)).plan:
                    lead = (f"would run past {clock(reservation.at)} on cards reserved for job {reservation.job_id} "
                            "(estimate), so it waits")
                decision.waiting[job.id] = why_waiting(job, x, lead)
                continue
            now = self._leave_to_rival(job, now, order[position + 1:WINDOW], x, free, reservation)
            share = x.table.normalised(job, now)
            if share < MIN_SHARE and running:
                reservation = reservation or self._reserve(job, x, free)
                decision.waiting[job.id] = why_waiting(job, x, f"the free cards would give it {share:.0%} of its best speed (estimate); "
                                                                "it waits for better ones")
                continue
            waits_until = self._better_soon(job, now, best, x, running, reservation)
            if waits_until is not None:
                decision.waiting[job.id] = why_waiting(job, x, f"waits for faster cards: it would end about {clock(waits_until)} on them, "
                                                                 f"later on the free {' + '.join(r.card.short_name for r in now.plan.ranks)}")
                continue
            decision.assignments.append(Assignment(job.id, now.plan))
            free -= set(now.cards)
            running.append(RunningJob(job.id, now.cards, x.now + now.duration_s(job.total_steps)))
        return decision

    def _urgency(self, job: QueuedJob, x: PolicyInput) -> tuple:
        """Priority first, aged; within a priority, highest response ratio next: (waited + run) / run on its best
        cards, so short jobs go first and every waiting job's ratio grows until it is first."""
        best = x.table.best(job)
        run = best.duration_s(job.total_steps) if best.plan else float("inf")
        return (-aged_priority(job, x), -((x.now - job.submitted_at) + run) / run, job.submitted_at)

    def _place(self, job: QueuedJob, x: PolicyInput, free: set[str], reservation: Reservation | None) -> Outcome | None:
        """Its best plan on the free cards, keeping off reserved cards unless it ends before they are needed,
        and in part-used boxes when that is nearly as fast."""
        options = [free - reservation.cards, free] if reservation else [free]
        for pool in options:
            outcome = x.table.plan(job, frozenset(pool))
            if not outcome.plan:
                continue
            if reservation and set(outcome.cards) & reservation.cards and x.now + outcome.duration_s(job.total_steps) > reservation.at:
                continue
            leftovers = pool - _whole_free_boxes(x, pool)
            if leftovers != pool and leftovers:
                packed = x.table.plan(job, frozenset(leftovers))
                if packed.plan and packed.plan.step.tokens_per_s >= NEARLY_AS_FAST * outcome.plan.step.tokens_per_s:
                    return packed
            return outcome
        return None

    def _leave_to_rival(self, job: QueuedJob, now: Outcome, rivals: list[QueuedJob], x: PolicyInput, free: set[str],
                        reservation: Reservation | None) -> Outcome:
        """Other free cards for this job when a waiting job of the same priority values the cards it would
        take more: the sum of normalised throughputs (Gavel's measure) grows by more than SWAP_MARGIN."""
        taken = set(now.cards)
        for rival in [r for r in rivals if r.priority == job.priority][:RIVALS]:
            theirs = x.table.plan(rival, frozenset(free))
            if not theirs.plan or not taken & set(theirs.cards):
                continue
            other = self._place(job, x, free - set(theirs.cards), reservation)
            if other is None:
                continue
            keep = x.table.normalised(job, now) + x.table.normalised(rival, x.table.plan(rival, frozenset(free - taken)))
            swap = x.table.normalised(job, other) + x.table.normalised(rival, theirs)
            if swap > keep * (1 + SWAP_MARGIN):
                return other
        return now

    def _better_soon(self, job: QueuedJob, now: Outcome, best: Outcome, x: PolicyInput, running: list[RunningJob],
                     reservation: Reservation | None) -> float | None:
        """When its best cards free up soon enough that waiting for them ends this job sooner than starting
        now, the time it would end that way; else None. A card held by a running job frees at its estimated
        end; one reserved for the head job, when that job would end on it; one left to a job that gains more
        from it this round, or held outside the queue, gives no estimate and so no reason to wait."""
        if set(best.cards) <= set(now.cards) or x.table.normalised(job, now) >= 1.0:
            return None
        free_at = x.now
        for card in best.cards:
            holder = next((r for r in running if card in r.cards), None)
            if holder:
                free_at = max(free_at, holder.est_end)
            elif reservation and card in reservation.cards:
                free_at = max(free_at, reservation.until)
            else:
                return None
        end_waiting = free_at + best.duration_s(job.total_steps)
        end_now = x.now + now.duration_s(job.total_steps)
        return end_waiting if end_waiting < x.now + WAIT_MARGIN * (end_now - x.now) else None

    def _reserve(self, job: QueuedJob, x: PolicyInput, free: set[str]) -> Reservation | None:
        """The cards this job gets, and when, if running jobs end as estimated and nothing else starts."""
        pool = set(free)
        for running in sorted(x.running, key=lambda r: r.est_end):
            pool |= set(running.cards)
            outcome = x.table.plan(job, frozenset(pool))
            if outcome.plan:
                return Reservation(job.id, frozenset(outcome.cards), running.est_end, running.est_end + outcome.duration_s(job.total_steps))
        return None


def aged_priority(job: QueuedJob, x: PolicyInput) -> int:
    """The highest priority among the queued jobs that its own priority plus AGING_PER_HOUR per hour waited has
    reached: after (q - p) / AGING_PER_HOUR hours a priority-p job queues as an equal of the priority-q jobs
    (first by response ratio among them), so no stream of higher-priority jobs keeps it waiting for ever. Whole
    priority classes, not a sliding score: within a class the order stays shortest-response-ratio first."""
    reached = job.priority + AGING_PER_HOUR * max(0.0, x.now - job.submitted_at) / 3600
    return max((j.priority for j in x.queue if job.priority <= j.priority <= reached), default=job.priority)


def _whole_free_boxes(x: PolicyInput, pool: set[str]) -> set[str]:
    """Cards of multi-card boxes all of whose cards are in `pool`."""
    whole = set()
    for node in x.table.cluster.nodes:
        ids = {c.card_id for c in node.cards}
        if len(ids) > 1 and ids <= pool:
            whole |= ids
    return whole
