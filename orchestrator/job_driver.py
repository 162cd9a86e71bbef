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
from orchestrator.worker_group import RankFailed, WorkerGroup, wait_for_cards
from workers import job_records
from workers.collectives import first_ranks
from workers.rebalance import measured_speeds
from workers.train import TrainConfig, utilisation

READY_TIMEOUT_S = 60


def report(config: TrainConfig, plan: dict, placements: list[dict], results: list[dict | None]) -> dict:
    """The job's result. A run resumed at its last step (its driver died after the final save) trained no step:
    its figures per step are None, and it still succeeds. With outer steps, the ranks of a box lost on the way have
    no result (None): the result's ranks and history are the boxes' that finished, and `outer.boxes_left` says why
    (and `outer.boxes_back` when a box was let back in: its cards' figures start there)."""
    first, cards = results[0], plan["ranks"]
    ran = bool(first["history"])
    # A rank's figures are in its own group's lists: the job's, or with outer steps its box's (ranks box by box)
    boxes = [(f, n) for f, n in zip(first_ranks(config.boxes), config.boxes) if results[f] is not None]
    local = [r for size in config.boxes for r in range(size)]
    history = job_history(boxes, results)
    finished = [(i, r) for i, r in enumerate(results) if r is not None]  # (in history's order: box by box)
    return {
        "job_id": config.job_id,
        "steps": first["steps"],
        "first_loss": history[0]["loss"] if history else first["first_loss"],
        "last_loss": history[-1]["loss"] if history else first["last_loss"],
        "losses": [h["loss"] for h in history],
        "history": history,  # every step, every card (workers/telemetry.StepStats.record): the report's data
        # each correction of the split from measured speeds (workers/rebalance.py), with the ranks whose split it is (the
        # job's; with outer steps a box's, or every rank's for the boxes' shares)
        "rebalances": sorted(({"ranks": list(range(f, f + n)), **change} for f, n in zip(first_ranks(config.boxes), config.boxes)
                              if results[f] is not None for change in results[f]["rebalances"]), key=lambda change: change["step"]),
        "plan": plan,
        "method": config.method,
        "base": _base(config, first),
        "resumed_from": first["resumed_from"] or None,  # the checkpoint this run took over from
        "tokens_per_s": round(sum(r["tokens_per_s"] for _, r in finished) / len(finished), 1),
        "final_dir": first["final_dir"],
        "step_time_s": round(first["step_time_s"], 4) if ran else None,  # measured, mean over the run
        "est_step_s": plan["est_step_s"],  # the plan's estimate, for the real cards
        # outer steps across boxes: how many, the bytes the box leaders sent across the link (counted there), the boxes lost
        "outer": {"outer_steps": first["outer_steps"], "bytes_across_boxes": sum(r["outer_bytes_sent"] for _, r in finished),
                  "boxes_left": first["boxes_left"], "boxes_back": first["boxes_back"]} if config.outer else None,
        "ranks": [
            {"rank": i, "card": c["card"], "model": c["model"], "micro_batch": config.micro_batches[i],
             "final_micro_batch": history[-1]["split"][pos] if history else config.micro_batches[i],
             "zero_stage": config.ds_configs[i]["zero_optimization"]["stage"], "precision": r["precision"],
             "device": p["device"], "cuda_visible_devices": p["cuda_visible_devices"],
             "nvml_name": p["nvml_name"], "uuid": p["uuid"], "pci_bus_id": p["pci_bus_id"],
             "busy_s": round(r["busy_s"][j], 4) if ran else None, "wait_s": round(r["wait_s"][j], 4) if ran else None,
             "utilisation": round(utilisation(r["busy_s"], r["wait_s"])[j], 3) if ran else None,
             "est_compute_s": c["est_compute_s"],
             # measured from the engine's tensors vs the plan's estimate (weights + gradients + optimizer)
             "model_state_mib": float(f"{sum(r['model_state_bytes'].values()) / 1024**2:.4g}"),
             "est_model_state_mib": float(f"{sum(c['est_mem_breakdown_gib'][k] for k in ('weights', 'gradients', 'optimizer')) * 1024:.4g}"),
             # outer steps: the most memory an outer step held above what the rank held before it (measured), and
             # the plan's estimate of its buffers on the card (a box leader's host RAM comes on top of it)
             **({"outer_step_peak_mib": None if r["outer_peak_bytes"] is None else round(r["outer_peak_bytes"] / 1024**2, 1),
                 "est_outer_step_mib": round(c["est_outer_step_gib"] * 1024, 1)} if config.outer else {})}
            for pos, (i, r) in enumerate(finished) for c, p, j in [(cards[i], placements[i], local[i])]
        ],
    }


PER_RANK = ("tokens", "step_time_s", "reduce_s", "memory_bytes", "peak_memory_bytes", "split", "wait_s", "compute_s")


ABSENT = {"tokens": 0, "split": 0}  # a card at a step its box was out of the job: no samples; its other figures None


def job_history(boxes: list[tuple[int, int]], results: list[dict | None]) -> list[dict]:
    """Every step, every card. Synchronous: any rank's history (they all hold the job's). With outer steps each box
    records its own cards (`boxes`: each box's first rank and ranks, of the boxes with results): the boxes' records
    of a step side by side, the loss their mean weighted by tokens. Box 0 ran every step; a box let back in after it
    was lost has no record of the steps it was out (ABSENT)."""
    histories = [results[first]["history"] for first, _ in boxes]
    if len(histories) == 1:
        return histories[0]
    by_step = [{h["step"]: h for h in history} for history in histories]
    merged = []
    for step in (h["step"] for h in histories[0]):
        records = [steps.get(step) for steps in by_step]
        present = [r for r in records if r]
        row = {**present[0], "next_split": [],
               **{key: [v for r, (_, n) in zip(records, boxes) for v in (r[key] if r else [ABSENT.get(key)] * n)] for key in PER_RANK}}
        tokens = [sum(r["tokens"]) for r in present]
        row["loss"] = sum(r["loss"] * t for r, t in zip(present, tokens)) / sum(tokens)
        row["comm_s"] = min(v for r in present for v in r["reduce_s"])
        row["tokens_per_s"] = round(sum(row["tokens"]) / max(v for r in present for v in r["step_time_s"]), 1)
        row["stop"] = any(r["stop"] for r in present)
        merged.append(row)
    return merged


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
        try:
            wait_for_cards(group_pg, cards, READY_TIMEOUT_S)
            group = WorkerGroup(group_pg, cards, attempt)
            placements = group.where()
            for c, p in zip(cards, placements):
                print(f"zeromix: rank on {c['card']} ({c['model']}) sees CUDA_VISIBLE_DEVICES={p['cuda_visible_devices']}, "
                      f"NVML {p['nvml_name'] or 'none'} at {p['pci_bus_id'] or '-'}, device {p['device']}", flush=True)
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
        ran_on = {**plan, "ranks": [plan["ranks"][r["rank"]] for r in summary["ranks"]]}  # (less a box lost on the way)
        learnt = registry.record_training_speeds(measured_speeds(summary["history"], ran_on))
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
