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
import statistics
from collections import Counter
from dataclasses import dataclass, field

from orchestrator.inventory import ClusterSnapshot
from orchestrator.jobspec import JobSpec
from orchestrator.planner import Plan
from orchestrator.queue import Event, JobRecord, QueueStore
from orchestrator.scheduler import Ending, Scheduler, failures, spec_record
from orchestrator.scheduler.costs import Costs
from orchestrator.scheduler.policies import Policy
from orchestrator.scheduler.table import QueuedJob, ThroughputTable
from orchestrator.scheduler.trace import TraceJob



class VirtualClock:
    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


@dataclass
class _Run:
    """One placement of a job in virtual time. Its costs (start, load, steps, checkpoints) are counted in seconds
    as it would run alone; sharing its boxes' network links with other jobs stretches what is left of them."""

    plan: Plan
    resources: tuple[str, ...]
    nodes: frozenset[str]
    share: float  # of the job's steps this placement runs (less after a move)
    alone_s: float  # the whole placement, alone (Costs.run_s)
    fixed_s: float  # of which starting and loading the weights
    network_fraction: float  # of what is left, the share spent in collectives over the network (0 inside one box)
    left_s: float = 0.0  # of alone_s, still to run
    slowdown: float = 1.0  # its pace now: wall seconds per second of alone_s
    end: float = 0.0


class SimulatedLaunch:
    """A `Launcher` whose jobs end when their costs say. Jobs that span boxes share each box's network link: a
    link that k such jobs use at once gives each of them 1/k of it, so their collectives take k times as long
    while that lasts (each is retimed whenever a job starts or stops). A job asked to move stops after the
    checkpoint it then saves, and its next placement runs only the steps it had left (plus starting and loading
    again)."""

    def __init__(self, cluster: ClusterSnapshot, clock: VirtualClock, costs: Costs = Costs.NONE):
        self._cluster, self._clock, self.costs = cluster, clock, costs
        self._runs: dict[str, _Run] = {}
        self._retimed_at = clock()
        self._left: dict[str, float] = {}  # job id -> share of its steps left after its last move
        self._moved: dict[str, tuple[str, int]] = {}  # job id -> (why, the step it stops after), until it has

    @property
    def running(self) -> dict[str, tuple[tuple[str, ...], float]]:
        """Job id -> (card resources, when it ends at today's sharing)."""
        return {job_id: (run.resources, run.end) for job_id, run in self._runs.items()}

    def cluster(self) -> ClusterSnapshot:
        return self._cluster.with_holders({res: job_id for job_id, run in self._runs.items() for res in run.resources})

    def reserving(self) -> set[str]:
        return set(self._runs)

    def nodes_that_cannot_see(self, directory: str, nodes: list[str]) -> list[str]:
        return []  # no files: a trace's jobs write nothing

    def check_inputs(self, job_id: str, spec: JobSpec) -> None:
        """A trace's jobs name models by their shipped configs and no data files: nothing to look for."""

    def start(self, job: JobRecord, plan: Plan) -> None:
        share = self._left.get(job.id, 1.0)
        alone, fixed = self.costs.run_s(job.id, plan, share), self.costs.start_s + self.costs.load_s(plan)
        nodes = frozenset(r.card.node for r in plan.ranks)
        network = plan.step.comm_s / plan.step.step_s * max(0.0, alone - fixed) / alone if len(nodes) > 1 and alone > 0 else 0.0
        self._retime()
        self._runs[job.id] = _Run(plan, tuple(r.card.resource for r in plan.ranks), nodes, share, alone, fixed, network, left_s=alone)
        self._retime()

    def move(self, job: JobRecord, reason: str) -> None:
        """It stops after saving a checkpoint; its steps count in proportion to the training time it had."""
        self._retime()
        run = self._runs[job.id]
        done = run.share * min(1.0, max(0.0, (run.alone_s - run.left_s - run.fixed_s) / max(1e-9, run.alone_s - run.fixed_s)))
        self._left[job.id] = run.share - done
        self._moved[job.id] = (reason, round((1 - self._left[job.id]) * run.plan.total_steps))
        run.left_s, run.network_fraction = min(run.left_s, self.costs.save_s(run.plan)), 0.0  # the save: no collectives
        self._retime()

    def ended(self, running: list[JobRecord]) -> dict[str, Ending]:
        ended = {}
        for r in running:
            if self._runs[r.id].end > self._clock():
                continue
            if r.id in self._moved:
                why, step = self._moved.pop(r.id)
                ended[r.id] = failures.from_ray("SUCCEEDED", None, None, {"stopped_at": step, "of": r.total_steps}, {"reason": why})
            else:
                ended[r.id] = Ending("succeeded", "finished (simulated)")
        return ended

    def stop(self, job_id: str) -> None:
        self._retime()
        if self._runs.pop(job_id, None):
            self._retime()

    def next_end(self) -> float | None:
        return min((run.end for run in self._runs.values()), default=None)

    def _retime(self) -> None:
        """Charge every run the time since the last retiming at the pace it had, then set each one's pace and end
        from who shares its boxes' links now."""
        now = self._clock()
        for run in self._runs.values():
            run.left_s = max(0.0, run.left_s - (now - self._retimed_at) / run.slowdown)
        on_link = Counter(node for run in self._runs.values() if run.network_fraction for node in run.nodes)
        for run in self._runs.values():
            sharing = max(on_link[n] for n in run.nodes) if run.network_fraction else 1
            run.slowdown = 1.0 + (sharing - 1) * run.network_fraction
            run.end = now + run.left_s * run.slowdown
        self._retimed_at = now


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
    events: list[Event] = field(default_factory=list)  # every job's moves between states, with the reasons
    costs: Costs = Costs.NONE

    @property
    def never_ran(self) -> dict[str, str]:
        """Job id -> why it was still waiting when the trace ended (the scheduler's last reason)."""
        return {j.id: j.reason for j in self.jobs if j.started_at is None}

    @property
    def moves(self) -> int:
        """Running jobs stopped with a checkpoint and placed again (the policy's moves)."""
        return sum(1 for e in self.events if e.source == "running" and e.reason.startswith("moved:"))

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
                     [j.id for j in jobs if j.ended_at is None], {k: run for k, (run, _) in alone.items()}, idle_s, ahead, store.events(), costs)


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
