"""The DeepSpeed JSON for one rank, with every field written out. DeepSpeed's defaults move between
releases (gradient_clipping became 1.0 in 0.19.3), so nothing is left to them."""

from __future__ import annotations

from dataclasses import dataclass

# Communication buckets, in elements. DeepSpeed's default (5e8) would take 1 GB per bucket in 16-bit, a tenth
# of an 11 GB card; 5e7 keeps collectives large enough to run at link speed. The memory model counts them.
BUCKET_ELEMENTS = 50_000_000
# ZeRO-3 keeps this many parameters gathered and reuses them within this distance: for models up to this size
# a weight gathered for forward is still there for backward (the step-time model counts one gather per micro-step).
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000


@dataclass(frozen=True)
class Optimization:
    lr: float
    schedule: str  # constant | linear | cosine
    warmup_steps: int
    weight_decay: float
    total_steps: int


@dataclass(frozen=True)
class RankTuning:
    """The per-card choices the planner makes."""

    micro_batch: int
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    precision: str  # fp32 | fp16 | bf16
    # Per card: transformers recomputes each decoder layer's forward in backward. Per process, it changes no
    # maths (the same RNG state is replayed), only this rank's memory and time; see planner/tuning._checkpointing_modes.
    activation_checkpointing: bool = False
    # ZeRO-3 across boxes: ZeRO++ hierarchical partitioning over this many cards (those of one box, which must be
    # consecutive ranks), so backward's weight gathers stay inside the box. 1: off.
    hpz_partition_size: int = 1


def deepspeed_config(tuning: RankTuning, grad_accum: int, world_size: int, gradient_clipping: float, opt: Optimization) -> dict:
    return {
        # DeepSpeed checks train_batch_size == micro * accumulation * world on each rank; with uneven
        # micro-batches this is the rank's own view, and the true global batch is the sum over ranks.
        "train_batch_size": tuning.micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": tuning.micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": gradient_clipping,
        "prescale_gradients": False,
        "gradient_predivide_factor": 1.0,
        "steps_per_print": 1_000_000_000,  # zeromix logs steps itself
        "wall_clock_breakdown": True,  # DeepSpeed's timers feed zeromix's straggler accounting (CUDA events, no sync)
        "zero_allow_untested_optimizer": False,
        "fp16": {
            "enabled": tuning.precision == "fp16",
            "loss_scale": 0,  # 0 = dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "bf16": {"enabled": tuning.precision == "bf16"},
        # ZeRO-3 with bf16 accumulates gradients in fp32: exact across accumulation steps (bf16 keeps 8 bits of
        # mantissa), and the buffer doubles as the fp32 gradient the step needs, so no second copy is made.
        "data_types": {"grad_accum_dtype": "fp32" if tuning.precision == "bf16" and tuning.zero_stage == 3 else None},
        "zero_optimization": _zero_section(tuning),
        "activation_checkpointing": {"partition_activations": False, "cpu_checkpointing": False, "contiguous_memory_optimization": False},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": opt.lr,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": opt.weight_decay,
                # Offload runs DeepSpeed's CPU Adam. Otherwise torch's AdamW (no FusedAdam to build with nvcc), fused:
                # one pass over the weights rather than a pass per operation (CPU, 13.7M weights: 17.5 ms, not 93 ms).
                **({} if tuning.offload_optimizer else {"torch_adam": True, "fused": True}),
            },
        },
        "scheduler": _scheduler(opt),
    }


def _zero_section(t: RankTuning) -> dict:
    section = {
        "stage": t.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": False,
        "reduce_scatter": True,
        "reduce_bucket_size": BUCKET_ELEMENTS,
        "allgather_partitions": True,
        "allgather_bucket_size": BUCKET_ELEMENTS,
        "offload_optimizer": {"device": "cpu" if t.offload_optimizer else "none", "pin_memory": t.offload_optimizer},
        "offload_param": {"device": "cpu" if t.offload_params else "none", "pin_memory": t.offload_params},
    }
    if t.zero_stage == 3:
        section |= {
            "stage3_prefetch_bucket_size": BUCKET_ELEMENTS,
            "stage3_param_persistence_threshold": 100_000,
            "stage3_max_live_parameters": STAGE3_MAX_LIVE_PARAMETERS,
            "stage3_max_reuse_distance": STAGE3_MAX_LIVE_PARAMETERS,
            "stage3_gather_16bit_weights_on_model_save": True,
        }
        if t.hpz_partition_size > 1:
            section["zero_hpz_partition_size"] = t.hpz_partition_size
    return section


def _scheduler(opt: Optimization) -> dict:
    # DeepSpeed warms up over at least 2 steps starting from the floor; with no warmup the floor is the peak.
    warmup = max(opt.warmup_steps, 1)
    floor_ratio = 0.0 if opt.warmup_steps else 1.0
    if opt.schedule == "cosine":
        return {"type": "WarmupCosineLR", "params": {
            "total_num_steps": opt.total_steps, "warmup_min_ratio": floor_ratio, "warmup_num_steps": warmup,
            "cos_min_ratio": 0.0, "warmup_type": "linear"}}
    params = {"warmup_min_lr": opt.lr * floor_ratio, "warmup_max_lr": opt.lr, "warmup_num_steps": warmup, "warmup_type": "linear"}
    if opt.schedule == "linear":
        return {"type": "WarmupDecayLR", "params": {"total_num_steps": opt.total_steps, **params}}
    return {"type": "WarmupLR", "params": params}
