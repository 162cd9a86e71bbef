"""Per-rank memory estimate (an estimate, labelled as such wherever it is shown). Pure: no Ray, no torch.

Model states follow DeepSpeed's own estimators (`estimate_zero2/3_model_states_mem_needs`), which the tests
check figure for figure. With mixed precision (fp16/bf16) each trainable parameter costs 2 bytes of 16-bit
weight, 2 of 16-bit gradient and 16 of optimizer state (fp32 master 4, fp32 gradient 4, Adam m and v 8):
ZeRO-1 partitions the optimizer state over the W ranks, ZeRO-2 also the gradients (2P + 18P/W), ZeRO-3 also
the weights, with 16-bit gradients reduced straight into the fp32 partition, plus the largest module
gathered whole (4L + 18P/W; zeromix accumulates ZeRO-3 bf16 gradients in fp32, which makes DeepSpeed's engine
hold exactly that). Offloading moves the optimizer state (and at ZeRO-3 the weights) to host RAM. In fp32,
DeepSpeed still keeps a separate fp32 master partition: 4 + 4 + 12 bytes. LoRA keeps the frozen base in the compute dtype and pays
gradient and optimizer bytes only for the adapters.

Activations count what autograd keeps per token and layer with memory-efficient attention (no seq² scores),
or only the layer inputs under activation checkpointing, plus the logits of at most LOSS_CHUNK_BYTES' worth of
tokens (the loss runs the output head a chunk of tokens at a time: workers/loss.py); buckets and the CUDA context
come on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from orchestrator.ds_config import BUCKET_ELEMENTS
from orchestrator.model_facts import ModelFacts

GIB = 1024**3
CUDA_CONTEXT_BYTES = 600 * 1024**2  # CUDA context + cuBLAS workspace, typical for recent drivers
ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation on top of everything else
HOST_BUFFER_FACTOR = 1.5  # DeepSpeed's estimators' additional_buffer_factor for host memory
LOAD_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size: the most of a checkpoint a 4-bit load holds in host RAM
LOSS_CHUNK_BYTES = 256 * 1024**2  # the loss's logits held at once (at its peak: logit_bytes_per_token), whatever the micro-batch
OUTER_BUCKET_ELEMENTS = 2**22  # outer steps: the new global weights reach a box's cards this many at a time (16 MiB in fp32)


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # parameters resident on the card (16-bit, or fp32 in fp32 training)
    gradients: int  # 16-bit gradients (fp32 in fp32 training)
    optimizer: int  # fp32 master weights, fp32 gradients and Adam m, v
    gathered: int  # ZeRO-3: the largest module gathered whole, weights and gradients
    activations: int
    buckets: int  # communication buckets (gradient reduce, all-gather / prefetch)
    overhead: int  # CUDA context and allocator slack
    dequantised: int = 0  # QLoRA: a 4-bit weight dequantised to the compute dtype for its matmul, forward and backward
    outer_step: int = 0  # outer-step mode: the outer step's buffers, held once the step's activations are freed (not in total)

    @property
    def model_states(self) -> int:
        """What DeepSpeed's estimators call GPU memory for model states."""
        return self.weights + self.gradients + self.optimizer + self.gathered

    @property
    def total(self) -> int:
        return self.model_states + self.activations + self.buckets + self.overhead + self.dequantised


@dataclass(frozen=True)
class TrainingShape:
    facts: ModelFacts
    trainable: int  # = n_params for a full fine-tune, the adapter size for LoRA
    seq_len: int
    precision: str  # fp32 | fp16 | bf16
    activation_checkpointing: bool
    lora: bool = False  # the base is frozen: only the adapters have gradients and optimizer state
    four_bit: FourBit | None = None  # QLoRA: the base's linear layers held in 4 bits (bitsandbytes)


class FourBit(NamedTuple):
    """How bitsandbytes stores a 4-bit weight: two values a byte, and one absmax scale per block of 64 weights
    (fp32; or, double-quantised, uint8 with an fp32 scale per 256 blocks and a 256-entry fp32 code)."""

    double_quant: bool


BLOCK = 64  # weights per absmax block, bitsandbytes' default for 4-bit
NESTED_BLOCK = 256  # absmax values per second-level block (double quantisation)


def four_bit_bytes(weights: int, double_quant: bool) -> int:
    """One quantised linear's bytes as bitsandbytes allocates them: the packed weight and its quant state (checked
    tensor by tensor against Linear4bit on CPU: tests/test_qlora.py)."""
    blocks = -(-weights // BLOCK)
    packed, code = -(-weights // 2), 16 * 4  # the NF4/FP4 code book: 16 fp32 values
    if not double_quant:
        return packed + 4 * blocks + code
    return packed + blocks + 4 * -(-blocks // NESTED_BLOCK) + 256 * 4 + 4 + code  # uint8 absmax, nested absmax, its code, offset


class ZeroSetting(NamedTuple):  # a tuple: hashed in C, and the planner keys its caches by it
    stage: int
    offload_optimizer: bool
    offload_params: bool
    hpz: int = 1  # ZeRO++ hierarchical partitioning: a second copy of the weights split over this many cards in a box

    @property
    def offload(self) -> str:
        return "optimizer+params" if self.offload_params else ("optimizer" if self.offload_optimizer else "none")

    def describe(self) -> str:
        return f"ZeRO-{self.stage}{f' with hpZ over {self.hpz} cards per box' if self.hpz > 1 else ''}, offload {self.offload}"


def bytes_per_value(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def model_states(shape: TrainingShape, zero: ZeroSetting, world: int) -> tuple[int, int, int, int]:
    """(weights, gradients, optimizer, gathered) bytes on the card for one rank."""
    c = bytes_per_value(shape.precision)
    t = shape.trainable
    state_bytes = 16 if c == 2 else 12  # fp32 master + Adam m, v (DeepSpeed clones the master even in fp32); + fp32 gradient when mixed
    weights = base_bytes(shape)
    gradients = t * c
    optimizer = t * state_bytes // (world if zero.stage >= 1 else 1)
    gathered = 0
    if zero.stage >= 2:
        gradients //= world
    if zero.stage == 3:
        weights = weights // world + weights // zero.hpz * (zero.hpz > 1)  # hpZ keeps a box-wide partition besides
        gathered = 2 * c * shape.facts.largest_layer_params
        if c == 2:
            gradients = 0  # reduced straight into the fp32 partition, which `optimizer` counts
    if zero.offload_optimizer:
        optimizer = 0
        if zero.stage >= 2:
            gradients = 0  # the gradient partition goes to host RAM with the optimizer
    if zero.offload_params:
        weights = 0
    return weights, gradients, optimizer, gathered


def base_bytes(shape: TrainingShape) -> int:
    """The whole model's weights as one rank holds them unpartitioned: in the compute dtype, or for QLoRA the
    decoder's linear weights in 4 bits and the rest (embeddings, output head, norms, biases) in the compute dtype."""
    f, c = shape.facts, bytes_per_value(shape.precision)
    if not shape.four_bit:
        return f.n_params * c
    quantised = f.n_layers * sum(four_bit_bytes(l.fan_in * l.fan_out, shape.four_bit.double_quant) for l in f.quantised_linears)
    return quantised + (f.n_params - f.quantised_weights) * c


def dequantised_bytes(shape: TrainingShape) -> int:
    """QLoRA: the largest 4-bit weight dequantised to the compute dtype for its matmul, in forward and again in
    backward (bitsandbytes frees each after use)."""
    if not shape.four_bit or not shape.facts.quantised_linears:
        return 0
    return 2 * bytes_per_value(shape.precision) * max(l.fan_in * l.fan_out for l in shape.facts.quantised_linears)


def host_bytes(shape: TrainingShape, zero: ZeroSetting, ranks_here: int, world: int) -> int:
    """Host RAM one node needs for its ranks' model states, as DeepSpeed's estimators count it (with their
    1.5 buffer factor): the offloaded optimizer state (and weights), or the copy each rank loads at start.
    LoRA is counted as it is: DeepSpeed's estimators assume a full fine-tune (an fp32 copy of every weight)."""
    p, t, largest = shape.facts.n_params, shape.trainable, shape.facts.largest_layer_params
    share = ranks_here / world
    if shape.lora:
        return _lora_host_bytes(shape, zero, ranks_here, share)
    if zero.stage == 3:
        if zero.offload_params:
            need = (16 * t + 2 * p) * share  # 18 bytes per parameter for a full fine-tune
        elif zero.offload_optimizer:
            need = 16 * t * share
        else:
            need = 4 * largest * ranks_here  # zero.Init: each rank materialises one module at a time
    elif zero.offload_optimizer:
        need = max(4 * p * world, 16 * t)  # DeepSpeed does not split this across nodes
    else:
        need = 4 * p * ranks_here  # each rank loads the model in fp32 before DeepSpeed partitions it
    return int(need * HOST_BUFFER_FACTOR)


def _lora_host_bytes(shape: TrainingShape, zero: ZeroSetting, ranks_here: int, share: float) -> int:
    """The frozen base as each rank loads it (the checkpoint's dtype), plus the adapters' optimizer state
    (fp32 master, Adam m and v, fp32 gradient: 16 bytes each) when it is offloaded."""
    f, t = shape.facts, shape.trainable
    adapters = 16 * t * share if zero.offload_optimizer else 0
    if zero.stage == 3 and zero.offload_params:
        base = base_bytes(shape) * share  # the base's partitions live in host RAM
    elif shape.four_bit:  # each rank reads the checkpoint shard by shard and quantises it on its card
        base = min(f.load_bytes * f.n_params, LOAD_SHARD_BYTES) * ranks_here
    elif zero.stage == 3:
        base = f.load_bytes * f.largest_layer_params * ranks_here  # zero.Init: one module at a time
    else:
        base = f.load_bytes * f.n_params * ranks_here
    return int(base + adapters)


def layer_activation_bytes_per_sample(shape: TrainingShape) -> int:
    f, s = shape.facts, shape.seq_len
    c = bytes_per_value(shape.precision)
    # per token and layer: 4 residual-stream tensors (norm inputs and outputs), q/k/v and the attention
    # output (memory-efficient attention keeps no seq x seq scores), 3 MLP-width tensors (gate, up, product)
    per_layer = (4 * f.hidden + (f.heads + 2 * f.kv_heads) * f.head_dim + f.heads * f.head_dim + 3 * f.intermediate) * s * c
    if shape.activation_checkpointing:
        return f.n_layers * s * f.hidden * c + per_layer  # layer inputs, plus one layer recomputed at a time
    return f.n_layers * per_layer


def logit_bytes_per_token(vocab: int, precision: str) -> int:
    """What the loss holds of a token's logits at its peak, in backward: the logits in the compute dtype and three
    fp32 tensors of them (the saved log-probabilities, their gradient, the logits' gradient). Measured by
    bench/loss_memory.py: 16.4 bytes a logit in fp32, 14.3 in bf16 (this counts 16 and 14)."""
    return vocab * (bytes_per_value(precision) + 3 * 4)


def loss_chunk_tokens(vocab: int, precision: str) -> int:
    """Tokens whose logits the loss computes at once (workers/loss.py: the plan hands the number to the ranks)."""
    return max(1, LOSS_CHUNK_BYTES // logit_bytes_per_token(vocab, precision))


def activation_bytes(shape: TrainingShape, micro_batch: int) -> int:
    """A micro-batch's: every sample's layer activations, and the logits of one chunk of its tokens (all of them
    where they fit in one)."""
    vocab, precision = shape.facts.vocab, shape.precision
    logits = min(micro_batch * shape.seq_len, loss_chunk_tokens(vocab, precision)) * logit_bytes_per_token(vocab, precision)
    return layer_activation_bytes_per_sample(shape) * micro_batch + logits


def bucket_bytes(shape: TrainingShape, zero: ZeroSetting) -> int:
    """The gradient-reduce bucket, and the all-gather bucket (ZeRO-1/2) or prefetch bucket (ZeRO-3)."""
    if zero.stage == 0:
        return 0
    elements = min(BUCKET_ELEMENTS, shape.trainable) + min(BUCKET_ELEMENTS, shape.facts.n_params)
    return elements * bytes_per_value(shape.precision)


def estimate(shape: TrainingShape, zero: ZeroSetting, world: int, micro_batch: int) -> MemoryEstimate:
    weights, gradients, optimizer, gathered = model_states(shape, zero, world)
    activations = activation_bytes(shape, micro_batch)
    buckets = bucket_bytes(shape, zero)
    dequantised = dequantised_bytes(shape)
    slack = int((weights + gradients + optimizer + gathered + activations + buckets + dequantised) * ALLOCATOR_SLACK)
    return MemoryEstimate(weights, gradients, optimizer, gathered, activations, buckets, CUDA_CONTEXT_BYTES + slack, dequantised)


def outer_step_bytes(shape: TrainingShape) -> int:
    """What an outer step holds on a card (workers/outer_steps.py): one trained weight read whole in fp32 (DeepSpeed's
    buffer for it), then one bucket of the new global weights in fp32. The step's activations are freed by then."""
    largest = min(shape.facts.largest_layer_params, shape.trainable)
    return 4 * max(largest, min(shape.trainable, OUTER_BUCKET_ELEMENTS))


def outer_step_need(shape: TrainingShape, zero: ZeroSetting, world: int, micro_batch: int) -> int:
    """What a card must hold in outer-step mode (ZeRO over `world` ranks: its box's): the training step's total at
    `micro_batch`, or at an outer step, where the activations are freed, the model states and the outer step's
    buffers; whichever is more."""
    return max(estimate(shape, zero, world, micro_batch).total, estimate(shape, zero, world, 0).total + outer_step_bytes(shape))


def max_micro_batch(shape: TrainingShape, zero: ZeroSetting, world: int, capacity: int) -> int:
    """The largest micro-batch whose estimate fits in `capacity` bytes (0 if not even one sample does)."""
    fixed = estimate(shape, zero, world, 0).total
    layers, chunk = layer_activation_bytes_per_sample(shape), loss_chunk_tokens(shape.facts.vocab, shape.precision)
    logits = logit_bytes_per_token(shape.facts.vocab, shape.precision)
    # Past `chunk` tokens a micro-batch holds one chunk's logits whatever its size: only its layers grow with it
    chunked = int((capacity - fixed - chunk * logits * (1 + ALLOCATOR_SLACK)) // (layers * (1 + ALLOCATOR_SLACK)))
    if chunked * shape.seq_len >= chunk:
        return chunked
    return max(0, int((capacity - fixed) // ((layers + shape.seq_len * logits) * (1 + ALLOCATOR_SLACK))))
