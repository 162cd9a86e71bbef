"""The outer-step variant of a plan that spans boxes (workers/outer_steps.py, DiLoCo): the same cards and per-card
micro-batches, each box its own DeepSpeed world over PCIe, and every H steps one exchange of weight deltas across
the boxes' link. Pure: no Ray, no torch. All figures are estimates.

    inner step   per box: its slowest card's compute (and offload) + its own collectives over PCIe, ZeRO
                 partitioned over the box's cards only (so each card holds more: checked against its memory);
                 the job's inner step is its slowest box's (the boxes meet only at outer steps)
    exchange     each box's leader reads its box's fp32 weights (an all-reduce inside the box), sends its delta in
                 the wire format to the k-1 other boxes (gloo's ring all-gather: (k-1) payloads out on its link) and
                 broadcasts the new global weights inside its box
    H            the job's inner_steps, or (auto) the fewest that keep the exchange under EXCHANGE_SHARE of the
                 time, within H_BOUNDS and leaving at least MIN_OUTER_STEPS outer steps in the run
    auto         outer steps when the synchronous plan's collectives (across the boxes' link) take more than
                 AUTO_COMM_SHARE of its step and the outer plan is faster
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from orchestrator.planner import memory, step_time
from orchestrator.planner.memory import GIB, ZeroSetting
from orchestrator.planner.nccl import nccl_env
from orchestrator.planner.plan import Plan, sig
from orchestrator.planner.tuning import Group, PlanInput, capacity, host_ram_ok, training_shape, tune

EXCHANGE_SHARE = 0.05  # auto H: the exchange at most this share of wall time
H_BOUNDS = (10, 500)
MIN_OUTER_STEPS = 8  # auto H leaves at least this many outer steps in a run (bench/outer_steps.py: 8 in 400 steps kept the loss within 2%)
AUTO_COMM_SHARE = 0.25  # auto: outer steps when synchronous collectives take more than this share of a step
WIRE_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}
HEADER_FIELDS = 4  # beside each delta, in float64: the box's loss tokens, its wish to stop, its measured inner seconds and steps
OUTER_STATE_BYTES = 8  # per trained parameter on each box leader's host: the global weights and the momentum (fp32) ...
# ... and at an outer step every box's delta in the wire format (its own, and the others' as received)


@dataclass(frozen=True)
class OuterSteps:
    """How a plan's boxes train apart and meet (estimates)."""

    boxes: tuple[tuple[str, int], ...]  # (node, its ranks), in rank order: the plan's ranks are listed box by box
    inner_steps: int  # H
    box_step_s: tuple[float, ...]  # per box, one inner step
    exchange_bytes: int  # what each box leader sends across the link per outer step
    exchange_s: float  # one outer step's exchange
    link_s: float  # ... of which its deltas across the boxes' link (the rest: reading and loading weights in each box)
    outer_lr: float
    outer_momentum: float
    wire: str
    sync_step_s: float  # the synchronous plan on the same cards
    sync_bytes_per_step: float  # what its collectives move across the boxes' link per step (ring order, box by box)

    @property
    def inner_step_s(self) -> float:
        return max(self.box_step_s)

    @property
    def step_s(self) -> float:
        """Wall time per optimizer step, the exchange spread over the H steps between outer steps."""
        return self.inner_step_s + self.exchange_s / self.inner_steps

    def bytes_per_hour(self) -> tuple[float, float]:
        """(synchronous, outer): bytes across the boxes' link per hour of training, all boxes."""
        outer = len(self.boxes) * self.exchange_bytes / (self.inner_steps * self.step_s)
        return self.sync_bytes_per_step / self.sync_step_s * 3600, outer * 3600

    def summary(self) -> dict:
        sync_h, outer_h = self.bytes_per_hour()
        return {"boxes": [{"node": n, "ranks": k, "est_inner_step_s": sig(s)} for (n, k), s in zip(self.boxes, self.box_step_s)],
                "inner_steps": self.inner_steps, "outer_lr": self.outer_lr, "outer_momentum": self.outer_momentum, "wire": self.wire,
                "est_exchange_bytes": self.exchange_bytes, "est_exchange_s": sig(self.exchange_s), "est_link_s": sig(self.link_s),
                "est_sync_step_s": sig(self.sync_step_s), "est_sync_bytes_per_h": sig(sync_h), "est_outer_bytes_per_h": sig(outer_h)}


def outer_variant(ctx: PlanInput, plan: Plan) -> Plan | str:
    """The plan as outer steps across its boxes (at least two), with its step time replaced by the outer one; or why
    not, in a few words: a card cannot hold its ZeRO partition of its box alone, or a box's host RAM the outer state."""
    nodes = list(dict.fromkeys(r.card.node for r in plan.ranks))
    ranks = tuple(sorted(plan.ranks, key=lambda r: nodes.index(r.card.node)))  # box by box
    order = [plan.ranks.index(r) for r in ranks]
    compute = [plan.step.compute_s[i] for i in order]
    box_steps, offload, host, per_rank, first = [], [], {}, [], 0
    for node in nodes:
        mine = [r for r in ranks if r.card.node == node]
        group = Group(ctx, [r.card for r in mine])
        zeros = tuple(_zero(r) for r in mine)
        envs = nccl_env([r.card for r in mine], ctx.snapshot)  # each box's NCCL world stays inside the box
        envs = [{**env, **_link_env(ctx.snapshot.node(node))} for env in envs]
        for r, zero, env in zip(mine, zeros, envs):
            shape = training_shape(ctx, plan.precision, r.tuning.activation_checkpointing)
            held = replace(memory.estimate(shape, zero, len(mine), r.tuning.micro_batch), outer_step=memory.outer_step_bytes(shape))
            need = memory.outer_step_need(shape, zero, len(mine), r.tuning.micro_batch)
            if need > capacity(r.card):  # (the cap: what the box's own split tuner may give the card, its box alone partitioning)
                return (f"{r.card.card_id} ({r.card.short_name}) would need {need / GIB:.1f} GiB at micro-batch {r.tuning.micro_batch} "
                        f"with ZeRO partitioned over its box's {len(mine)} card(s) alone and the outer step's buffers; it has "
                        f"{capacity(r.card) / GIB:.1f} GiB (estimates)")
            per_rank.append(replace(r, tuning=replace(r.tuning, hpz_partition_size=1), memory=held, env=env,  # (hpZ: a box is one world)
                                    micro_cap=memory.max_micro_batch(shape, zero, len(mine), capacity(r.card))))
        comm, box_offload = group.step.overheads(zeros, plan.grad_accum)
        host.update(group.host_bytes(zeros))  # ZeRO partitions over the box's ranks alone (offloaded states too)
        offload += box_offload
        box_steps.append(max(c + o for c, o in zip(compute[first: first + len(mine)], box_offload)) + comm)
        first += len(mine)
    sync = ctx.job.sync
    payload = ctx.trainable * WIRE_BYTES[sync.wire] + header_bytes([sum(r.card.node == n for r in ranks) for n in nodes])
    link = min(step_time.network_gb_per_s(ctx.snapshot.node(n)) for n in nodes) * 1e9
    pcie = min(step_time.pcie_gb_per_s(r.card) for r in ranks) * 1e9
    link_s = (len(nodes) - 1) * payload / link
    exchange = link_s + 3 * 4 * ctx.trainable / pcie  # in the box: the fp32 read and the broadcast
    inner = max(box_steps)
    h = sync.inner_steps if sync.inner_steps != "auto" else auto_inner_steps(exchange, inner, plan.total_steps)
    sync_volume = step_time.comm_volume(ctx.trainable, ctx.facts.n_params, len(ranks), plan.zero.stage, plan.grad_accum,
                                        memory.bytes_per_value(plan.precision), memory.bytes_per_value(plan.precision))
    outer = OuterSteps(tuple((n, sum(r.card.node == n for r in ranks)) for n in nodes), h, tuple(box_steps), (len(nodes) - 1) * payload,
                       exchange, link_s, sync.outer_lr, sync.outer_momentum, sync.wire, plan.step.step_s,
                       len(nodes) * sync_volume.wire_bytes(len(ranks)))
    step = step_time.StepEstimate(tuple(compute), outer.step_s - max(c + o for c, o in zip(compute, offload)), tuple(offload), plan.step.tokens)
    for node in nodes:  # each box's leader keeps the global weights and the momentum, and meets with the deltas
        host[node] += (OUTER_STATE_BYTES + len(nodes) * WIRE_BYTES[sync.wire]) * ctx.trainable
    if not host_ram_ok(ctx.snapshot, host):
        return "the boxes' host RAM cannot hold the outer state beside the model states: " + ", ".join(
            f"{node} needs {need / GIB:.1f} GiB" for node, need in host.items()) + " (estimates)"
    return replace(plan, ranks=tuple(per_rank), zero=plan.zero._replace(hpz=1), step=step, host_bytes_per_node=host, outer=outer)


def header_bytes(ranks_per_box: list[int]) -> int:
    """What a box leader sends beside its delta: HEADER_FIELDS, then its cards' micro-batches, as many as the largest
    box has cards (every box's header the same length), all float64 (workers/outer_steps.py)."""
    return 8 * (HEADER_FIELDS + max(ranks_per_box))


def auto_inner_steps(exchange_s: float, inner_step_s: float, total_steps: int) -> int:
    """The fewest inner steps that keep the exchange under EXCHANGE_SHARE of the time, within H_BOUNDS, and no more
    than leave MIN_OUTER_STEPS outer steps in the run (one exchange at the very end would only average models trained
    apart)."""
    h = min(max(math.ceil(exchange_s / (EXCHANGE_SHARE * inner_step_s)), H_BOUNDS[0]), H_BOUNDS[1])
    return max(H_BOUNDS[0], min(h, total_steps // MIN_OUTER_STEPS))


def choose(ctx: PlanInput, synchronous: Plan) -> Plan:
    """The plan a job in mode outer or auto runs on these cards: with outer steps where its mode asks for them
    (outer), or (auto) where synchronous collectives take more than AUTO_COMM_SHARE of the step and outer steps are
    faster. The synchronous plan's settings come first; where a card cannot hold them with ZeRO over its box alone,
    the cards are tuned again so (smaller micro-batches, more accumulation, offload or ZeRO-3, as the job allows). A
    job that asked for outer steps and cannot have them here runs synchronous, and its plan says why."""
    asked = ctx.job.sync.mode == "outer"
    comm_bound = synchronous.step.comm_s > AUTO_COMM_SHARE * synchronous.step.step_s
    if not (asked or comm_bound):
        return synchronous  # (auto, and synchronous collectives are cheap here: no outer plan needed)
    outer = outer_variant(ctx, synchronous)
    if isinstance(outer, str):
        retuned = tune(Group(ctx, [r.card for r in synchronous.ranks], by_box=True))
        outer = outer_variant(ctx, retuned) if retuned else outer
    if isinstance(outer, str):
        return replace(synchronous, no_outer=outer) if asked else synchronous
    return outer if asked or outer.step.step_s < synchronous.step.step_s else synchronous


def describe(outer: OuterSteps) -> list[str]:
    """For `zeromix plan`: the boxes, the exchange and both modes side by side (estimates)."""
    sync_h, outer_h = outer.bytes_per_hour()
    boxes = "; ".join(f"{n}: {k} card(s), inner step {s:.3g} s" for (n, k), s in zip(outer.boxes, outer.box_step_s))
    return [f"outer steps across boxes (estimates): {boxes}",
            "  checkpoints at the first outer step after every checkpoint_every steps (box 0's, with the outer momentum)",
            f"  every {outer.inner_steps} steps each box sends {outer.exchange_bytes / GIB:.2f} GiB ({outer.wire}) across the link, "
            f"about {outer.exchange_s:.3g} s; outer lr {outer.outer_lr:g}, Nesterov momentum {outer.outer_momentum:g}",
            f"  synchronous on these cards: {outer.sync_step_s:.3g} s/step, {sync_h / GIB:,.0f} GiB/h across boxes; "
            f"outer steps: {outer.step_s:.3g} s/step, {outer_h / GIB:,.1f} GiB/h"]


def _link_env(node) -> dict[str, str]:
    """The interface the box leaders' gloo link takes: the node's toward the others (probed, or `nic:` in cluster.yaml).
    Left to itself gloo takes the address the host name resolves to, which on Debian and Ubuntu is 127.0.1.1, and the
    other boxes cannot reach it. Not on a simulated node: its interfaces are this machine's, not the ones declared."""
    return {"GLOO_SOCKET_IFNAME": node.nic} if node.nic and not node.simulated else {}


def _zero(rank) -> ZeroSetting:
    return ZeroSetting(rank.tuning.zero_stage, rank.tuning.offload_optimizer, rank.tuning.offload_params)
