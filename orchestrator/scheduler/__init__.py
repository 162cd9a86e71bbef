"""The scheduler: one round (`tick`) turns the queue and the free cards into started jobs.

    finish what ended -> free cards (Ray's live reservations and the queue's holds) -> the policy's
    assignments -> for each: queued -> placing (cards held in the queue) -> reserve + launch -> running

The same class runs the long-lived scheduler on the head (service.py: Ray launches, wall clock) and the
simulator (simulate.py: virtual time, launches that only compute when they end). Only the `Launcher` and
the clock differ, so the simulator proves the code that runs, not a copy of it.
"""

from __future__ import annotations

import time
from typing import NamedTuple, Protocol

from orchestrator.inventory import ClusterSnapshot
from orchestrator.jobspec import JobSpec
from orchestrator.planner import Plan
from orchestrator.queue import ACTIVE, JobRecord, QueueStore, StaleTransition
from orchestrator.scheduler.policies import Decision, Policy, PolicyInput, RunningJob
from orchestrator.scheduler.table import QueuedJob, ThroughputTable

MAX_ATTEMPTS = 3  # launches that may fail before a job is marked failed
MAX_RESTARTS = 3  # times a job that lost a card or node (or ran out of memory) is placed again


class Ending(NamedTuple):
    """How a running job ended. `retryable`: it lost a card, a node or its memory, not its mind: placing it
    again, on the cards free then, resumes it from its last checkpoint."""

    state: str  # succeeded | failed | cancelled | queued (Ray lost it: placed again)
    reason: str
    retryable: bool = False
    out_of_memory: str | None = None  # the card that ran out of memory, if that was why


def memory_cap_mib(plan: dict, card: str) -> int:
    """What a card that ran out of memory may use for the job from now on: the plan's estimate for it less half
    of its activations, so the planner gives it a smaller micro-batch, checkpointing or offload (or other cards)."""
    parts = next(r for r in plan["ranks"] if r["card"] == card)["est_mem_breakdown_gib"]  # 4 significant figures each
    return int((sum(parts.values()) - parts["activations"] / 2) * 1024)


class Launcher(Protocol):
    def cluster(self) -> ClusterSnapshot:
        """Every live card, each marked with the job whose reservation holds it."""

    def start(self, job: JobRecord, plan: Plan) -> None:
        """Reserve the plan's cards and start the job on them; raise if it could not (nothing left held)."""

    def ended(self, running: list[JobRecord]) -> dict[str, Ending]:
        """Of these jobs, those no longer running, and how they ended."""

    def stop(self, job_id: str) -> None:
        """Stop the job if it runs and free its cards. Idempotent."""


def spec_record(spec: JobSpec) -> dict:
    """A job spec as the queue stores it: what was set, so that it validates again as the same spec."""
    return spec.model_dump(mode="json", exclude_unset=True)


class Scheduler:
    def __init__(self, store: QueueStore, launcher: Launcher, policy: Policy, clock=time.time):
        self.store, self.launcher, self.policy, self.clock = store, launcher, policy, clock
        self._table: ThroughputTable | None = None
        self._jobs: dict[str, QueuedJob] = {}  # parsed once per job, not once per round
        self.cards_free = self.cards_held = 0  # as the last round saw them

    def queued_job(self, record: JobRecord) -> QueuedJob:
        if record.id not in self._jobs:
            self._jobs[record.id] = QueuedJob(record.id, JobSpec.model_validate(record.spec), record.priority,
                                              record.submitted_at, record.total_steps, tuple(sorted(record.memory_caps.items())))
        return self._jobs[record.id]

    def table(self, snapshot: ClusterSnapshot) -> ThroughputTable:
        """Rebuilt when the cluster's cards change (a node joined or left), else kept with its cache."""
        cards = [c.card_id for c in snapshot.cards]
        if self._table is None or [c.card_id for c in self._table.cluster.cards] != cards:
            self._table = ThroughputTable(snapshot.with_holders({}))
        return self._table

    def recover(self) -> None:
        """After a (re)start: a job caught between queued and running is stopped and queued again, so
        nothing runs twice; running jobs are checked against Ray on the first tick."""
        for record in self.store.jobs(("placing",)):
            self.launcher.stop(record.id)
            self._transition(record.id, "placing", "queued", "the scheduler restarted while placing it; queued again")

    def tick(self) -> Decision:
        self._finish_ended()
        snapshot = self.launcher.cluster()
        active = self.store.jobs(ACTIVE)
        self._release_leaked(snapshot, {r.id for r in active})
        held = {**{c.card_id: c.held_by for c in snapshot.cards if c.held_by}, **self.store.holds()}
        now = self.clock()
        running = tuple(RunningJob(r.id, r.cards, r.est_end or now) for r in active)
        queue = tuple(self.queued_job(r) for r in self.store.jobs(("queued",)))
        self._jobs = {job.id: job for job in queue}  # only queued jobs are parsed again; the rest are forgotten
        free = tuple(c for c in snapshot.cards if c.card_id not in held)
        self.cards_free, self.cards_held = len(free), len(snapshot.cards) - len(free)
        decision = self.policy.allocate(PolicyInput(now, queue, free, running, self.table(snapshot)))
        for assignment in decision.assignments:
            self._start(self.store.get(assignment.job_id), assignment.plan)
        self.store.set_reasons(decision.waiting)
        return decision

    def _finish_ended(self) -> None:
        running = self.store.jobs(("running",))
        for job_id, ending in self.launcher.ended(running).items():
            self.launcher.stop(job_id)  # the job's own exit frees its cards; this catches a driver that died first
            state, reason, caps = ending.state, ending.reason, None
            if ending.out_of_memory:
                record = self.store.get(job_id)
                caps = {**record.memory_caps, ending.out_of_memory: memory_cap_mib(record.plan, ending.out_of_memory)}
                reason += f"; {ending.out_of_memory} is planned with at most {caps[ending.out_of_memory]:,} MiB for it from now on"
            if ending.retryable:
                restarts = self.store.returns(job_id, "running")
                if restarts < MAX_RESTARTS:
                    state, reason = "queued", (f"{reason}; placed again on the cards free now, resuming from its last "
                                               f"checkpoint (restart {restarts + 1} of {MAX_RESTARTS})")
                else:
                    reason = f"{reason}; not restarted again (it was restarted {MAX_RESTARTS} times)"
            self._transition(job_id, "running", state, reason, memory_caps=caps)

    def _release_leaked(self, snapshot: ClusterSnapshot, active: set[str]) -> None:
        """A reservation whose job the queue does not count as active (cancelled meanwhile, or left by a crash)."""
        for holder in {c.held_by for c in snapshot.cards if c.held_by} - active:
            self.launcher.stop(holder)

    def _start(self, record: JobRecord, plan: Plan) -> None:
        cards = tuple(r.card.card_id for r in plan.ranks)
        describe = " + ".join(f"{r.card.card_id} {r.card.short_name}" for r in plan.ranks)
        if not self._transition(record.id, "queued", "placing", f"placing on {describe}", cards=cards, plan=plan.summary()):
            return
        try:
            self.launcher.start(self.store.get(record.id), plan)  # as placed: this placement's attempt number
        except Exception as err:  # a launch that failed leaves nothing held, and the job queued (or failed, in the end)
            self.launcher.stop(record.id)
            failed = self.store.returns(record.id, "placing") + 1
            self._transition(record.id, "placing", "failed" if failed >= MAX_ATTEMPTS else "queued",
                             f"launch {failed} of {MAX_ATTEMPTS} failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
            return
        est_end = self.clock() + plan.step.step_s * plan.total_steps
        if not self._transition(record.id, "placing", "running", f"running on {describe}", est_end=est_end):
            self.launcher.stop(record.id)  # cancelled while it was being placed

    def _transition(self, job_id: str, expected, target: str, reason: str, **fields) -> bool:
        try:
            self.store.transition(job_id, expected, target, reason, **fields)
            return True
        except StaleTransition:
            return False
