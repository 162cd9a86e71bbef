"""The default policy: heterogeneity-aware placement with backfill.

Each round, jobs in order: first those it has just moved (rule 6), then those past their due time (a bound on
every job's wait, below), earliest due first; then the others by priority (plus aging), then response ratio:
  1. The planner's throughput table says how fast the job runs on the free cards and on its best cards
     (normalised per job, as in Gavel). A 1080 Ti is worth little to a bf16 job and much to an fp32 one:
     when a job of the same priority waiting behind gains more from the cards this job would take than
     this job loses by taking others, this job takes the others (comparative advantage), provided both
     then start.
  2. Start now, or wait for better cards? A job waits for its best cards only when, after the jobs ahead of
     it that wait for the same cards have had them, it would still end sooner on them than on the cards free
     now. A job that would get under MIN_SHARE of its best speed from the free cards waits too, but only
     until it has waited PATIENCE times its run on its best cards. So every wait for better cards is bounded:
     by the estimated ends of running jobs and of the jobs ahead, or by PATIENCE x its own best run.
  3. The first job that cannot start reserves the cards it will get when running jobs end (EASY backfill):
     later jobs may use those cards only if they end before that time (estimates), and take them when that
     is faster than the cards nobody reserved.
  4. Bounded waits. A job is due DUE times (its run on its best cards + the work ahead of it) after it was
     submitted, the work ahead being what the jobs submitted before it still have to do, spread over all the
     cards (estimates). A due job goes before every job that is not, priority included: from then on it waits
     only for cards that running jobs hold (EASY's reservation, or its best cards when they free soon enough),
     for due jobs ahead of it, and under MIN_SHARE until PATIENCE x its run. The README states the bound this
     gives; tests/test_simulator.py checks it on every trace family. (Letting a due job take cards below
     MIN_SHARE was tried: on the Poisson mix with estimate error it raised the average JCT from 18 to 47 h.)
  5. No fragmentation: a job that fits on the cards left over in part-used boxes, nearly as fast, goes
     there rather than splitting a whole free box whose cards one job could use together over PCIe.
  6. A job just moved (`zeromix move`: stopped with a checkpoint to be placed again) goes first. This policy moves
     no job itself yet: moving a job to faster cards that free up was tried and made the averages worse (README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator.scheduler.host_ram import HostRam
from orchestrator.scheduler.policies import Assignment, Decision, PolicyInput, RunningJob, clock, why_waiting
from orchestrator.scheduler.table import Outcome, QueuedJob

AGING_PER_HOUR = 6.0  # priority points a queued job gains per hour of waiting
WINDOW = 32  # jobs considered per round, in order; beyond it, only while cards are still free
NEARLY_AS_FAST = 0.9  # "nearly as fast" for the fragmentation rule
MIN_SHARE = 0.25  # a job is not started below this share of its best speed (it would hold slow cards 4x as long) ...
PATIENCE = 30.0  # ... once it has waited this many times its run on its best cards, it takes what is free
RIVALS = 4  # later jobs checked for a better use of this job's cards
SWAP_MARGIN = 0.1  # ... and by how much better it must be
WAIT_MARGIN = 0.9  # wait for better cards only when that ends the job at least 10% sooner (of its run)
DUE = 8.0  # a job is due after DUE x (its run + the work ahead of it): it then goes first, whatever its priority


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
        claims: dict[str, float] = {}  # card -> until when jobs ahead, waiting for it, would use it (estimate)
        reservation: Reservation | None = None
        ram = x.host_ram.copy() if x.host_ram else HostRam({})  # grows with this round's starts
        drain_s, due_at = _drain_s(x), due_times(x)
        order = sorted(x.queue, key=lambda j: (-1, j.submitted_at) if j.moved else (0, due_at[j.id]) if self._due(j, x, due_at)
                       else (1, *self._urgency(j, x, drain_s)))
        decision.turns = tuple(j.id for j in order)
        for position, job in enumerate(order):
            if position >= WINDOW and not free:
                decision.waiting[job.id] = f"{position} job(s) ahead of it in priority order"
                continue
            best = x.table.best(job)
            if not best.plan:
                decision.waiting[job.id] = why_waiting(job, x)
                continue
            now = self._place(job, x, free, reservation)
            if now is None:
                reservation = reservation or self._reserve(job, x, free, running)
                lead = ""
                if reservation and reservation.job_id == job.id:
                    lead = f"expected to start about {clock(reservation.at)} (estimate)"
                elif reservation and x.table.plan(job, frozenset(free)).plan:
                    lead = (f"would run past {clock(reservation.at)} on cards reserved for job {reservation.job_id} "
                            "(estimate), so it waits")
                decision.waiting[job.id] = why_waiting(job, x, self._noting_due(job, x, due_at, lead))
                continue
            now = self._leave_to_rival(job, now, order[position + 1:WINDOW], x, free, reservation, running, claims)
            share = x.table.normalised(job, now)
            if share < MIN_SHARE and running and x.now - job.submitted_at < PATIENCE * best.duration_s(job.total_steps):
                reservation = reservation or self._reserve(job, x, free, running)
                decision.waiting[job.id] = why_waiting(job, x, f"the free cards would give it {share:.0%} of its best speed (estimate); it "
                                                                f"waits for better ones until about {clock(job.submitted_at + PATIENCE * best.duration_s(job.total_steps))}")
                continue
            waits_until = self._better_soon(job, now, x, running, reservation, claims)
            if waits_until is not None:
                claims.update({card: waits_until for card in best.cards})
                decision.waiting[job.id] = why_waiting(job, x, self._noting_due(job, x, due_at, (
                    f"waits for faster cards: it would end about {clock(waits_until)} on them, "
                    f"later on the free {' + '.join(r.card.short_name for r in now.plan.ranks)}")))
                continue
            fits = self._within_host_ram(job, now, x, ram, free, reservation)
            if fits is None:
                decision.waiting[job.id] = why_waiting(job, x, ram.shortfall(now.plan))
                continue
            now = fits
            ram.take(job.id, now.plan)
            decision.assignments.append(Assignment(job.id, now.plan))
            free -= set(now.cards)
            running.append(RunningJob(job.id, now.cards, x.now + now.duration_s(job.total_steps), job.submitted_at))
        return decision

    def _within_host_ram(self, job: QueuedJob, now: Outcome, x: PolicyInput, ram: HostRam, free: set[str],
                         reservation: Reservation | None) -> Outcome | None:
        """Its plan, or, when that would take a box's RAM past what jobs may use there beside those already on it, its
        plan on the free cards of the other boxes (None when there is none)."""
        crowded = set(ram.crowded(now.plan))
        if not crowded:
            return now
        elsewhere = self._place(job, x, {c.card_id for c in x.free if c.card_id in free and c.node not in crowded}, reservation)
        return elsewhere if elsewhere and not ram.crowded(elsewhere.plan) else None

    @staticmethod
    def _due(job: QueuedJob, x: PolicyInput, due_at: dict[str, float]) -> bool:
        return x.now >= due_at.get(job.id, math.inf)

    def _noting_due(self, job: QueuedJob, x: PolicyInput, due_at: dict[str, float], lead: str) -> str:
        """A waiting reason, led by the job's due time once it has passed (why it is first in `zeromix queue`)."""
        due = f"due since about {clock(due_at[job.id])}, so served first" if self._due(job, x, due_at) else ""
        return "; ".join(part for part in (due, lead) if part)

    def _urgency(self, job: QueuedJob, x: PolicyInput, drain_s: float) -> tuple:
        """Priority first, aged. Within a priority, a job that alone runs longer than the whole queue takes to drain
        goes first, longest first (started last, it would set the makespan); then the highest response ratio,
        (waited + run) / run on its best cards, so short jobs go next and every waiting job's ratio grows until
        it is first."""
        best = x.table.best(job)
        run = best.duration_s(job.total_steps) if best.plan else float("inf")
        critical = run > drain_s and best.plan is not None
        return (-aged_priority(job, x), not critical, -run if critical else -((x.now - job.submitted_at) + run) / run, job.submitted_at)

    def _place(self, job: QueuedJob, x: PolicyInput, free: set[str], reservation: Reservation | None) -> Outcome | None:
        """Its fastest plan on the free cards, on reserved cards only if it ends before they are needed (else on the
        cards nobody reserved), and in part-used boxes when that is nearly as fast."""
        pool = set(free)
        outcome = x.table.plan(job, frozenset(pool))
        if (outcome.plan and reservation and set(outcome.cards) & reservation.cards
                and x.now + outcome.duration_s(job.total_steps) > reservation.at):
            pool -= reservation.cards
            outcome = x.table.plan(job, frozenset(pool))
        return self._packed(job, x, pool, outcome) if outcome.plan else None

    @staticmethod
    def _packed(job: QueuedJob, x: PolicyInput, pool: set[str], outcome: Outcome) -> Outcome:
        """The plan on the cards of part-used boxes instead, when it is nearly as fast: whole free boxes stay whole."""
        whole = _whole_free_boxes(x, pool)
        leftovers = pool - whole
        if whole & set(outcome.cards) and leftovers:
            packed = x.table.plan(job, frozenset(leftovers))
            if packed.plan and packed.plan.step.tokens_per_s >= NEARLY_AS_FAST * outcome.plan.step.tokens_per_s:
                return packed
        return outcome

    def _leave_to_rival(self, job: QueuedJob, now: Outcome, rivals: list[QueuedJob], x: PolicyInput, free: set[str],
                        reservation: Reservation | None, running: list[RunningJob], claims: dict[str, float]) -> Outcome:
        """Other free cards for this job when a waiting job of the same priority values the cards it would
        take more: the sum of normalised throughputs (Gavel's measure) grows by more than SWAP_MARGIN, and
        neither job would then wait for better cards (a swap that leaves both waiting helps nobody)."""
        taken = set(now.cards)
        for rival in [r for r in rivals if r.priority == job.priority][:RIVALS]:
            if set(x.table.best(rival).cards) <= free - taken:
                continue  # its best cards stay free: these cannot be worth more to it
            theirs = x.table.plan(rival, frozenset(free))
            if not theirs.plan or not taken & set(theirs.cards):
                continue
            other = self._place(job, x, free - set(theirs.cards), reservation)
            if other is None:
                continue
            keep = x.table.normalised(job, now) + x.table.normalised(rival, x.table.plan(rival, frozenset(free - taken)))
            swap = x.table.normalised(job, other) + x.table.normalised(rival, theirs)
            if (swap > keep * (1 + SWAP_MARGIN) and self._better_soon(job, other, x, running, reservation, claims) is None
                    and self._better_soon(rival, theirs, x, running, reservation, claims) is None):
                return other
        return now

    @staticmethod
    def _better_soon(job: QueuedJob, now: Outcome, x: PolicyInput, running: list[RunningJob],
                     reservation: Reservation | None, claims: dict[str, float]) -> float | None:
        """When waiting for its best cards ends this job sooner than starting now, the time it would end that
        way; else None. A card held by a running job frees at its estimated end, and then goes to the jobs
        ahead of this one that wait for it (`claims`: until they would end); one reserved for the head job,
        when that job would end on it; a card with no such estimate gives no reason to wait."""
        best = x.table.best(job)
        if set(best.cards) <= set(now.cards) or x.table.normalised(job, now) >= 1.0:
            return None
        free_at = x.now
        for card in best.cards:
            holder = next((r for r in running if card in r.cards), None)
            if holder:
                free_at = max(free_at, holder.est_end, claims.get(card, 0.0))
            elif reservation and card in reservation.cards:
                free_at = max(free_at, reservation.until, claims.get(card, 0.0))
            else:
                return None
        end_waiting = free_at + best.duration_s(job.total_steps)
        end_now = x.now + now.duration_s(job.total_steps)
        return end_waiting if end_waiting < x.now + WAIT_MARGIN * (end_now - x.now) else None

    def _reserve(self, job: QueuedJob, x: PolicyInput, free: set[str], running: list[RunningJob]) -> Reservation | None:
        """The cards this job gets, and when, if running jobs (this round's starts included) end as estimated and
        nothing else starts."""
        pool = set(free)
        for holder in sorted(running, key=lambda r: r.est_end):
            pool |= set(holder.cards)
            outcome = x.table.plan(job, frozenset(pool))
            if outcome.plan:
                return Reservation(job.id, frozenset(outcome.cards), holder.est_end, holder.est_end + outcome.duration_s(job.total_steps))
        return None


def due_times(x: PolicyInput) -> dict[str, float]:
    """Job id -> when it is due: submitted + DUE x (its run on its best cards + the work ahead of it). The work
    ahead is what the jobs submitted before it still have to do (a queued one: its run on its best cards; a
    running one: what is left of its estimate), in card-seconds over all the cards: at most the work ahead of it
    when it arrived, so a job is due no later than DUE x (its run + the queue it found). Jobs that fit nowhere
    are left out."""
    n_cards, ahead_card_s, due = max(1, len(x.table.cluster.cards)), 0.0, {}
    arrivals = sorted([(j.submitted_at, 1, j.id, j) for j in x.queue] + [(r.submitted_at, 0, r.id, r) for r in x.running],
                      key=lambda a: a[:3])
    for _, queued, _, item in arrivals:
        if not queued:
            ahead_card_s += max(0.0, item.est_end - x.now) * len(item.cards)
        elif (best := x.table.best(item)).plan:
            run = best.duration_s(item.total_steps)
            due[item.id] = item.submitted_at + DUE * (run + ahead_card_s / n_cards)
            ahead_card_s += run * len(best.cards)
    return due


def _drain_s(x: PolicyInput) -> float:
    """How long the cards would take to run every queued job on its best cards and finish the running ones, if
    the work spread evenly over them (an estimate)."""
    queued = sum(best.duration_s(job.total_steps) * len(best.cards) for job in x.queue if (best := x.table.best(job)).plan)
    running = sum(max(0.0, r.est_end - x.now) * len(r.cards) for r in x.running)
    return (queued + running) / max(1, len(x.table.cluster.cards))


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
