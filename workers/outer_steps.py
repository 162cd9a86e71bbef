"""Outer steps across boxes: DeepSpeed ZeRO inside each box, DiLoCo's outer step between boxes (Douillard et al.,
arXiv 2311.08105), so a job can span boxes joined by 1 GbE without moving gradients across it every step.

Each box is a DeepSpeed world of its own and trains on its share of every global batch for `inner_steps` (H)
optimizer steps. Then, on every rank of every box at once:
  1. each rank reads its full fp32 weights (DeepSpeed's safe_get_full_fp32_param: a collective inside the box);
  2. the box's leader (its rank 0) takes the box's delta from the global weights, global - local, in fp32, and
     sends it in the wire format with the loss tokens the box trained on since the last outer step;
  3. every leader combines the deltas weighted by those tokens and takes an outer Nesterov SGD step on the global
     weights, which it keeps in host RAM with the outer momentum (8 bytes a trained parameter);
  4. the leader broadcasts the new global weights inside its box, and every rank loads them into DeepSpeed's fp32
     master weights and into the model's own.
Weighting by tokens makes the combination exact for boxes of unequal batch: with inner SGD, H = 1, outer lr 1 and
no momentum, the result is one synchronous data-parallel step on the whole global batch (tests/test_outer_steps.py).
The inner optimizer's state (Adam's moments) stays in each box, as in DiLoCo.

Checkpoints are taken at outer steps, where every box holds the global weights: box 0 saves its DeepSpeed
checkpoint with the outer momentum beside it (one manifest); a resumed job's box 0 loads it (through the universal
form on another number of cards) and the other boxes take the weights and momentum from it over the link, their
inner optimizer states starting afresh. A stop the scheduler asks for (a move) takes effect at the next outer step,
on every box at once. ZeRO-1 and 2 only for now: every rank holds the whole model, which step 4 writes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from workers.collectives import BoxLink, RankComm

from orchestrator.planner.outer import header_bytes
from workers.collectives import first_ranks
from workers.rebalance import BOX_WINDOW_STEPS, WARMUP_STEPS, BoxShares, box_shares

WIRE_FORMATS = ("fp32", "bf16", "int8")


@dataclass(frozen=True)
class OuterConfig:
    """The job's outer-step settings (TrainConfig.outer)."""

    boxes: tuple[int, ...]  # ranks per box, in rank order: the job's config lists ranks box by box
    inner_steps: int  # H: optimizer steps each box takes between outer steps
    outer_lr: float
    outer_momentum: float  # Nesterov
    wire: str  # what a delta crosses the link as: fp32, bf16, or int8 with a scale per tensor

    @classmethod
    def from_dict(cls, raw: dict) -> OuterConfig:
        config = cls(tuple(raw["boxes"]), int(raw["inner_steps"]), float(raw["outer_lr"]), float(raw["outer_momentum"]), raw["wire"])
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


class OuterSteps:
    """One rank's part in the outer steps; the box leader's holds the global weights, the momentum and the link."""

    def __init__(self, config: OuterConfig, params: list[torch.nn.Parameter], comm: RankComm, link: BoxLink | None,
                 caps: tuple[int, ...] = ()):
        self.config, self.params, self.comm, self.link = config, params, comm, link
        self.caps = caps  # every rank's micro-batch cap; empty: the boxes' shares stay as planned
        self.measured_s, self.measured_steps, self.measured_from = 0.0, 0, WARMUP_STEPS  # this box's inner steps since a change
        self.tokens_since = 0.0  # loss tokens this box trained on since the last outer step
        self.done = 0  # outer steps taken
        self.exchange_s = 0.0  # a leader's time sending and receiving deltas across the link (the boxes already met)
        self.stop_wanted = False  # this box was asked to stop (the scheduler moves the job): at the next outer step
        local = self._local_fp32()  # every rank: a collective inside the box
        self.global_weights = [t.to("cpu", copy=True) for t in local] if comm.rank == 0 else []
        self.momentum = [w.new_zeros(w.shape) for w in self.global_weights]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

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
        self.measured_from = start + WARMUP_STEPS
        if start == 0:
            return 0
        flat = self.comm.zeros(self.numel, torch.float32)
        if self.link:
            if self.link.box == 0 and saved:  # (a checkpoint of a synchronous run: the momentum starts at zero)
                self.momentum = [m.to("cpu", torch.float32) for m in saved["momentum"]]
            state = torch.cat([t.reshape(-1) for t in (*self.global_weights, *self.momentum)])
            state = self.link.exchange(state if self.link.box == 0 else torch.zeros_like(state))[0]
            weights, momentum = state[: self.numel], state[self.numel:]
            shapes = [w.shape for w in self.global_weights]
            self.global_weights = [t.clone() for t in _split(weights, shapes)]
            self.momentum = [t.clone() for t in _split(momentum, shapes)]
            flat.copy_(weights.to(flat.device))
        self._load(self.comm.broadcast(flat))
        return start

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
        return self.outer_step(step, split)

    def outer_step(self, step: int, split: tuple[int, ...]) -> Met:
        """One outer step: the new global weights, whether a box asked to stop, and the boxes' shares of the global
        batch corrected from their measured inner steps (`rebalance.box_shares`) when that is worth it."""
        import torch

        local = self._local_fp32()
        flat = self.comm.zeros(self.numel + 1 + len(split), torch.float32)  # the new global weights, the stop flag, the split
        shares = None
        if self.comm.rank == 0:
            delta = [g - t.to("cpu") for g, t in zip(self.global_weights, local)]
            combined, heads = self._combine(delta, split)
            self._nesterov(combined)
            shares = self._shares(step, heads)
            flat[: self.numel].copy_(torch.cat([w.reshape(-1) for w in self.global_weights]).to(flat.device))
            flat[self.numel] = float(any(bool(h[1]) for h in heads))
            if shares:
                flat[self.numel + 1:] = torch.tensor(shares.new, dtype=torch.float32, device=flat.device)
        self.comm.broadcast(flat)
        self._load(flat[: self.numel])
        self.tokens_since, self.done = 0.0, self.done + 1
        new = tuple(int(v) for v in flat[self.numel + 1:].tolist())
        if any(new):
            self.split_changed(step + 1)
        return Met(bool(flat[self.numel].item()), new if any(new) else None, shares)

    def split_changed(self, step: int) -> None:
        """The box runs another split from `step` on: its inner steps are measured afresh (that step warms up)."""
        self.measured_s, self.measured_steps, self.measured_from = 0.0, 0, step

    def _shares(self, step: int, heads: list[torch.Tensor]) -> BoxShares | None:
        """The boxes' new shares, the same on every leader (from the same headers); None to keep them."""
        steps = min(int(h[3]) for h in heads)
        if not self.caps or steps < BOX_WINDOW_STEPS:
            return None
        boxes = self.config.boxes
        now = tuple(int(v) for h, n in zip(heads, boxes) for v in h[4: 4 + n].tolist())  # each box's own slice, as it runs
        box_s = tuple(float(h[2]) / int(h[3]) for h in heads)
        found = box_shares(now, boxes, box_s, self.caps)
        if not found:
            return None
        new, per_sample, predicted = found
        return BoxShares(step + 1, now, new, per_sample, box_s, predicted)

    def _load(self, flat: torch.Tensor) -> None:
        offset = 0
        for param in self.params:
            _set_full_fp32(param, flat[offset: offset + param.numel()].view_as(param))
            offset += param.numel()

    def _combine(self, delta: list[torch.Tensor], split: tuple[int, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every box's delta, weighted by the loss tokens it trained on, and every box's header: its loss tokens, its
        wish to stop, its measured inner steps (seconds, count) and its own cards' split (one exchange across boxes
        each for the headers and for the payload)."""
        import torch

        first = first_ranks(self.config.boxes)[self.link.box]
        mine = split[first: first + self.config.boxes[self.link.box]]
        head = [self.tokens_since, float(self.stop_wanted), self.measured_s, float(self.measured_steps), *mine]
        head += [0.0] * (header_bytes(list(self.config.boxes)) // 8 - len(head))  # every box's header the same length
        heads = self.link.exchange(torch.tensor(head, dtype=torch.float64, device="cpu"))
        mine = encode(delta, self.config.wire)
        started = time.perf_counter()  # (the small exchange above waited for the slowest box: this one is the link's)
        payload = self.link.exchange(mine)
        self.exchange_s += time.perf_counter() - started
        total = sum(float(h[0]) for h in heads)
        shapes = [d.shape for d in delta]
        out = [torch.zeros(s, dtype=torch.float32, device="cpu") for s in shapes]
        for head, sent in zip(heads, payload):
            for acc, part in zip(out, decode(sent, shapes, self.config.wire)):
                acc.add_(part, alpha=float(head[0]) / total)
        return out, heads

    def _nesterov(self, delta: list[torch.Tensor]) -> None:
        """Outer SGD with Nesterov momentum on the global weights, the combined delta as the gradient (as
        torch.optim.SGD(nesterov=True) steps)."""
        mu, lr = self.config.outer_momentum, self.config.outer_lr
        for weight, buf, grad in zip(self.global_weights, self.momentum, delta):
            buf.mul_(mu).add_(grad)
            weight.sub_(grad.add(buf, alpha=mu), alpha=lr)

    def _local_fp32(self) -> list[torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        return [safe_get_full_fp32_param(p).detach().float() for p in self.params]


def _set_full_fp32(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """DeepSpeed's fp32 master copy (the optimizer steps from it) and the model's weight (the forward reads it)."""
    import torch
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(param, value)
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def encode(tensors: list[torch.Tensor], wire: str) -> torch.Tensor:
    """Tensors as one flat payload: fp32; or bytes (gloo has no 16-bit integer or bf16 type, and moves bytes as they
    are): bf16, or int8 with one fp32 scale per tensor (its largest magnitude over 127), the scales first."""
    import torch

    flat = torch.cat([t.reshape(-1) for t in tensors])
    if wire == "fp32":
        return flat
    if wire == "bf16":
        return flat.to(torch.bfloat16).view(torch.uint8)
    scales = torch.stack([t.abs().max().clamp(min=1e-30) / 127 for t in tensors])
    q = torch.cat([(t.reshape(-1) / s).round().clamp(-127, 127) for t, s in zip(tensors, scales)]).to(torch.int8)
    return torch.cat([scales.view(torch.uint8), q.view(torch.uint8)])


def decode(payload: torch.Tensor, shapes: list, wire: str) -> list[torch.Tensor]:
    import torch

    if wire == "fp32":
        flat = payload
    elif wire == "bf16":
        flat = payload.view(torch.bfloat16).float()
    else:
        n = len(shapes)
        scales = payload[: 4 * n].view(torch.float32)
        q = payload[4 * n:].view(torch.int8).float()
        sizes = [_numel(s) for s in shapes]
        flat = torch.cat([part * s for part, s in zip(torch.split(q, sizes), scales)])
    return _split(flat, shapes)


def _split(flat: torch.Tensor, shapes: list) -> list[torch.Tensor]:
    import torch

    return [part.view(shape) for part, shape in zip(torch.split(flat, [_numel(s) for s in shapes]), shapes)]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
