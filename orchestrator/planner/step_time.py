"""Step-time estimate per rank (an estimate, labelled as such wherever it is shown). Pure: no Ray, no torch.

compute:  training FLOPs of the rank's tokens over the rate the card achieves in training (`card_tflops`): its
          measured matmul rate at the plan's precision (workers/rate_probe.py) times MEASURED_RATE_EFFICIENCY,
          or, for a card not probed, its catalog peak (tensor rate with FP32 accumulate; Pascal runs fp16 no
          faster than fp32) times ASSUMED_EFFICIENCY; plus the non-matmul work (norms, rotary embedding,
          residual adds, the gated activation, the loss's softmax, the adapters' scale-and-add), which is bound
          by memory bandwidth: the bytes it reads and writes (`elementwise_bytes_per_token`) over the card's
          bandwidth (`card_gb_per_s`: measured copy bandwidth, else the catalog's, times an efficiency);
comm:     the collectives DeepSpeed runs per optimizer step (`comm_volume`, checked against DeepSpeed's own comms
          logger by tests/test_comm_volume.py), over the slowest link the group uses: PCIe inside a node, the
          cluster's network between nodes (1 GbE moves about 0.11 GB/s; measured where `join` measured it). ZeRO-1 reduces gradients once per
          optimizer step; ZeRO-2 and ZeRO-3 in every micro-step's backward; ZeRO-3 also gathers every weight
          in every micro-step's forward (and again in backward when more than stage3_max_live_parameters
          would stay gathered);
offload:  the PCIe copies of offload (gradients down in every micro-step at ZeRO-2/3, updated weights up once,
          ZeRO-3 weights up at every gather) and DeepSpeed's CPU Adam.
Ranks compute in parallel and wait for the slowest. zeromix runs DeepSpeed with overlap_comm off, so
communication and offload are added to compute, not overlapped with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from orchestrator.ds_config import STAGE3_MAX_LIVE_PARAMETERS
from orchestrator.inventory import Card, Node
from orchestrator.model_facts import ModelFacts
from orchestrator.planner.memory import ZeroSetting, bytes_per_value, loss_chunk_tokens

ASSUMED_EFFICIENCY = 0.4  # achieved / catalog peak matmul rate for transformer training; an assumption, not a measurement
# achieved / *measured* large-matmul rate in a training step's matmuls and attention, for wide models; narrow
# ones reach less (`width_efficiency`). On CPU: 0.65-0.70 at hidden 256, 0.67-0.82 at 512, 0.75-0.88 at 768
# (see MEASURED_BANDWIDTH_EFFICIENCY for how), which 0.95 x hidden / (hidden + 100) follows.
MEASURED_RATE_EFFICIENCY = 0.95
MATMUL_HALF_WIDTH = 100  # hidden size at which a model's matmuls reach half the rate of wide ones
# achieved / measured copy bandwidth for training's non-matmul ops: 0.30-0.56 on CPU, Llama-shaped 5M-100M models,
# full and LoRA, with and without checkpointing (torch profiler: time outside matmuls and attention, over the
# bytes counted below; the same cases give 0.65-0.88 for MEASURED_RATE_EFFICIENCY)
MEASURED_BANDWIDTH_EFFICIENCY = 0.4
# achieved / catalog peak for the same ops on a card: a copy reaches ~0.85 of peak, training's unfused
# elementwise kernels ~60% of a copy; an assumption, not a measurement
ASSUMED_BANDWIDTH_EFFICIENCY = 0.5
# Values read plus written per token by one forward's non-matmul ops, counted op by op for a Llama layer: two
# RMSNorms (~7 passes over the hidden state each), rotary embedding of q and k (~16), the attention's reshapes
# and its input/output (~12), two residual adds (6), per hidden unit; the gated activation (silu, then times
# up: 5) per intermediate unit; the loss's log-softmax over the vocabulary in fp32 (4); the adapters' scale-and-
# add per output of an adapted linear (counted 5, measured nearer 2: torch fuses part of it). Backward touches
# about twice as much.
VALUES_PER_HIDDEN, VALUES_PER_INTERMEDIATE, VALUES_PER_VOCAB, VALUES_PER_ADAPTED_OUTPUT = 48, 5, 4, 2
# What checkpointing's recomputed forward costs, as a fraction of the decoder layers' forward: measured 0.5-0.8
# on CPU (step time with / without checkpointing, 5M-100M models, five runs); Hugging Face documents about 20%
# on the whole step for GPUs, which 0.7 of a forward gives
RECOMPUTE_FRACTION = 0.7
DEQUANTISE_READ_BYTES = 0.5 + 1 / 64  # a 4-bit weight and its share of a block's uint8 scale
CPU_ADAM_PARAMS_PER_S = 1.0e9  # DeepSpeed's CPU Adam on one homelab CPU (AVX2, 8-16 cores); an assumption
PCIE_GBS_PER_LANE = {3.0: 0.985, 4.0: 1.969, 5.0: 3.938}  # GB/s per lane and direction
LINK_EFFICIENCY = 0.9  # achieved / line rate


@dataclass(frozen=True)
class StepEstimate:
    compute_s: tuple[float, ...]  # per rank
    comm_s: float  # the same on every rank: collectives
    offload_s: tuple[float, ...]  # per rank: its PCIe copies and CPU Adam (0 where it does not offload)
    tokens: int  # per optimizer step, all ranks

    @property
    def busy_s(self) -> tuple[float, ...]:
        return tuple(c + o for c, o in zip(self.compute_s, self.offload_s))

    @property
    def step_s(self) -> float:
        return max(self.busy_s) + self.comm_s

    @property
    def wait_s(self) -> tuple[float, ...]:
        """Per rank: idle until the slowest rank is done (ranks meet at every gradient reduction)."""
        return tuple(max(self.busy_s) - b for b in self.busy_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s


def flops_per_token(facts: ModelFacts, seq_len: int, method: str, activation_checkpointing: bool) -> float:
    """Forward: 2 FLOPs per weight a token passes through, plus causal attention (2 * seq * width per
    layer). Backward: twice the forward for a full fine-tune (input and weight gradients), once for LoRA
    (the frozen weights need no gradient). Checkpointing recomputes the decoder layers' forward once more
    (transformers checkpoints each decoder layer; the output head is not recomputed), at RECOMPUTE_FRACTION."""
    head = 2 * facts.vocab * facts.hidden
    forward = 2 * facts.matmul_params_per_token + 2 * seq_len * facts.heads * facts.head_dim * facts.n_layers
    backward = 2 * forward if method == "full" else forward
    return forward + backward + (RECOMPUTE_FRACTION * (forward - head) if activation_checkpointing else 0)


def elementwise_bytes_per_token(facts: ModelFacts, precision: str, activation_checkpointing: bool,
                                lora_targets: tuple[str, ...] = ()) -> float:
    """Bytes the non-matmul ops read and write per token in forward and backward (and the decoder layers'
    forward again under checkpointing). Activations in the compute dtype; the loss in fp32, as train.py runs it."""
    layer = (VALUES_PER_HIDDEN * facts.hidden + VALUES_PER_INTERMEDIATE * facts.intermediate
             + VALUES_PER_ADAPTED_OUTPUT * facts.lora_outputs(list(lora_targets))) * facts.n_layers * bytes_per_value(precision)
    head = VALUES_PER_VOCAB * facts.vocab * 4
    return 3 * (layer + head) + (RECOMPUTE_FRACTION * layer if activation_checkpointing else 0)


def width_efficiency(facts: ModelFacts) -> float:
    """Matmuls as narrow as a small model's reach less of a card's rate than the probe's large ones: about
    hidden / (hidden + MATMUL_HALF_WIDTH), near 1 for a 1B model (2048) and 0.7 for a 5M one (256)."""
    return facts.hidden / (facts.hidden + MATMUL_HALF_WIDTH)


@dataclass(frozen=True)
class TokenWork:
    """One token's forward and backward: matmul FLOPs (scaled up for narrow matmuls) and non-matmul bytes."""

    flops: float
    moved_bytes: float

    def seconds(self, tflops: float, gb_per_s: float) -> float:
        """On a card reaching `tflops` in wide matmuls and `gb_per_s` in the rest."""
        return self.flops / (tflops * 1e12) + self.moved_bytes / (gb_per_s * 1e9)


def head_forward(facts: ModelFacts) -> TokenWork:
    """A token's pass through the output head, which backward runs again where the loss takes the logits a chunk
    of tokens at a time (workers/loss.py)."""
    return TokenWork(2 * facts.vocab * facts.hidden / width_efficiency(facts), VALUES_PER_VOCAB * facts.vocab * 4)


def token_work(facts: ModelFacts, seq_len: int, method: str, activation_checkpointing: bool, precision: str,
               lora_targets: tuple[str, ...]) -> TokenWork:
    work = TokenWork(flops_per_token(facts, seq_len, method, activation_checkpointing) / width_efficiency(facts),
                     elementwise_bytes_per_token(facts, precision, activation_checkpointing, lora_targets))
    if seq_len > loss_chunk_tokens(facts.vocab, precision):  # even one sample's loss takes chunks: the head again, every token
        again = head_forward(facts)
        work = TokenWork(work.flops + again.flops, work.moved_bytes + again.moved_bytes)
    return work


def seconds_per_token(facts: ModelFacts, seq_len: int, method: str, activation_checkpointing: bool, precision: str,
                      lora_targets: tuple[str, ...], tflops: float, gb_per_s: float) -> float:
    return token_work(facts, seq_len, method, activation_checkpointing, precision, lora_targets).seconds(tflops, gb_per_s)


def _measured_tflops(card: Card, precision: str) -> float | None:
    return card.facts.measured.tflops(precision) if card.facts.measured else None


def rate_source(card: Card, precision: str) -> str:
    """Where a card's rate comes from, as `zeromix nodes` and the plan say it."""
    speed = card.facts.training_speed
    return ("measured" if _measured_tflops(card, precision) else "catalog") + (f" x{speed:.2g} from runs" if speed else "")


def card_tflops(card: Card, precision: str) -> float:
    """The TFLOPS a card achieves in a training step: measured x MEASURED_RATE_EFFICIENCY, else catalog x
    ASSUMED_EFFICIENCY; scaled by how fast earlier jobs really trained there (`CardFacts.training_speed`)."""
    measured = _measured_tflops(card, precision)
    rate = measured * MEASURED_RATE_EFFICIENCY if measured else card.spec.matmul_tflops(precision) * ASSUMED_EFFICIENCY
    return rate * (card.facts.training_speed or 1.0)


def card_gb_per_s(card: Card) -> float:
    """The memory bandwidth training's non-matmul ops reach on a card: measured x MEASURED_BANDWIDTH_EFFICIENCY,
    else catalog x ASSUMED_BANDWIDTH_EFFICIENCY; scaled as `card_tflops` is."""
    gb_s = card.facts.measured.memory_gb_s * MEASURED_BANDWIDTH_EFFICIENCY if card.facts.measured else card.spec.mem_bandwidth_gbs * ASSUMED_BANDWIDTH_EFFICIENCY
    return gb_s * (card.facts.training_speed or 1.0)


def pcie_gb_per_s(card: Card) -> float:
    """Host -> card GB/s: measured, else the slot's line rate (NVML's generation and width, else the catalog's)."""
    if card.facts.measured and card.facts.measured.host_to_device_gb_s:
        return card.facts.measured.host_to_device_gb_s
    gen, lanes = card.facts.pcie_gen or card.spec.pcie_gen, card.facts.pcie_width or card.spec.pcie_lanes
    return PCIE_GBS_PER_LANE.get(gen, PCIE_GBS_PER_LANE[3.0]) * lanes * LINK_EFFICIENCY


def network_gb_per_s(node: Node) -> float:
    """A node's link to the others, GB/s: measured at join, else what the user or the NIC said."""
    if node.link_measured_gbit_per_s:
        return node.link_measured_gbit_per_s / 8
    return node.link_gbit_per_s / 8 * LINK_EFFICIENCY


@dataclass(frozen=True)
class CommVolume:
    """Bytes per optimizer step in each kind of collective, as DeepSpeed's comms logger records them: the
    message of an all-reduce or reduce-scatter is the whole tensor; that of an all-gather, one rank's part."""

    all_reduce: float
    reduce_scatter: float
    all_gather: float  # over every rank
    all_gather_in_box: float = 0.0  # ZeRO++ hpZ: backward's gathers, over the cards of one box

    def wire_bytes(self, world: int) -> float:
        """What crosses each rank's link in ring collectives over all ranks: an all-reduce moves 2(W-1)/W of
        its tensor, a reduce-scatter (W-1)/W, an all-gather (W-1) parts."""
        return (self.all_reduce * 2 + self.reduce_scatter) * (world - 1) / world + self.all_gather * (world - 1)

    def box_wire_bytes(self, hpz: int) -> float:
        """What hpZ's gathers move inside a box, over PCIe: (hpz-1) parts."""
        return self.all_gather_in_box * (hpz - 1)


def gathers_per_micro_step(n_params: int, max_live: int = STAGE3_MAX_LIVE_PARAMETERS) -> int:
    """ZeRO-3 gathers the weights for forward; with zeromix's stage3_max_live_parameters and max_reuse_distance
    (ds_config.py) they stay gathered for backward unless the model is larger than the live limit."""
    return 1 if n_params <= max_live else 2


def comm_volume(trainable: int, n_params: int, world: int, stage: int, grad_accum: int, value_bytes: int,
                grad_bytes: int, hpz: int = 1, max_live: int = STAGE3_MAX_LIVE_PARAMETERS) -> CommVolume:
    """The collectives of one optimizer step. `value_bytes`: a weight as communicated (the compute dtype);
    `grad_bytes`: a gradient as reduced (fp32 where zeromix accumulates ZeRO-3 bf16 gradients in fp32).
    With hpZ (`hpz` cards per box), backward's gathers read the box-wide copy: their parts are 1/hpz of the
    weights and never leave the box (only when weights are gathered twice per micro-step; with them kept
    from forward to backward, hpZ has nothing to save)."""
    if world == 1:
        return CommVolume(0.0, 0.0, 0.0)
    if stage <= 1:  # gradients reduced once, at the accumulation boundary; updated partitions gathered
        return CommVolume(trainable * grad_bytes, 0.0, trainable * value_bytes / world)
    if stage == 2:  # gradients reduced in every micro-step's backward
        return CommVolume(grad_accum * trainable * grad_bytes, 0.0, trainable * value_bytes / world)
    reduced = grad_accum * trainable * grad_bytes
    weights = grad_accum * n_params * value_bytes
    if gathers_per_micro_step(n_params, max_live) == 1:
        return CommVolume(0.0, reduced, weights / world)
    if hpz > 1:
        return CommVolume(0.0, reduced, weights / world, weights / hpz)
    return CommVolume(0.0, reduced, 2 * weights / world)


def offload_seconds(trainable: int, n_params: int, world: int, zero: ZeroSetting, grad_accum: int, value_bytes: int,
                    pcie_gb_s: float, most_ranks_on_a_node: int) -> float:
    """Per rank, over its PCIe link: its gradient partition down in every micro-step (ZeRO-2/3 reduce every
    micro-step and accumulate on the host), its updated weights up once; with parameter offload, its weight
    partition up at every gather. Plus CPU Adam, one CPU serving its node's ranks."""
    if not zero.offload_optimizer:
        return 0.0
    reductions = grad_accum if zero.stage >= 2 else 1
    copies = (reductions + 1) * trainable * value_bytes / world
    if zero.offload_params:
        copies += grad_accum * gathers_per_micro_step(n_params) * n_params * value_bytes / world
    adam = trainable * most_ranks_on_a_node / world / CPU_ADAM_PARAMS_PER_S
    return copies / (pcie_gb_s * 1e9) + adam


@dataclass(frozen=True)
class StepInputs:
    """What a group's step time depends on besides its settings: the job and model, each card's rates (one entry
    per rank, in rank order) and the links between the cards. Made once per candidate group (planner/tuning.py)."""

    facts: ModelFacts
    trainable: int
    method: str
    seq_len: int
    precision: str
    lora_targets: tuple[str, ...]
    rates_tflops: tuple[float, ...]
    bandwidths_gb_s: tuple[float, ...]
    link_gb_s: float  # the slowest link the group's collectives cross
    pcie_gb_s: float  # the slowest card's PCIe slot
    most_ranks_on_a_node: int
    four_bit: bool = False  # QLoRA: every micro-step dequantises the base's 4-bit weights before their matmuls

    @cached_property
    def _work(self) -> dict[bool, TokenWork]:
        return {ckpt: token_work(self.facts, self.seq_len, self.method, ckpt, self.precision, self.lora_targets) for ckpt in (False, True)}

    def seconds_per_sample(self, rank: int, activation_checkpointing: bool) -> float:
        return self._work[activation_checkpointing].seconds(self.rates_tflops[rank], self.bandwidths_gb_s[rank]) * self.seq_len

    def loss_recompute_s(self, rank: int, micro_batch: float) -> float:
        """Per micro-step: the head's forward again where a sample fits one of the loss's chunks but the micro-batch
        does not (where a sample alone does not, `token_work` counts it for every token)."""
        tokens, chunk = micro_batch * self.seq_len, loss_chunk_tokens(self.facts.vocab, self.precision)
        if tokens <= chunk or self.seq_len > chunk:
            return 0.0
        return head_forward(self.facts).seconds(self.rates_tflops[rank], self.bandwidths_gb_s[rank]) * tokens

    def dequantise_s(self, rank: int, passes: int) -> float:
        """QLoRA, per micro-step: every 4-bit weight dequantised `passes` times (forward, backward's input gradient,
        a recomputed forward), each reading its packed half byte (and scales) and writing the compute dtype; bound
        by memory bandwidth, whatever the micro-batch."""
        if not self.four_bit:
            return 0.0
        moved = self.facts.quantised_weights * (DEQUANTISE_READ_BYTES + bytes_per_value(self.precision))
        return passes * moved / (self.bandwidths_gb_s[rank] * 1e9)

    def overheads(self, zeros: tuple[ZeroSetting, ...], grad_accum: int) -> tuple[float, tuple[float, ...]]:
        """What an optimizer step costs besides compute: (communication, the same on every rank; offload per
        rank). `zeros`: one per rank (every rank runs the same ZeRO stage; offload may differ per rank)."""
        zero, world, c = zeros[0], len(zeros), bytes_per_value(self.precision)
        grad_bytes = 4 if (zero.stage == 3 and self.precision == "bf16") else c  # ds_config.py: fp32 accumulation there
        volume = comm_volume(self.trainable, self.facts.n_params, world, zero.stage, grad_accum, c, grad_bytes, zero.hpz)
        comm = volume.wire_bytes(world) / (self.link_gb_s * 1e9) + volume.box_wire_bytes(zero.hpz) / (self.pcie_gb_s * 1e9)
        by_setting = {z: offload_seconds(self.trainable, self.facts.n_params, world, z, grad_accum, c, self.pcie_gb_s,
                                         self.most_ranks_on_a_node) for z in set(zeros)}
        return comm, tuple(by_setting[z] for z in zeros)

    def estimate(self, activation_checkpointing: list[bool], samples_per_rank: list[float], zeros: tuple[ZeroSetting, ...],
                 grad_accum: int) -> StepEstimate:
        """The step of a setting: per rank, whether it recomputes and its samples per optimizer step."""
        compute = tuple(self.seconds_per_sample(r, ckpt) * n + (self.dequantise_s(r, 3 if ckpt else 2) + self.loss_recompute_s(r, n / grad_accum)) * grad_accum
                        for r, (ckpt, n) in enumerate(zip(activation_checkpointing, samples_per_rank)))
        comm, offload = self.overheads(zeros, grad_accum)
        return StepEstimate(compute, comm, offload, sum(samples_per_rank) * self.seq_len)
