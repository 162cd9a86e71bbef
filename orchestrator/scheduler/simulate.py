"""The simulator: a job trace replayed through the real queue, scheduler, policy and planner in virtual time.

Only two things are simulated: the clock, and the launch, which starts nothing and says the job ends
after total_steps x the planner's step time (an estimate). Everything else is the code that runs on the
head: the SQLite queue (in memory), `Scheduler.tick`, the policy, `make_plan`. So a policy's figures
here are the figures of the code users run, on their cluster.yaml. Deterministic: same trace, same result.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from orchestrator.inventory import ClusterSnapshot
from orchestrator.jobspec import JobSpec
from orchestrator.planner import Plan
from orchestrator.queue import JobRecord, QueueStore
from orchestrator.scheduler import Ending, Scheduler, spec_record
from orchestrator.scheduler.policies import Policy
from orchestrator.scheduler.table import QueuedJob
from orchestrator.scheduler.trace import TraceJob


class VirtualClock:
    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


class SimulatedLaunch:
    """A `Launcher` whose jobs end when the planner says they would."""

    def __init__(self, cluster: ClusterSnapshot, clock: VirtualClock):
        self._cluster, self._clock = cluster, clock
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
        self.running[job.id] = (tuple(r.card.resource for r in plan.ranks), self._clock() + plan.step.step_s * plan.total_steps)

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

    @property
    def jct_s(self) -> list[float]:
        return [j.ended_at - j.submitted_at for j in self.jobs if j.ended_at is not None]

    @property
    def avg_jct_s(self) -> float:
        return statistics.fmean(self.jct_s)

    @property
    def p95_jct_s(self) -> float:
        values = sorted(self.jct_s)
        return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]

    @property
    def makespan_s(self) -> float:
        return max(j.ended_at for j in self.jobs if j.ended_at is not None) - min(j.submitted_at for j in self.jobs)

    def occupancy(self) -> list[tuple[str, str, float, float]]:
        """(card, job, start, end) for every job that ran."""
        return [(card, j.id, j.started_at, j.ended_at) for j in self.jobs if j.started_at is not None for card in j.cards]

    def utilisation(self) -> dict[str, float]:
        busy = {card: 0.0 for card in self.card_ids}
        for card, _, start, end in self.occupancy():
            busy[card] += end - start
        return {card: b / self.makespan_s for card, b in busy.items()}


def simulate(cluster: ClusterSnapshot, trace: list[TraceJob], policy: Policy) -> SimResult:
    clock = VirtualClock(trace[0].arrival_s if trace else 0.0)
    store = QueueStore(":memory:", clock)
    launch = SimulatedLaunch(cluster, clock)
    scheduler = Scheduler(store, launch, policy, clock)
    table = scheduler.table(cluster)
    arrivals, rejected, queue_length, rounds = list(reversed(trace)), {}, [], 0
    while True:
        while arrivals and arrivals[-1].arrival_s <= clock.now:
            job = arrivals.pop()
            spec = job.spec()
            best = table.best(QueuedJob(job.job_id, spec, job.priority, job.arrival_s, job.steps))
            if best.plan is None:
                rejected[job.job_id] = best.why_not
                continue
            store.submit(job.job_id, spec.name, spec_record(spec), job.steps, job.priority, at=job.arrival_s)
        scheduler.tick()
        rounds += 1
        queue_length.append((clock.now, len(store.jobs(("queued",)))))
        upcoming = [t for t in (arrivals[-1].arrival_s if arrivals else None, launch.next_end()) if t is not None]
        if not upcoming:
            break
        clock.now = min(upcoming)
    jobs = store.jobs()
    return SimResult(policy.name, jobs, rejected, queue_length, [c.card_id for c in cluster.cards], rounds,
                     [j.id for j in jobs if j.ended_at is None])


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
