"""What a user asks of zeromix, as functions that return values: the CLI and the demo draw them, tests call them.

Every call about jobs goes to the scheduler actor on the head, which owns the queue: `submit` on a joined box
stores the job in the head's queue, as it does on the head, and `watch` follows it from anywhere. Nothing here
prints; following a job yields its changes (`Waiting`, `Step`, `Ended`) for a renderer to draw.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from orchestrator import cluster_runtime, registry
from orchestrator.cluster_config import load_cluster
from orchestrator.errors import InputError, ZeromixError
from orchestrator.inventory import ClusterSnapshot, snapshot_from_config
from orchestrator.job_states import LIVE, TERMINAL
from orchestrator.jobspec import JobSpec, load_job, total_steps
from orchestrator.model_facts import ModelFacts, facts_from_config, read_config
from orchestrator.planner import Plan, make_plan, on_the_same_cards
from orchestrator.queue import JobRecord
from workers import job_records

POLL_S = 1.0
CALL_TIMEOUT_S = 30  # one answer from the scheduler actor
PLACING_TIMEOUT_S = 240  # a job being placed (reserve + submit) that takes longer is reported (the binder gives up at 180 s)
END_RECORDED_TIMEOUT_S = 60  # the job wrote its result or failure; the scheduler records its end on a round after Ray's


# ------------------------------------------------------------------------------------------ the scheduler
_schedulers: dict[str, object] = {}  # cluster id -> the scheduler actor's handle, found once per process


def scheduler():
    """The scheduler actor, started on the head if it is not running (a queue nobody schedules never moves)."""
    from orchestrator.scheduler.service import ensure_running

    state = cluster_runtime.connect()
    if state.cluster_id not in _schedulers:
        _schedulers[state.cluster_id] = ensure_running(state)
    return _schedulers[state.cluster_id]


def _ask(method: str, *args):
    """One call to the scheduler actor, with a deadline. An actor replaced meanwhile is looked up again once."""
    cluster_runtime.connect()  # before Ray is imported here: it reads the cluster's token auth settings at its import
    import ray

    for attempt in (1, 2):
        try:
            return ray.get(getattr(scheduler(), method).remote(*args), timeout=CALL_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ZeromixError(f"the zeromix scheduler did not answer {method} within {CALL_TIMEOUT_S} s; `zeromix queue` "
                               "again in a minute, and its log is in the Ray dashboard (actor zeromix-scheduler)") from None
        except ray.exceptions.RayActorError:
            _schedulers.clear()
            if attempt == 2:
                raise


def start_scheduler(state: cluster_runtime.ClusterState) -> None:
    from orchestrator.scheduler.service import ensure_running

    cluster_runtime.connect(state)
    ensure_running(state)


# ------------------------------------------------------------------------------------------ plan and submit
def job_and_facts(job_file: str, overrides: list[str]) -> tuple[JobSpec, ModelFacts]:
    job = load_job(job_file, overrides=overrides)  # schema and paths are checked before the cluster is touched
    facts = facts_from_config(read_config(job.model.path))
    facts.check_seq_len(job.seq_len, job_file)
    return job, facts


@dataclass(frozen=True)
class Planned:
    plan: Plan
    # QLoRA: the same job with a 16-bit base (method lora) on the same cards: its plan, or why it does not fit
    as_lora: Plan | str | None = None


def plan(job_file: str, overrides: list[str], pool: str | None = None) -> Planned:
    """Against the live cluster's cards (free memory as NVML reports it now), or a pool file without Ray."""
    job, facts = job_and_facts(job_file, overrides)
    if pool:
        snapshot = snapshot_from_config(load_cluster(pool))
    else:
        try:
            cluster_runtime.connect()
        except ZeromixError as err:  # no cluster here, or none answering: a plan can do without one
            raise ZeromixError(f"{err}; or plan against a file of cards, with no cluster: "
                               f"`zeromix plan {job_file} --pool cluster.yaml`") from None
        snapshot = registry.snapshot(live_free_memory=True)
    chosen = make_plan(job, facts, snapshot, total_steps(job))
    as_lora = on_the_same_cards(job.model_copy(update={"method": "lora", "quant": None}), facts, snapshot, chosen) if job.method == "qlora" else None
    return Planned(chosen, as_lora)


@dataclass(frozen=True)
class Submitted:
    job_id: str
    preview: Plan  # on the whole cluster, nothing held: where it would run if it were alone


def submit(job_file: str, overrides: list[str]) -> Submitted:
    """Validate against files and the cluster's cards (a job that fits nowhere is refused, nothing stored), then
    queue it on the head."""
    from orchestrator.launch import new_job_id
    from orchestrator.scheduler import spec_record

    job, facts = job_and_facts(job_file, overrides)
    cluster_runtime.connect()
    steps = total_steps(job)
    snapshot = registry.snapshot().with_holders({})
    _check_simulated_nodes_run_qlora(job_file, job, snapshot)
    preview = make_plan(job, facts, snapshot, steps)
    job_id = new_job_id(job)
    clash = _ask("submit", job_id, job.name, spec_record(job), steps, job.priority)
    if clash:
        raise InputError(job_file, "output_dir", job.output_dir, f"{clash}; choose another")
    return Submitted(job_id, preview)


def _check_simulated_nodes_run_qlora(job_file: str, job: JobSpec, snapshot: ClusterSnapshot) -> None:
    """A real node reports whether it has bitsandbytes (the planner leaves its cards out if not, saying so); simulated
    nodes run their ranks in this machine's Python, so it is checked here."""
    if job.method != "qlora" or not any(n.simulated for n in snapshot.nodes):
        return
    from workers.gpu_probe import installed_version

    if not installed_version("bitsandbytes"):
        raise InputError(job_file, "method", job.method, "it needs bitsandbytes, which this machine's Python (where the simulated "
                                                          "nodes run) lacks: pip install 'zeromix[qlora]'")


# ------------------------------------------------------------------------------------------ the queue
@dataclass(frozen=True)
class QueueView:
    jobs: list[JobRecord]
    cards: list[dict]  # card, gpu, held_by
    scheduler: dict  # policy, rounds, last_error, turns

    @property
    def waiting(self) -> list[JobRecord]:
        """The queued jobs in the order the scheduler's last round served them (the gain policy: priority, aged by
        waiting, then shortest response ratio); jobs it has not seen yet after them, in arrival order."""
        turn = {job_id: i for i, job_id in enumerate(self.scheduler.get("turns", []))}
        return sorted((r for r in self.jobs if r.state == "queued"), key=lambda r: (turn.get(r.id, len(turn)), r.submitted_at))


def queue(show_all: bool = False) -> QueueView:
    health = _ask("health")
    jobs = _ask("jobs", None if show_all else LIVE)
    cards = [{"card": c.card_id, "gpu": c.short_name, "held_by": c.held_by} for c in registry.snapshot().cards]
    return QueueView(jobs, cards, health)


def job(job_id: str) -> JobRecord:
    """A job by id, or by a prefix only one job has."""
    record, why_not = _ask("find", job_id)
    if record is None:
        raise ZeromixError(f"no job {why_not!r} in the queue; `zeromix queue --all` lists them")
    return record


@dataclass(frozen=True)
class Cancelled:
    job_id: str
    was: str  # the state it left, or the terminal state it had already reached
    cancelled: bool


def cancel(job_id: str) -> Cancelled:
    record = job(job_id)
    if record.state in TERMINAL:
        return Cancelled(record.id, record.state, False)
    was, cancelled = _ask("cancel", record.id)
    return Cancelled(record.id, was, cancelled)


def move(job_id: str) -> tuple[str, str, bool]:
    """(its id, its state, whether it was asked to move): only a running job can be."""
    record = job(job_id)
    if record.state != "running":
        return record.id, record.state, False
    was, asked = _ask("move", record.id)
    return record.id, was, asked


def logs(job_id: str) -> str:
    """Its Ray job's whole log (empty for a job that never started)."""
    record = job(job_id)
    if record.state == "queued" and not record.attempts:
        return ""
    from orchestrator.launch import JobLog

    log = JobLog(**_ask("job_log", record.ray_job_id))
    if log.missing:
        raise ZeromixError(f"Ray has no logs for {record.id} (it ended before the head restarted?)")
    if log.error:
        raise ZeromixError(f"Ray's Jobs API did not give the log of {record.id}: {log.error}; `zeromix logs {record.id}` again later")
    return log.text


def write_report(job_id: str, out: str | None) -> Path:
    from orchestrator import report as job_report

    record = job(job_id)
    output_dir = Path(record.spec["output_dir"])
    return job_report.write(job_report.load_result(output_dir, record.id), Path(out) if out else output_dir / job_report.REPORT_FILE)


# ------------------------------------------------------------------------------------------ watching
@dataclass(frozen=True)
class Waiting:
    job_id: str
    state: str  # queued | placing
    reason: str


@dataclass(frozen=True)
class Step:
    job_id: str
    step: int
    of: int
    loss: float
    tokens_per_s: float
    step_time_s: float


@dataclass(frozen=True)
class Ended:
    job_id: str
    state: str  # succeeded | failed | cancelled
    result: dict | None  # the driver's result, when it finished


def watch(job_id: str) -> Iterator[Waiting | Step | Ended]:
    """A job's life from now to its end: each change of why it waits, each step while it runs, its end. A job
    restarted after a lost card goes back to waiting and is followed again. Waiting in the queue has no deadline
    (the caller stops watching, not the job); being placed, and the end being recorded, have one."""
    record, last, placing_since = job(job_id), None, None
    while True:
        while (record := _get(record.id)).state in ("queued", "placing"):
            if (record.state, record.reason) != last:
                yield Waiting(record.id, record.state, record.reason)
                last = (record.state, record.reason)
            placing_since = (placing_since or time.monotonic()) if record.state == "placing" else None
            if placing_since and time.monotonic() - placing_since > PLACING_TIMEOUT_S:
                raise ZeromixError(f"{record.id} has been placing for {PLACING_TIMEOUT_S} s; `zeromix queue` says why, "
                                   "and the scheduler's log is in the Ray dashboard (actor zeromix-scheduler)")
            time.sleep(POLL_S)
        if record.state == "running":
            record = yield from _steps(record)
            last = None
        if record.state in TERMINAL:
            yield Ended(record.id, record.state, job_records.get(record.ray_job_id, "result") if record.attempts else None)
            return


def _get(job_id: str) -> JobRecord:
    return _ask("find", job_id)[0]


def _steps(record: JobRecord) -> Iterator[Step]:
    """Each step of this placement, from the progress rank 0 posts (workers/job_records.py), until the scheduler
    records that it ended; returns the job's record then. A job that wrote its end but is still recorded as
    running after END_RECORDED_TIMEOUT_S is reported (the scheduler's rounds do not run)."""
    attempt, seen, ended_at = record.ray_job_id, 0, None
    while True:
        for step in job_records.get(attempt, "progress") or []:
            if step["step"] > seen:
                seen = step["step"]
                yield Step(record.id, step["step"], step["of"], step["loss"], step["tokens_per_s"], step["step_time_s"])
        now = _get(record.id)
        if now.state != "running" or now.ray_job_id != attempt:
            return now
        if ended_at is None and (job_records.get(attempt, "result") or job_records.get(attempt, "failure")):
            ended_at = time.monotonic()
        if ended_at and time.monotonic() - ended_at > END_RECORDED_TIMEOUT_S:
            raise ZeromixError(f"{record.id} ended but the scheduler has not recorded it within {END_RECORDED_TIMEOUT_S} s; "
                               "`zeromix queue` shows whether its rounds run")
        time.sleep(POLL_S)
