"""What the planner hands on: a plan (each rank's card, settings, memory and time estimates) and the cards
it left out, with why. Data only; `tuning.py` and `__init__.py` make it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.ds_config import Optimization, RankTuning, deepspeed_config
from orchestrator.inventory import Card
from orchestrator.jobspec import JobSpec
from orchestrator.planner import step_time
from orchestrator.planner.memory import GIB, MemoryEstimate, ZeroSetting

if TYPE_CHECKING:
    from orchestrator.planner.outer import OuterSteps


@dataclass(frozen=True)
class Rejection:
    card_id: str
    card: str
    reason: str


@dataclass(frozen=True)
class RankPlan:
    card: Card
    tuning: RankTuning
    memory: MemoryEstimate  # an estimate
    capacity_bytes: int  # what the estimate must fit in: the card's memory (free memory where probed)
    rate_tflops: float  # what the card achieves in training at the plan's precision (step_time.card_tflops)
    rate_source: str  # "measured" or "catalog"
    env: dict[str, str]  # NCCL settings for this rank
    # The largest micro-batch this card holds at its settings (the memory model): how far the self-correcting
    # split (workers/rebalance.py) may grow its share when it turns out faster than planned
    micro_cap: int = 0


@dataclass(frozen=True)
class FourBitBase:
    """QLoRA: the frozen base's linear layers in 4 bits (bitsandbytes)."""

    type: str  # nf4 | fp4
    double_quant: bool
    why: str  # how the cards hold it, in words

    def describe(self) -> str:
        return f"4-bit {self.type} base{', double-quantised' if self.double_quant else ''}"


@dataclass(frozen=True)
class Plan:
    job_name: str
    ranks: tuple[RankPlan, ...]
    grad_accum: int
    zero: ZeroSetting
    precision: str
    total_steps: int
    n_params: int
    trainable: int
    host_bytes_per_node: dict[str, int]  # an estimate, DeepSpeed's accounting
    rejected: tuple[Rejection, ...]
    step: step_time.StepEstimate  # an estimate
    lora_targets: tuple[str, ...] = ()  # the modules LoRA adapts (resolved: the spec's or PEFT's default); () for full
    four_bit: FourBitBase | None = None  # QLoRA's 4-bit base; None for full and LoRA
    outer: OuterSteps | None = None  # boxes that train apart and meet every H steps (planner/outer.py); None: synchronous
    no_outer: str = ""  # why a job that asked for outer steps runs synchronous across these boxes
    loss_chunk_tokens: int = 0  # the tokens whose logits the loss computes at once (workers/loss.py); 0: a micro-batch's all

    @property
    def loss_chunked(self) -> bool:
        """Whether a micro-batch's logits take more than one of the loss's chunks on some card."""
        seq_len = self.step.tokens // self.global_batch  # (the step's tokens are its samples' sequences)
        return bool(self.loss_chunk_tokens) and max(r.tuning.micro_batch for r in self.ranks) * seq_len > self.loss_chunk_tokens

    @property
    def global_batch(self) -> int:
        return sum(r.tuning.micro_batch for r in self.ranks) * self.grad_accum

    @property
    def offloading(self) -> tuple[str, ...]:
        """The cards whose optimizer partition lives in host RAM (chosen per card at ZeRO-2)."""
        return tuple(r.card.card_id for r in self.ranks if r.tuning.offload_optimizer)

    @property
    def offload(self) -> str:
        """Offload in words: none, optimizer, optimizer+params, or the cards that offload their optimizer."""
        if self.offloading and len(self.offloading) < len(self.ranks):
            return "optimizer on " + ", ".join(self.offloading)
        return self.zero.offload

    @property
    def settings(self) -> str:
        zero = f"ZeRO-{self.zero.stage}, offload {self.offload}" if self.offload != self.zero.offload else self.zero.describe()
        zero = f"{zero}, {self.four_bit.describe()}" if self.four_bit else zero
        return f"{zero} in each of {len(self.outer.boxes)} boxes, outer steps every {self.outer.inner_steps}" if self.outer else zero

    @property
    def title(self) -> str:
        """One line: the job, each card with its micro-batch, the settings; what the Ray dashboard names the job."""
        cards = " + ".join(f"{r.card.card_id} {r.card.short_name.removeprefix('GeForce ')} x{r.tuning.micro_batch}" for r in self.ranks)
        return (f"{self.job_name}: {cards}; {self.settings}, {self.precision}, checkpointing {self.checkpointing}; "
                f"~{self.step.tokens_per_s:,.0f} tokens/s (estimate)")

    @property
    def recomputing(self) -> tuple[str, ...]:
        """The cards that run with activation checkpointing (chosen per card)."""
        return tuple(r.card.card_id for r in self.ranks if r.tuning.activation_checkpointing)

    @property
    def checkpointing(self) -> str:
        """Activation checkpointing in words: off, on, or on for the cards that need it."""
        if not self.recomputing:
            return "off"
        return "on" if len(self.recomputing) == len(self.ranks) else "on for " + ", ".join(self.recomputing)

    def ds_configs(self, job: JobSpec) -> list[dict]:
        opt = Optimization(job.optimizer.lr, job.optimizer.schedule, job.optimizer.warmup_steps, job.optimizer.weight_decay, self.total_steps)
        return [deepspeed_config(r.tuning, self.grad_accum, len(self.ranks), job.deepspeed.gradient_clipping, opt) for r in self.ranks]

    def summary(self) -> dict:
        """JSON-able, for Ray job metadata, `plan --json` and the workers. Memory and time are estimates."""
        return {
            "job": self.job_name,
            "zero_stage": self.zero.stage, "precision": self.precision,
            "offload": self.offload,
            "activation_checkpointing": self.checkpointing,
            "grad_accum": self.grad_accum, "global_batch": self.global_batch, "total_steps": self.total_steps,
            "params": self.n_params, "trainable_params": self.trainable, "lora_targets": list(self.lora_targets),
            "four_bit": dataclasses.asdict(self.four_bit) if self.four_bit else None, "loss_chunk_tokens": self.loss_chunk_tokens,
            "est_step_s": sig(self.step.step_s), "est_compute_s": sig(max(self.step.compute_s)),
            "est_comm_s": sig(self.step.comm_s), "est_offload_s": sig(max(self.step.offload_s)),
            "est_tokens_per_s": sig(self.step.tokens_per_s),
            "est_host_gib": {node: round(b / GIB, 2) for node, b in self.host_bytes_per_node.items()},
            "ranks": [{"card": r.card.card_id, "node": r.card.node, "index": r.card.index, "resource": r.card.resource,
                       "model": r.card.short_name, "uuid": r.card.facts.uuid, "micro_batch": r.tuning.micro_batch,
                       "micro_batch_cap": r.micro_cap,
                       "activation_checkpointing": r.tuning.activation_checkpointing,
                       "vram_gib": round(r.card.vram_mib / 1024, 1), "capacity_gib": round(r.capacity_bytes / GIB, 2),
                       "est_mem_gib": round(r.memory.total / GIB, 2), "est_mem_breakdown_gib": _breakdown(r.memory),
                       "rate_tflops": sig(r.rate_tflops), "rate_source": r.rate_source, "est_compute_s": sig(c),
                       "est_wait_s": sig(w), "est_comm_s": sig(self.step.comm_s), "est_offload_s": sig(o),
                       "offload_optimizer": r.tuning.offload_optimizer, "offload_params": r.tuning.offload_params, "env": r.env,
                       **({"est_outer_step_gib": float(f"{r.memory.outer_step / GIB:.4g}")} if self.outer else {})}
                      for r, c, w, o in zip(self.ranks, self.step.compute_s, self.step.wait_s, self.step.offload_s)],
            "rejected": [{"card": x.card_id, "model": x.card, "reason": x.reason} for x in self.rejected],
            "outer": self.outer.summary() if self.outer else None,
            **({"no_outer": self.no_outer} if self.no_outer else {}),
        }


def _breakdown(m: MemoryEstimate) -> dict[str, float]:
    parts = ("weights", "gradients", "optimizer", "gathered", "activations", "buckets", "overhead", "dequantised")
    return {p: float(f"{getattr(m, p) / GIB:.4g}") for p in parts}


def sig(value: float) -> float:
    """Three significant figures: estimates span microseconds (a tiny model) to minutes."""
    return float(f"{value:.3g}")

