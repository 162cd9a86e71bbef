"""The scheduler: one round (`tick`) turns the queue and the free cards into started jobs.

    finish what ended -> collect the launches and stops that ended (binding.py) -> free cards (Ray's live
    reservations and the queue's holds) -> the policy's assignments -> for each that the boxes' host RAM
    takes beside the jobs already there (host_ram.py): queued -> placing (cards held in the queue) -> the
    launch handed to the binder -> (this round or a later one) running, or queued again

Launching and stopping run apart from the round (binding.py), so a slow launch holds only its own job.

The same class runs the long-lived scheduler on the head (service.py: Ray launches, wall clock) and the
simulator (simulate.py: virtual time, launches that only compute when they end). Only the `Launcher` and
the clock differ, so the simulator proves the code that runs, not a copy of it.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import pydantic

from orchestrator.errors import InputError
from orchestrator.inventory import ClusterSnapshot
from orchestrator.jobspec import JobSpec
from orchestrator.planner import Plan
from orchestrator.queue import ACTIVE, JobRecord, QueueStore, StaleTransition
from orchestrator.scheduler import failures
from orchestrator.scheduler.binding import Binder, Inline
from orchestrator.scheduler.failures import MAX_ATTEMPTS, MAX_MOVES, MAX_RESTARTS, Ending
from orchestrator.scheduler.host_ram import HostRam
from orchestrator.scheduler.links import NetworkLinks
from orchestrator.scheduler.policies import Decision, Move, Policy, PolicyInput, RunningJob
from orchestrator.scheduler.table import QueuedJob, ThroughputTable
from orchestrator.schema import from_validation_error

log = logging.getLogger("zeromix.scheduler")
__all__ = ["MAX_ATTEMPTS", "MAX_RESTARTS", "Ending", "Launcher", "Scheduler", "spec_record", "stored_spec"]


class Launcher(Protocol):
    def cluster(self) -> ClusterSnapshot:
        """Every live card, each marked with the job whose reservation holds it."""

    def reserving(self) -> set[str]:
        """The jobs that hold a reservation, on any node, live or gone (a gone node's reservation takes its card
        back when the node returns)."""

    def check_inputs(self, job_id: str, spec: JobSpec) -> None:
        """First thing in its launch: raise an InputError naming a path the job reads that is gone."""

    def nodes_that_cannot_see(self, directory: str, nodes: list[str]) -> list[str]:
        """Of these nodes, those that do not see what the head writes into `directory` (not shared storage)."""

    def start(self, job: JobRecord, plan: Plan) -> None:
        """Reserve the plan's cards and start the job on them; raise if it could not (nothing left held)."""

    def ended(self, running: list[JobRecord]) -> dict[str, Ending]:
        """Of these jobs, those no longer running, and how they ended."""

    def stop(self, job_id: str) -> None:
        """Stop the job if it runs and free its cards. Idempotent."""

    def move(self, job: JobRecord, reason: str) -> None:
        """Ask the running job to stop at its next step with a checkpoint; `ended` then says it was moved."""


def stored_spec(record: JobRecord) -> JobSpec:
    """The job's spec as the queue stored it, validated by today's code: a field an upgrade no longer accepts is
    one line naming it."""
    try:
        return JobSpec.model_validate(record.spec)
    except pydantic.ValidationError as err:
        raise from_validation_error(f"job {record.id}'s stored spec", JobSpec, err) from None


def on_its_checkpoints_side(spec: JobSpec, placed: dict | None) -> JobSpec:
    """A job placed before (`placed`: the plan it last ran under) may have left checkpoints, and DeepSpeed loads one only
    on its side of ZeRO-3's boundary (workers/checkpoint.across_zero3). Planned again (restarted, moved, or queued
    again by a head restart), a job at `zero_stage: auto` stays on the side it ran on: ZeRO-3 again, or short of it
    (auto's other choice: ZeRO-2; for QLoRA, which never runs ZeRO-3, either of its two)."""
    if placed is None or spec.deepspeed.zero_stage != "auto" or (placed.get("zero_stage") != 3 and spec.method == "qlora"):
        return spec
    stage = 3 if placed.get("zero_stage") == 3 else 2
    return spec.model_copy(update={"deepspeed": spec.deepspeed.model_copy(update={"zero_stage": stage})})


def spec_record(spec: JobSpec) -> dict:
    """A job spec as the queue stores it: what was set, so that it validates again as the same spec."""
    return spec.model_dump(mode="json", exclude_unset=True)


class Scheduler:
    def __init__(self, store: QueueStore, launcher: Launcher, policy: Policy, clock=time.time, binder: Binder | None = None):
        self.store, self.launcher, self.policy, self.clock = store, launcher, policy, clock
        self.binder = binder or Inline()
        self._launching: dict[str, Plan] = {}  # job id -> the plan of its launch in flight
        self._moving: set[str] = set()  # running jobs asked to stop with a checkpoint, until they have
        self._steps_done: dict[str, int] = {}  # a moved job -> the step it resumes after (for its estimated end)
        self._just_moved: set[str] = set()  # moved and queued again, not yet placed: the policy places them first
        self._given_up: set[str] = set()  # launches past their deadline: the job is queued again, stopped once the call returns
        self._table: ThroughputTable | None = None
        self._jobs: dict[str, QueuedJob] = {}  # parsed once per job, not once per round
        self.cards_free = self.cards_held = 0  # as the last round saw them
        self.rounds = 0  # ended so far
        self.last_error: str | None = None  # why the last round stopped early, one line; None when it completed
        self.turns: tuple[str, ...] = ()  # the queued jobs in the order the last round's policy served them

    def queued_job(self, record: JobRecord) -> QueuedJob:
        if record.id not in self._jobs:
            spec = on_its_checkpoints_side(stored_spec(record), record.plan)
            self._jobs[record.id] = QueuedJob(record.id, spec, record.priority, record.submitted_at, record.total_steps,
                                              tuple(sorted(record.memory_caps.items())), moved=record.id in self._just_moved)
        return self._jobs[record.id]

    def _running(self, record: JobRecord, now: float, table: ThroughputTable, moving_to: tuple[str, ...]) -> RunningJob:
        """An active job as the policy sees it, holding the cards it is being moved to as well as its own. One the
        policy may move must be running (not still placing), not already asked to move (by this scheduler, or by
        the one before a restart: the queue still holds the cards it is moving to), moved fewer than MAX_MOVES
        times, and still plannable: its spec parses and its model config is still there (a job that cannot be
        planned must not stop the round)."""
        movable = (record.state == "running" and record.id not in self._moving and not moving_to
                   and self.store.moves(record.id) < MAX_MOVES)
        try:
            job = self.queued_job(record) if movable else None
            if job:
                table.best(job)
        except Exception:  # the policy will not move it; the job itself runs on as placed
            job = None
        return RunningJob(record.id, record.cards + moving_to, record.est_end or now, record.submitted_at, job,
                          (record.plan or {}).get("est_step_s", 0.0))

    def table(self, snapshot: ClusterSnapshot) -> ThroughputTable:
        """Rebuilt when anything the planner reads about the cards changes (a node joined or left, `zeromix probe`
        measured new rates, a job recorded a card's speed, a driver was upgraded), else kept with its cache."""
        cluster = snapshot.with_holders({})
        if self._table is None or self._table.cluster != cluster:
            self._table = ThroughputTable(cluster)
        return self._table

    def recover(self) -> None:
        """After a (re)start: a job caught between queued and running is stopped and queued again, so
        nothing runs twice; running jobs are checked against Ray on the first tick."""
        self._requeue_placing("the scheduler restarted while placing it; queued again")

    def tick(self) -> Decision:
        """One round. A job that breaks it (an unreadable spec or model, a planner error) fails on its own with
        its reason and the round goes on; anything else that stops a round is kept in `last_error`."""
        try:
            decision = self._round()
        except Exception as err:
            self.last_error = f"round {self.rounds + 1}: {type(err).__name__}: {_first_line(err)}"
            raise
        finally:
            self.rounds += 1  # rounds ended, whether they completed or not
        self.last_error = None
        return decision

    def _round(self) -> Decision:
        self._finish_ended()
        self._requeue_placing("an earlier round stopped while placing it; queued again")  # none, unless a round broke
        self._settle()
        snapshot = self.launcher.cluster()
        active = self.store.jobs(ACTIVE)
        busy = self.binder.busy()  # not placed again, nor stopped, until their calls return
        self._release_leaked({r.id for r in active} | busy)
        holds = self.store.holds()
        held = {**{c.card_id: c.held_by for c in snapshot.cards if c.held_by}, **holds}
        now = self.clock()
        table = self.table(snapshot)
        running = tuple(self._running(r, now, table, tuple(c for c, j in holds.items() if j == r.id and c not in r.cards)) for r in active)
        queue = self._plannable([r for r in self.store.jobs(("queued",)) if r.id not in busy], table)
        self._jobs = {job.id: job for job in (*queue, *(r.job for r in running if r.job))}  # the others are forgotten
        free = tuple(c for c in snapshot.cards if c.card_id not in held)
        self.cards_free, self.cards_held = len(free), len(snapshot.cards) - len(free)
        ram = HostRam.in_use(snapshot, active)
        links = NetworkLinks.in_use(active, now)
        decision = self.policy.allocate(PolicyInput(now, queue, free, running, table, ram, links))  # (gain counts on copies)
        self.turns = decision.turns or tuple(job.id for job in queue)
        started = []
        for assignment in decision.assignments:
            short = ram.shortfall(assignment.plan)
            if short:  # a policy that does not count the boxes' RAM (gain does) placed two jobs that overcommit one
                decision.waiting[assignment.job_id] = short
                continue
            ram.take(assignment.job_id, assignment.plan)
            self._start(self.store.get(assignment.job_id), assignment.plan)
            started.append(assignment)
        decision.assignments = started
        movable = {r.id for r in running if r.job}
        self._move(decision.moves, [r for r in active if r.id in movable])
        self._settle()  # the launches that ended already (all of them, with the inline binder)
        self.store.set_reasons(decision.waiting)
        return decision

    def _plannable(self, records: list[JobRecord], table: ThroughputTable) -> tuple[QueuedJob, ...]:
        """The queued jobs the policy may see. One whose stored spec no longer validates (an upgrade), whose model
        config cannot be read (moved, a disk gone) or that the planner cannot plan fails here with that reason:
        a job that cannot be planned must not stop the others."""
        plannable = []
        for record in records:
            try:
                job = self.queued_job(record)
                table.best(job)  # reads its model's config and plans it on the whole cluster; the policy reuses it
            except Exception as err:
                self._transition(record.id, "queued", "failed", f"cannot be planned any more: {type(err).__name__}: {_first_line(err)}")
                continue
            plannable.append(job)
        return tuple(plannable)

    def _finish_ended(self) -> None:
        running = self.store.jobs(("running",))
        for job_id, ending in self.launcher.ended(running).items():
            self._stop(job_id)  # the job's own exit frees its cards; this catches a driver that died first
            record = self.store.get(job_id)
            restarts = self.store.returns(job_id, "running") - self.store.moves(job_id)
            verdict = failures.decide(ending, restarts, record.plan, record.memory_caps)
            self._moving.discard(job_id)
            self._jobs.pop(job_id, None)  # parsed again when queued: moved or not
            if ending.steps_done is not None:
                self._steps_done[job_id] = ending.steps_done
                self._just_moved.add(job_id)
            elif verdict.state != "queued":
                self._steps_done.pop(job_id, None)
            self._transition(job_id, "running", verdict.state, verdict.reason, memory_caps=verdict.memory_caps)

    def _release_leaked(self, active: set[str]) -> None:
        """A reservation whose job the queue does not count as active (cancelled meanwhile, or left by a crash or
        a stop that failed), also on a node that is gone now."""
        for holder in self.launcher.reserving() - active:
            self._stop(holder)

    def _move(self, moves: dict[str, Move], movable: list[JobRecord]) -> None:
        """Ask the jobs the policy moves to stop with a checkpoint, of those this round found movable (`_running`: once
        each, at most MAX_MOVES times a job); each is queued again when it has, resuming there. The cards it is moved
        for are held for it while it saves (no other job takes them meanwhile), and given back when it is queued
        again, where it is placed first."""
        for record in movable:
            if record.id in moves:
                move = moves[record.id]
                try:
                    self.launcher.move(record, move.reason)
                except Exception as err:  # Ray's KV store did not take it: the policy asks again next round
                    log.warning("asking %s to move failed: %s", record.id, _first_line(err))
                    continue
                self._moving.add(record.id)
                self.store.hold(record.id, tuple(c for c in move.cards if c not in record.cards))
                log.info("moving %s: %s", record.id, move.reason)

    def _start(self, record: JobRecord, plan: Plan) -> None:
        """queued -> placing, its cards held in the queue; the launch itself is the binder's."""
        spec = self.queued_job(record).spec  # parsed once this round, for the policy
        if not self._transition(record.id, "queued", "placing", f"placing on {_cards(plan)}",
                                cards=tuple(r.card.card_id for r in plan.ranks), plan=plan.summary()):
            return
        placed = self.store.get(record.id)  # as placed: this placement's attempt number (read here: the store is this thread's)
        self._just_moved.discard(record.id)
        self._jobs.pop(record.id, None)  # parsed again with this plan: a move weighed while it runs keeps its checkpoints' side of ZeRO-3
        self._launching[record.id] = plan
        self.binder.launch(record.id, lambda: self._launch(placed, spec, plan))

    def _launch(self, record: JobRecord, spec: JobSpec, plan: Plan) -> None:
        """The binding cycle's call (on the binder's thread: no queue here). A path the job reads that is gone, or an
        output_dir some of its boxes cannot see, is an InputError: the job fails with it, nothing is launched."""
        self.launcher.check_inputs(record.id, spec)
        nodes = sorted({r.card.node for r in plan.ranks})
        blind = self.launcher.nodes_that_cannot_see(spec.output_dir, nodes) if len(nodes) > 1 else []
        if blind:
            raise InputError(f"job {record.id}", "output_dir", spec.output_dir, (
                f"{', '.join(blind)} cannot see it, and a job across boxes ({', '.join(nodes)}) needs an output_dir every "
                "one of them sees (NFS): each rank writes its shards there"))
        self.launcher.start(record, plan)

    def _settle(self) -> None:
        """The binder's news: a launch past its deadline gives its job back to the queue; a launch that ended
        makes its job run, or queues it again (failed, in the end); a stop that failed is logged (`_release_leaked`
        frees its cards on a later round)."""
        for job_id in self.binder.overdue() - self._given_up:
            self._given_up.add(job_id)
            self._launch_failed(job_id, f"took longer than {self.binder.deadline_s:.0f} s (its cards are freed once Ray answers)")
        for outcome in self.binder.outcomes():
            job_id = outcome.job_id
            if outcome.what == "stop":
                if outcome.error:
                    log.warning("stopping job %s failed (its cards are freed on a later round): %s", job_id, _first_line(outcome.error))
                continue
            plan = self._launching.pop(job_id, None)
            if plan is None:  # given up at its deadline, and queued again meanwhile: whatever it started goes
                self._given_up.discard(job_id)
                self._stop(job_id)
            elif isinstance(outcome.error, InputError):  # its files: no launch will do better
                self._stop(job_id)
                self._transition(job_id, "placing", "failed", str(outcome.error))
            elif outcome.error:  # a launch that failed leaves nothing held, and the job queued (or failed, in the end)
                self._stop(job_id)
                self._launch_failed(job_id, _first_line(outcome.error))
            elif not self._transition(job_id, "placing", "running", f"running on {_cards(plan)}",
                                      est_end=self.clock() + plan.step.step_s * (plan.total_steps - self._steps_done.get(job_id, 0))):
                self._stop(job_id)  # cancelled while it was being placed

    def _launch_failed(self, job_id: str, why: str) -> None:
        self._launching.pop(job_id, None)
        failed = self.store.returns(job_id, "placing") + 1
        self._transition(job_id, "placing", "failed" if failed >= MAX_ATTEMPTS else "queued", f"launch {failed} of {MAX_ATTEMPTS} failed: {why}")

    def _requeue_placing(self, reason: str) -> None:
        """Jobs in `placing` with no launch in flight (a round that broke, a scheduler that restarted)."""
        busy = self.binder.busy()
        for record in self.store.jobs(("placing",)):
            if record.id not in busy:
                self._stop(record.id)
                self._transition(record.id, "placing", "queued", reason)

    def _stop(self, job_id: str) -> None:
        """Stop a job's Ray side, through the binder. One that fails (the Jobs API down) leaves a reservation that
        `_release_leaked` frees on a later round; it must never leave the job's state unrecorded."""
        self.binder.stop(job_id, lambda: self.launcher.stop(job_id))

    def _transition(self, job_id: str, expected, target: str, reason: str, **fields) -> bool:
        try:
            self.store.transition(job_id, expected, target, reason, **fields)
            return True
        except StaleTransition:
            return False


def _cards(plan: Plan) -> str:
    return " + ".join(f"{r.card.card_id} {r.card.short_name}" for r in plan.ranks)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__
