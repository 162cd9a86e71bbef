"""Outer steps across boxes: DeepSpeed ZeRO inside each box, DiLoCo's outer step between boxes (Douillard et al.,
arXiv 2311.08105), so a job can span boxes joined by 1 GbE without moving gradients across it every step.

Each box is a DeepSpeed world of its own and trains on its share of every global batch for `inner_steps` (H)
optimizer steps. Then, on every rank of every box at once:
  1. each rank reads its full fp32 weights one at a time (DeepSpeed's safe_get_full_fp32_param: a collective
     inside the box); the box's leader (its rank 0) writes the box's delta from the global weights, global - local,
     in host RAM in the wire format, weight by weight;
  2. the leader sends it, with the loss tokens the box trained on since the last outer step;
  3. every leader combines the deltas weighted by those tokens and takes an outer Nesterov SGD step on the global
     weights, which it keeps in host RAM with the outer momentum (8 bytes a trained parameter), weight by weight;
  4. the leader broadcasts the new global weights inside its box a bucket at a time, and every rank loads them into
     DeepSpeed's fp32 master weights and into the model's own.
A card never holds more of this than one weight or one bucket in fp32 (planner/memory.py counts it): the whole model
in fp32, read and broadcast at once, would be twice its 16-bit weights again on cards already full of them.
Weighting by tokens makes the combination exact for boxes of unequal batch: with inner SGD, H = 1, outer lr 1 and
no momentum, the result is one synchronous data-parallel step on the whole global batch (tests/test_outer_steps.py).
The inner optimizer's state (Adam's moments) stays in each box, as in DiLoCo.

Checkpoints are taken at outer steps, where every box holds the global weights: box 0 saves its DeepSpeed
checkpoint with the outer momentum beside it (one manifest); a resumed job's box 0 loads it (through the universal
form on another number of cards) and the other boxes take the weights and momentum from it over the link, their
inner optimizer states starting afresh. A stop the scheduler asks for (a move) takes effect at the next outer step,
on every box at once. Any ZeRO stage inside a box: under ZeRO-3 step 4 writes each rank's slice of each weight.

A box other than box 0 that is lost (its node unplugged, a process killed) is left out at the next outer step, without
a restart: the job's driver sees its ranks die and says so (job_records "lost"); box 0's leader, waiting for the boxes
at the outer step (BoxLink.meet, in the rendezvous store rather than a collective that would hang on the dead box),
goes on without it; the boxes left take its share of every global batch from the next step, within their cards' caps
(`rebalance.shares_without`), so each step's batch stays the job's. What the lost box trained since the last outer step
is lost with it (its delta never came). The driver starts the box's ranks again on their cards (on a node that died,
once it is back); they ask back in (`come_back`), and box 0's leader lets them in at its next outer step, where the box
brings an empty delta and takes the step, the global weights and the outer momentum from box 0 (its inner optimizer
starts afresh), and every box returns to the plan's split; where the job stops at that outer step (a move), the box
learns it there and stops with the others, training nothing (alone, it would meet nobody). Box 0 holds the rendezvous
and the checkpoints: losing it restarts the job from its checkpoint, as do boxes left too small for the batch (except
at the last outer step, where no split runs after). A box lost during the exchange itself is left out there: the boxes
left exchange again without it (BoxLink.exchange).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from workers.collectives import BoxLink, RankComm

from orchestrator.planner.memory import OUTER_BUCKET_ELEMENTS
from orchestrator.planner.outer import header_bytes
from workers.collectives import first_ranks
from workers.rebalance import BOX_WINDOW_STEPS, WARMUP_STEPS, BoxShares, box_shares, shares_without
from workers.telemetry import PeakAbove

WIRE_FORMATS = ("fp32", "bf16", "int8")
BACK_HEARTBEAT_S = 10.0  # a box asking back in: how often its leader tells its ranks "not yet"
BACK_WAIT_S = 24 * 3600.0  # ... and how long it asks before it gives up (the job's driver stops it when the job ends)


@dataclass(frozen=True)
class OuterConfig:
    """The job's outer-step settings (TrainConfig.outer)."""

    boxes: tuple[int, ...]  # ranks per box, in rank order: the job's config lists ranks box by box
    inner_steps: int  # H: optimizer steps each box takes between outer steps
    outer_lr: float
    outer_momentum: float  # Nesterov
    wire: str  # what a delta crosses the link as: fp32, bf16, or int8 with a scale per tensor
    bucket_elements: int = OUTER_BUCKET_ELEMENTS  # the new global weights go to a box's cards this many at a time
    caps: tuple[int, ...] = ()  # every rank's largest micro-batch (the plan's): the boxes left take a lost box's share within them
    planned: tuple[int, ...] = ()  # every rank's micro-batch in the plan: where a box that comes back starts again from

    @classmethod
    def from_dict(cls, raw: dict) -> OuterConfig:
        config = cls(tuple(raw["boxes"]), int(raw["inner_steps"]), float(raw["outer_lr"]), float(raw["outer_momentum"]), raw["wire"],
                     int(raw["bucket_elements"]), tuple(raw.get("caps", ())), tuple(raw.get("planned", ())))
        if config.wire not in WIRE_FORMATS:
            raise ValueError(f"outer.wire: {config.wire!r} is not one of {', '.join(WIRE_FORMATS)}")
        if config.inner_steps < 1:
            raise ValueError(f"outer.inner_steps: {config.inner_steps} must be at least 1")
        return config


@dataclass(frozen=True)
class Met:
    """What an outer step told every rank of every box."""

    stop: bool  # a box was asked to stop (the scheduler moves the job): every box stops here
    split: tuple[int, ...] | None = None  # the job's split from the next step on, the boxes' shares corrected; or None
    shares: BoxShares | None = None  # why (box 0's leader records it)
    left: tuple[int, ...] = ()  # boxes lost since the last outer step, left out from here on (known to the leaders)
    back: tuple[int, ...] = ()  # boxes let back in at this outer step, training from the next step on (known to the leaders)
    since: int = 0  # the first step since the last outer step: a box lost took its share of the steps from here with it


@dataclass(frozen=True)
class Back:
    """What a box let back in learns at its outer step (the same on each of its ranks)."""

    step: int  # the outer step's: it trains on from the next
    split: tuple[int, ...]  # the job's split from there (every box's)
    stop: bool  # a box asked to stop at this outer step (the scheduler moves the job): it stops with the others, training nothing


class BoxesLost(RuntimeError):
    """Boxes were lost and those left cannot hold the global batch within their cards' memory: the job is placed
    again (its failure reads as a lost node, which the scheduler restarts)."""


class BoxSplits:
    """The job's split after a meeting of the box leaders, decided alike on every leader from the same headers (each
    box's: loss tokens, stop, measured inner seconds and steps, its ranks' micro-batches): the plan's when boxes come
    back, the survivors' when boxes were lost, the boxes' shares corrected from their measured inner steps, or none."""

    def __init__(self, config: OuterConfig, rebalance: bool):
        self.config, self.rebalance = config, rebalance

    def left(self, split: tuple[int, ...], heads: dict[int, torch.Tensor], back: tuple[int, ...]) -> tuple[int, ...]:
        """The boxes lost since the last outer step: not met, or met as a box let back in (its share since then went
        untrained), of those that still had a share (one lost earlier has none)."""
        firsts = first_ranks(self.config.boxes)
        return tuple(b for b, n in enumerate(self.config.boxes)
                     if (b not in heads or b in back) and any(split[firsts[b]: firsts[b] + n]))

    def after(self, step: int, split: tuple[int, ...], heads: dict[int, torch.Tensor], back: tuple[int, ...],
              left: tuple[int, ...], last: bool) -> tuple[tuple[int, ...] | None, BoxShares | None]:
        """The new split (None: keep it) and, where the boxes' shares were corrected, why. After the job's last step
        no split runs: a box lost there changes nothing (its share of those steps went untrained, and the boxes left
        need not hold the batch)."""
        if back:
            return self.with_back(heads), None
        if last:
            return None, None
        if left:
            return self.without(split, heads), None
        shares = self.shares(step, heads)
        return (shares.new, shares) if shares else (None, None)

    def with_back(self, heads: dict[int, torch.Tensor]) -> tuple[int, ...]:
        """The split once boxes came back: the plan's, over the boxes that met (with one still lost, its share spread
        over the others by the plan's shares, within their caps); each box's own tuning starts again from it."""
        if len(heads) == len(self.config.boxes):
            return self.config.planned
        return self._over_met(self.config.planned, heads, (0.0,) * len(self.config.boxes))

    def without(self, split: tuple[int, ...], heads: dict[int, torch.Tensor]) -> tuple[int, ...]:
        """The split with the boxes lost out, their share of every global batch on the boxes that met, by their
        measured inner steps."""
        return self._over_met(split, heads, self._seconds_a_step(heads))

    def _seconds_a_step(self, heads: dict[int, torch.Tensor]) -> tuple[float, ...]:
        """Each box's measured inner step (its header's seconds over its steps); 0 for a box not met or not measured."""
        return tuple(float(heads[b][2]) / int(heads[b][3]) if b in heads and int(heads[b][3]) else 0.0 for b in range(len(self.config.boxes)))

    def _over_met(self, split: tuple[int, ...], heads: dict[int, torch.Tensor], box_s: tuple[float, ...]) -> tuple[int, ...]:
        """`split`'s global batch over the boxes that met alone (rebalance.shares_without); BoxesLost where they
        cannot hold it within the plan's caps."""
        gone = set(range(len(self.config.boxes))) - set(heads)
        new = shares_without(split, self.config.boxes, gone, box_s, self.config.caps) if self.config.caps else None
        if new is None:
            held = "the plan's caps " + str(list(self.config.caps)) if self.config.caps else "no caps (the run has none)"
            raise BoxesLost(f"box(es) {sorted(gone)} are out of the job and the boxes that met cannot take their share of the global "
                            f"batch of {sum(split)} samples a micro-step within {held}: the job is placed again from its last checkpoint")
        return new

    def shares(self, step: int, heads: dict[int, torch.Tensor]) -> BoxShares | None:
        """The boxes' new shares from their measured inner steps; None to keep them. A box out of the job (lost, not
        back) has no share and none is given to it."""
        boxes = self.config.boxes
        if not self.rebalance or min(int(h[3]) for h in heads.values()) < BOX_WINDOW_STEPS:
            return None
        now = tuple(int(v) for b, n in enumerate(boxes) for v in (heads[b][4: 4 + n].tolist() if b in heads else [0] * n))  # each box's own slice
        box_s = self._seconds_a_step(heads)
        found = box_shares(now, boxes, box_s, self.config.caps)
        if not found:
            return None
        new, per_sample, predicted = found
        return BoxShares(step + 1, now, new, per_sample, box_s, predicted)


class OuterSteps:
    """One rank's part in the outer steps; the box leader's holds the global weights, the momentum and the link."""

    def __init__(self, config: OuterConfig, params: list[torch.nn.Parameter], comm: RankComm, link: BoxLink | None,
                 rebalance: bool = False, lost: Callable[[], dict[int, int]] = dict, fault: Callable[[str], None] = lambda at: None):
        """`rebalance`: the boxes' shares follow their measured inner steps; `lost()`: the boxes whose processes the
        job's driver saw die, each with the life of it lost (box 0's leader asks, while it waits for the boxes at an
        outer step); `fault`: test-only (workers/faults.py), told "exchange-<step>" before a leader's exchange."""
        self.config, self.params, self.comm, self.link, self.lost, self.fault = config, params, comm, link, lost, fault
        self.shapes = [tuple(getattr(p, "ds_shape", p.shape)) for p in params]  # (ZeRO-3: whole; the tensor holds a slice)
        self.splits = BoxSplits(config, rebalance and bool(config.caps))
        self.since = 0  # the first step since the last outer step
        self.measured_s, self.measured_steps, self.measured_from = 0.0, 0, WARMUP_STEPS  # this box's inner steps since a change
        self.tokens_since = 0.0  # loss tokens this box trained on since the last outer step
        self.done = 0  # outer steps taken
        self.exchange_s = 0.0  # a leader's time sending and receiving deltas across the link (the boxes already met)
        self.peak_bytes: int | None = None  # the most memory an outer step held above what the rank held before it (measured)
        self.stop_wanted = False  # this box was asked to stop (the scheduler moves the job): at the next outer step
        self.global_weights: list[torch.Tensor] = []  # the leader's, in host RAM
        self._read(lambda i, weight: self.global_weights.append(weight))  # every rank: collectives inside the box
        self.momentum = [w.new_zeros(w.shape) for w in self.global_weights]

    @property
    def numel(self) -> int:
        return sum(_numel(s) for s in self.shapes)

    def join(self, start_step: int, saved: dict | None) -> int:
        """Every box starts where box 0 does (the only box that reads checkpoints): its step and, resuming, the
        global weights and the outer momentum it saved. The other boxes' inner optimizer states start afresh. Returns
        the step to start from."""
        import torch

        head = self.comm.zeros(2, torch.float64)  # box 0's (start step, outer steps done)
        if self.link:
            mine = torch.tensor([start_step, saved["outer_steps"] if saved else 0], dtype=torch.float64, device="cpu")
            head.copy_(self.link.exchange(mine)[0].to(head.device))
        start, self.done = (int(v) for v in self.comm.broadcast(head).tolist())
        self.measured_from, self.since = start + WARMUP_STEPS, start + 1
        if start == 0:
            return 0
        if self.link:
            if self.link.box == 0 and saved:  # (a checkpoint of a synchronous run: the momentum starts at zero)
                self.momentum = [m.to("cpu", torch.float32) for m in saved["momentum"]]
            state = self._state()
            self._take_state(self.link.exchange(state if self.link.box == 0 else torch.zeros_like(state))[0])
        self._load_global()
        return start

    def come_back(self, heartbeat_s: float = BACK_HEARTBEAT_S) -> Back:
        """Every rank of a box started again after it was lost: its leader waits until box 0's leader lets it back in
        at an outer step (telling its ranks "not yet" every `heartbeat_s`, so that no collective of the box waits out
        its timeout), meets with an empty delta (no tokens: it weighs nothing), and takes the step, the global
        weights and the outer momentum from box 0; every rank loads them. Its inner optimizer state starts afresh."""
        import torch

        deadline = time.monotonic() + BACK_WAIT_S
        let_in = self.comm.zeros(1, torch.float32)
        while not let_in.item():
            if time.monotonic() > deadline:
                raise RuntimeError(f"box {self.link.box if self.link else '?'} asked back in for {BACK_WAIT_S:.0f} s and was never let in")
            if self.comm.rank == 0:
                let_in[0] = float(self.link.let_in(heartbeat_s))
            self.comm.broadcast(let_in)
        control = self.comm.zeros(3 + len(self.config.planned), torch.float64)  # (step, outer steps done, stop, the new split)
        if self.comm.rank == 0:
            payload = Payload([w.shape for w in self.global_weights], self.config.wire)
            payload.buffer.zero_()
            heads, _ = self.link.meet(torch.zeros(header_bytes(list(self.config.boxes)) // 8, dtype=torch.float64, device="cpu"), self.lost)
            self.link.exchange(payload.buffer)  # (the others' outer step: this box's delta weighs nothing)
            control[:3] = self.link.receive(torch.zeros(3, dtype=torch.float64, device="cpu"), 0).to(control.device)
            self._take_state(self.link.receive(torch.zeros_like(self._state()), 0))
            control[3:] = torch.tensor(self.splits.with_back(heads), dtype=torch.float64, device=control.device)
        self.comm.broadcast(control)
        self._load_global()
        start, self.done = int(control[0].item()), int(control[1].item())
        self.measured_from, self.since = start + WARMUP_STEPS, start + 1
        return Back(start, tuple(int(v) for v in control[3:].tolist()), bool(control[2].item()))

    def _state(self) -> torch.Tensor:
        """The leader's global weights and outer momentum, flat in fp32 (what a box joining the job takes)."""
        import torch

        return torch.cat([t.reshape(-1) for t in (*self.global_weights, *self.momentum)])

    def _take_state(self, state: torch.Tensor) -> None:
        shapes = [w.shape for w in self.global_weights]
        self.global_weights = [t.clone() for t in _split(state[: self.numel], shapes)]
        self.momentum = [t.clone() for t in _split(state[self.numel:], shapes)]

    def saved(self) -> dict:
        """What a checkpoint keeps of the outer steps (a leader's; the global weights are the model's own at an
        outer step, when checkpoints are taken)."""
        return {"outer_steps": self.done, "momentum": self.momentum}

    def after_step(self, step: int, box_loss_tokens: float, last: bool, stop: bool, inner_s: float,
                   split: tuple[int, ...]) -> Met | None:
        """Count the step's tokens and (after warm-up) this box's inner step, `inner_s`; every `inner_steps` steps,
        after the last, or once a stop is asked (on any box, known to all at the next outer step), take an outer
        step at the job's `split` (every rank's micro-batch, box by box). None when no outer step was taken."""
        self.tokens_since += box_loss_tokens
        self.stop_wanted = self.stop_wanted or stop
        if step > self.measured_from:
            self.measured_s, self.measured_steps = self.measured_s + inner_s, self.measured_steps + 1
        if step % self.config.inner_steps and not last:
            return None
        return self.outer_step(step, split, last)

    def outer_step(self, step: int, split: tuple[int, ...], last: bool = False) -> Met:
        """One outer step: the new global weights, whether a box asked to stop, and the boxes' shares of the global
        batch corrected from their measured inner steps (`rebalance.box_shares`) when that is worth it, or given to
        the boxes left when a box was lost (`rebalance.shares_without`)."""
        with PeakAbove(self.comm.on_gpu) as peak:
            met = self._outer_step(step, split, last)
        if peak.bytes is not None:
            self.peak_bytes = max(self.peak_bytes or 0, peak.bytes)
        return met

    def _outer_step(self, step: int, split: tuple[int, ...], last: bool) -> Met:
        import torch

        payload = Payload([w.shape for w in self.global_weights], self.config.wire) if self.comm.rank == 0 else None
        self._read(lambda i, weight: payload.put(i, self.global_weights[i] - weight))  # the leader's delta, global - local
        control = self.comm.zeros(1 + len(split), torch.float32)  # whether a box asked to stop, the new split
        shares, left, back, new = None, (), (), None
        if self.comm.rank == 0:
            heads, back = self._meet(step, payload, split, last)
            left = self.splits.left(split, heads, back)
            control[0] = float(any(bool(h[1]) for h in heads.values()))
            if back:
                self._hand_over(step, back, stop=bool(control[0]))
            new, shares = self.splits.after(step, split, heads, back, left, last)
            if new:
                control[1:] = torch.tensor(new, dtype=torch.float32, device=control.device)
        self.comm.broadcast(control)
        self._load_global()
        since, self.since = self.since, step + 1
        self.tokens_since, self.done = 0.0, self.done + 1
        new = tuple(int(v) for v in control[1:].tolist())
        if any(new):
            self.split_changed(step + 1)
        return Met(bool(control[0].item()), new if any(new) else None, shares, left=left, back=back, since=since)

    def _hand_over(self, step: int, back: tuple[int, ...], stop: bool) -> None:
        """Box 0's leader: the step, the outer steps done, whether the job stops here (a box asked to stop at this
        outer step: the box let in stops with the others) and the global state, to each box let back in."""
        import torch

        if self.link.box == 0:
            for box in back:
                self.link.send(torch.tensor([step, self.done + 1, float(stop)], dtype=torch.float64, device="cpu"), box)
                self.link.send(self._state(), box)

    def split_changed(self, step: int) -> None:
        """The box runs another split from `step` on: its inner steps are measured afresh (that step warms up)."""
        self.measured_s, self.measured_steps, self.measured_from = 0.0, 0, step

    def _read(self, each) -> None:
        """Every rank: each trained weight read whole in fp32, one at a time (DeepSpeed's accessor, a collective
        inside the box), so a card holds one weight in fp32 at a time; the leader hands each to `each(index, weight)`
        in host RAM."""
        import torch
        from deepspeed.utils import safe_get_full_fp32_param

        for i, param in enumerate(self.params):
            whole = safe_get_full_fp32_param(param)
            if self.comm.rank == 0:
                each(i, whole.detach().to("cpu", torch.float32, copy=True))
            del whole

    def _load_global(self) -> None:
        """Every rank: the leader's global weights, broadcast inside the box a bucket at a time (bucket_elements, or
        one larger weight alone) and loaded; a card holds one bucket of them at a time."""
        for bucket in buckets([_numel(s) for s in self.shapes], self.config.bucket_elements):
            self._load_bucket(bucket)  # (a call each: the bucket is freed before the next one is made)

    def _load_bucket(self, bucket: list[int]) -> None:
        import torch

        sizes = [_numel(self.shapes[i]) for i in bucket]
        flat = self.comm.zeros(sum(sizes), torch.float32)
        if self.comm.rank == 0:
            for i, part in zip(bucket, flat.split(sizes)):
                part.copy_(self.global_weights[i].reshape(-1))
        self.comm.broadcast(flat)
        for i, part in zip(bucket, flat.split(sizes)):
            _set_full_fp32(self.params[i], part.view(self.shapes[i]), self.comm.rank)

    def _meet(self, step: int, payload: Payload, split: tuple[int, ...], last: bool) -> tuple[dict[int, torch.Tensor], tuple[int, ...]]:
        """The leaders' part: every box's header (its loss tokens, its wish to stop, its measured inner steps (seconds,
        count) and its own cards' split), then every box's delta (one exchange across boxes), and the outer step
        on the global weights, the deltas weighted by the loss tokens each box trained on, one weight at a time.
        A box lost since the last meeting is not waited for (BoxLink.meet): its delta is left out, and so are the
        samples it trained on since then, as are those of a box lost during the exchange (BoxLink.exchange: the
        boxes left exchange again); a box let back in brings an empty delta. Returns the headers of the boxes that met, by box, and the
        boxes let back in."""
        import torch

        first = first_ranks(self.config.boxes)[self.link.box]
        mine = split[first: first + self.config.boxes[self.link.box]]
        head = [self.tokens_since, float(self.stop_wanted), self.measured_s, float(self.measured_steps), *mine]
        head += [0.0] * (header_bytes(list(self.config.boxes)) // 8 - len(head))  # every box's header the same length
        heads, back = self.link.meet(torch.tensor(head, dtype=torch.float64, device="cpu"), self.lost, let_in=not last)
        self.fault(f"exchange-{step}")
        started = time.perf_counter()  # (the meeting above waited for the slowest box: this exchange is the link's)
        payloads = self.link.exchange(payload.buffer, self.lost)  # (in box order, as the headers)
        self.exchange_s += time.perf_counter() - started
        # a box lost during the exchange (the others exchanged again without it) is out, as one lost before the meeting
        heads, back = {b: h for b, h in heads.items() if b in self.link.members}, tuple(b for b in back if b in self.link.members)
        total = sum(float(h[0]) for h in heads.values())
        for i in range(len(self.global_weights)):
            combined = sum(payload.read(sent, i) * (float(h[0]) / total) for h, sent in zip(heads.values(), payloads))
            self._nesterov(i, combined)
        return heads, back

    def _nesterov(self, i: int, delta: torch.Tensor) -> None:
        """Outer SGD with Nesterov momentum on global weight `i`, the combined delta as its gradient (as
        torch.optim.SGD(nesterov=True) steps)."""
        mu, lr = self.config.outer_momentum, self.config.outer_lr
        weight, buf = self.global_weights[i], self.momentum[i]
        buf.mul_(mu).add_(delta)
        weight.sub_(delta.add(buf, alpha=mu), alpha=lr)


def _set_full_fp32(param: torch.nn.Parameter, value: torch.Tensor, rank: int) -> None:
    """DeepSpeed's fp32 master copy (the optimizer steps from it) and the model's weight (the forward reads it); under
    ZeRO-3, this rank's slice of each (`rank`: in the box's world)."""
    import torch
    from deepspeed.utils import safe_set_full_fp32_param

    if hasattr(param, "ds_id"):
        return _set_zero3_partitions(param, value, rank)
    safe_set_full_fp32_param(param, value)
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _set_zero3_partitions(param: torch.nn.Parameter, value: torch.Tensor, rank: int) -> None:
    """ZeRO-3 keeps on each rank one slice of the flattened weight, the last padded: its 16-bit slice (ds_tensor, what
    the forward gathers; and the whole weight, for the small ones it keeps gathered) and its fp32 master slice.
    DeepSpeed's safe_set_full_fp32_param narrows the value to a whole slice and would fail on the padded one (0.19), so
    both slices are written here, where DeepSpeed partitions them (partition_parameters: start = slice size x the
    rank in the weight's group, the box's world: `rank`)."""
    import torch

    optimizer = param._z3_optimizer
    master, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
    start = param.ds_tensor.ds_numel * rank
    count = max(0, min(param.ds_tensor.ds_numel, param.ds_numel - start))
    mine = value.reshape(-1).narrow(0, start, count)
    with torch.no_grad():
        master.narrow(0, 0, count).copy_(mine)
        param.ds_tensor.narrow(0, 0, count).copy_(mine)
        if param.data.numel():  # a small weight ZeRO-3 keeps whole on every rank (ds_persist): the forward reads it there
            param.data.copy_(value.view(param.ds_shape))


class Payload:
    """A box's delta as it crosses the link, written one weight at a time (the whole delta is never held in fp32
    beside it): fp32; or bytes (gloo has no 16-bit integer or bf16 type, and moves bytes as they are): bf16, or int8
    with one fp32 scale per weight (its largest magnitude over 127), the scales first."""

    def __init__(self, shapes: list, wire: str):
        import torch

        self.shapes, self.wire = shapes, wire
        sizes = [_numel(s) for s in shapes]
        self.offsets = [0, *itertools.accumulate(sizes)]
        n, count = self.offsets[-1], len(shapes)
        if wire == "fp32":
            self.buffer = torch.empty(n, dtype=torch.float32, device="cpu")
        elif wire == "bf16":
            self.buffer = torch.empty(n, dtype=torch.bfloat16, device="cpu").view(torch.uint8)
        else:
            self.buffer = torch.empty(4 * count + n, dtype=torch.uint8, device="cpu")
        self._scales, self._values = self._parts(self.buffer)

    def _parts(self, buffer: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        import torch

        if self.wire == "fp32":
            return None, buffer
        if self.wire == "bf16":
            return None, buffer.view(torch.bfloat16)
        count = len(self.shapes)
        return buffer[: 4 * count].view(torch.float32), buffer[4 * count:].view(torch.int8)

    def put(self, i: int, tensor: torch.Tensor) -> None:
        values = self._values[self.offsets[i]: self.offsets[i + 1]]
        if self.wire != "int8":
            values.copy_(tensor.reshape(-1))
            return
        scale = tensor.abs().max().clamp(min=1e-30) / 127
        self._scales[i] = scale
        values.copy_((tensor.reshape(-1) / scale).round().clamp(-127, 127))

    def read(self, buffer: torch.Tensor, i: int) -> torch.Tensor:
        """Weight `i` of a payload in this layout (another box's, as received), in fp32."""
        import torch

        scales, values = self._parts(buffer)
        part = values[self.offsets[i]: self.offsets[i + 1]].to(torch.float32)
        return (part * scales[i] if scales is not None else part).view(self.shapes[i])


def buckets(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive indices grouped so that each group's sizes sum to at most `limit` (a larger one alone)."""
    groups: list[list[int]] = []
    total = limit + 1
    for i, size in enumerate(sizes):
        if total + size > limit:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def _split(flat: torch.Tensor, shapes: list) -> list[torch.Tensor]:
    import torch

    return [part.view(shape) for part, shape in zip(torch.split(flat, [_numel(s) for s in shapes]), shapes)]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
