"""Tuning one candidate group of cards: enumerate its settings -> filter -> score -> the fastest, as a Plan.

    Group(...)               what every setting on the group shares, gathered once: precision, each card's rate
                             and memory, the links, the micro-batch each card holds at each setting (memory.py)
    settings(group)          every ZeRO stage x offload x activation checkpointing the job allows: offload per card
                             at ZeRO-2 where one sample fits nowhere else, checkpointing per card at ZeRO-1/2
    fits_host_ram(...)       an offloading setting needs its boxes' host RAM
    score(group, setting)    per-card micro-batches and one accumulation count within every card's memory that
                             make the fastest step (split.py), and that step's time (step_time.py)
    tune(...)                the fastest setting that fits (and beats the best group so far), assembled into a Plan
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from orchestrator.ds_config import RankTuning
from orchestrator.inventory import Card, ClusterSnapshot
from orchestrator.jobspec import JobSpec
from orchestrator.model_facts import ModelFacts
from orchestrator.planner import memory, step_time
from orchestrator.planner.memory import GIB, FourBit, TrainingShape, ZeroSetting
from orchestrator.planner.nccl import nccl_env
from orchestrator.planner.plan import FourBitBase, Plan, RankPlan
from orchestrator.planner.precision import resolve_precision
from orchestrator.planner.split import RankCost, best_split, split_fits, step_lower_bound

HOST_RAM_RESERVED = 4 * GIB  # for the OS and the data pipeline; DeepSpeed's 1.5x buffer is already in the need


@dataclass(frozen=True)
class PlanInput:
    """What every candidate group is planned against."""

    job: JobSpec
    facts: ModelFacts
    snapshot: ClusterSnapshot
    trainable: int
    lora_targets: tuple[str, ...]
    total_steps: int
    # (precision, checkpointing, ZeRO setting, by box, capacity, ZeRO world) -> the largest micro-batch: the groups of
    # one plan share most cards and sizes, so each is computed once per plan
    micro_caps: dict = field(default_factory=dict, compare=False, repr=False)


class Setting(NamedTuple):
    zero: ZeroSetting  # the stage and offload the job runs (what the plan reports)
    zeros: tuple[ZeroSetting, ...]  # per card: `zero`, or at ZeRO-2 optimizer offload on a card short of memory
    checkpointing: str  # "none", "all", or "per card": a card recomputes only if its micro-batch needs it


@dataclass(frozen=True)
class Scored:
    setting: Setting
    micro: list[int]
    grad_accum: int
    recompute: list[bool]
    step: step_time.StepEstimate  # an estimate


class Group:
    """A candidate group of cards and what every setting on it shares. With hpZ the cards are ordered box by box:
    DeepSpeed forms hpZ's groups from consecutive ranks (rank order changes no maths). `by_box`: each box a ZeRO world
    of its own, meeting in outer steps (planner/outer.py): each card's memory counts ZeRO partitioned over its box and
    the outer step's buffers; its step time is still the synchronous one (outer.py puts in the outer one)."""

    def __init__(self, given: PlanInput, cards: list[Card], by_box: bool = False):
        job = given.job
        self.given, self.hpz, self.by_box = given, 1 if by_box else _hpz_size(given.facts, cards), by_box  # (hpZ: within a box)
        if self.hpz > 1 or by_box:
            boxes = list(dict.fromkeys(c.node for c in cards))
            cards = sorted(cards, key=lambda c: boxes.index(c.node))
        self.cards, self.world = cards, len(cards)
        per_box = Counter(c.node for c in cards)
        self.partition = [per_box[c.node] if by_box else self.world for c in cards]  # each card's ZeRO world
        self.precision = resolve_precision(job.precision, cards)
        self.capacities = [capacity(c) for c in cards]
        link, pcie = links(given.snapshot, cards)
        self.step = step_time.StepInputs(
            given.facts, given.trainable, job.method, job.seq_len, self.precision, given.lora_targets,
            tuple(step_time.card_tflops(c, self.precision) for c in cards), tuple(step_time.card_gb_per_s(c) for c in cards),
            link, pcie, max(per_box.values()), job.method == "qlora")
        self.shapes = {ckpt: training_shape(given, self.precision, ckpt) for ckpt in (False, True)}
        self.plain_s = [self.step.seconds_per_sample(r, False) for r in range(self.world)]
        self._caps_of: dict[tuple[bool, tuple[ZeroSetting, ...]], tuple[int, ...]] = {}
        self._fixed: dict[tuple[tuple[ZeroSetting, ...], int], tuple[float, ...]] = {}
        self._host: dict[tuple[ZeroSetting, ...], dict[str, int]] = {}

    def caps(self, ckpt: bool, zeros: tuple[ZeroSetting, ...]) -> tuple[int, ...]:
        """Each card's largest micro-batch at its setting (kept per setting, which the tuner asks for at every split
        it scores; each card model's once per plan: `_micro_cap`)."""
        found = self._caps_of.get((ckpt, zeros))
        if found is None:
            found = self._caps_of[ckpt, zeros] = tuple(self._micro_cap(ckpt, z, c, w) for c, w, z in zip(self.capacities, self.partition, zeros))
        return found

    def _micro_cap(self, ckpt: bool, zero: ZeroSetting, capacity: int, world: int) -> int:
        key = (self.precision, ckpt, zero, self.by_box, capacity, world)
        if key not in self.given.micro_caps:
            shape = self.shapes[ckpt]
            fits = not self.by_box or memory.outer_step_need(shape, zero, world, 0) <= capacity
            self.given.micro_caps[key] = memory.max_micro_batch(shape, zero, world, capacity) if fits else 0
        return self.given.micro_caps[key]

    def fixed_s(self, zeros: tuple[ZeroSetting, ...], grad_accum: int) -> tuple[float, ...]:
        """Per rank, what a step costs besides compute (communication and offload): the same for every checkpointing mode."""
        if (zeros, grad_accum) not in self._fixed:  # (QLoRA's dequantisation: forward and backward; a recompute adds one more)
            comm, offload = self.step.overheads(zeros, grad_accum)
            self._fixed[zeros, grad_accum] = tuple(comm + o + self.step.dequantise_s(r, 2) * grad_accum for r, o in enumerate(offload))
        return self._fixed[zeros, grad_accum]

    def host_bytes(self, zeros: tuple[ZeroSetting, ...]) -> dict[str, int]:
        """Per node (kept: each setting's host-RAM check asks, and the plan again; not to be changed)."""
        if zeros not in self._host:
            self._host[zeros] = host_bytes(self.shapes[False], zeros, self.cards)
        return self._host[zeros]


def training_shape(given: PlanInput, precision: str, activation_checkpointing: bool) -> TrainingShape:
    job = given.job
    four_bit = FourBit(job.quant_config.double_quant) if job.method == "qlora" else None
    return TrainingShape(given.facts, given.trainable, job.seq_len, precision, activation_checkpointing, job.adapters, four_bit)


def settings(group: Group) -> Iterator[Setting]:
    """Every setting the job allows on this group, in the order ties are settled (the first of equals wins)."""
    job = group.given.job
    zeros_to_try = zero_options(job)
    zeros_to_try += [z._replace(hpz=group.hpz) for z in zeros_to_try if z.stage == 3 and group.hpz > 1]
    for zero in zeros_to_try:
        for zeros in _per_card_offloads(group, zero):
            for mode in _checkpointing_modes(job, zero):
                yield Setting(zero, zeros, mode)


def fits_host_ram(group: Group, setting: Setting) -> bool:
    if not any(z.offload_optimizer or z.offload_params for z in setting.zeros):
        return True  # host RAM then holds the model only while it loads: the plan reports it, the scheduler's round counts it per box
    return host_ram_ok(group.given.snapshot, group.host_bytes(setting.zeros))


def score(group: Group, setting: Setting, to_beat: float | None = None) -> Scored | None:
    """The fastest split at this setting and its step time; None if it does not fit, or cannot beat `to_beat` seconds."""
    global_batch = group.given.job.global_batch_size
    if to_beat is not None and step_lower_bound(global_batch, group.plain_s, group.fixed_s(setting.zeros, 1)) >= to_beat:
        return None  # even with one accumulation step and no recompute, no faster than the best so far
    costs = _rank_costs(group, setting)
    split = best_split(global_batch, costs, lambda grad_accum: group.fixed_s(setting.zeros, grad_accum))
    if split is None:
        return None
    micro, grad_accum = split
    recompute = [c.recomputes(m) for c, m in zip(costs, micro)]
    step = group.step.estimate(recompute, [m * grad_accum for m in micro], setting.zeros, grad_accum)
    return Scored(setting, micro, grad_accum, recompute, step)


def tune(group: Group, to_beat: float | None = None) -> Plan | None:
    """The fastest setting for this group that fits and beats `to_beat` seconds a step (another group's best),
    or None."""
    best: Scored | None = None
    for setting in settings(group):
        if not fits_host_ram(group, setting):
            continue
        scored = score(group, setting, to_beat)
        if scored and (to_beat is None or scored.step.step_s < to_beat):
            best, to_beat = scored, scored.step.step_s
    return _assemble(group, best) if best else None


def fits(group: Group) -> bool:
    """Whether any setting holds the job on this group (what `tune` under a bound cannot tell when it returns None)."""
    batch = group.given.job.global_batch_size
    return any(fits_host_ram(group, s) and split_fits(batch, _rank_costs(group, s)) for s in settings(group))


def quick_tokens_per_s(group: Group) -> float:
    """To rank groups before tuning any: samples split in proportion to rate (fractions allowed), with the first
    ZeRO/offload setting in which one sample fits on every card of the group (checkpointing on): a group of small
    cards that needs ZeRO-3 pays for ZeRO-3's traffic here already, and for as many accumulation steps as its
    memory forces (ZeRO-2/3 communicate in every one). 0 when nothing fits."""
    for zero in zero_options(group.given.job):
        caps = group.caps(True, (zero,) * group.world)
        if min(caps) >= 1:
            break
    else:
        return 0.0
    global_batch = group.given.job.global_batch_size
    grad_accum = -(-global_batch // sum(caps))
    rates = group.step.rates_tflops
    samples = [global_batch * r / sum(rates) for r in rates]
    return group.step.estimate([False] * group.world, samples, (zero,) * group.world, grad_accum).tokens_per_s


def _assemble(group: Group, best: Scored) -> Plan:
    given, setting = group.given, best.setting
    envs = nccl_env(group.cards, given.snapshot)
    caps = {ckpt: group.caps(ckpt, setting.zeros) for ckpt in (False, True)}
    ranks = tuple(
        RankPlan(card, RankTuning(m, z.stage, z.offload_optimizer, z.offload_params, group.precision, ckpt, z.hpz),
                 memory.estimate(group.shapes[ckpt], z, group.partition[i], m), cap_bytes, group.step.rates_tflops[i],
                 step_time.rate_source(card, group.precision), envs[i], caps[ckpt][i])
        for i, (card, cap_bytes, z, m, ckpt) in enumerate(zip(group.cards, group.capacities, setting.zeros, best.micro, best.recompute)))
    return Plan(given.job.name, ranks, best.grad_accum, setting.zero, group.precision, given.total_steps, given.facts.n_params,
                given.trainable, dict(group.host_bytes(setting.zeros)), (), best.step, given.lora_targets, _four_bit_base(group, setting.zero),
                loss_chunk_tokens=memory.loss_chunk_tokens(given.facts.vocab, group.precision))


def _four_bit_base(group: Group, zero: ZeroSetting) -> FourBitBase | None:
    """QLoRA: how the 4-bit base is held."""
    job = group.given.job
    if job.method != "qlora":
        return None
    quant, size = job.quant_config, memory.base_bytes(group.shapes[False]) / GIB
    return FourBitBase(quant.type, quant.double_quant, f"every card holds the whole 4-bit base (about {size:.1f} GiB, estimate): "
                                                     f"ZeRO-{zero.stage} splits only the adapters' states")


def _rank_costs(group: Group, setting: Setting) -> list[RankCost]:
    """Each card's seconds per sample and micro-batch caps, without and (where the mode allows) with recompute."""
    mode, step = setting.checkpointing, group.step
    plain_caps, recompute_caps = group.caps(False, setting.zeros), group.caps(True, setting.zeros)
    return [RankCost(step.seconds_per_sample(r, mode == "all"), 0 if mode == "all" else plain_caps[r],
                     step.seconds_per_sample(r, True), 0 if mode == "none" else recompute_caps[r]) for r in range(group.world)]


def zero_options(job: JobSpec) -> list[ZeroSetting]:
    """The ZeRO stages and offloads the job allows, in the order ties are settled. QLoRA runs at ZeRO-1 or 2: its
    4-bit base is frozen and small, every card holds all of it, and only the adapters' states are split (ZeRO-3
    would not lower the peak: each rank loads the whole 4-bit base before DeepSpeed could partition it,
    DeepSpeed#5660)."""
    qlora = job.method == "qlora"
    stages = ([1, 2] if qlora else [2, 3]) if job.deepspeed.zero_stage == "auto" else [job.deepspeed.zero_stage]
    offloads = {"auto": [(False, False), (True, False), (True, True)], "none": [(False, False)],
                "optimizer": [(True, False)], "optimizer+params": [(True, True)]}[job.deepspeed.offload]
    return [ZeroSetting(s, o, p) for o, p in offloads for s in stages if not (p and s != 3) and not (o and s == 0)]


def _per_card_offloads(group: Group, zero: ZeroSetting) -> Iterator[tuple[ZeroSetting, ...]]:
    """`zero` on every card; and at ZeRO-2 without offload (offload: auto), optimizer offload on the cards where one
    sample does not fit otherwise (with checkpointing, where allowed) while the others keep theirs: DeepSpeed runs
    the same collectives either way (checked on CPU ranks by tests/test_exact_update.py)."""
    uniform = (zero,) * group.world
    yield uniform
    if group.given.job.deepspeed.offload != "auto" or zero != ZeroSetting(2, False, False):
        return
    roomy = [max(caps) >= 1 for caps in zip(*(group.caps(ckpt, uniform) for ckpt in _checkpointing_options(group.given.job)))]
    if any(roomy) and not all(roomy):  # else the uniform settings already cover it
        yield tuple(zero if ok else ZeroSetting(2, True, False) for ok in roomy)


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


def _hpz_size(facts: ModelFacts, group: list[Card]) -> int:
    """Cards per box for ZeRO++ hierarchical partitioning, or 1 when it would not help: it needs the group
    spread over two or more boxes with the same number of cards each (DeepSpeed splits ranks into equal
    consecutive groups), and it only saves traffic when ZeRO-3 gathers the weights again for backward."""
    per_box = Counter(c.node for c in group)
    sizes = set(per_box.values())
    if len(per_box) < 2 or len(sizes) != 1 or min(sizes) < 2:
        return 1
    return min(sizes) if step_time.gathers_per_micro_step(facts.n_params) == 2 else 1


def links(snapshot: ClusterSnapshot, group: list[Card]) -> tuple[float, float]:
    """(GB/s of the slowest link the group's collectives cross, GB/s of the slowest card's PCIe slot)."""
    pcie = min(step_time.pcie_gb_per_s(c) for c in group)
    nodes = {c.node for c in group}
    if len(nodes) == 1:
        return pcie, pcie
    return min(step_time.network_gb_per_s(snapshot.node(n)) for n in nodes), pcie


def capacity(card: Card) -> int:
    """Bytes a rank's estimate must fit in: the card's memory, or its free memory where that was probed."""
    free = card.facts.memory_free_mib
    return (min(free, card.vram_mib) if free is not None else card.vram_mib) * 1024**2


def host_bytes(shape: TrainingShape, zeros: tuple[ZeroSetting, ...], group: list[Card]) -> dict[str, int]:
    """Per node, `zeros` one per card. With per-card settings, a node with any offloading rank is counted as
    DeepSpeed counts a node whose ranks all offload (an upper bound)."""
    ranks_here = Counter(c.node for c in group)
    node_zero = {n: zeros[0] for n in ranks_here}
    for card, zero in zip(group, zeros):
        if zero != zeros[0]:  # the per-card settings differ: count the node's most offloading one
            node_zero[card.node] = max(node_zero[card.node], zero, key=lambda z: (z.offload_optimizer, z.offload_params))
    return {n: memory.host_bytes(shape, node_zero[n], ranks_here[n], len(group)) for n in sorted(ranks_here)}


def host_ram_ok(snapshot: ClusterSnapshot, host: dict[str, int]) -> bool:
    return all(need <= snapshot.node(node).ram_gb * GIB - HOST_RAM_RESERVED for node, need in host.items())
