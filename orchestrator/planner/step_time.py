"""Step-time estimate per rank (an estimate, labelled as such wherever it is shown). Pure: no Ray, no torch.

compute: training FLOPs of the rank's samples over its catalog peak at the plan's precision, times an
         assumed efficiency (achieved / peak) typical of consumer cards;
comm:    the bytes ZeRO moves per optimizer step, over the slowest link the group uses: PCIe inside a node,
         the cluster.yaml network between nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

ASSUMED_EFFICIENCY = 0.4  # achieved / peak matmul rate for transformer training; an assumption, not a measurement
PCIE_GBS_PER_LANE = {3.0: 0.985, 4.0: 1.969, 5.0: 3.938}  # GB/s per lane and direction
LINK_EFFICIENCY = 0.9  # 1 GbE moves about 0.11 GB/s in practice


@dataclass(frozen=True)
class StepEstimate:
    compute_s: tuple[float, ...]  # per rank
    comm_s: float

    @property
    def step_s(self) -> float:
        """Ranks compute in parallel and wait for the slowest; communication is not assumed to overlap."""
        return max(self.compute_s) + self.comm_s


def flops_per_token(n_params: int, method: str, activation_checkpointing: bool) -> float:
    """Forward 2P; backward 4P for a full fine-tune (input and weight gradients), 2P for LoRA (the frozen
    weights need no gradient); recomputing activations adds another forward."""
    backward = 4 if method == "full" else 2
    return (2 + backward + (2 if activation_checkpointing else 0)) * n_params


def link_gb_per_s(nodes: set[str], node_links_gbit: dict[str, float], pcie_gen: float, pcie_lanes: int) -> float:
    if len(nodes) > 1:
        return min(node_links_gbit[n] for n in nodes) / 8 * LINK_EFFICIENCY
    return PCIE_GBS_PER_LANE.get(pcie_gen, 0.985) * pcie_lanes * LINK_EFFICIENCY


def comm_bytes_per_step(trainable: int, n_params: int, world: int, stage: int, bytes_per_value: int) -> float:
    """Ring collectives move (W-1)/W of the data each way. ZeRO-1/2: reduce gradients and gather the updated
    weights (2 passes over the trainable weights); ZeRO-3 also gathers every weight in forward and backward."""
    if world == 1:
        return 0.0
    share = (world - 1) / world
    passes = 2 * trainable + (2 * n_params if stage == 3 else 0)
    return passes * share * bytes_per_value


def estimate(*, n_params: int, trainable: int, method: str, activation_checkpointing: bool, tokens_per_rank: list[int],
             rates_tflops: list[float], stage: int, precision: str, link_gb_s: float) -> StepEstimate:
    per_token = flops_per_token(n_params, method, activation_checkpointing)
    compute = tuple(per_token * tokens / (rate * 1e12 * ASSUMED_EFFICIENCY) for tokens, rate in zip(tokens_per_rank, rates_tflops))
    bytes_per_value = 4 if precision == "fp32" else 2
    comm = comm_bytes_per_step(trainable, n_params, len(tokens_per_rank), stage, bytes_per_value) / (link_gb_s * 1e9)
    return StepEstimate(compute, comm)
