"""The default policy: heterogeneity-aware placement with backfill.

Each round, jobs in order: first those it has just moved (rule 6), then those past their due time (a bound on
every job's wait, below), earliest due first; then the others by priority (plus aging), then response ratio:
  1. The planner's throughput table says how fast the job runs on the free cards and on its best cards
     (normalised per job, as in Gavel). A 1080 Ti is worth little to a bf16 job and much to an fp32 one:
     when a job of the same priority waiting behind gains more from the cards this job would take than
     this job loses by taking others, this job takes the others (comparative advantage), provided both
     then start and this one keeps MIN_SHARE of its best speed.
  2. Start now, or wait for better cards? A job waits for its best cards (a one-card job: any card of that
     model) only when, after the jobs ahead of it that wait for the same cards have had them, it would still end
     sooner on them than on the cards free now. A job that would get under MIN_SHARE of its best speed from the
     free cards waits too, while that turn would end it sooner (or while nothing says when the turn comes), and
     in either case only until it has waited PATIENCE times its run on its best cards: then it takes the free
     cards, however slow (README: "The scheduler: measured" has what that costs once). So every wait for better
     cards is bounded: by the estimated ends of running jobs and of the jobs ahead, or by PATIENCE x its own best run.
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
  6. A job just moved (stopped with a checkpoint to be placed again: rule 8, or `zeromix move`) goes first and
     takes its fastest plan on the free cards where the boxes have room (rule 7): it was moved for them.
  7. What a box's jobs share (links.py, host_ram.py). A plan goes only where the boxes' host RAM holds it beside
     the jobs already there, else on the other boxes' free cards. A plan across boxes whose network links other
     jobs across boxes already use is priced at what it will cost: its collectives slowed by the sharing, plus the
     time it adds to those jobs; a plan that keeps off those links goes instead when it ends sooner than that.
     Every rule above then judges the plan the job would really get.
  8. Moves. Cards still free once every queued job has had its turn (and not reserved for the head job) may go
     to a running job, longest rest first: it stops at its next step with a checkpoint and is placed again, first,
     when its rest on the cards it would get (its own and those free) plus the measured cost of the move (saving
     the checkpoint, starting, loading the weights: sim_costs.yaml) is under MOVE_GAIN of its rest where it runs.
     The scheduler holds those cards for it while it saves (`Move.cards`), so rule 6 finds them free.
     The scheduler moves a job at most MAX_MOVES times; the reason is in the job's events and `zeromix queue`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from orchestrator.scheduler.costs import Costs
from orchestrator.scheduler.host_ram import HostRam
from orchestrator.scheduler.links import NetworkLinks
from orchestrator.scheduler.policies import Assignment, Decision, Move, PolicyInput, RunningJob, clock, why_waiting
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
MOVE_GAIN = 0.8  # move a running job only when its rest elsewhere, the move's cost included, is under 80% of its rest


@dataclass(frozen=True)
class Reservation:
    job_id: str
    cards: frozenset[str]
    at: float  # when the cards are expected free (an estimate)
    until: float  # when that job is expected to end on them (an estimate)


@dataclass
class Boxes:
    """What the jobs placed on a box share, this round's starts included: its host RAM and its network link."""

    ram: HostRam
    links: NetworkLinks

    def run_s(self, job: QueuedJob, outcome: Outcome) -> float:
        """Its run on these cards with the links shared as they are now (an estimate)."""
        return outcome.duration_s(job.total_steps) * self.links.stretch(outcome.plan)


class Gain:
    name = "gain"

    def allocate(self, x: PolicyInput) -> Decision:
        decision, free = Decision(), set(x.free_ids)
        running = list(x.running)  # grows with this round's starts, so later jobs see when those cards free up
        claims: dict[str, float] = {}  # card -> until when jobs ahead, waiting for it, would use it (estimate)
        reservation: Reservation | None = None
        boxes = Boxes(x.host_ram.copy() if x.host_ram else HostRam({}),  # both grow with this round's starts
                      x.links.copy() if x.links else NetworkLinks())
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
            roomy = self._with_room(job, now, x, boxes, free, reservation)
            if roomy is None:
                decision.waiting[job.id] = why_waiting(job, x, boxes.ram.shortfall(now.plan))
                continue
            if job.moved:  # moved for the cards free now (rule 6): it takes them, it does not wait for others
                self._start(job, roomy, x, boxes, decision, free, running)
                continue
            now = self._leave_to_rival(job, roomy, order[position + 1:WINDOW], x, free, reservation, running, claims, boxes)
            share = x.table.normalised(job, now) / boxes.links.stretch(now.plan)
            if share < MIN_SHARE and running and x.now - job.submitted_at < PATIENCE * best.duration_s(job.total_steps):
                turn = _turn_at_best(job, now, x, running, reservation, claims)
                if turn is None or turn.end < x.now + boxes.run_s(job, now):
                    claims.update({card: turn.end for card in turn.cards} if turn else {})
                    reservation = reservation or self._reserve(job, x, free, running)
                    until = (f"it would end about {clock(turn.end)} on them" if turn else
                             f"until about {clock(job.submitted_at + PATIENCE * best.duration_s(job.total_steps))}")
                    decision.waiting[job.id] = why_waiting(job, x, f"the free cards would give it {share:.0%} of its best speed (estimate); it "
                                                                    f"waits for better ones, {until}")
                    continue
                # (its turn would end it later than the free cards: so no wait for faster cards either)
            elif (turn := self._better_soon(job, now, x, running, reservation, claims, boxes)) is not None:
                claims.update({card: turn.end for card in turn.cards})
                decision.waiting[job.id] = why_waiting(job, x, self._noting_due(job, x, due_at, (
                    f"waits for faster cards: it would end about {clock(turn.end)} on them, "
                    f"later on the free {' + '.join(r.card.short_name for r in now.plan.ranks)}")))
                continue
            self._start(job, now, x, boxes, decision, free, running)
        decision.moves = self._moves(x, free - (reservation.cards if reservation else set()), boxes)
        return decision

    @staticmethod
    def _start(job: QueuedJob, now: Outcome, x: PolicyInput, boxes: Boxes, decision: Decision, free: set[str],
               running: list[RunningJob]) -> None:
        """Assign it; what later jobs in this round see (free cards, running jobs, RAM and links) counts it."""
        run_s = boxes.run_s(job, now)
        boxes.ram.take(job.id, now.plan)
        boxes.links.take(job.id, now.plan, run_s)
        decision.assignments.append(Assignment(job.id, now.plan))
        free -= set(now.cards)
        running.append(RunningJob(job.id, now.cards, x.now + run_s, job.submitted_at))

    @staticmethod
    def _moves(x: PolicyInput, spare: set[str], boxes: Boxes) -> dict[str, Move]:
        """Running jobs that end sooner on the spare cards (rule 8), and the cards each is moved for."""
        moves: dict[str, Move] = {}
        for r in sorted(x.running, key=lambda r: r.est_end, reverse=True):
            if not spare:
                break
            if not (r.job and r.est_step_s):
                continue
            rest = r.est_end - x.now
            if rest <= 0:
                continue  # past its estimated end: how much is left is not known, so neither is what a move saves
            there = x.table.plan(r.job, frozenset(spare | set(r.cards)))
            if not there.plan or set(there.cards) == set(r.cards):
                continue
            if boxes.ram.without(r.id).crowded(there.plan):
                continue  # its boxes there have no room for it beside the other jobs
            moved_s = rest / r.est_step_s * there.plan.step.step_s * boxes.links.stretch(there.plan) + _move_cost_s(there)
            if moved_s < MOVE_GAIN * rest:
                cards = " + ".join(f"{rank.card.card_id} {rank.card.short_name}" for rank in there.plan.ranks)
                moves[r.id] = Move(f"on {cards} its rest would take about {moved_s / 3600:.1f} h instead of {rest / 3600:.1f} h "
                                   "where it runs (estimates; the checkpoint, the start and the weights' load counted)", there.cards)
                spare -= set(there.cards)
        return moves

    def _with_room(self, job: QueuedJob, now: Outcome, x: PolicyInput, boxes: Boxes, free: set[str],
                   reservation: Reservation | None) -> Outcome | None:
        """The plan it gets where its boxes have room (rule 7): off boxes whose host RAM it would overcommit (None
        when the other boxes cannot take it), and off busy network links when that ends it sooner. The plan on the
        other boxes may land on another crowded one (the fragmentation rule prefers part-used boxes, which are the
        ones with jobs on them): each is left out in turn, so a job never waits while a box with room has a card
        for it (it once left 51 of 64 cards idle for five hours with 61 jobs queued)."""
        crowded: set[str] = set()
        while more := set(boxes.ram.crowded(now.plan)):
            crowded |= more
            now = self._place(job, x, {c.card_id for c in x.free if c.card_id in free and c.node not in crowded}, reservation)
            if now is None:
                return None
        return self._off_busy_links(job, now, x, boxes, free)

    @staticmethod
    def _off_busy_links(job: QueuedJob, now: Outcome, x: PolicyInput, boxes: Boxes, free: set[str]) -> Outcome:
        """A plan across boxes whose links other such jobs use costs its own run slowed by the sharing plus the time
        it adds to them; the fastest plan that uses no busy link (on the boxes with quiet links, or inside one of
        its busy boxes) goes instead when it ends sooner than that. Estimates."""
        links = boxes.links
        if links.sharing(now.plan) == 1:
            return now
        run = now.duration_s(job.total_steps)
        cost = run * links.stretch(now.plan) + links.added_s(now.plan, run)
        busy = links.busy_nodes()
        usable = [c for c in x.free if c.card_id in free]
        pools = [{c.card_id for c in usable if c.node not in busy}]
        pools += [{c.card_id for c in usable if c.node == node} for node in {r.card.node for r in now.plan.ranks} & busy]
        for pool in pools:
            other = x.table.plan(job, frozenset(pool)) if pool else None
            if (other and other.plan and links.sharing(other.plan) == 1 and not boxes.ram.crowded(other.plan)
                    and other.duration_s(job.total_steps) < cost):
                now, cost = other, other.duration_s(job.total_steps)
        return now

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
                        reservation: Reservation | None, running: list[RunningJob], claims: dict[str, float],
                        boxes: Boxes) -> Outcome:
        """Other free cards for this job when a waiting job of the same priority values the cards it would
        take more: the sum of normalised throughputs (Gavel's measure) grows by more than SWAP_MARGIN, neither job
        would then wait for better cards (a swap that leaves both waiting helps nobody), and this one keeps MIN_SHARE
        of its best speed (a 7B LoRA once gave its 4090 away and ran 212 h on a 3090 and a 3060 across boxes, 24 h
        on its best cards)."""
        taken = set(now.cards)
        for rival in [r for r in rivals if r.priority == job.priority][:RIVALS]:
            if set(x.table.best(rival).cards) <= free - taken:
                continue  # its best cards stay free: these cannot be worth more to it
            theirs = x.table.plan(rival, frozenset(free))
            if not theirs.plan or not taken & set(theirs.cards):
                continue
            other = self._place(job, x, free - set(theirs.cards), reservation)
            other = other and self._with_room(job, other, x, boxes, free - set(theirs.cards), reservation)
            if other is None or x.table.normalised(job, other) / boxes.links.stretch(other.plan) < MIN_SHARE:
                continue  # not onto cards it would crawl on
            keep = x.table.normalised(job, now) + x.table.normalised(rival, x.table.plan(rival, frozenset(free - taken)))
            swap = x.table.normalised(job, other) + x.table.normalised(rival, theirs)
            if (swap > keep * (1 + SWAP_MARGIN) and self._better_soon(job, other, x, running, reservation, claims, boxes) is None
                    and self._better_soon(rival, theirs, x, running, reservation, claims, boxes) is None):
                return other
        return now

    @staticmethod
    def _better_soon(job: QueuedJob, now: Outcome, x: PolicyInput, running: list[RunningJob],
                     reservation: Reservation | None, claims: dict[str, float], boxes: Boxes) -> Turn | None:
        """Its turn at cards like its best ones when waiting for them ends this job sooner than starting now (by
        WAIT_MARGIN of its run); else None."""
        if x.table.normalised(job, now) >= 1.0:
            return None
        turn = _turn_at_best(job, now, x, running, reservation, claims)
        end_now = x.now + boxes.run_s(job, now)
        return turn if turn and turn.end < x.now + WAIT_MARGIN * (end_now - x.now) else None

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


@functools.cache
def _costs() -> Costs:
    return Costs.measured()


def _move_cost_s(outcome: Outcome) -> float:
    """Saving its checkpoint, starting again and loading the weights (sim_costs.yaml: measured or estimate)."""
    costs = _costs()
    return costs.save_s(outcome.plan) + costs.start_s + costs.load_s(outcome.plan)


@dataclass(frozen=True)
class Turn:
    """When a waiting job would get cards as fast as its best ones, and end on them (estimates)."""

    cards: tuple[str, ...]
    end: float


def _turn_at_best(job: QueuedJob, now: Outcome, x: PolicyInput, running: list[RunningJob], reservation: Reservation | None,
                  claims: dict[str, float]) -> Turn | None:
    """Its earliest turn at its best cards: a card held by a running job frees at its estimated end, one reserved
    for the head job when that job would end on it, and then it goes to the jobs ahead of this one that wait for
    it (`claims`: until they would end). A one-card job may take any card of its best card's model where it has
    no memory cap (as fast, so the jobs waiting for that model spread over all of them). A card free now that it
    does not get (another's room or reservation) gives no estimate, nor does one whose job has run past its
    estimated end (when it frees is not known); None when no option has one, or when it already has its best cards."""
    best = x.table.best(job)
    if set(best.cards) <= set(now.cards):
        return None
    options = [best.cards]
    if len(best.cards) == 1:
        model = next(c.model for c in x.table.cluster.cards if c.card_id == best.cards[0])
        capped = {card for card, _ in job.memory_caps}
        options = [(c.card_id,) for c in x.table.cluster.cards if c.model == model and c.card_id not in capped]
    turns = [Turn(cards, at + best.duration_s(job.total_steps)) for cards in options
             if (at := _free_at(cards, x, running, reservation, claims)) is not None]
    return min(turns, key=lambda t: t.end, default=None)


def _free_at(cards: tuple[str, ...], x: PolicyInput, running: list[RunningJob], reservation: Reservation | None,
             claims: dict[str, float]) -> float | None:
    """When all these cards are expected free for a job that waits for them (see `_turn_at_best`)."""
    at = x.now
    for card in cards:
        holder = next((r for r in running if card in r.cards), None)
        if holder and holder.est_end <= x.now:
            return None  # past its estimated end: not "free now"
        if holder:
            at = max(at, holder.est_end, claims.get(card, 0.0))
        elif reservation and card in reservation.cards:
            at = max(at, reservation.until, claims.get(card, 0.0))
        else:
            return None
    return at


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
    return max((p for p in x.priorities if job.priority <= p <= reached), default=job.priority)


def _whole_free_boxes(x: PolicyInput, pool: set[str]) -> set[str]:
    """Cards of multi-card boxes all of whose cards are in `pool`."""
    whole = set()
    for node in x.table.cluster.nodes:
        ids = {c.card_id for c in node.cards}
        if len(ids) > 1 and ids <= pool:
            whole |= ids
    return whole
