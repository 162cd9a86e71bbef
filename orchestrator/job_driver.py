"""The entrypoint Ray Jobs runs for a zeromix job: start the worker group on the reserved cards, train,
report, and release the cards whatever happens."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ray
from ray.util.placement_group import remove_placement_group

from orchestrator import registry
from orchestrator.launch import CONFIG_KEY_ENV, load_train_config
from orchestrator.registry import placement_group_name
from orchestrator.report import RESULT_FILE
from orchestrator.worker_group import RankFailed, WorkerGroup
from workers import job_records
from workers.rebalance import measured_speeds
from workers.train import TrainConfig, utilisation

READY_TIMEOUT_S = 60


def report(config: TrainConfig, plan: dict, placements: list[dict], results: list[dict]) -> dict:
    """The job's result. A run resumed at its last step (its driver died after the final save) trained no step:
    its figures per step are None, and it still succeeds."""
    first, cards = results[0], plan["ranks"]
    util = utilisation(first["busy_s"], first["wait_s"])
    ran = bool(first["history"])
    return {
        "job_id": config.job_id,
        "steps": first["steps"],
        "first_loss": first["first_loss"],
        "last_loss": first["last_loss"],
        "losses": first["losses"],
        "history": first["history"],  # every step, every card (workers/telemetry.StepStats.record): the report's data
        "rebalances": first["rebalances"],  # each correction of the split from measured speeds (workers/rebalance.py)
        "plan": plan,
        "method": config.method,
        "base": _base(config, first),
        "resumed_from": first["resumed_from"] or None,  # the checkpoint this run took over from
        "tokens_per_s": round(sum(r["tokens_per_s"] for r in results) / len(results), 1),
        "final_dir": first["final_dir"],
        "step_time_s": round(first["step_time_s"], 4) if ran else None,  # measured, mean over the run
        "est_step_s": plan["est_step_s"],  # the plan's estimate, for the real cards
        "ranks": [
            {"rank": i, "card": c["card"], "model": c["model"], "micro_batch": config.micro_batches[i],
             "final_micro_batch": first["history"][-1]["split"][i] if first["history"] else config.micro_batches[i],
             "zero_stage": config.ds_configs[i]["zero_optimization"]["stage"], "precision": r["precision"],
             "device": p["device"], "cuda_visible_devices": p["cuda_visible_devices"],
             "nvml_name": p["nvml_name"], "uuid": p["uuid"], "pci_bus_id": p["pci_bus_id"],
             "busy_s": round(first["busy_s"][i], 4) if ran else None, "wait_s": round(first["wait_s"][i], 4) if ran else None,
             "utilisation": round(util[i], 3) if util else None,
             "est_compute_s": c["est_compute_s"],
             # measured from the engine's tensors vs the plan's estimate (weights + gradients + optimizer)
             "model_state_mib": float(f"{sum(r['model_state_bytes'].values()) / 1024**2:.4g}"),
             "est_model_state_mib": float(f"{sum(c['est_mem_breakdown_gib'][k] for k in ('weights', 'gradients', 'optimizer')) * 1024:.4g}")}
            for i, (c, p, r) in enumerate(zip(cards, placements, results))
        ],
    }


def _base(config: TrainConfig, first: dict) -> str:
    """What the frozen base (or the trained model) was, as the ranks held it."""
    if config.method != "qlora":
        return f"{first['precision']} weights"
    q = config.four_bit
    return (f"4-bit {q['type']}{', double-quantised' if q['double_quant'] else ''}: {first['quantised_layers']} linear layers "
            f"quantised (bitsandbytes), the rest in {first['precision']}")


def main() -> int:
    ray.init(namespace="zeromix")
    config = load_train_config(os.environ[CONFIG_KEY_ENV])
    attempt = config.attempt  # this placement's Ray job id: its rank actors' names and its records are its own
    plan = config.plan
    cards = plan["ranks"]
    group_pg = ray.util.get_placement_group(placement_group_name(config.job_id))
    group = None
    try:
        ray.get(group_pg.ready(), timeout=READY_TIMEOUT_S)
        group = WorkerGroup(group_pg, cards, attempt)
        placements = group.where()
        for c, p in zip(cards, placements):
            print(f"zeromix: rank on {c['card']} ({c['model']}) sees CUDA_VISIBLE_DEVICES={p['cuda_visible_devices']}, "
                  f"NVML {p['nvml_name'] or 'none'} at {p['pci_bus_id'] or '-'}, device {p['device']}", flush=True)
        try:
            results = group.run(config.to_json())
        except RankFailed as failed:
            job_records.put(attempt, "failure", failed.record())  # before the driver exits: the scheduler reads it then
            raise
        if results[0]["stopped_early"]:  # the scheduler moves it: the next placement resumes from this checkpoint
            job_records.put(attempt, "result", {"stopped_at": results[0]["steps"], "of": config.total_steps})
            print(f"zeromix: stopped after step {results[0]['steps']} of {config.total_steps} with a checkpoint, as the scheduler "
                  "asked; it is placed again and resumes there", flush=True)
            return 0
        summary = report(config, plan, placements, results)
        Path(config.output_dir, RESULT_FILE).write_text(json.dumps(summary, indent=2))
        learnt = registry.record_training_speeds(measured_speeds(summary["history"], plan))
        if learnt:
            print(f"zeromix: the measured speeds of {', '.join(learnt)} are in their nodes' records for the next plans", flush=True)
        job_records.put(attempt, "result", {k: v for k, v in summary.items() if k not in ("history", "plan")})  # those are in the file
        print(f"zeromix: finished {summary['steps']} steps; the result is in {Path(config.output_dir, RESULT_FILE)}", flush=True)
        return 0
    finally:
        if group:
            group.shutdown()
        remove_placement_group(group_pg)  # the cards are free again


if __name__ == "__main__":
    sys.exit(main())
