"""The planner: a job spec, model facts and a cluster snapshot in; a plan out. Pure: no Ray, no torch.

    filter cards (filters.py) -> one software build -> candidate card groups (groups.py), ranked by a quick
    throughput estimate -> for the best few: precision, ZeRO stage / offload / checkpointing, per-card
    micro-batches within each card's memory (memory.py), step time (step_time.py), NCCL settings (nccl.py)
    -> the fastest plan, with every card left out and why; or, when nothing fits, what would.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, replace
from functools import cache

from orchestrator.ds_config import Optimization, RankTuning, deepspeed_config
from orchestrator.errors import InputError, ZeromixError
from orchestrator.inventory import Card, ClusterSnapshot
from orchestrator.jobspec import JobSpec
from orchestrator.model_facts import ModelFacts
from orchestrator.planner import memory, step_time
from orchestrator.planner.filters import DEFAULT_FILTERS
from orchestrator.planner.groups import candidate_groups
from orchestrator.planner.memory import GIB, MemoryEstimate, TrainingShape, ZeroSetting
from orchestrator.planner.nccl import nccl_env

HOST_RAM_RESERVED = 4 * GIB  # for the OS and the data pipeline; DeepSpeed's 1.5x buffer is already in the need
FULLY_TUNED_GROUPS = 8  # candidate groups tuned in full, best quick estimate first
MOST_GROUPS_TRIED = 32  # ... or more, while none of them fits


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
    capacity_bytes: int  # what the estimate must fit in: the card's memory (free memory where probed)
    rate_tflops: float  # what the card achieves in training at the plan's precision (step_time.card_tflops)
    rate_source: str  # "measured" or "catalog"
    env: dict[str, str]  # NCCL settings for this rank
    # The largest micro-batch this card holds at its settings (the memory model): how far the self-correcting
    # split (workers/rebalance.py) may grow its share when it turns out faster than planned
    micro_cap: int = 0


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
        if self.offload != self.zero.offload:
            return f"ZeRO-{self.zero.stage}, offload {self.offload}"
        return self.zero.describe()

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
            "est_step_s": _sig(self.step.step_s), "est_compute_s": _sig(max(self.step.compute_s)),
            "est_comm_s": _sig(self.step.comm_s), "est_offload_s": _sig(max(self.step.offload_s)),
            "est_tokens_per_s": _sig(self.step.tokens_per_s),
            "est_host_gib": {node: round(b / GIB, 2) for node, b in self.host_bytes_per_node.items()},
            "ranks": [{"card": r.card.card_id, "node": r.card.node, "index": r.card.index, "resource": r.card.resource,
                       "model": r.card.short_name, "uuid": r.card.facts.uuid, "micro_batch": r.tuning.micro_batch,
                       "micro_batch_cap": r.micro_cap,
                       "activation_checkpointing": r.tuning.activation_checkpointing,
                       "vram_gib": round(r.card.vram_mib / 1024, 1), "capacity_gib": round(r.capacity_bytes / GIB, 2),
                       "est_mem_gib": round(r.memory.total / GIB, 2), "est_mem_breakdown_gib": _breakdown(r.memory),
                       "rate_tflops": _sig(r.rate_tflops), "rate_source": r.rate_source, "est_compute_s": _sig(c),
                       "est_wait_s": _sig(w), "est_comm_s": _sig(self.step.comm_s), "est_offload_s": _sig(o),
                       "offload_optimizer": r.tuning.offload_optimizer, "offload_params": r.tuning.offload_params, "env": r.env}
                      for r, c, w, o in zip(self.ranks, self.step.compute_s, self.step.wait_s, self.step.offload_s)],
            "rejected": [{"card": x.card_id, "model": x.card, "reason": x.reason} for x in self.rejected],
        }


def _breakdown(m: MemoryEstimate) -> dict[str, float]:
    parts = ("weights", "gradients", "optimizer", "gathered", "activations", "buckets", "overhead")
    return {p: float(f"{getattr(m, p) / GIB:.4g}") for p in parts}


def _sig(value: float) -> float:
    """Three significant figures: estimates span microseconds (a tiny model) to minutes."""
    return float(f"{value:.3g}")


def resolve_precision(requested: str, cards) -> str:
    """auto: bf16 only if every card is sm_80+, fp16 if every card is sm_70+ (dynamic loss scaling), else fp32."""
    return precision_for(requested, min(c.compute_capability for c in cards))


def precision_for(requested: str, lowest: tuple[int, int]) -> str:
    """The precision cards down to compute capability `lowest` run (see resolve_precision)."""
    if requested != "auto":
        return requested
    return "bf16" if lowest >= (8, 0) else ("fp16" if lowest >= (7, 0) else "fp32")


def _zero_options(job: JobSpec) -> list[ZeroSetting]:
    stages = [2, 3] if job.deepspeed.zero_stage == "auto" else [job.deepspeed.zero_stage]
    offloads = {"auto": [(False, False), (True, False), (True, True)], "none": [(False, False)],
                "optimizer": [(True, False)], "optimizer+params": [(True, True)]}[job.deepspeed.offload]
    return [ZeroSetting(s, o, p) for o, p in offloads for s in stages if not (p and s != 3) and not (o and s == 0)]


@dataclass(frozen=True)
class RankCost:
    """What a rank's micro-batch costs: seconds per sample at its rate, as many samples as fit without
    recomputing, and (with checkpointing allowed) as many as fit with it, at the recompute's slower rate."""

    plain_s: float  # seconds per sample, no recompute
    plain_cap: int
    recompute_s: float = 0.0  # seconds per sample with activation checkpointing
    recompute_cap: int = 0  # 0: checkpointing not allowed here

    @property
    def cap(self) -> int:
        return max(self.plain_cap, self.recompute_cap)

    def recomputes(self, micro: int) -> bool:
        return micro > self.plain_cap

    def seconds(self, micro: int) -> float:
        return micro * (self.recompute_s if self.recomputes(micro) else self.plain_s)


def split_batch(total: int, costs: list[RankCost], offsets: list[float] | None = None) -> list[int] | None:
    """Per-rank micro-batches summing to `total`, each >= 1 and <= its cap, that minimise the slowest rank's
    time (its micro-batch's seconds plus its fixed `offsets`, e.g. offload): each next sample goes to the rank
    that would finish it first (optimal, as every rank's time grows with its micro-batch)."""
    n = len(costs)
    offsets = offsets or [0.0] * n
    caps = [c.cap for c in costs]
    if n > total or min(caps) < 1 or sum(caps) < total:
        return None
    plain, plain_cap, recompute = [c.plain_s for c in costs], [c.plain_cap for c in costs], [c.recompute_s for c in costs]
    micro = _lower_bound(total, plain, plain_cap, recompute, caps, offsets)
    heap = [(costs[i].seconds(micro[i] + 1) + offsets[i], i) for i in range(n) if micro[i] < caps[i]]
    heapq.heapify(heap)
    for _ in range(total - sum(micro)):  # RankCost.seconds, inlined: this runs for every sample placed
        i = heapq.heappop(heap)[1]
        m = micro[i] = micro[i] + 1
        if m < caps[i]:
            heapq.heappush(heap, ((m + 1) * (recompute[i] if m + 1 > plain_cap[i] else plain[i]) + offsets[i], i))
    return micro


def _lower_bound(total: int, plain: list[float], plain_cap: list[int], recompute: list[float], caps: list[int],
                 offsets: list[float]) -> list[int]:
    """Samples every rank is sure to get, so the greedy places only the last few: were every rank to run at its
    plain speed, uncapped, all would finish together at a time T no real split beats; each rank gets at least
    what it finishes by T (within its cap, and its no-recompute cap where recomputing is slower)."""
    t = (total + sum(o / p for o, p in zip(offsets, plain))) / sum(1 / p for p in plain)
    start = [max(1, min(int((t - o) / p), caps[i] if recompute[i] == p else plain_cap[i]))
             for i, (o, p) in enumerate(zip(offsets, plain))]
    return start if sum(start) <= total else [1] * len(plain)


@dataclass(frozen=True)
class _Job:
    """What every candidate is planned against."""

    job: JobSpec
    facts: ModelFacts
    snapshot: ClusterSnapshot
    trainable: int
    total_steps: int


def make_plan(job: JobSpec, facts: ModelFacts, snapshot: ClusterSnapshot, total_steps: int, filters=DEFAULT_FILTERS,
              suggest: bool = True) -> Plan:
    """The fastest plan for the job on these cards. `suggest`: when nothing fits, plan variants of the job
    to say what would."""
    trainable = _trainable(job, facts)
    ctx = _Job(job, facts, snapshot, trainable, total_steps)
    rejected: dict[str, Rejection] = {}
    eligible: list[Card] = []
    for card in snapshot.cards:
        verdict = next((v for v in (f.check(job, card) for f in filters) if not v.ok), None)
        if verdict:
            rejected[card.card_id] = Rejection(card.card_id, card.short_name, verdict.reason)
        else:
            eligible.append(card)
    eligible = _one_build(eligible, rejected)

    lo, hi = job.gpus.bounds
    hi = min(hi or len(eligible), job.global_batch_size)
    groups = candidate_groups(eligible, lo, hi, lambda lowest: precision_for(job.precision, lowest))
    groups.sort(key=lambda g: -_quick_tokens_per_s(ctx, g))
    best, misfits = None, {}
    for tried, group in enumerate(groups[:MOST_GROUPS_TRIED]):
        if best is not None and tried >= FULLY_TUNED_GROUPS:
            break
        plan, dropped = _fit(ctx, list(group), lo)
        if plan and (best is None or plan.step.tokens_per_s > best.step.tokens_per_s):
            best, misfits = plan, dropped
    if best is None:
        raise NoPlacement(_no_placement_message(ctx, lo, eligible, rejected, groups, suggest))
    chosen = {r.card.card_id for r in best.ranks}
    for card in eligible:
        if card.card_id not in chosen:
            rejected[card.card_id] = misfits.get(card.card_id) or _left_out(ctx, best, card, hi)
    ordered = tuple(rejected[c.card_id] for c in snapshot.cards if c.card_id in rejected)
    return replace(best, rejected=ordered)


def lora_targets(job: JobSpec, facts: ModelFacts) -> tuple[str, ...]:
    """The modules LoRA adapts: the spec's, or PEFT's default for the architecture. Nothing for a full fine-tune."""
    if job.method != "lora":
        return ()
    return tuple(job.lora_config.target_modules or facts.default_lora_targets)


def _trainable(job: JobSpec, facts: ModelFacts) -> int:
    if job.method != "lora":
        return facts.n_params
    targets = lora_targets(job, facts)
    trainable = facts.lora_params(job.lora_config.r, list(targets))
    if trainable == 0:
        raise InputError("job", "lora.target_modules", list(targets),
                         f"name linear layers of this {facts.model_type} model: {', '.join(facts.lora_targets())}")
    return trainable


def _one_build(cards: list[Card], rejected: dict[str, Rejection]) -> list[Card]:
    """One job runs one torch/NCCL build on all its nodes (NCCL versions must match across ranks). Keep the
    build with the most compute behind it; the cards of other builds are left out, saying why."""
    builds: dict[str, float] = {}
    for card in cards:
        if card.software:
            builds[card.software.build] = builds.get(card.software.build, 0.0) + card.spec.fp32_tflops
    if len(builds) <= 1:
        return cards
    chosen = max(builds, key=lambda b: (builds[b], b))
    kept = []
    for card in cards:
        if card.software and card.software.build != chosen:
            rejected[card.card_id] = Rejection(card.card_id, card.short_name, f"{card.node} runs {card.software.build}, the job's "
                                               f"other nodes {chosen}: a job needs one torch/NCCL build on every node; install the same build there")
        else:
            kept.append(card)
    return kept


def _links(snapshot: ClusterSnapshot, group: list[Card]) -> tuple[float, float]:
    """(GB/s of the slowest link the group's collectives cross, GB/s of the slowest card's PCIe slot)."""
    pcie = min(step_time.pcie_gb_per_s(c) for c in group)
    nodes = {c.node for c in group}
    if len(nodes) == 1:
        return pcie, pcie
    return min(step_time.network_gb_per_s(snapshot.node(n)) for n in nodes), pcie


def _quick_tokens_per_s(ctx: _Job, group) -> float:
    """To rank groups: samples split in proportion to rate (fractions allowed), with the first ZeRO/offload
    setting in which one sample fits on every card of the group (checkpointing on): a group of small cards
    that needs ZeRO-3 pays for ZeRO-3's traffic here already, and for as many accumulation steps as its
    memory forces (ZeRO-2/3 communicate in every one). 0 when nothing fits."""
    precision = resolve_precision(ctx.job.precision, group)
    shape = TrainingShape(ctx.facts, ctx.trainable, ctx.job.seq_len, precision, True, ctx.job.method == "lora")
    for zero in _zero_options(ctx.job):
        by_capacity = {cap: memory.max_micro_batch(shape, zero, len(group), cap) for cap in {_capacity(c) for c in group}}
        if min(by_capacity.values()) >= 1:
            break
    else:
        return 0.0
    grad_accum = -(-ctx.job.global_batch_size // sum(by_capacity[_capacity(c)] for c in group))
    rates = [step_time.card_tflops(c, precision) for c in group]
    bandwidths = [step_time.card_gb_per_s(c) for c in group]
    link, pcie = _links(ctx.snapshot, list(group))
    samples = [ctx.job.global_batch_size * r / sum(rates) for r in rates]
    return step_time.estimate(facts=ctx.facts, trainable=ctx.trainable, method=ctx.job.method, seq_len=ctx.job.seq_len,
                              activation_checkpointing=[False] * len(group), samples_per_rank=samples, rates_tflops=rates,
                              bandwidths_gb_s=bandwidths, zeros=[zero] * len(group), precision=precision, lora_targets=lora_targets(ctx.job, ctx.facts),
                              link_gb_s=link, pcie_gb_s=pcie, most_ranks_on_a_node=1, grad_accum=grad_accum).tokens_per_s


def _fit(ctx: _Job, group: list[Card], lo: int) -> tuple[Plan | None, dict[str, Rejection]]:
    """Tune the group; while nothing fits, drop its smallest card (the likeliest misfit) and try again."""
    dropped: dict[str, Rejection] = {}
    while len(group) >= max(lo, 1):
        plan = _tune(ctx, group)
        if plan:
            return plan, dropped
        smallest = min(group, key=lambda c: (c.vram_mib, c.card_id))
        dropped[smallest.card_id] = Rejection(smallest.card_id, smallest.short_name,
                                              "the model does not fit on it beside the others in any ZeRO/offload setting (estimate)")
        group = [c for c in group if c is not smallest]
    return None, dropped


def _capacity(card: Card) -> int:
    free = card.facts.memory_free_mib
    return (min(free, card.vram_mib) if free is not None else card.vram_mib) * 1024**2


def _checkpointing_options(job: JobSpec) -> list[bool]:
    wanted = job.deepspeed.activation_checkpointing
    return [False, True] if wanted == "auto" else [wanted]


def _checkpointing_modes(job: JobSpec, zero: ZeroSetting) -> list[str]:
    """"per card": each card recomputes only if its micro-batch does not fit otherwise. Only where ZeRO leaves
    weights whole on every rank (stages 1-2): at ZeRO-3 a recomputed forward gathers weights again, a
    collective the ranks that do not recompute would never join, so there it is all cards or none."""
    wanted = job.deepspeed.activation_checkpointing
    if wanted != "auto":
        return ["all" if wanted else "none"]
    return ["per card"] if zero.stage <= 2 else ["none", "all"]


def _offload_modes(job: JobSpec, zero: ZeroSetting) -> list[str]:
    """"per card": at ZeRO-2 without offload, a card that cannot hold even one sample offloads its optimizer
    partition to host RAM while the others keep theirs (DeepSpeed runs the same collectives either way: checked
    on CPU ranks by tests/test_exact_update.py)."""
    per_card = job.deepspeed.offload == "auto" and zero == ZeroSetting(2, False, False)
    return ["uniform", "per card"] if per_card else ["uniform"]


def _hpz_size(facts: ModelFacts, group: list[Card]) -> int:
    """Cards per box for ZeRO++ hierarchical partitioning, or 1 when it would not help: it needs the group
    spread over two or more boxes with the same number of cards each (DeepSpeed splits ranks into equal
    consecutive groups), and it only saves traffic when ZeRO-3 gathers the weights again for backward."""
    per_box = Counter(c.node for c in group)
    sizes = set(per_box.values())
    if len(per_box) < 2 or len(sizes) != 1 or min(sizes) < 2:
        return 1
    return min(sizes) if step_time.gathers_per_micro_step(facts.n_params) == 2 else 1


def _tune(ctx: _Job, group: list[Card]) -> Plan | None:
    """The fastest setting (ZeRO stage, offload and checkpointing per card, split) for this group that fits, or None."""
    hpz = _hpz_size(ctx.facts, group)
    if hpz > 1:  # a box's cards as consecutive ranks, as hpZ's groups are formed (rank order changes no maths)
        boxes = list(dict.fromkeys(c.node for c in group))
        group = sorted(group, key=lambda c: boxes.index(c.node))
    job, world = ctx.job, len(group)
    precision = resolve_precision(job.precision, group)
    rates = [step_time.card_tflops(c, precision) for c in group]
    bandwidths = [step_time.card_gb_per_s(c) for c in group]
    link, pcie = _links(ctx.snapshot, group)
    most_here = max(Counter(c.node for c in group).values())
    lora, targets = job.method == "lora", lora_targets(job, ctx.facts)
    shapes = {ckpt: TrainingShape(ctx.facts, ctx.trainable, job.seq_len, precision, ckpt, lora) for ckpt in (False, True)}

    work = {ckpt: step_time.token_work(ctx.facts, job.seq_len, job.method, ckpt, precision, targets) for ckpt in (False, True)}

    def per_sample(ckpt: bool, rate: float, gb_s: float) -> float:
        return work[ckpt].seconds(rate, gb_s) * job.seq_len

    plain_s = [per_sample(False, rate, gb_s) for rate, gb_s in zip(rates, bandwidths)]
    capacities = [_capacity(c) for c in group]
    caps: dict[tuple[bool, ZeroSetting], dict[int, int]] = {}

    def card_caps(ckpt: bool, zero: ZeroSetting) -> dict[int, int]:
        """Micro-batch caps by card capacity (most groups hold a few card models: computed once per model)."""
        if (ckpt, zero) not in caps:
            caps[ckpt, zero] = {c: memory.max_micro_batch(shapes[ckpt], zero, world, c) for c in set(capacities)}
        return caps[ckpt, zero]

    best = None
    zeros_to_try = _zero_options(job)
    zeros_to_try += [z._replace(hpz=hpz) for z in zeros_to_try if z.stage == 3 and hpz > 1]
    for zero in zeros_to_try:
        for offload_mode in _offload_modes(job, zero):
            if offload_mode == "uniform":
                zeros = [zero] * world
            else:  # offload on the cards where one sample does not fit otherwise (checkpointing, where allowed)
                roomy = [max(card_caps(ckpt, zero)[c] for ckpt in _checkpointing_options(job)) >= 1 for c in capacities]
                if all(roomy) or not any(roomy):
                    continue  # the uniform settings already cover it
                zeros = [zero if ok else ZeroSetting(2, True, False) for ok in roomy]
            host = _host_bytes(shapes[False], zeros, group)
            if any(z.offload_optimizer or z.offload_params for z in zeros) and not _host_ram_ok(ctx.snapshot, host):
                continue

            @cache  # the same for every checkpointing mode
            def fixed_s(grad_accum: int, zeros=zeros) -> tuple[float, ...]:
                comm, offload = step_time.overheads(facts=ctx.facts, trainable=ctx.trainable, zeros=zeros, precision=precision,
                                                    link_gb_s=link, pcie_gb_s=pcie, most_ranks_on_a_node=most_here, grad_accum=grad_accum)
                return tuple(comm + o for o in offload)

            if best and _step_lower_bound(job.global_batch_size, plain_s, fixed_s(1)) >= best.step.step_s:
                continue  # even with one accumulation step and no recompute, slower than the best so far
            plain_caps = [card_caps(False, z)[c] for c, z in zip(capacities, zeros)]
            recompute_caps = [card_caps(True, z)[c] for c, z in zip(capacities, zeros)]
            for mode in _checkpointing_modes(job, zero):
                costs = [RankCost(per_sample(mode == "all", rate, gb_s), 0 if mode == "all" else plain_cap,
                                  per_sample(True, rate, gb_s), 0 if mode == "none" else recompute_cap)
                         for plain_cap, recompute_cap, rate, gb_s in zip(plain_caps, recompute_caps, rates, bandwidths)]
                split = _split(job.global_batch_size, costs, fixed_s)
                if split is None:
                    continue
                micro, grad_accum = split
                recompute = [c.recomputes(m) for c, m in zip(costs, micro)]
                estimate = step_time.estimate(
                    facts=ctx.facts, trainable=ctx.trainable, method=job.method, seq_len=job.seq_len, activation_checkpointing=recompute,
                    samples_per_rank=[m * grad_accum for m in micro], rates_tflops=rates, bandwidths_gb_s=bandwidths, zeros=zeros,
                    precision=precision, lora_targets=targets, link_gb_s=link, pcie_gb_s=pcie, most_ranks_on_a_node=most_here,
                    grad_accum=grad_accum)
                if best is None or estimate.step_s < best.step.step_s:
                    envs = nccl_env(group, ctx.snapshot)
                    ranks = tuple(
                        RankPlan(card, RankTuning(m, z.stage, z.offload_optimizer, z.offload_params, precision, ckpt, z.hpz),
                                 memory.estimate(shapes[ckpt], z, world, m), capacity, rate, step_time.rate_source(card, precision), env,
                                 card_caps(ckpt, z)[capacity])
                        for card, capacity, z, m, ckpt, rate, env in zip(group, capacities, zeros, micro, recompute, rates, envs))
                    best = Plan(job.name, ranks, grad_accum, zero, precision, ctx.total_steps, ctx.facts.n_params,
                                ctx.trainable, host, (), estimate, targets)
    return best


def _split(global_batch: int, costs: list[RankCost], fixed_s=None) -> tuple[list[int], int] | None:
    """Micro-batches and the accumulation count (the same on every rank) that fit every card and make the
    fastest step: compute, plus `fixed_s(grad_accum)` per rank (communication and offload, which grow with the
    accumulation count at ZeRO-2/3); of equally fast splits, the fewest accumulation steps. A memory cap on the
    fast card can make more, smaller micro-batches the better split."""
    best, best_time = None, None
    for grad_accum in (g for g in range(1, global_batch + 1) if global_batch % g == 0):
        if global_batch // grad_accum < len(costs):
            break
        fixed = fixed_s(grad_accum) if fixed_s else [0.0] * len(costs)
        if best_time is not None and round(_step_lower_bound(global_batch, [c.plain_s for c in costs], fixed), 9) >= best_time:
            continue  # no split at this accumulation count can beat the best one
        micro = split_batch(global_batch // grad_accum, costs, [f / grad_accum for f in fixed])
        if micro:
            slowest = round(max(c.seconds(m) * grad_accum + f for c, m, f in zip(costs, micro, fixed)), 9)
            if best_time is None or slowest < best_time:
                best, best_time = (micro, grad_accum), slowest
    return best


def _step_lower_bound(global_batch: int, plain_s: list[float], fixed: tuple[float, ...]) -> float:
    """No split's step beats this: every rank at its plain (fastest) seconds per sample, fractions of samples
    allowed, all finishing together; and no rank finishes before its fixed cost."""
    inverse = sum(1 / p for p in plain_s)
    return max((global_batch + sum(f / p for p, f in zip(plain_s, fixed))) / inverse, max(fixed))


def _host_bytes(shape: TrainingShape, zeros: list[ZeroSetting], group: list[Card]) -> dict[str, int]:
    """Per node, `zeros` one per card. With per-card settings, a node with any offloading rank is counted as
    DeepSpeed counts a node whose ranks all offload (an upper bound)."""
    ranks_here = Counter(c.node for c in group)
    node_zero = {n: zeros[0] for n in ranks_here}
    for card, zero in zip(group, zeros):
        if zero != zeros[0]:  # the per-card settings differ: count the node's most offloading one
            node_zero[card.node] = max(node_zero[card.node], zero, key=lambda z: (z.offload_optimizer, z.offload_params))
    return {n: memory.host_bytes(shape, node_zero[n], ranks_here[n], len(group)) for n in sorted(ranks_here)}


def _host_ram_ok(snapshot: ClusterSnapshot, host: dict[str, int]) -> bool:
    return all(need <= snapshot.node(node).ram_gb * GIB - HOST_RAM_RESERVED for node, need in host.items())


def _left_out(ctx: _Job, plan: Plan, card: Card, hi: int) -> Rejection:
    chosen = [r.card for r in plan.ranks]
    if len(chosen) >= hi:
        return Rejection(card.card_id, card.short_name, f"the job takes at most {hi} card(s) (gpus, global_batch_size); faster ones were chosen")
    with_plan = _tune(ctx, [*chosen, card])
    if with_plan is None:
        return Rejection(card.card_id, card.short_name, "with it the model fits in no ZeRO/offload setting on every card of the group (estimate)")
    without, with_it = plan.step.tokens_per_s, with_plan.step.tokens_per_s
    why = []
    if resolve_precision(ctx.job.precision, [*chosen, card]) != plan.precision:
        why.append(f"it would force {resolve_precision(ctx.job.precision, [*chosen, card])} on every card")
    if card.node not in {c.node for c in chosen}:
        why.append(f"its node's {ctx.snapshot.node(card.node).link_gbit_per_s:g} Gbit/s link would carry every step's collectives")
    slowest = min(chosen + [card], key=lambda c: step_time.card_tflops(c, with_plan.precision))
    if slowest is card and with_plan.grad_accum > 1:
        why.append(f"it must take at least one sample in each of {with_plan.grad_accum} micro-steps")
    because = f" ({'; '.join(why)})" if why else ""
    return Rejection(card.card_id, card.short_name, f"faster without it{because}: about {without:,.0f} vs {with_it:,.0f} tokens/s with it (estimate)")


def _no_placement_message(ctx: _Job, lo: int, eligible: list[Card], rejected: dict[str, Rejection], groups, suggest: bool) -> str:
    job = ctx.job
    reasons = "; ".join(f"{r.card_id} ({r.card}): {r.reason}" for r in rejected.values()) or "no card was rejected by a filter"
    if not groups:
        reasons += f". {len(eligible)} card(s) eligible, the job needs {lo}"
    else:
        reasons += ". The model does not fit in any ZeRO/offload/checkpointing setting on the eligible cards (estimate)"
    if eligible and job.deepspeed.offload != "none":
        shape = TrainingShape(ctx.facts, ctx.trainable, job.seq_len, "bf16", True, job.method == "lora")
        need = _host_bytes(shape, [ZeroSetting(3, True, False)] * len(eligible), eligible)
        short = [f"{n} needs about {b / GIB:.0f} GiB, has {ctx.snapshot.node(n).ram_gb:g} GB" for n, b in need.items()
                 if not _host_ram_ok(ctx.snapshot, {n: b})]
        if short:
            reasons += f"; offloading the optimizer needs more host RAM than there is ({'; '.join(short)}; estimate)"
    fixes = []
    if len(eligible) < lo:
        fixes.append(f"lower gpus.{'count' if job.gpus.count else 'min'} (needs {lo}, {len(eligible)} eligible) or free more cards")
    fixes += suggestions(ctx) if suggest else []
    return f"no placement for job {job.name!r}: {reasons}. To fix: {', or '.join(fixes) or 'add cards with more memory'}."


def suggestions(ctx: _Job) -> list[str]:
    """Changes to the job that would make it fit on the same cards, each checked by planning it."""
    job = ctx.job
    tries: list[tuple[str, JobSpec]] = []
    if job.deepspeed.offload != "auto":
        tries.append(("allow deepspeed.offload: auto", job.model_copy(update={"deepspeed": job.deepspeed.model_copy(update={"offload": "auto"})})))
    if job.deepspeed.activation_checkpointing is False:
        tries.append(("allow deepspeed.activation_checkpointing: auto",
                      job.model_copy(update={"deepspeed": job.deepspeed.model_copy(update={"activation_checkpointing": "auto"})})))
    if job.method == "full":
        tries.append(("use method: lora", job.model_copy(update={"method": "lora"})))
    seq = job.seq_len // 2
    while seq >= 64:
        tries.append((f"shorten seq_len to {seq} (now {job.seq_len})", job.model_copy(update={"seq_len": seq})))
        seq //= 2
    found = []
    for text, variant in tries:
        if text.startswith("shorten") and any(f.startswith("shorten") for f in found):
            continue  # the longest sequence that fits is the useful one
        try:
            plan = make_plan(variant, ctx.facts, ctx.snapshot, ctx.total_steps, suggest=False)
        except (NoPlacement, InputError):  # it does not fit either, or is not a valid job for this model
            continue
        found.append(f"{text} ({plan.settings} on {', '.join(r.card.card_id for r in plan.ranks)})")
    try:  # more cards: would the job fit if every card had a twin beside it?
        plan = make_plan(job, ctx.facts, _with_twins(ctx.snapshot), ctx.total_steps, suggest=False)
        found.append(f"add cards: it fits on {len(plan.ranks)} ({plan.settings}: "
                      f"{', '.join(sorted({r.card.short_name for r in plan.ranks}))})")
    except NoPlacement:
        pass
    return found


def _with_twins(snapshot: ClusterSnapshot) -> ClusterSnapshot:
    """The same cluster with a second copy of every card in its node: for 'would more cards help?'."""
    def twin(node):
        copies = tuple(replace(c, facts=replace(c.facts, index=c.index + len(node.cards), uuid=None), held_by=None) for c in node.cards)
        return replace(node, cards=node.cards + copies)

    return ClusterSnapshot(tuple(twin(n) for n in snapshot.nodes))
