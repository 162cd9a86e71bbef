"""The experiment trackers a job's `report_to` names, written by rank 0 with each library's own writer: the
loss, learning rate and throughput of every step, each card's step time, throughput and memory, and the
plan (as text or config). W&B and MLflow are imported only when asked for.

Where they write: TensorBoard under <output_dir>/tensorboard; W&B under <output_dir>/wandb (online, or
offline with WANDB_MODE=offline, as W&B's own environment variables say); MLflow to MLFLOW_TRACKING_URI, or
its file store at <output_dir>/mlruns. Credentials (WANDB_API_KEY, MLflow's) come from the environment the
cluster was started with and are never written by zeromix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from workers.telemetry import StepStats

TRACKERS = ("tensorboard", "wandb", "mlflow")
TENSORBOARD_DIR = "tensorboard"


def card_names(plan: dict, world: int) -> list[str]:
    """Each rank's card as a series name (e.g. desk/0), or rank0.. without a plan for every rank."""
    ranks = plan.get("ranks") or []
    return [c["card"] for c in ranks] if len(ranks) == world else [f"rank{r}" for r in range(world)]


def scalars(stats: StepStats, cards: list[str]) -> dict[str, float]:
    """Every figure of a step, by the name each tracker shows it under."""
    out = {"train/loss": stats.loss, "train/lr": stats.lr, "train/tokens_per_s": stats.tokens_per_s,
           "train/step_time_s": max(stats.step_time_s), "train/comm_s": stats.comm_s}
    for rank, card in enumerate(cards):
        out[f"step_time_s/{card}"] = stats.step_time_s[rank]
        out[f"compute_s/{card}"] = stats.compute_s[rank]
        out[f"wait_s/{card}"] = stats.wait_s[rank]
        out[f"tokens_per_s/{card}"] = stats.card_tokens_per_s(rank)
        out[f"memory_gib/{card}"] = stats.memory_bytes[rank] / 1024**3
    return out


def plan_table(plan: dict) -> str:
    """The plan as a Markdown table (TensorBoard renders it in its Text tab)."""
    head = (f"ZeRO-{plan.get('zero_stage')} · {plan.get('precision')} · {plan.get('grad_accum')} accumulation step(s) · "
            f"est. {plan.get('est_step_s')} s/step, {plan.get('est_tokens_per_s')} tokens/s (estimates)\n\n")
    rows = ["| rank | card | model | micro-batch | checkpointing | offload | est. memory GiB |", "|---|---|---|---|---|---|---|"]
    rows += [f"| {i} | {r['card']} | {r['model']} | {r['micro_batch']} | {r['activation_checkpointing']} | "
             f"{'optimizer' if r['offload_optimizer'] else 'none'} | {r['est_mem_gib']} |" for i, r in enumerate(plan.get("ranks", []))]
    return head + "\n".join(rows)


class Trackers:
    def __init__(self, report_to: tuple[str, ...], out: Path, job_id: str, plan: dict, world: int, start_step: int):
        self.cards = card_names(plan, world)
        self.writers = []
        config = {k: v for k, v in plan.items() if k != "ranks"} | {"cards": [r["card"] for r in plan.get("ranks", [])]}
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR), purge_step=start_step or None)
            if not start_step:
                writer.add_text("plan", plan_table(plan), 0)

            def add_scalars(values: dict[str, float], step: int) -> None:
                for name, value in values.items():
                    writer.add_scalar(name, value, step)

            self.writers.append(_Writer(add_scalars, writer.close))
        if "wandb" in report_to:
            import wandb

            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "zeromix"), name=job_id, id=job_id, resume="allow",
                             dir=str(out), config={"plan": config, "job_id": job_id})
            self.writers.append(_Writer(lambda values, step: run.log(values, step=step), run.finish))
        if "mlflow" in report_to:
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):  # a file store beside the run: no server, no database
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps it, in maintenance mode
                mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "zeromix"))
            mlflow.start_run(run_name=job_id)
            mlflow.log_params({k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
            mlflow.log_text(json.dumps(plan, indent=2), "plan.json")
            self.writers.append(_Writer(lambda values, step: mlflow.log_metrics(values, step=step), mlflow.end_run))

    def log(self, stats: StepStats) -> None:
        values = scalars(stats, self.cards)
        for writer in self.writers:
            writer.log(values, stats.step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


@dataclass(frozen=True)
class _Writer:
    """One tracker: how it logs a step's scalars, and how it ends."""

    log: Callable[[dict[str, float], int], None]
    close: Callable[[], None]
