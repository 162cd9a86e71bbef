"""A split that corrects itself: move samples between cards when their measured speeds disagree with the plan.

The planner splits each global batch by the speeds it expects; a throttled card, a slow riser or a model whose
kernels behave otherwise makes that split wrong for the rest of the run. Every optimizer step, every rank
already reports its busy time (compute, not waiting for slower cards). From those, for each card, a line
    busy seconds per micro-step = fixed + per_sample x micro-batch
is fitted (the fixed part is the per-call cost, which does not shrink with fewer samples: kernel launches, the
framework's bookkeeping); with one micro-batch size seen so far the fixed part is taken as 0, and the first
correction gives each card a second size to fit from. The global batch is then split again by those lines with
the planner's own `split_batch` (each next sample to the card that would finish it first), never beyond the
card's memory cap from the plan.

The maths does not move: the same global batch, the same accumulation count, the same samples in each step
(workers/data.py takes each step's samples from the global batch, whatever the split), each rank's loss
weighted by its share of the loss tokens. Only rank 0 decides, and the new split reaches every rank inside the
all-reduce they already run at the end of a step (workers/telemetry.py), so all switch at the same optimizer
step (ranks that disagreed on their micro-batches would still run, but on samples meant for another).

Pure: no torch. A change is worth making when the fit predicts the slowest card's busy time to drop by more
than `threshold` of the step; after one, the new split is measured for `window` steps before the next decision.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

from orchestrator.planner.split import RankCost, split_batch
from workers.collectives import first_ranks

WARMUP_STEPS = 2  # the first steps pay lazy initialisation; not measured
WINDOW_STEPS = 3  # steps measured at a split before deciding on it (the median of them, per card)
THRESHOLD = 0.05  # a change must save more than this share of the step
BOX_WINDOW_STEPS = 2 * WINDOW_STEPS  # outer steps: a box's measured steps before the boxes' shares move (each box's own
# cards' split moves first, and a change of it starts its box's count again)


@dataclass(frozen=True)
class Rebalance:
    """One change of the split, as the job's log, result and report show it."""

    step: int  # the first optimizer step that runs with `new`
    old: tuple[int, ...]
    new: tuple[int, ...]
    per_sample_s: tuple[float, ...]  # fitted seconds per sample, per card (measured)
    fixed_s: tuple[float, ...]  # fitted seconds per micro-step that do not depend on its size, per card
    busy_s: tuple[float, ...]  # each card's measured busy seconds per step at `old` (median of the window)
    predicted_busy_s: tuple[float, ...]  # at `new`, by the fit (an estimate)
    step_s: float  # the measured step at `old`

    @property
    def why(self) -> str:
        slowest = max(self.busy_s)
        return (f"busy {', '.join(f'{b:.3g}' for b in self.busy_s)} s per step at {list(self.old)}: the slowest card sets the step, "
                f"the split is predicted to bring it from {slowest:.3g} to {max(self.predicted_busy_s):.3g} s "
                f"({(slowest - max(self.predicted_busy_s)) / self.step_s:.0%} of a {self.step_s:.3g} s step)")

    def record(self) -> dict:
        return {"step": self.step, "old": list(self.old), "new": list(self.new), "per_sample_s": list(self.per_sample_s),
                "fixed_s": list(self.fixed_s), "busy_s": list(self.busy_s), "predicted_busy_s": list(self.predicted_busy_s),
                "step_s": self.step_s, "why": self.why}


def fit_line(points: dict[int, float]) -> tuple[float, float]:
    """(fixed, per_sample) of busy = fixed + per_sample x n through the points (n -> busy seconds per micro-step),
    by least squares; with one size seen, or a fit that makes no physical sense, all of it per sample."""
    if len(points) >= 2:
        ns, ts = list(points), list(points.values())
        mean_n, mean_t = statistics.fmean(ns), statistics.fmean(ts)
        slope = sum((n - mean_n) * (t - mean_t) for n, t in zip(ns, ts)) / sum((n - mean_n) ** 2 for n in ns)
        fixed = mean_t - slope * mean_n
        if slope > 0 and fixed >= 0:
            return fixed, slope
    n, t = max(points.items())  # the largest size seen: its fixed share is smallest
    return 0.0, t / n


@dataclass
class SplitTuner:
    """Rank 0's: fed every step's busy times, it says when (and to what) the split should change."""

    split: tuple[int, ...]
    caps: tuple[int, ...]  # the largest micro-batch each card holds (the plan's memory model)
    grad_accum: int
    threshold: float = THRESHOLD
    window: int = WINDOW_STEPS
    warmup: int = WARMUP_STEPS
    # card -> micro-batch size -> busy seconds per micro-step of its last `window` measured steps (a card that
    # slows down mid-run is judged by how it runs now)
    seen: list[dict[int, deque]] = field(default_factory=list)
    # splits run and left, with the slowest card's busy seconds there: never back to one that was no better
    left: dict[tuple[int, ...], float] = field(default_factory=dict)
    _since_change: int = 0

    def __post_init__(self):
        self.seen = [{} for _ in self.split]
        self._since_change = -self.warmup

    def observe(self, step: int, busy_s: tuple[float, ...], step_s: float) -> Rebalance | None:
        """After optimizer step `step` (1-based) ran at `self.split`: a change to make from step + 2 on (the
        decision travels in the next step's all-reduce), or None."""
        self._since_change += 1
        if self._since_change <= 0:
            return None
        for card, busy in enumerate(busy_s):
            self.seen[card].setdefault(self.split[card], deque(maxlen=self.window)).append(busy / self.grad_accum)
        if self._since_change < self.window:
            return None
        lines = [fit_line({n: statistics.median(ts) for n, ts in seen.items()}) for seen in self.seen]
        costs = [RankCost(max(per_sample, 1e-12), cap) for (_, per_sample), cap in zip(lines, self.caps)]
        new = split_batch(sum(self.split), costs, [fixed for fixed, _ in lines])
        if new is None or tuple(new) == self.split:
            return None
        now = [statistics.median(self.seen[card][n]) * self.grad_accum for card, n in enumerate(self.split)]
        predicted = [(fixed + per_sample * n) * self.grad_accum for (fixed, per_sample), n in zip(lines, new)]
        if (max(now) - max(predicted)) <= self.threshold * step_s:
            return None
        if tuple(new) in self.left and self.left[tuple(new)] >= max(now) - self.threshold * step_s:
            return None  # measured there already, and it was no better: no oscillating between two splits
        return Rebalance(step + 2, self.split, tuple(new), tuple(s for _, s in lines), tuple(f for f, _ in lines), tuple(now),
                         tuple(predicted), step_s)

    def applied(self, split: tuple[int, ...]) -> None:
        """Every rank runs `split` from now on: measure it afresh (its first step warms up again)."""
        self.left[self.split] = max(statistics.median(self.seen[card][n]) for card, n in enumerate(self.split)) * self.grad_accum
        self.split, self._since_change = tuple(split), -1


def measured_speeds(history: list[dict], plan: dict) -> dict[str, float]:
    """Per card (by card id), how fast it trained over the plan's estimate: the plan's compute seconds per step
    over the median measured at the planned split, after warm-up. What the next plan on these cards starts from
    (orchestrator/registry.record_training_speeds); the estimate is an estimate, the median is measured."""
    planned = [r["micro_batch"] for r in plan["ranks"]]
    steps = [h for h in history if h["step"] > WARMUP_STEPS and list(h["split"]) == planned]
    if len(steps) < WINDOW_STEPS:
        return {}
    return {r["card"]: r["est_compute_s"] / statistics.median(h["compute_s"][i] for h in steps)
            for i, r in enumerate(plan["ranks"]) if r.get("est_compute_s") and all(h["compute_s"][i] > 0 for h in steps)}


@dataclass(frozen=True)
class BoxShares:
    """One change of the boxes' shares of the global batch (outer steps across boxes), as the job's result shows it."""

    step: int  # the first optimizer step that runs with `new`
    old: tuple[int, ...]  # the job's split, every rank, box by box
    new: tuple[int, ...]
    per_sample_s: tuple[float, ...]  # per box: its measured inner step over its samples per micro-step
    box_step_s: tuple[float, ...]  # per box: its measured inner step at `old`
    predicted_step_s: tuple[float, ...]  # at `new` (an estimate: each box's seconds per sample held)

    @property
    def why(self) -> str:
        return (f"boxes' inner steps {', '.join(f'{s:.3g}' for s in self.box_step_s)} s: the faster waited for the slower at "
                f"every outer step; the boxes' shares are predicted to bring the slowest to {max(self.predicted_step_s):.3g} s")

    def record(self) -> dict:
        return {"step": self.step, "old": list(self.old), "new": list(self.new), "per_sample_s": list(self.per_sample_s),
                "ranks": list(range(len(self.old))), "why": self.why}


def box_shares(split: tuple[int, ...], boxes: tuple[int, ...], box_step_s: tuple[float, ...], caps: tuple[int, ...],
               threshold: float = THRESHOLD) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]] | None:
    """With outer steps, the boxes meet every H steps and the faster waits for the slower: the boxes' shares of the
    global batch follow their measured inner steps as the cards' shares do inside a synchronous job (`split_batch`
    over the boxes, each at its seconds per sample now, within its cards' caps), and each box's share is spread
    over its cards in proportion to their micro-batches now (what its own tuner has learned). (The new split, each
    box's seconds per sample, each box's predicted step), or None unless the slowest box's step is predicted to
    drop by more than `threshold` of it. The same inputs give the same answer on every box leader. A box out of the
    job (lost, with no share of the batch) stays out: it gets none, and its figures are 0."""
    sums, box_caps = _box_sums(split, boxes, caps)
    live = [b for b, total in enumerate(sums) if total]
    per_sample = tuple(s / n if n else 0.0 for s, n in zip(box_step_s, sums))
    new_sums = _over_boxes(sum(sums), per_sample, box_caps, live)
    if new_sums is None or new_sums == sums or any(new_sums[b] < boxes[b] for b in live):
        return None
    predicted = tuple(s * n for s, n in zip(per_sample, new_sums))
    if max(box_step_s) - max(predicted) <= threshold * max(box_step_s):
        return None
    new = _spread(split, boxes, new_sums, caps)
    return (new, per_sample, predicted) if new else None


def shares_without(split: tuple[int, ...], boxes: tuple[int, ...], gone: set[int], box_step_s: tuple[float, ...],
                   caps: tuple[int, ...]) -> tuple[int, ...] | None:
    """The job's split once the boxes `gone` left it (their node died): the whole global batch over the boxes left,
    each at its measured seconds per sample (`box_step_s`; where a box left has no measured step yet, every box's
    share now stands for its speed), within its cards' caps and spread over its cards as now; the boxes gone get
    none. None where the boxes left cannot hold the global batch."""
    sums, box_caps = _box_sums(split, boxes, caps)
    left = [b for b in range(len(boxes)) if b not in gone]
    measured = all(box_step_s[b] > 0 for b in left)
    per_sample = [(box_step_s[b] if measured else 1.0) / n if n else 0.0 for b, n in enumerate(sums)]
    totals = _over_boxes(sum(sums), per_sample, box_caps, left)
    return _spread(split, boxes, totals, caps) if totals else None


def _box_sums(split: tuple[int, ...], boxes: tuple[int, ...], caps: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Each box's samples a micro-step now, and its cards' caps together."""
    firsts = first_ranks(boxes)
    return [sum(split[f: f + n]) for f, n in zip(firsts, boxes)], [sum(caps[f: f + n]) for f, n in zip(firsts, boxes)]


def _over_boxes(total: int, per_sample, box_caps: list[int], among: list[int]) -> list[int] | None:
    """`total` samples a micro-step over the boxes `among` by their seconds per sample, within their caps
    (`split_batch`, each next sample to the box that would finish it first); the other boxes none."""
    found = split_batch(total, [RankCost(max(per_sample[b], 1e-12), box_caps[b]) for b in among])
    if found is None:
        return None
    totals = [0] * len(box_caps)
    for b, share in zip(among, found):
        totals[b] = share
    return totals


def _spread(split: tuple[int, ...], boxes: tuple[int, ...], totals: list[int], caps: tuple[int, ...]) -> tuple[int, ...] | None:
    """Each box's new total over its cards in proportion to their micro-batches now (what its own tuner has learned;
    a card's time per sample taken as 1 / its micro-batch), within their caps; a box's total of 0 gives its cards
    none. None where a box's cards cannot hold its total."""
    new: list[int] = []
    for f, n, total in zip(first_ranks(boxes), boxes, totals):
        cards = split[f: f + n]
        spread = split_batch(total, [RankCost(1 / max(m, 1), cap) for m, cap in zip(cards, caps[f: f + n])]) if total else [0] * n
        if spread is None:
            return None
        new += spread
    return tuple(new)
