"""Splitting a global batch over cards of unequal speed and memory: per-card micro-batches and one
accumulation count that make the fastest step. Pure arithmetic; the planner and the workers' self-correcting
split (workers/rebalance.py) both use it."""

from __future__ import annotations

import heapq
from dataclasses import dataclass


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


def best_split(global_batch: int, costs: list[RankCost], fixed_s=None) -> tuple[list[int], int] | None:
    """Micro-batches and the accumulation count (the same on every rank) that fit every card and make the
    fastest step: compute, plus `fixed_s(grad_accum)` per rank (communication and offload, which grow with the
    accumulation count at ZeRO-2/3); of equally fast splits, the fewest accumulation steps. A memory cap on the
    fast card can make more, smaller micro-batches the better split. `fixed_s` must not fall as the count grows
    (collectives and offload are per micro-step or per step), so once a count's bound cannot beat the best split,
    no larger count can."""
    best, best_time = None, None
    plain = [c.plain_s for c in costs]
    for grad_accum in (g for g in range(1, global_batch + 1) if global_batch % g == 0):
        if global_batch // grad_accum < len(costs):
            break
        fixed = fixed_s(grad_accum) if fixed_s else [0.0] * len(costs)
        if best_time is not None and round(step_lower_bound(global_batch, plain, fixed), 9) >= best_time:
            break  # no split at this accumulation count can beat the best one, nor at any larger one
        micro = split_batch(global_batch // grad_accum, costs, [f / grad_accum for f in fixed])
        if micro:
            slowest = round(max(c.seconds(m) * grad_accum + f for c, m, f in zip(costs, micro, fixed)), 9)
            if best_time is None or slowest < best_time:
                best, best_time = (micro, grad_accum), slowest
    return best


def split_fits(global_batch: int, costs: list[RankCost]) -> bool:
    """Whether `best_split` finds a split: every rank takes a sample, and some accumulation count leaves each
    micro-step at least one sample a rank and no more than the caps hold (the fewest samples a micro-step: the
    largest such count)."""
    n = len(costs)
    if n > global_batch or min(c.cap for c in costs) < 1:
        return False
    fewest = min(global_batch // g for g in range(1, global_batch + 1) if global_batch % g == 0 and global_batch // g >= n)
    return fewest <= sum(c.cap for c in costs)


def step_lower_bound(global_batch: int, plain_s: list[float], fixed: tuple[float, ...]) -> float:
    """No split's step beats this: every rank at its plain (fastest) seconds per sample, fractions of samples
    allowed, all finishing together; and no rank finishes before its fixed cost."""
    inverse = sum(1 / p for p in plain_s)
    return max((global_batch + sum(f / p for p, f in zip(plain_s, fixed))) / inverse, max(fixed))

