"""What zeromix's per-card split buys, for a GTX 1080 Ti + RTX 3090 + RTX 4090 plan, with real DeepSpeed.

SPEEDS ARE EMULATED ON CPU. Every rank runs on this machine's CPU at the same speed; rank r is made k_r
times slower (k_r = the fastest planned card's catalog rate / this card's, at the plan's precision) by
sleeping in proportion to its measured compute. The figures show what the split buys, not what the cards do.

Three throughputs from one run:
  uniform  every card gets the same micro-batch (plain DeepSpeed)
  zeromix  the planner's per-card micro-batches
  ideal    the sum of each card's throughput when it trains alone on its zeromix share

    .venv/bin/python bench/hetero_dp.py [--steps 16] [--global-batch 96]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from orchestrator.cluster_config import load_cluster
from orchestrator.inventory import snapshot_from_config
from orchestrator.jobspec import JobSpec
from orchestrator.launch import train_config
from orchestrator.model_facts import facts_from_config
from orchestrator.planner import Plan, make_plan
from orchestrator.demo.task import TINY_LLAMA, write_demo_data
from workers.local_launch import run_local_ranks
from workers.train import utilisation

REPO = Path(__file__).resolve().parents[1]
TRIO = ["GTX 1080 Ti", "RTX 3090", "RTX 4090"]
WARMUP_STEPS = 4  # first steps include lazy initialisation; not timed
# Every rank is slowed by BASE_SLOWDOWN * k_r. The common factor keeps the cards' ratios (the k_r) and makes
# emulated time dominate, so three ranks sharing two CPU cores do not slow each other's real compute much.
BASE_SLOWDOWN = 4.0
# Wider than the demo's model so that compute, not DeepSpeed's fixed per-step cost, dominates a step.
BENCH_MODEL = {**TINY_LLAMA, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128}


def with_micro_batches(plan: Plan, micro: list[int]) -> Plan:
    ranks = tuple(dataclasses.replace(r, tuning=dataclasses.replace(r.tuning, micro_batch=m)) for r, m in zip(plan.ranks, micro))
    return dataclasses.replace(plan, ranks=ranks)


def measure(job: JobSpec, plan: Plan, slowdown: list[float], out: Path) -> dict:
    config = dataclasses.replace(train_config(job, plan, out.name), output_dir=str(out), emulated_slowdown=tuple(slowdown))
    results = run_local_ranks(config)
    step = statistics.median(results[0]["step_times"][WARMUP_STEPS:])
    return {"micro_batches": [r.tuning.micro_batch for r in plan.ranks], "step_s": step, "samples_per_s": plan.global_batch / step,
            "utilisation": utilisation(results[0]["busy_s"], results[0]["wait_s"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--global-batch", type=int, default=96)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="zeromix-bench-"))
    model_dir = work / "model"
    shutil.copytree(REPO / "jobs" / "examples" / "tiny-llama", model_dir)
    (model_dir / "config.json").write_text(json.dumps(BENCH_MODEL))
    data = write_demo_data(work / "data", pretrain_lines=2000, reverse_train=10, reverse_eval=5)
    job = JobSpec.model_validate({
        "name": "bench", "model": {"init": "scratch", "path": str(model_dir)},
        "dataset": {"path": str(data["pretrain"]), "text_field": "text"}, "seq_len": 32,
        "global_batch_size": args.global_batch, "max_steps": args.steps, "output_dir": str(work / "out"),
        "optimizer": {"lr": 1e-3, "schedule": "constant"}, "gpus": {"count": 3, "models": TRIO}, "deepspeed": {"zero_stage": 2},
    })
    plan = make_plan(job, facts_from_config(BENCH_MODEL), snapshot_from_config(load_cluster(REPO / "cluster.yaml")), args.steps)
    rates = [r.rate_tflops for r in plan.ranks]
    slowdown = [BASE_SLOWDOWN * max(rates) / rate for rate in rates]
    names = [r.card.short_name for r in plan.ranks]
    print(f"SPEEDS ARE EMULATED ON CPU: each rank sleeps to run {BASE_SLOWDOWN:g} x k times slower, k from the catalog rates.")
    print(f"plan: {', '.join(f'{n} ({rate:g} TFLOPS {r.tuning.precision}, k={k / BASE_SLOWDOWN:.2f})' for n, rate, r, k in zip(names, rates, plan.ranks, slowdown))}")
    print(f"global batch {plan.global_batch} = micro-batches x {plan.grad_accum} accumulation step(s); {args.steps} steps, first {WARMUP_STEPS} untimed\n")

    per_card = args.global_batch // (len(plan.ranks) * plan.grad_accum)
    uniform = measure(job, with_micro_batches(plan, [per_card] * len(plan.ranks)), slowdown, work / "uniform")
    zeromix = measure(job, plan, slowdown, work / "zeromix")
    solos = []
    for i, rank in enumerate(plan.ranks):
        solo_plan = dataclasses.replace(plan, ranks=(rank,))
        solo_job = job.model_copy(update={"global_batch_size": solo_plan.global_batch})
        solos.append(measure(solo_job, solo_plan, [slowdown[i]], work / f"solo-{i}"))
    ideal = sum(s["samples_per_s"] for s in solos)

    print(f"{'split':10s} {'micro-batches':>16s} {'step (s)':>9s} {'samples/s':>10s} {'of ideal':>9s}  utilisation per card")
    for name, row in (("uniform", uniform), ("zeromix", zeromix)):
        util = ", ".join(f"{n} {u:.0%}" for n, u in zip(names, row["utilisation"]))
        print(f"{name:10s} {str(row['micro_batches']):>16s} {row['step_s']:9.3f} {row['samples_per_s']:10.1f} {row['samples_per_s'] / ideal:9.0%}  {util}")
    print(f"{'ideal':10s} {'(solo sum)':>16s} {'':9s} {ideal:10.1f} {1:9.0%}  " + ", ".join(f"{n} alone {s['samples_per_s']:.1f}/s" for n, s in zip(names, solos)))
    print()
    speedup, share = zeromix["samples_per_s"] / uniform["samples_per_s"], zeromix["samples_per_s"] / ideal
    print(f"zeromix vs uniform: {speedup:.2f}x (target >= 1.5x: {'met' if speedup >= 1.5 else 'NOT MET'})")
    print(f"zeromix vs ideal:   {share:.0%} (target >= 90%: {'met' if share >= 0.9 else 'NOT MET'})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
