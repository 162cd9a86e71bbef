"""The scheduler's policies on every trace family and pool, and the cost of one scheduling round.

    .venv/bin/python bench/scheduler.py [--jobs 200] [--seeds 11 12]        (or `make bench-scheduler`)

1. Each trace family (orchestrator/scheduler/trace.py: the Poisson mix, bursts, long-then-short, VRAM-heavy,
   priority mix) on three pools (cluster.yaml's 5 cards; four such homelabs, 20 cards; 16 mixed boxes, 64
   cards), arrivals scaled with the pool, replayed by the simulator through each policy, with what a real
   cluster charges (orchestrator/data/sim_costs.yaml: start, weights, checkpoints) and without and with the
   planner's estimate error (log-normal; the policy never sees it). Per row: average and p95 JCT, makespan,
   the largest slowdown (JCT over the job's run alone on its best cards), card-hours idle while a queued job
   could have started on them, jobs that never ran; and each figure over FIFO first-fit's. Then the default
   policy against its goals: average JCT at most 1.0x FIFO on every row and 0.7x in the geometric mean, p95
   at most 1.1x, makespan at most 1.0x.
2. One scheduling round (`Scheduler.tick`) with 200 queued jobs on the 64-card pool, from a cold planner
   cache, in CPU seconds (`time.process_time`: a loaded machine does not move it). Target: under 1 s.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from orchestrator.cluster_config import ClusterConfig  # noqa: E402
from orchestrator.inventory import snapshot_from_config  # noqa: E402
from orchestrator.queue import QueueStore  # noqa: E402
from orchestrator.scheduler import Scheduler, spec_record  # noqa: E402
from orchestrator.scheduler.policies import POLICY_NAMES, policy  # noqa: E402
from orchestrator.scheduler.costs import Costs  # noqa: E402
from orchestrator.scheduler.simulate import SimulatedLaunch, VirtualClock, simulate  # noqa: E402
from orchestrator.scheduler.trace import FAMILIES, family  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BOX_MIXES = (["NVIDIA GeForce GTX 1080 Ti", "NVIDIA GeForce RTX 2080 Ti", "NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 4090"],
             ["NVIDIA GeForce RTX 3090"] * 4, ["NVIDIA GeForce RTX 4090"] * 2 + ["NVIDIA GeForce RTX 3090"] * 2,
             ["NVIDIA GeForce GTX 1080 Ti"] * 2 + ["NVIDIA GeForce RTX 2080 Ti"] * 2)
GOALS = {"avg": 1.0, "geomean avg": 0.7, "p95": 1.1, "makespan": 1.0}
DEFAULT = "gain"


def pools() -> dict[str, object]:
    homelab = yaml.safe_load((REPO / "cluster.yaml").read_text())
    four = {**homelab, "nodes": [{**n, "name": f"{n['name']}{k}", "address": f"10.0.{k}.{i + 1}"}
                                 for k in range(4) for i, n in enumerate(homelab["nodes"])]}
    four["head"] = {**homelab["head"], "address": "10.0.0.1"}
    sixteen = {"head": {"address": "10.0.1.1"}, "network": {"link": "10GbE"},
               "nodes": [{"name": f"box{i}", "address": f"10.0.1.{i + 1}", "ram_gb": 64, "cpus": 16,
                          "gpus": [{"model": m} for m in BOX_MIXES[i % len(BOX_MIXES)]]} for i in range(16)]}
    return {name: snapshot_from_config(ClusterConfig.model_validate(c)) for name, c in
            (("homelab 5", homelab), ("4 homelabs 20", four), ("16 boxes 64", sixteen))}


def families_on_pools(n_jobs: int, seeds: list[int]) -> bool:
    sigma = Costs.measured().estimate_sigma
    ratios, misses = [], []
    print(f"{n_jobs}-job traces, seeds {seeds}; times are simulated (planner estimates x costs); the error column is the "
          f"estimate error the policy does not see")
    header = (f"{'family':<16} {'pool':<14} {'error':>5} {'policy':<17} {'avg JCT':>8} {'p95':>8} {'makespan':>9} {'max slow':>8} "
              f"{'idle&wait':>9} {'moves':>5} {'never':>5}   {'avg/FIFO':>8} {'p95/FIFO':>8} {'mksp/FIFO':>9}")
    print(header)
    for pool_name, pool in pools().items():
        scale = len(pool.cards) / 5
        for name in FAMILIES:
            for seed in seeds:
                jobs = family(name, n_jobs, seed, scale)
                for error in (0.0, sigma):
                    costs = Costs.measured(seed=seed, estimate_sigma=error)
                    results = {p: simulate(pool, jobs, policy(p), costs) for p in POLICY_NAMES}
                    fifo = results["fifo-first-fit"]
                    for p, r in results.items():
                        row = (r.avg_jct_s / fifo.avg_jct_s, r.p95_jct_s / fifo.p95_jct_s, r.makespan_s / fifo.makespan_s)
                        print(f"{name if p == POLICY_NAMES[0] else '':<16} {pool_name:<14} {error:>5.2f} {p:<17} "
                              f"{r.avg_jct_s / 3600:>6.2f} h {r.p95_jct_s / 3600:>6.2f} h {r.makespan_s / 3600:>7.1f} h "
                              f"{max(r.slowdowns):>8.1f} {r.idle_while_waiting_s / 3600:>7.1f} h {r.moves:>5} {len(r.never_ran):>5}   "
                              f"{row[0]:>7.2f}x {row[1]:>7.2f}x {row[2]:>8.2f}x", flush=True)
                        if p == DEFAULT:
                            ratios.append(row[0])
                            where = f"{name} on {pool_name}, seed {seed}, error {error:.2f}"
                            for goal, value in zip(("avg", "p95", "makespan"), row):
                                if value > GOALS[goal]:
                                    misses.append(f"{goal} {value:.2f}x > {GOALS[goal]}x: {where}")
                            if r.never_ran:
                                misses.append(f"{len(r.never_ran)} job(s) never ran: {where}")
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(f"\n{DEFAULT}: average JCT over FIFO first-fit, geometric mean of {len(ratios)} rows: {geomean:.2f}x (goal <= {GOALS['geomean avg']}x)")
    if geomean > GOALS["geomean avg"]:
        misses.append(f"geometric mean {geomean:.2f}x > {GOALS['geomean avg']}x")
    print(f"{DEFAULT}: {len(misses)} goal(s) missed" + "".join(f"\n  {m}" for m in misses))
    return not misses


def one_round_at_64_cards() -> None:
    pool = pools()["16 boxes 64"]
    for name in POLICY_NAMES:
        clock = VirtualClock(0.0)
        store = QueueStore(":memory:", clock)
        for job in family("poisson-mix", 200, seed=2, scale=10.0):
            spec = job.spec()
            store.submit(job.job_id, spec.name, spec_record(spec), job.steps, job.priority, at=job.arrival_s)
        clock.now = 3 * 3600.0
        scheduler = Scheduler(store, SimulatedLaunch(pool, clock), policy(name), clock)
        started = time.process_time()
        decision = scheduler.tick()
        cold = time.process_time() - started
        started = time.process_time()
        scheduler.tick()
        warm = time.process_time() - started
        print(f"{name:<18} one round, 200 queued on {len(pool.cards)} cards: {cold * 1000:.0f} ms CPU from a cold cache "
              f"({len(decision.assignments)} started), next round {warm * 1000:.0f} ms (target < 1000 ms)")


if __name__ == "__main__":
    args = argparse.ArgumentParser()
    args.add_argument("--jobs", type=int, default=200)
    args.add_argument("--seeds", type=int, nargs="+", default=[11])
    parsed = args.parse_args()
    met = families_on_pools(parsed.jobs, parsed.seeds)
    one_round_at_64_cards()
    sys.exit(0 if met else 1)
