"""The scheduler's policies on the shipped homelab, and the cost of one scheduling round.

    .venv/bin/python bench/scheduler.py        (or `make bench-scheduler`)

1. A generated 200-job trace (seed 1, 6 jobs/hour) replayed by the simulator through each policy on
   cluster.yaml: average and p95 job completion time, makespan, and the ratio to FIFO first-fit (what plain
   Ray resource requests give). Job lengths are the planner's step-time estimates. Targets: the default
   policy's average JCT at most 0.67x FIFO first-fit's, and a shorter makespan.
2. One scheduling round (`Scheduler.tick`: queue read, policy, planner, starts) with 200 queued jobs on a
   64-card pool (16 boxes of 4 mixed cards), from a cold planner cache. Target: under 1 s.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.cluster_config import ClusterConfig, load_cluster  # noqa: E402
from orchestrator.inventory import snapshot_from_config  # noqa: E402
from orchestrator.queue import QueueStore  # noqa: E402
from orchestrator.scheduler import Scheduler, spec_record  # noqa: E402
from orchestrator.scheduler.policies import POLICY_NAMES, policy  # noqa: E402
from orchestrator.scheduler.simulate import SimulatedLaunch, VirtualClock, simulate  # noqa: E402
from orchestrator.scheduler.trace import generate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BOX_MIXES = (["NVIDIA GeForce GTX 1080 Ti", "NVIDIA GeForce RTX 2080 Ti", "NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 4090"],
             ["NVIDIA GeForce RTX 3090"] * 4, ["NVIDIA GeForce RTX 4090"] * 2 + ["NVIDIA GeForce RTX 3090"] * 2,
             ["NVIDIA GeForce GTX 1080 Ti"] * 2 + ["NVIDIA GeForce RTX 2080 Ti"] * 2)


def policies_on_the_homelab() -> None:
    homelab = snapshot_from_config(load_cluster(REPO / "cluster.yaml"))
    jobs = generate(200, 6.0, seed=1)
    results = {}
    for name in POLICY_NAMES:
        started = time.perf_counter()
        results[name] = simulate(homelab, jobs, policy(name))
        print(f"  simulated {name} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    fifo = results["fifo-first-fit"]
    print(f"200-job trace (seed 1, 6/h) on cluster.yaml, {len(homelab.cards)} cards; job lengths are planner estimates")
    print(f"{'policy':<18} {'avg JCT':>9} {'p95 JCT':>9} {'makespan':>9} {'avg vs FIFO':>12} {'makespan vs FIFO':>17}")
    for name, r in results.items():
        print(f"{name:<18} {r.avg_jct_s / 3600:>7.2f} h {r.p95_jct_s / 3600:>7.2f} h {r.makespan_s / 3600:>7.1f} h "
              f"{r.avg_jct_s / fifo.avg_jct_s:>11.2f}x {r.makespan_s / fifo.makespan_s:>16.2f}x")
    util = "  ".join(f"{card} {u:.0%}" for card, u in results["gain"].utilisation().items())
    print(f"gain's card utilisation: {util}")


def one_round_at_64_cards() -> None:
    nodes = [{"name": f"box{i}", "address": f"10.0.1.{i + 1}", "ram_gb": 64, "cpus": 16,
              "gpus": [{"model": m} for m in BOX_MIXES[i % len(BOX_MIXES)]]} for i in range(16)]
    pool = snapshot_from_config(ClusterConfig.model_validate({"head": {"address": "10.0.1.1"}, "network": {"link": "10GbE"}, "nodes": nodes}))
    for name in POLICY_NAMES:
        clock = VirtualClock(0.0)
        store = QueueStore(":memory:", clock)
        for job in generate(200, 60.0, seed=2):
            spec = job.spec()
            store.submit(job.job_id, spec.name, spec_record(spec), job.steps, job.priority, at=job.arrival_s)
        clock.now = 3 * 3600.0
        scheduler = Scheduler(store, SimulatedLaunch(pool, clock), policy(name), clock)
        started = time.perf_counter()
        decision = scheduler.tick()
        cold = time.perf_counter() - started
        started = time.perf_counter()
        scheduler.tick()
        warm = time.perf_counter() - started
        print(f"{name:<18} one round, 200 queued on {len(pool.cards)} cards: {cold * 1000:.0f} ms cold cache "
              f"({len(decision.assignments)} started), next round {warm * 1000:.0f} ms (target < 1000 ms)")


if __name__ == "__main__":
    policies_on_the_homelab()
    one_round_at_64_cards()
