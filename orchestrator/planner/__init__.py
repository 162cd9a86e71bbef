"""The planner: a job spec, model facts and a cluster snapshot in; a plan out. Pure: no Ray, no torch.

    filter cards -> choose the group -> resolve precision -> pick ZeRO stage / offload / checkpointing
    -> split the global batch across the cards -> Plan (with every rejected card and why)
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from orchestrator.ds_config import Optimization, RankTuning, deepspeed_config
from orchestrator.errors import ZeromixError
from orchestrator.inventory import Card, ClusterSnapshot
from orchestrator.jobspec import JobSpec
from orchestrator.model_facts import ModelFacts
from orchestrator.planner import memory, step_time
from orchestrator.planner.filters import DEFAULT_FILTERS
from orchestrator.planner.memory import GIB, MemoryEstimate, TrainingShape

HOST_RAM_USABLE = 0.8  # leave the OS and the data pipeline a fifth of each node's RAM


class NoPlacement(ZeromixError):
    """Nothing fits. The message lists why each card was left out and what would help."""


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
    rate_tflops: float  # catalog peak for the plan's precision


@dataclass(frozen=True)
class Plan:
    job_name: str
    ranks: tuple[RankPlan, ...]
    grad_accum: int
    activation_checkpointing: bool
    total_steps: int
    n_params: int
    trainable_params: int
    rejected: tuple[Rejection, ...]
    step: step_time.StepEstimate  # an estimate

    @property
    def global_batch(self) -> int:
        return sum(r.tuning.micro_batch for r in self.ranks) * self.grad_accum

    @property
    def first(self) -> RankTuning:
        return self.ranks[0].tuning

    def ds_configs(self, job: JobSpec) -> list[dict]:
        opt = Optimization(job.optimizer.lr, job.optimizer.schedule, job.optimizer.warmup_steps, job.optimizer.weight_decay, self.total_steps)
        return [deepspeed_config(r.tuning, self.grad_accum, len(self.ranks), job.deepspeed.gradient_clipping, opt) for r in self.ranks]

    def summary(self) -> dict:
        """JSON-able, for Ray job metadata and `--json`; memory figures are estimates."""
        t = self.first
        return {
            "job": self.job_name,
            "zero_stage": t.zero_stage, "precision": t.precision,
            "offload": "optimizer+params" if t.offload_params else ("optimizer" if t.offload_optimizer else "none"),
            "activation_checkpointing": self.activation_checkpointing,
            "grad_accum": self.grad_accum, "global_batch": self.global_batch, "total_steps": self.total_steps,
            "params": self.n_params, "trainable_params": self.trainable_params,
            "est_step_s": _sig(self.step.step_s), "est_comm_s": _sig(self.step.comm_s),
            "ranks": [{"card": r.card.card_id, "node": r.card.node, "index": r.card.index, "resource": r.card.resource,
                       "model": r.card.short_name, "uuid": r.card.facts.uuid, "micro_batch": r.tuning.micro_batch,
                       "est_mem_gib": round(r.memory.total / GIB, 2), "vram_gib": round(r.card.vram_mib / 1024, 1),
                       "est_compute_s": _sig(c)} for r, c in zip(self.ranks, self.step.compute_s)],
            "rejected": [{"card": x.card_id, "model": x.card, "reason": x.reason} for x in self.rejected],
        }


def _sig(seconds: float) -> float:
    """Three significant figures: estimates span microseconds (a tiny model) to minutes."""
    return float(f"{seconds:.3g}")


def resolve_precision(requested: str, cards: list[Card]) -> str:
    """auto: bf16 only if every card is sm_80+, fp16 if every card is sm_70+ (dynamic loss scaling), else fp32."""
    if requested != "auto":
        return requested
    lowest = min(c.compute_capability[0] for c in cards)
    return "bf16" if lowest >= 8 else ("fp16" if lowest >= 7 else "fp32")


def _ds_options(job: JobSpec) -> list[tuple[int, bool, bool]]:
    """(stage, offload optimizer, offload params), cheapest first."""
    stages = [2, 3] if job.deepspeed.zero_stage == "auto" else [job.deepspeed.zero_stage]
    offloads = {"auto": [(False, False), (True, False), (True, True)], "none": [(False, False)],
                "optimizer": [(True, False)], "optimizer+params": [(True, True)]}[job.deepspeed.offload]
    return [(s, o, p) for o, p in offloads for s in stages if not (p and s != 3) and not (o and s == 0)]


def split_batch(total: int, rates: list[float], caps: list[int]) -> list[int] | None:
    """Per-rank micro-batches summing to `total`, each >= 1 and <= its cap, that minimise the slowest
    rank's time (micro / rate): each next sample goes to the rank that would finish it first."""
    n = len(rates)
    if n > total or any(c < 1 for c in caps) or sum(caps) < total:
        return None
    micro = [1] * n
    heap = [(2 / rates[i], i) for i in range(n) if caps[i] > 1]
    heapq.heapify(heap)
    for _ in range(total - n):
        _, i = heapq.heappop(heap)
        micro[i] += 1
        if micro[i] < caps[i]:
            heapq.heappush(heap, ((micro[i] + 1) / rates[i], i))
    return micro


def make_plan(job: JobSpec, facts: ModelFacts, snapshot: ClusterSnapshot, total_steps: int, filters=DEFAULT_FILTERS) -> Plan:
    rejected: list[Rejection] = []
    eligible: list[Card] = []
    for card in snapshot.cards:
        verdict = next((v for v in (f.check(job, card) for f in filters) if not v.ok), None)
        if verdict:
            rejected.append(Rejection(card.card_id, card.short_name, verdict.reason))
        else:
            eligible.append(card)

    lo, hi = job.gpus.bounds
    precision = resolve_precision(job.precision, eligible) if eligible else "fp32"
    eligible = _one_build(eligible, precision, rejected)
    eligible.sort(key=lambda c: (-c.spec.matmul_tflops(precision), c.card_id))
    group = eligible[: min(hi or len(eligible), job.global_batch_size)]
    trainable = facts.lora_params(job.lora_config.r, job.lora_config.target_modules) if job.method == "lora" else facts.n_params

    while len(group) >= lo and group:
        precision = resolve_precision(job.precision, group)
        plan = _tune(job, facts, snapshot, group, precision, trainable, total_steps, rejected)
        if plan:
            return plan
        dropped = min(group, key=lambda c: (c.vram_mib, c.card_id))  # the smallest card is the likeliest misfit
        rejected.append(Rejection(dropped.card_id, dropped.short_name, "the model does not fit beside the others in any ZeRO/offload setting"))
        group = [c for c in group if c is not dropped]
    raise NoPlacement(_no_placement_message(job, lo, len(eligible), rejected))


def _tune(job, facts, snapshot, group, precision, trainable, total_steps, rejected) -> Plan | None:
    world = len(group)
    checkpointing = [False, True] if job.deepspeed.activation_checkpointing == "auto" else [job.deepspeed.activation_checkpointing]
    for stage, off_opt, off_par in _ds_options(job):
        for ckpt in checkpointing:
            shape = TrainingShape(facts, trainable, job.seq_len, precision, ckpt)
            if not _host_ram_ok(snapshot, group, shape, off_opt, off_par):
                continue
            caps = [memory.max_micro_batch(shape, stage, world, c.vram_mib * 1024**2, off_opt, off_par) for c in group]
            rates = [c.spec.matmul_tflops(precision) for c in group]
            for grad_accum in (g for g in range(1, job.global_batch_size + 1) if job.global_batch_size % g == 0):
                micro = split_batch(job.global_batch_size // grad_accum, rates, caps)
                if micro:
                    ranks = tuple(
                        RankPlan(card, RankTuning(m, stage, off_opt, off_par, precision),
                                 memory.estimate(shape, stage, world, m, off_opt, off_par), rate)
                        for card, m, rate in zip(group, micro, rates)
                    )
                    estimate = step_time.estimate(
                        n_params=facts.n_params, trainable=trainable, method=job.method, activation_checkpointing=ckpt,
                        tokens_per_rank=[m * grad_accum * job.seq_len for m in micro], rates_tflops=rates, stage=stage,
                        precision=precision, link_gb_s=_slowest_link(snapshot, group))
                    return Plan(job.name, ranks, grad_accum, ckpt, total_steps, facts.n_params, trainable, tuple(rejected), estimate)
                if job.global_batch_size // grad_accum < world:
                    break
    return None


def _one_build(cards: list[Card], precision: str, rejected: list[Rejection]) -> list[Card]:
    """One job runs one torch/NCCL build on all its nodes (NCCL versions must match across ranks). Keep the
    build with the most compute behind it; the cards of other builds are left out, saying why."""
    builds: dict[str, float] = {}
    for card in cards:
        if card.software:
            builds[card.software.build] = builds.get(card.software.build, 0.0) + card.spec.matmul_tflops(precision)
    if len(builds) <= 1:
        return cards
    chosen = max(builds, key=lambda b: (builds[b], b))
    kept = []
    for card in cards:
        if card.software and card.software.build != chosen:
            rejected.append(Rejection(card.card_id, card.short_name, f"{card.node} runs {card.software.build}, the job's other nodes "
                                      f"{chosen}: a job needs one torch/NCCL build on every node; install the same build there"))
        else:
            kept.append(card)
    return kept


def _slowest_link(snapshot: ClusterSnapshot, group: list[Card]) -> float:
    nodes = {c.node for c in group}
    return step_time.link_gb_per_s(nodes, {n: snapshot.node(n).link_gbit_per_s for n in nodes},
                                   min(c.spec.pcie_gen for c in group), min(c.spec.pcie_lanes for c in group))


def _host_ram_ok(snapshot: ClusterSnapshot, group: list[Card], shape: TrainingShape, off_opt: bool, off_par: bool) -> bool:
    per_rank = memory.host_bytes(shape, len(group), off_opt, off_par)
    for node in {c.node for c in group}:
        ranks_here = sum(c.node == node for c in group)
        if per_rank * ranks_here > snapshot.node(node).ram_gb * GIB * HOST_RAM_USABLE:
            return False
    return True


def _no_placement_message(job: JobSpec, lo: int, n_eligible: int, rejected: list[Rejection]) -> str:
    reasons = "; ".join(f"{r.card_id} ({r.card}): {r.reason}" for r in rejected) or "the cluster has no cards"
    fixes = []
    if n_eligible < lo:
        fixes.append(f"lower gpus.{'count' if job.gpus.count else 'min'} (needs {lo}, {n_eligible} eligible) or free more cards")
    if job.method == "full":
        fixes.append("use method: lora")
    if job.deepspeed.offload in ("none", "optimizer"):
        fixes.append("allow deepspeed.offload: auto")
    fixes.append(f"shorten seq_len (now {job.seq_len})")
    return f"no placement for job {job.name!r}: {reasons}. To fix: {', or '.join(fixes)}."
