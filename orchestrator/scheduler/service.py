"""The long-lived scheduler on the head: a detached, named Ray actor that runs `Scheduler.tick` every second.

It outlives the clients that submit (`zeromix submit` stores a job in the queue and returns), Ray restarts
it if its process dies, and on every start it reconciles the queue with Ray's job table and live placement
groups (`Scheduler.recover` and the first tick), so a restart loses no job and runs none twice. The queue
itself is the SQLite file in the head's ZEROMIX_HOME; this actor is the only writer of placements.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict

from orchestrator import launch, registry
from orchestrator.cluster_runtime import RAY_NAMESPACE, ClusterState, home
from orchestrator.errors import ZeromixError
from orchestrator.jobspec import JobSpec, check_inputs_still_there
from orchestrator.planner import Plan
from orchestrator.queue import LIVE, JobRecord, OutputDirTaken, QueueStore, StaleTransition
from orchestrator.scheduler import Ending, Scheduler, binding, failures
from orchestrator.scheduler.policies import policy
from workers import job_records

ACTOR_NAME = "zeromix-scheduler"
TICK_S = 1.0
READY_TIMEOUT_S = 60
API = 5  # the calls clients make (orchestrator/client.py); 4: `job_log` answered None for any failure; 3: before `move`; 2: progress read from job logs; 1: before the clients reached the queue through the actor
log = logging.getLogger("zeromix.scheduler")


def queue_path():
    return home() / "state" / "queue.db"


class RayLaunch:
    """The `Launcher` of a real cluster: placement groups and Ray jobs."""

    def __init__(self, state: ClusterState):
        self.state = state

    def cluster(self):
        return registry.snapshot()

    def reserving(self) -> set[str]:
        return set(registry.live_placement_groups())

    def check_inputs(self, job_id: str, spec: JobSpec) -> None:
        check_inputs_still_there(job_id, spec)

    def nodes_that_cannot_see(self, directory: str, nodes: list[str]) -> list[str]:
        return registry.nodes_that_cannot_see(directory, nodes)

    def start(self, job: JobRecord, plan: Plan) -> None:
        launch.submit(self.state, JobSpec.model_validate(job.spec), plan, job.id, job.ray_job_id)

    def ended(self, running: list[JobRecord]) -> dict[str, Ending]:
        client, done = launch.jobs_client(self.state), {}
        for record in running:
            try:
                info = client.get_job_info(record.ray_job_id)
            except launch.JobsApiError as err:
                if err.status == 404:
                    done[record.id] = failures.UNKNOWN_TO_RAY
                continue  # any other answer: ask again next round
            except RuntimeError:
                continue  # the Jobs API did not answer: ask again next round
            if info.status.is_terminal():
                failure = job_records.get(record.ray_job_id, "failure") if info.status.value == "FAILED" else None
                result = job_records.get(record.ray_job_id, "result") if info.status.value == "SUCCEEDED" else None
                done[record.id] = failures.from_ray(info.status.value, info.message, failure, result,
                                                    job_records.get(record.ray_job_id, "move"))
        return done

    def stop(self, job_id: str) -> None:
        launch.stop(self.state, job_id)

    def move(self, job: JobRecord, reason: str) -> None:
        job_records.put(job.ray_job_id, "move", {"reason": reason})


class ClusterGauges:
    """The cluster's Ray metrics, exported by the scheduler after every round (Ray prefixes "ray_")."""

    def __init__(self):
        from ray.util.metrics import Gauge

        self.cards = Gauge("zeromix_cards", description="Cards in the pool, by state: free or held by a job.", tag_keys=("state",))
        self.jobs = Gauge("zeromix_jobs", description="Jobs not ended, by state: queued, placing, running.", tag_keys=("state",))

    def record(self, scheduler: Scheduler) -> None:
        self.cards.set(scheduler.cards_free, tags={"state": "free"})
        self.cards.set(scheduler.cards_held, tags={"state": "held"})
        counts = Counter(r.state for r in scheduler.store.jobs(LIVE))
        for state in LIVE:
            self.jobs.set(counts[state], tags={"state": state})


class SchedulerService:
    """The actor's body (wrapped with ray.remote in `ensure_running`)."""

    def __init__(self, state: dict, db_path: str, policy_name: str):
        self.launch = RayLaunch(ClusterState(**state))
        self.scheduler = Scheduler(QueueStore(db_path), self.launch, policy(policy_name), binder=binding.Threads())
        self.scheduler.recover()
        self.gauges = ClusterGauges()
        # The clients' own connection to the queue (the rounds' transactions are the loop thread's), one call at a time.
        self.queue, self._queue_lock = QueueStore(db_path), threading.Lock()
        self._wake = threading.Event()
        threading.Thread(target=self._loop, name="zeromix-scheduler", daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                self.scheduler.tick()
                self.gauges.record(self.scheduler)
            except Exception:  # one bad round must not stop the scheduler: `zeromix queue` shows it, the log has it all
                log.error("scheduling round failed:\n%s", traceback.format_exc(limit=5))
            self._wake.wait(TICK_S)
            self._wake.clear()

    def poke(self) -> None:
        """A job was submitted or cancelled: run a round now rather than at the next tick."""
        self._wake.set()

    # ---------------------------------------------------------------------------- the clients' calls (client.py)
    def submit(self, job_id: str, name: str, spec: dict, total_steps: int, priority: int) -> str | None:
        """Queue a job; None, or why not (another live job writes into its output_dir)."""
        with self._queue_lock:
            try:
                self.queue.submit(job_id, name, spec, total_steps, priority)
            except OutputDirTaken as clash:
                return str(clash)
        self.poke()
        return None

    def jobs(self, states: tuple[str, ...] | None) -> list[JobRecord]:
        with self._queue_lock:
            return self.queue.jobs(states) if states else self.queue.jobs()

    def find(self, prefix: str) -> tuple[JobRecord | None, str]:
        """The job with this id, or the only one whose id starts so; else None and why."""
        with self._queue_lock:
            try:
                return self.queue.find(prefix), ""
            except KeyError as err:
                return None, err.args[0]

    def cancel(self, job_id: str) -> tuple[str, bool]:
        """(the state it was in, whether this call cancelled it); its Ray side is stopped and its cards freed."""
        with self._queue_lock:
            was = self.queue.get(job_id).state
            try:
                self.queue.transition(job_id, LIVE, "cancelled", "cancelled by the user")
            except StaleTransition:
                return self.queue.get(job_id).state, False
        try:
            self.launch.stop(job_id)  # idempotent; if Ray does not answer, the next rounds free its cards
        except Exception as err:
            log.warning("stopping cancelled job %s failed (its cards are freed on a later round): %s", job_id, err)
        self.poke()
        return was, True

    def move(self, job_id: str) -> tuple[str, bool]:
        """(its state, whether it was asked to move): a running job stops at its next step with a checkpoint and is
        placed again, resuming there."""
        with self._queue_lock:
            record = self.queue.get(job_id)
        if record.state != "running":
            return record.state, False
        self.launch.move(record, "its user asked (zeromix move)")
        return record.state, True

    def job_log(self, ray_job_id: str) -> dict:
        """The Ray job's whole log, or why there is none (`launch.JobLog`). Read on the head, whose Jobs API listens
        on loopback only."""
        return asdict(launch.job_log(launch.jobs_client(self.launch.state), ray_job_id))

    def health(self) -> dict:
        return {"api": API, "policy": self.scheduler.policy.name, "rounds": self.scheduler.rounds, "last_error": self.scheduler.last_error,
                "turns": list(self.scheduler.turns)}


def ensure_running(state: ClusterState, policy_name: str = "gain"):
    """The scheduler actor, started on the head if it is not running, once it answers. Needs a connected
    Ray driver. An actor Ray is restarting answers after its restart; the wait has a deadline. One that an
    older zeromix started (a cluster left up across an upgrade) does not know today's calls: it is replaced."""
    import ray

    actor = ray.remote(SchedulerService).options(
        name=ACTOR_NAME, namespace=RAY_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        resources={registry.HEAD_RESOURCE: 0.001}, max_restarts=-1, max_concurrency=4)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        handle = actor.remote(asdict(state), str(queue_path()), policy_name)
        answer = _answer(handle, deadline)
        if answer is None:
            break
        if answer.get("api") == API:
            return handle
        log.warning("replacing the scheduler an older zeromix started (api %s, this one is %s)", answer.get("api"), API)
        ray.kill(handle, no_restart=True)
        while _named_actor_exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    raise ZeromixError(f"the zeromix scheduler did not answer within {READY_TIMEOUT_S} s; its log is under "
                       f"{state.temp_dir or '/tmp/ray'}/*/session_latest/logs (worker-*.err); then `zeromix down` and `zeromix up`")


def _answer(handle, deadline: float) -> dict | None:
    """Its health, or None if it did not answer by the deadline. An actor Ray is restarting (or a call that met
    its death) is asked again."""
    import ray
    from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

    try:
        for attempt in Retrying(retry=retry_if_exception_type(ray.exceptions.ActorUnavailableError),
                                stop=stop_after_delay(max(0.0, deadline - time.monotonic())), wait=wait_fixed(0.5), reraise=True):
            with attempt:
                return ray.get(handle.health.remote(), timeout=max(1.0, deadline - time.monotonic()))
    except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
        return None


def _named_actor_exists() -> bool:
    import ray

    try:
        ray.get_actor(ACTOR_NAME, namespace=RAY_NAMESPACE)
        return True
    except ValueError:
        return False


def health(state: ClusterState) -> dict:
    """Its policy, rounds and last error. Asked again while Ray restarts it (a call can land just as it dies)."""
    answer = _answer(ensure_running(state), time.monotonic() + READY_TIMEOUT_S)
    if answer is None:
        raise ZeromixError(f"the zeromix scheduler did not answer within {READY_TIMEOUT_S} s; `zeromix down` and `zeromix up`")
    return answer
