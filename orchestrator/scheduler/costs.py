"""What a run costs beyond its steps on a real cluster: starting, reading the weights, checkpoints, and how far
the planner's step time is from the truth. From orchestrator/data/sim_costs.yaml (each figure marked measured or
estimate). The simulator charges them, a move's too (the checkpoint it saves, and starting and loading again).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestrator.planner import Plan

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

    def run_s(self, job_id: str, plan: Plan, share: float = 1.0) -> float:
        """How long the job takes on this plan's cards, start to end, doing `share` of its steps (the rest after a
        move): the truth the policy does not see."""
        error = math.exp(random.Random(f"{self.seed}:{job_id}").gauss(0.0, self.estimate_sigma)) if self.estimate_sigma else 1.0
        train_s = plan.step.step_s * plan.total_steps * share * error
        saves = int(train_s // self.checkpoint_every_s) if self.checkpoint_every_s else 0
        return self.start_s + self.load_s(plan) + train_s + saves * self.save_s(plan)

    def load_s(self, plan: Plan) -> float:
        return plan.n_params * 2 / GB / self.load_gb_per_s if self.load_gb_per_s else 0.0

    def save_s(self, plan: Plan) -> float:
        """Full: weights and Adam states (14 bytes a parameter); LoRA: the adapter's (16)."""
        state_bytes = plan.n_params * 14 if plan.trainable == plan.n_params else plan.trainable * 16
        return state_bytes / GB / self.checkpoint_gb_per_s if self.checkpoint_gb_per_s else 0.0


Costs.NONE = Costs(start_s=0.0, load_gb_per_s=0.0, checkpoint_gb_per_s=0.0, checkpoint_every_s=0.0, estimate_sigma=0.0)
