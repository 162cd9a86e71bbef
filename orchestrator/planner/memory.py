"""Per-rank memory estimate (an estimate, labelled as such wherever it is shown).

Model states follow the ZeRO paper's accounting (arXiv:1910.02054): with mixed precision each trainable
parameter costs 2 bytes (16-bit weight) + 2 (16-bit grad) + 12 (fp32 master, Adam m and v); in fp32 it is
4 + 4 + 8. ZeRO-1 partitions the optimizer states over W ranks, ZeRO-2 also the gradients, ZeRO-3 also the
weights. Activations use the per-layer formula of Korthikanti et al. (arXiv:2205.05198).
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.model_facts import ModelFacts

GIB = 1024**3
CUDA_CONTEXT_BYTES = 600 * 1024**2  # CUDA context + cuBLAS workspace, typical for recent drivers
ALLOCATOR_SLACK = 0.10  # fragmentation headroom on top of everything else


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead


@dataclass(frozen=True)
class TrainingShape:
    facts: ModelFacts
    trainable: int  # = n_params for a full fine-tune, the adapter size for LoRA
    seq_len: int
    precision: str  # fp32 | fp16 | bf16
    activation_checkpointing: bool


def _bytes_per(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def model_state_bytes(shape: TrainingShape, stage: int, world: int, offload_optimizer: bool, offload_params: bool) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes on the card for one rank."""
    c = _bytes_per(shape.precision)
    frozen = shape.facts.n_params - shape.trainable
    weights = (frozen + shape.trainable) * c
    if stage >= 3:
        weights = weights // world + shape.facts.largest_layer_params * c * 2  # shard + the gathered layer (and prefetch)
    if offload_params:
        weights = shape.facts.largest_layer_params * c * 2
    gradients = shape.trainable * c // (world if stage >= 2 else 1)
    optimizer_per_param = 12 if c == 2 else 8
    optimizer = shape.trainable * optimizer_per_param // (world if stage >= 1 else 1)
    if offload_optimizer:
        optimizer = 0
    return weights, gradients, optimizer


def host_bytes(shape: TrainingShape, world: int, offload_optimizer: bool, offload_params: bool) -> int:
    """Host RAM one rank needs for what it offloads (fp32 master + Adam states, fp16 weights)."""
    optimizer = shape.trainable * 12 // world if offload_optimizer else 0
    params = shape.facts.n_params * _bytes_per(shape.precision) // world if offload_params else 0
    return optimizer + params


def activation_bytes_per_sample(shape: TrainingShape) -> int:
    f, s = shape.facts, shape.seq_len
    c = _bytes_per(shape.precision)
    per_layer = s * f.hidden * 34 * c // 2 + 5 * f.heads * s * s * c // 2
    if shape.activation_checkpointing:
        kept = f.n_layers * s * f.hidden * c + per_layer  # layer inputs, plus one layer recomputed at a time
    else:
        kept = f.n_layers * per_layer
    logits = s * f.vocab * (c + 4 + 4)  # logits, their fp32 copy for the loss, and its gradient
    return kept + logits


def estimate(shape: TrainingShape, stage: int, world: int, micro_batch: int, offload_optimizer: bool, offload_params: bool) -> MemoryEstimate:
    weights, gradients, optimizer = model_state_bytes(shape, stage, world, offload_optimizer, offload_params)
    activations = activation_bytes_per_sample(shape) * micro_batch
    slack = int((weights + gradients + optimizer + activations) * ALLOCATOR_SLACK)
    return MemoryEstimate(weights, gradients, optimizer, activations, CUDA_CONTEXT_BYTES + slack)


def max_micro_batch(shape: TrainingShape, stage: int, world: int, capacity: int, offload_optimizer: bool, offload_params: bool) -> int:
    """The largest micro-batch whose estimate fits in `capacity` bytes (0 if not even the model states fit)."""
    fixed = estimate(shape, stage, world, 0, offload_optimizer, offload_params).total
    per_sample = activation_bytes_per_sample(shape) * (1 + ALLOCATOR_SLACK)
    return max(0, int((capacity - fixed) // per_sample))
