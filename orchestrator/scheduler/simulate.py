"""The simulator: a job trace replayed through the real queue, scheduler, policy and planner in virtual time.

Two things are simulated: the clock, and the launch, which starts nothing and says when the job would end.
Everything else is the code that runs on the head: the SQLite queue (in memory), `Scheduler.tick`, the
policy, `make_plan`. So a policy's figures here are the figures of the code users run, on their cluster.yaml.

A run costs what a real one costs (`Costs`, from orchestrator/data/sim_costs.yaml, each figure marked
measured or estimate): starting the Ray job and its ranks, reading the weights, a checkpoint about every ten
minutes, and a step time that is the planner's estimate times an error the policy never sees (log-normal,
drawn once per job from the seed). `Costs.NONE` replays the planner's estimates exactly, as the simulator did
before. Deterministic: same trace, costs and seed, same result.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from orchestrator.inventory import ClusterSnapshot
from orchestrator.jobspec import JobSpec
from orchestrator.planner import Plan
from orchestrator.queue import JobRecord, QueueStore
from orchestrator.scheduler import Ending, Scheduler, spec_record
from orchestrator.scheduler.policies import Policy
from orchestrator.scheduler.table import QueuedJob, ThroughputTable
from orchestrator.scheduler.trace import TraceJob

COSTS_FILE = Path(__file__).resolve().parents[1] / "data" / "sim_costs.yaml"
GB = 1e9


@dataclass(frozen=True)
class Costs:
    start_s: float  # the Ray job, its rank actors, imports and DeepSpeed's engine, before the weights are read
    load_gb_per_s: float  # reading the weights (bf16 on disk)
    checkpoint_gb_per_s: float  # writing a checkpoint: full, weights and Adam states (14 bytes a parameter); LoRA, the adapter's (16)
    checkpoint_every_s: float  # launch.CHECKPOINT_EVERY_S: the default cadence
    estimate_sigma: float  # true step time / the planner's estimate ~ log-normal(0, sigma); 0: exact
    seed: int = 0

    @classmethod
    def measured(cls, seed: int = 0, estimate_sigma: float | None = None) -> Costs:
        """The figures of sim_costs.yaml, with the default checkpoint cadence (launch.CHECKPOINT_EVERY_S)."""
        from orchestrator.launch import CHECKPOINT_EVERY_S

        figures = {k: v["value"] for k, v in yaml.safe_load(COSTS_FILE.read_text()).items()}
        if estimate_sigma is not None:
            figures["estimate_sigma"] = estimate_sigma
        return cls(seed=seed, checkpoint_every_s=CHECKPOINT_EVERY_S, **figures)

    def run_s(self, job_id: str, plan: Plan) -> float:
        """How long the job takes on this plan's cards, start to end (the truth the policy does not see)."""
        error = math.exp(random.Random(f"{self.seed}:{job_id}").gauss(0.0, self.estimate_sigma)) if self.estimate_sigma else 1.0
        train_s = plan.step.step_s * plan.total_steps * error
        saves = int(train_s // self.checkpoint_every_s) if self.checkpoint_every_s else 0
        state_bytes = plan.n_params * 14 if plan.trainable == plan.n_params else plan.trainable * 16
        load_s = plan.n_params * 2 / GB / self.load_gb_per_s if self.load_gb_per_s else 0.0
        save_s = state_bytes / GB / self.checkpoint_gb_per_s if self.checkpoint_gb_per_s else 0.0
        return self.start_s + load_s + train_s + saves * save_s


Costs.NONE = Costs(start_s=0.0, load_gb_per_s=0.0, checkpoint_gb_per_s=0.0, checkpoint_every_s=0.0, estimate_sigma=0.0)


class VirtualClock:
    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


class SimulatedLaunch:
    """A `Launcher` whose jobs end when their costs say."""

    def __init__(self, cluster: ClusterSnapshot, clock: VirtualClock, costs: Costs = Costs.NONE):
        self._cluster, self._clock, self.costs = cluster, clock, costs
        self.running: dict[str, tuple[tuple[str, ...], float]] = {}  # job id -> (card resources, end)

    def cluster(self) -> ClusterSnapshot:
        return self._cluster.with_holders({res: job for job, (resources, _) in self.running.items() for res in resources})

    def reserving(self) -> set[str]:
        return set(self.running)

    def nodes_that_cannot_see(self, directory: str, nodes: list[str]) -> list[str]:
        return []  # no files: a trace's jobs write nothing

    def check_inputs(self, job_id: str, spec: JobSpec) -> None:
        """A trace's jobs name models by their shipped configs and no data files: nothing to look for."""

    def start(self, job: JobRecord, plan: Plan) -> None:
        self.running[job.id] = (tuple(r.card.resource for r in plan.ranks), self._clock() + self.costs.run_s(job.id, plan))

    def ended(self, running: list[JobRecord]) -> dict[str, Ending]:
        return {r.id: Ending("succeeded", "finished (simulated)") for r in running if self.running[r.id][1] <= self._clock()}

    def stop(self, job_id: str) -> None:
        self.running.pop(job_id, None)

    def next_end(self) -> float | None:
        return min((end for _, end in self.running.values()), default=None)


@dataclass
class SimResult:
    policy: str
    jobs: list[JobRecord]  # every job of the trace that the cluster could run, at the end
    rejected: dict[str, str]  # job id -> why it fits nowhere in this cluster (refused at submit, as `zeromix submit` does)
    queue_length: list[tuple[float, int]]  # (time, queued jobs) after each round
    card_ids: list[str]
    rounds: int
    unfinished: list[str] = field(default_factory=list)
    alone_s: dict[str, float] = field(default_factory=dict)  # job id -> its run alone on its best cards, at the same costs
    idle_while_waiting_s: float = 0.0  # card-seconds a card was free while a queued job could have started on it
    ahead_s: dict[str, float] = field(default_factory=dict)  # job id -> the work ahead of it when it arrived (see `work_ahead_s`)
    costs: Costs = Costs.NONE

    @property
    def never_ran(self) -> dict[str, str]:
        """Job id -> why it was still waiting when the trace ended (the scheduler's last reason)."""
        return {j.id: j.reason for j in self.jobs if j.started_at is None}

    @property
    def slowdowns(self) -> list[float]:
        """Each finished job's JCT over its run alone on its best cards."""
        return [(j.ended_at - j.submitted_at) / self.alone_s[j.id] for j in self.jobs if j.ended_at is not None and self.alone_s.get(j.id)]

    @property
    def jct_s(self) -> list[float]:
        return [j.ended_at - j.submitted_at for j in self.jobs if j.ended_at is not None]

    @property
    def avg_jct_s(self) -> float:
        """NaN when no job finished (so are p95 and the makespan)."""
        return statistics.fmean(self.jct_s) if self.jct_s else math.nan

    @property
    def p95_jct_s(self) -> float:
        values = sorted(self.jct_s)
        return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))] if values else math.nan

    @property
    def makespan_s(self) -> float:
        ends = [j.ended_at for j in self.jobs if j.ended_at is not None]
        return max(ends) - min(j.submitted_at for j in self.jobs) if ends else math.nan

    def occupancy(self) -> list[tuple[str, str, float, float]]:
        """(card, job, start, end) for every job that ran."""
        return [(card, j.id, j.started_at, j.ended_at) for j in self.jobs if j.started_at is not None for card in j.cards]

    def utilisation(self) -> dict[str, float]:
        busy = {card: 0.0 for card in self.card_ids}
        for card, _, start, end in self.occupancy():
            busy[card] += end - start
        return {card: b / self.makespan_s for card, b in busy.items()}


def simulate(cluster: ClusterSnapshot, trace: list[TraceJob], policy: Policy, costs: Costs = Costs.NONE) -> SimResult:
    clock = VirtualClock(trace[0].arrival_s if trace else 0.0)
    store = QueueStore(":memory:", clock)
    launch = SimulatedLaunch(cluster, clock, costs)
    scheduler = Scheduler(store, launch, policy, clock)
    table = scheduler.table(cluster)
    arrivals, rejected, queue_length, rounds = list(reversed(trace)), {}, [], 0
    alone, ahead, idle_s = {}, {}, 0.0
    while True:
        while arrivals and arrivals[-1].arrival_s <= clock.now:
            job = arrivals.pop()
            spec = job.spec()
            best = table.best(QueuedJob(job.job_id, spec, job.priority, job.arrival_s, job.steps))
            if best.plan is None:
                rejected[job.job_id] = best.why_not
                continue
            ahead[job.job_id] = work_ahead_s(cluster, store.jobs(("queued", "placing")), launch, alone, clock.now)
            store.submit(job.job_id, spec.name, spec_record(spec), job.steps, job.priority, at=job.arrival_s)
            alone[job.job_id] = (costs.run_s(job.job_id, best.plan), len(best.plan.ranks))
        scheduler.tick()
        rounds += 1
        queued = store.jobs(("queued",))
        queue_length.append((clock.now, len(queued)))
        upcoming = [t for t in (arrivals[-1].arrival_s if arrivals else None, launch.next_end()) if t is not None]
        if not upcoming:
            break
        idle_s += len(_usable_by_waiting(scheduler, launch.cluster(), queued, table)) * (min(upcoming) - clock.now)
        clock.now = min(upcoming)
    jobs = store.jobs()
    return SimResult(policy.name, jobs, rejected, queue_length, [c.card_id for c in cluster.cards], rounds,
                     [j.id for j in jobs if j.ended_at is None], {k: run for k, (run, _) in alone.items()}, idle_s, ahead, costs)


def work_ahead_s(cluster: ClusterSnapshot, queued: list[JobRecord], launch: SimulatedLaunch, alone: dict[str, tuple[float, int]],
                 now: float) -> float:
    """The queue ahead of a job that arrives now, in seconds of the whole cluster: each queued job's run alone on
    its best cards and what is left of each running one, in card-seconds, spread over all the cluster's cards."""
    card_s = sum(run_s * n_cards for run_s, n_cards in (alone[j.id] for j in queued))
    card_s += sum(max(0.0, end - now) * len(resources) for resources, end in launch.running.values())
    return card_s / len(cluster.cards)


def _usable_by_waiting(scheduler: Scheduler, snapshot: ClusterSnapshot, queued: list[JobRecord], table: ThroughputTable) -> set[str]:
    """The free cards some queued job could start on now (its planner's plan on the free cards uses them)."""
    free = frozenset(c.card_id for c in snapshot.cards if not c.held_by)
    usable: set[str] = set()
    for record in queued:
        if usable >= free:
            break
        outcome = table.plan(scheduler.queued_job(record), free)
        usable |= set(outcome.cards) if outcome.plan else set()
    return usable


def render_png(results: list[SimResult], path: str) -> None:
    """Queue length over time, and each card's occupancy, one row of panels per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(14, 3.2 * len(results)), squeeze=False)
    for (queue_ax, cards_ax), result in zip(axes, results):
        times, lengths = zip(*result.queue_length)
        queue_ax.step([t / 3600 for t in times], lengths, where="post")
        queue_ax.set(title=f"{result.policy}: queued jobs", xlabel="hours", ylabel="jobs")
        colours = plt.get_cmap("tab20")
        for row, card in enumerate(result.card_ids):
            spans = [(s / 3600, (e - s) / 3600) for c, _, s, e in result.occupancy() if c == card]
            cards_ax.broken_barh(spans, (row - 0.4, 0.8), facecolors=[colours(i % 20) for i in range(len(spans))])
        cards_ax.set(title=f"{result.policy}: card occupancy", xlabel="hours", yticks=range(len(result.card_ids)),
                     yticklabels=result.card_ids)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
