"""What zeromix's per-card split buys, for a GTX 1080 Ti + RTX 3090 + RTX 4090 plan, with real DeepSpeed.

SPEEDS ARE EMULATED ON CPU. Every rank runs on this machine's CPU at the same speed; rank r also sleeps
BASE_SECONDS_PER_SAMPLE x k_r per sample before its backward (k_r = the fastest planned card's catalog rate / this
card's, at the plan's precision), so the emulated cards differ as the catalog says and the real compute, the same
on every rank, is a small part. The figures show what the split buys, not what the cards do.

Four throughputs from one run:
  uniform    every card gets the same micro-batch (plain DeepSpeed)
  planned    the planner's per-card micro-batches, kept for the whole run
  corrected  the planner's, then corrected from measured speeds while training (workers/rebalance.py); measured
             over the steps after its last change
  ideal      the sum of each card's throughput when it trains alone (no other rank to wait for, no gradient
             exchange) on the share the planner gives it with the right rates, the three solo runs at the same
             time, as the three ranks of the other rows share this machine's cores (run one after another, each
             solo had a core to itself and the sum overstated what any split on this CPU could reach: a split with
             every card 99-100% busy measured 87-94% of it). One yardstick for every row and for --wrong-rates.

--wrong-rates CARD gives the planner rates wrong by 2x for that card (it believes it twice as fast as the
emulation makes it), as a wrong catalog row, a throttled card or a riser would: the planned split is then wrong,
and the correction has to find the right one.

    .venv/bin/python bench/hetero_dp.py [--steps 16] [--correction-steps 30] [--global-batch 96] [--wrong-rates "RTX 3090"]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from orchestrator.cluster_config import load_cluster
from orchestrator.inventory import snapshot_from_config
from orchestrator.jobspec import JobSpec
from orchestrator.launch import train_config
from orchestrator.model_facts import facts_from_config
from orchestrator.planner import Plan, make_plan, step_time
from orchestrator.demo.task import TINY_LLAMA, write_demo_data
from workers.local_launch import run_local_ranks
from workers.train import utilisation

REPO = Path(__file__).resolve().parents[1]
TRIO = ["GTX 1080 Ti", "RTX 3090", "RTX 4090"]
WARMUP_STEPS = 4  # first steps include lazy initialisation; not timed
# Every rank sleeps BASE_SECONDS_PER_SAMPLE * k_r per sample: fixed seconds, the same in every run (an emulation
# calibrated per run against each rank's measured compute varied by +-20% between runs, more than what was measured)
BASE_SECONDS_PER_SAMPLE = 0.04
# Wider than the demo's model so that compute, not DeepSpeed's fixed per-step cost, dominates a step.
BENCH_MODEL = {**TINY_LLAMA, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128}


def model_dir_with(model_dir: Path, model_config: dict) -> Path:
    """A model directory with `model_config` and the tiny Llama's character-level tokenizer."""
    shutil.copytree(REPO / "jobs" / "examples" / "tiny-llama", model_dir)
    (model_dir / "config.json").write_text(json.dumps(model_config))
    return model_dir


def trio_job(work: Path, model_config: dict, steps: int, global_batch: int, pretrain_lines: int, **fields) -> JobSpec:
    """A full fine-tune from scratch of `model_config` (the tiny Llama's tokenizer) on the demo's text, on the
    homelab's 1080 Ti, 3090 and 4090, ZeRO-2, synchronous: what the CPU benches train."""
    model_dir = model_dir_with(work / "model", model_config)
    data = write_demo_data(work / "data", pretrain_lines=pretrain_lines, reverse_train=10, reverse_eval=5)
    return JobSpec.model_validate({
        "name": "bench", "model": {"init": "scratch", "path": str(model_dir)},
        "dataset": {"path": str(data["pretrain"]), "text_field": "text"}, "seq_len": 32,
        "global_batch_size": global_batch, "max_steps": steps, "output_dir": str(work / "out"),
        "optimizer": {"lr": 1e-3, "schedule": "constant"}, "gpus": {"count": 3, "models": TRIO}, "deepspeed": {"zero_stage": 2},
        "report_to": [], "sync": {"mode": "synchronous"}, **fields,
    })


def with_micro_batches(plan: Plan, micro: list[int]) -> Plan:
    ranks = tuple(dataclasses.replace(r, tuning=dataclasses.replace(r.tuning, micro_batch=m)) for r, m in zip(plan.ranks, micro))
    return dataclasses.replace(plan, ranks=ranks)


STEADY_STEPS = 4  # at least this many steps measured after the correction's last change


def measure(job: JobSpec, plan: Plan, sleep_s: list[float], out: Path, correct: bool = False) -> dict:
    """The median step over the steps after warm-up or, with the correction on, after its last change (whose
    first step warms up again)."""
    config = dataclasses.replace(train_config(job, plan, out.name), output_dir=str(out), emulated_seconds_per_sample=tuple(sleep_s))
    if not correct:
        config = dataclasses.replace(config, micro_batch_caps=())
    first = run_local_ranks(config)[0]
    changes, history = first["rebalances"], first["history"]
    settled = changes[-1]["step"] if changes else WARMUP_STEPS
    timed = [h for h in history if h["step"] > settled] or history[-STEADY_STEPS:]
    step = statistics.median(max(h["step_time_s"]) for h in timed)
    cards = range(len(plan.ranks))
    wait = [statistics.fmean(h["wait_s"][r] for h in timed) for r in cards]
    busy = [statistics.fmean(h["step_time_s"][r] for h in timed) - wait[r] for r in cards]
    return {"micro_batches": list(history[-1]["split"]), "step_s": step, "samples_per_s": plan.global_batch / step,
            "utilisation": utilisation(busy, wait), "changes": [(c["step"], c["new"]) for c in changes], "timed_steps": len(timed)}


def believed_twice_as_fast(snapshot, card_name: str):
    """The cluster as a planner misinformed about one card model would see it: twice its rates (through the same
    knob measured training speeds turn, `CardFacts.training_speed`)."""
    def wrong(card):
        if card.short_name.removeprefix("GeForce ") != card_name.removeprefix("GeForce "):
            return card
        return dataclasses.replace(card, facts=dataclasses.replace(card.facts, training_speed=2.0))

    return dataclasses.replace(snapshot, nodes=tuple(dataclasses.replace(n, cards=tuple(wrong(c) for c in n.cards)) for n in snapshot.nodes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--correction-steps", type=int, default=30, help="steps of the corrected run (it measures, then changes)")
    parser.add_argument("--global-batch", type=int, default=96)
    parser.add_argument("--wrong-rates", metavar="CARD", choices=TRIO, help="the planner believes this card twice as fast as it is")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="zeromix-bench-"))
    job = trio_job(work, BENCH_MODEL, args.steps, args.global_batch, pretrain_lines=2000)
    homelab = snapshot_from_config(load_cluster(REPO / "cluster.yaml"))
    believed = believed_twice_as_fast(homelab, args.wrong_rates) if args.wrong_rates else homelab
    plan = make_plan(job, facts_from_config(BENCH_MODEL), believed, args.steps)
    rightly = make_plan(job, facts_from_config(BENCH_MODEL), homelab, args.steps)  # the ideal's shares
    true_cards = {c.card_id: c for c in homelab.cards}
    rates = [step_time.card_tflops(true_cards[r.card.card_id], plan.precision) for r in plan.ranks]  # the emulation's truth
    sleep_s = [BASE_SECONDS_PER_SAMPLE * max(rates) / rate for rate in rates]
    names = [r.card.short_name for r in plan.ranks]
    print(f"SPEEDS ARE EMULATED ON CPU: each rank sleeps {BASE_SECONDS_PER_SAMPLE * 1000:g} ms x k per sample, k from the catalog rates.")
    print(f"cards: {', '.join(f'{n} ({rate:g} TFLOPS {r.tuning.precision}, k={k / BASE_SECONDS_PER_SAMPLE:.2f})' for n, rate, r, k in zip(names, rates, plan.ranks, sleep_s))}")
    if args.wrong_rates:
        print(f"THE PLANNER WAS GIVEN WRONG RATES: it believes the {args.wrong_rates} twice as fast as the emulation makes it")
    print(f"global batch {plan.global_batch} = micro-batches x {plan.grad_accum} accumulation step(s); {args.steps} steps "
          f"({args.correction_steps} for the corrected run), first {WARMUP_STEPS} (or those up to the last correction) untimed\n")

    per_card = args.global_batch // (len(plan.ranks) * plan.grad_accum)
    uniform = measure(job, with_micro_batches(plan, [per_card] * len(plan.ranks)), sleep_s, work / "uniform")
    planned = measure(job, plan, sleep_s, work / "planned")
    corrected = measure(job.model_copy(update={"max_steps": args.correction_steps}), dataclasses.replace(plan, total_steps=args.correction_steps),
                        sleep_s, work / "corrected", correct=True)
    def solo(i: int) -> dict:
        share = next(r for r in rightly.ranks if r.card.card_id == plan.ranks[i].card.card_id)
        solo_plan = dataclasses.replace(rightly, ranks=(share,))
        solo_job = job.model_copy(update={"global_batch_size": solo_plan.global_batch})
        return measure(solo_job, solo_plan, [sleep_s[i]], work / f"solo-{i}")

    with ThreadPoolExecutor(len(plan.ranks)) as pool:  # all at once, as the trio's ranks share the cores
        solos = list(pool.map(solo, range(len(plan.ranks))))
    ideal = sum(s["samples_per_s"] for s in solos)

    print(f"{'split':10s} {'micro-batches':>16s} {'step (s)':>9s} {'samples/s':>10s} {'of ideal':>9s}  utilisation per card")
    for name, row in (("uniform", uniform), ("planned", planned), ("corrected", corrected)):
        util = ", ".join(f"{n} {u:.0%}" for n, u in zip(names, row["utilisation"]))
        print(f"{name:10s} {str(row['micro_batches']):>16s} {row['step_s']:9.3f} {row['samples_per_s']:10.1f} {row['samples_per_s'] / ideal:9.0%}  {util}")
    shares = [s["micro_batches"][0] for s in solos]
    print(f"{'ideal':10s} {str(shares):>16s} {'':9s} {ideal:10.1f} {1:9.0%}  " + ", ".join(f"{n} alone {s['samples_per_s']:.1f}/s" for n, s in zip(names, solos)))
    print(f"corrections: {', '.join(f'from step {step}: {new}' for step, new in corrected['changes']) or 'none'}; "
          f"the corrected row is timed over its last {corrected['timed_steps']} steps\n")
    speedup, share, fixed = (planned["samples_per_s"] / uniform["samples_per_s"], planned["samples_per_s"] / ideal,
                             corrected["samples_per_s"] / ideal)
    goal = 0.90 if args.wrong_rates else 0.95
    print(f"planned vs uniform:  {speedup:.2f}x (target >= 1.5x: {'met' if speedup >= 1.5 else 'NOT MET'})")
    print(f"planned vs ideal:    {share:.0%}")
    print(f"corrected vs ideal:  {fixed:.0%} (target >= {goal:.0%}: {'met' if fixed >= goal else 'NOT MET'})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
