"""Step-time estimate per rank (an estimate, labelled as such wherever it is shown). Pure: no Ray, no torch.

compute:  training FLOPs of the rank's tokens over its catalog peak at the plan's precision (tensor rate with
          FP32 accumulate; Pascal runs fp16 no faster than fp32), times an assumed efficiency;
comm:     the bytes ZeRO moves per optimizer step, over the slowest link the group uses: PCIe inside a node,
          the cluster's network between nodes (1 GbE moves about 0.11 GB/s);
offload:  optimizer (and ZeRO-3 parameter) traffic over PCIe to host RAM, and DeepSpeed's CPU Adam.
Ranks compute in parallel and wait for the slowest; communication and offload are not assumed to overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.model_facts import ModelFacts
from orchestrator.planner.memory import ZeroSetting, bytes_per_value

ASSUMED_EFFICIENCY = 0.4  # achieved / peak matmul rate for transformer training; an assumption, not a measurement
CPU_ADAM_PARAMS_PER_S = 1.0e9  # DeepSpeed's CPU Adam on one homelab CPU (AVX2, 8-16 cores); an assumption
PCIE_GBS_PER_LANE = {3.0: 0.985, 4.0: 1.969, 5.0: 3.938}  # GB/s per lane and direction
LINK_EFFICIENCY = 0.9  # achieved / line rate


@dataclass(frozen=True)
class StepEstimate:
    compute_s: tuple[float, ...]  # per rank
    comm_s: float
    offload_s: float
    tokens: int  # per optimizer step, all ranks

    @property
    def step_s(self) -> float:
        return max(self.compute_s) + self.comm_s + self.offload_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s


def flops_per_token(facts: ModelFacts, seq_len: int, method: str, activation_checkpointing: bool) -> float:
    """Forward: 2 FLOPs per weight a token passes through, plus causal attention (2 * seq * width per
    layer). Backward: twice the forward for a full fine-tune (input and weight gradients), once for LoRA
    (the frozen weights need no gradient). Checkpointing recomputes the forward once more."""
    forward = 2 * facts.matmul_params_per_token + 2 * seq_len * facts.heads * facts.head_dim * facts.n_layers
    backward = 2 * forward if method == "full" else forward
    return forward + backward + (forward if activation_checkpointing else 0)


def pcie_gb_per_s(pcie_gen: float, pcie_lanes: int) -> float:
    return PCIE_GBS_PER_LANE.get(pcie_gen, PCIE_GBS_PER_LANE[3.0]) * pcie_lanes * LINK_EFFICIENCY


def network_gb_per_s(link_gbit_per_s: float) -> float:
    return link_gbit_per_s / 8 * LINK_EFFICIENCY


def comm_bytes_per_step(trainable: int, n_params: int, world: int, stage: int, value_bytes: int) -> float:
    """Ring collectives move (W-1)/W of the data through each link. ZeRO-1/2: reduce the gradients and gather
    the updated weights (2 passes over the trainable weights); ZeRO-3 also gathers every weight in forward
    and again in backward."""
    if world == 1:
        return 0.0
    passes = 2 * trainable + (2 * n_params if stage == 3 else 0)
    return passes * (world - 1) / world * value_bytes


def offload_seconds(trainable: int, n_params: int, world: int, zero: ZeroSetting, value_bytes: int,
                    pcie_gb_s: float, most_ranks_on_a_node: int) -> float:
    if not zero.offload_optimizer:
        return 0.0
    copies = 2 * trainable * value_bytes / world  # gradient partition down, updated weights up
    if zero.offload_params:
        copies += 2 * n_params * value_bytes / world  # the parameter partition up for forward and for backward
    adam = trainable * most_ranks_on_a_node / world / CPU_ADAM_PARAMS_PER_S  # one CPU serves its node's ranks
    return copies / (pcie_gb_s * 1e9) + adam


def estimate(*, facts: ModelFacts, trainable: int, method: str, seq_len: int, activation_checkpointing: bool,
             samples_per_rank: list[int], rates_tflops: list[float], zero: ZeroSetting, precision: str,
             link_gb_s: float, pcie_gb_s: float, most_ranks_on_a_node: int) -> StepEstimate:
    per_token = flops_per_token(facts, seq_len, method, activation_checkpointing)
    compute = tuple(per_token * n * seq_len / (rate * 1e12 * ASSUMED_EFFICIENCY) for n, rate in zip(samples_per_rank, rates_tflops))
    c = bytes_per_value(precision)
    world = len(samples_per_rank)
    comm = comm_bytes_per_step(trainable, facts.n_params, world, zero.stage, c) / (link_gb_s * 1e9)
    offload = offload_seconds(trainable, facts.n_params, world, zero, c, pcie_gb_s, most_ranks_on_a_node)
    return StepEstimate(compute, comm, offload, sum(samples_per_rank) * seq_len)
