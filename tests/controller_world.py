"""A world for the controller's tests: the real Scheduler, QueueStore and gain policy over the shipped homelab
(cluster.yaml's five cards), with a double of the one edge they talk to, Ray (`FakeRay`: reservations, jobs
that end as the test says, calls that fail on demand), a clock the test moves, and real files for the job's model
and data, which a test may delete."""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.inventory import ClusterSnapshot
from orchestrator.jobspec import JobSpec, check_inputs_still_there
from orchestrator.planner import Plan
from orchestrator.queue import JobRecord, QueueStore
from orchestrator.scheduler import Ending, Scheduler, spec_record
from orchestrator.scheduler.policies import policy
from tests.conftest import TINY_LLAMA
from tests.helpers import CONFIGS, HOMELAB


class RayDown(RuntimeError):
    """What the Jobs API raises when it does not answer."""


@dataclass
class FakeRay:
    """The `Launcher` edge, as Ray behaves: a start reserves the plan's cards, a stop frees them; jobs end when
    the test says how. `fail_start` / `fail_stop`: the next calls raise, as a Jobs API that is down does."""

    cluster_: ClusterSnapshot
    reservations: dict[str, tuple[str, ...]] = field(default_factory=dict)  # job id -> card resources it holds
    endings: dict[str, Ending] = field(default_factory=dict)  # how each running job will be reported ended
    unplugged: set[str] = field(default_factory=set)  # nodes gone
    fail_start: bool = False
    fail_stop: bool = False
    starts: list[str] = field(default_factory=list)
    local_dirs: list[Path] = field(default_factory=list)  # directories on the head's (attic's) own disk
    slow: dict[str, threading.Event] = field(default_factory=dict)  # job id -> its start waits for this (a slow launch)
    moves: list[tuple[str, str]] = field(default_factory=list)  # (job id, why): the requests to stop with a checkpoint

    def cluster(self) -> ClusterSnapshot:
        holders = {res: job for job, resources in self.reservations.items() for res in resources}
        return ClusterSnapshot(tuple(n for n in self.cluster_.with_holders(holders).nodes if n.name not in self.unplugged))

    def reserving(self) -> set[str]:
        return set(self.reservations)

    def nodes_that_cannot_see(self, directory: str, nodes: list[str]) -> list[str]:
        """As the probe file answers: every node sees a directory on shared storage; `local_dirs` are not shared."""
        return [n for n in nodes if n != "attic" and any(directory.startswith(str(d)) for d in self.local_dirs)]

    def check_inputs(self, job_id: str, spec: JobSpec) -> None:
        check_inputs_still_there(job_id, spec)

    def start(self, job: JobRecord, plan: Plan) -> None:
        if self.fail_start:
            raise RayDown("Failed to submit job: 503 Service Unavailable")
        if job.id in self.slow:
            self.slow[job.id].wait(timeout=30)
        self.reservations[job.id] = tuple(r.card.resource for r in plan.ranks)
        self.starts.append(job.id)

    def ended(self, running: list[JobRecord]) -> dict[str, Ending]:
        return {r.id: self.endings.pop(r.id) for r in running if r.id in self.endings}

    def move(self, job: JobRecord, reason: str) -> None:
        self.moves.append((job.id, reason))

    def stop(self, job_id: str) -> None:
        if self.fail_stop:
            raise RayDown("Failed to stop job: 503 Service Unavailable")
        self.reservations.pop(job_id, None)
        self.endings.pop(job_id, None)


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    """Everything one controller program runs against."""

    root: Path
    store: QueueStore
    ray: FakeRay
    clock: Clock
    scheduler: Scheduler
    submitted: int = 0

    @classmethod
    def make(cls, root: Path, policy_name: str = "gain") -> World:
        root.mkdir(parents=True, exist_ok=True)
        clock = Clock()
        store, ray = QueueStore(":memory:", clock=clock), FakeRay(HOMELAB)
        return cls(root, store, ray, clock, Scheduler(store, ray, policy(policy_name), clock=clock))

    def restart_scheduler(self) -> None:
        """What Ray does when the actor's process dies: a new one on the same queue, recovering first."""
        self.scheduler = Scheduler(self.store, self.ray, self.scheduler.policy, clock=self.clock)
        self.scheduler.recover()

    def model_dir(self, name: str = "tiny-llama") -> Path:
        """A model directory in this world's own files, so a test can take it away (from every job using it)."""
        path = self.root / f"model-{name}"
        if not path.exists():
            shutil.copytree(TINY_LLAMA if name == "tiny-llama" else CONFIGS / name, path)
        return path

    def data_file(self) -> Path:
        path = self.root / "data.jsonl"
        if not path.exists():
            path.write_text('{"text": "copy abc abc"}\n')
        return path

    def spec(self, model: str = "tiny-llama", **fields) -> JobSpec:
        self.submitted += 1
        base = {"name": f"job{self.submitted}", "model": {"path": str(self.model_dir(model))},
                "dataset": {"path": str(self.data_file()), "text_field": "text"}, "max_steps": 100,
                "global_batch_size": 16, "seq_len": 64, "output_dir": str(self.root / f"out{self.submitted}"), "report_to": []}
        return JobSpec.model_validate({**base, **fields})

    def submit(self, spec: JobSpec, stored: dict | None = None, at: float | None = None) -> str:
        """Store a job as `zeromix submit` does; `stored`: the spec as an older zeromix stored it."""
        job_id = f"{spec.name}-{self.submitted:04d}"
        self.store.submit(job_id, spec.name, stored or spec_record(spec), spec.max_steps or 1, spec.priority, at=at)
        return job_id

    def state(self, job_id: str) -> str:
        return self.store.get(job_id).state
