"""What a rank reports while it trains.

Once per optimizer step every rank contributes its own figures (tokens, step time, time inside gradient
reduction, memory) to one all-reduce, so every rank then knows every card's step. From that:
  - a `StepStats` record per step: rank 0 keeps the run's history (the report's data) and hands it to the
    experiment trackers (workers/tracking.py);
  - inside a Ray cluster, each rank exports its own card's figures as Ray metrics (Prometheus, the Ray
    dashboard, Grafana), labelled by job, rank, node and card.
The fastest rank's reduction is pure communication; the rest of a rank's reduction time is waiting for a
slower card.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

# Ray metrics every rank exports (Ray prefixes each name with "ray_"). monitoring/grafana-dashboard.json
# queries these names; tests/test_observability.py checks that they match.
RANK_METRICS = {
    "zeromix_loss": "Mean token loss of the last optimizer step (the whole global batch).",
    "zeromix_step": "Optimizer steps done.",
    "zeromix_tokens_per_s": "Tokens this card processed per second in the last step.",
    "zeromix_step_time_s": "Seconds of the last optimizer step on this card.",
    "zeromix_compute_s": "Seconds of the last step this card computed (step time less reduction).",
    "zeromix_wait_s": "Seconds of the last step this card waited for slower cards inside gradient reduction.",
    "zeromix_comm_s": "Seconds of the last step spent in gradient reduction by the fastest card (communication).",
    "zeromix_memory_bytes": "Memory in use: torch's allocated bytes on a GPU, the process's RSS on CPU.",
    "zeromix_memory_peak_bytes": "Peak memory so far: torch's max allocated on a GPU, the process's max RSS on CPU.",
    "zeromix_predicted_step_time_s": "The plan's estimated optimizer-step time (an estimate).",
    "zeromix_micro_batch": "Samples this card takes per micro-step now (the self-correcting split moves it).",
}
RANK_TAGS = ("job_id", "rank", "node", "card", "model")  # not "job": Prometheus keeps that label for its scrape job


@dataclass(frozen=True)
class StepStats:
    """One optimizer step, per rank (index = rank). The same on every rank."""

    step: int
    loss: float
    lr: float
    tokens: tuple[int, ...]
    step_time_s: tuple[float, ...]
    reduce_s: tuple[float, ...]
    memory_bytes: tuple[int, ...]
    peak_memory_bytes: tuple[int, ...]
    split: tuple[int, ...]  # each card's micro-batch in this step
    next_split: tuple[int, ...] = ()  # rank 0's correction of the split (workers/rebalance.py), for every rank to switch to; () if none
    stop: bool = False  # rank 0 was asked to stop here (the scheduler moves the job): every rank saves a checkpoint and stops
    job_tokens: int = 0  # with outer steps, the whole global batch's tokens, every box's (these ranks are one box); else 0

    @property
    def comm_s(self) -> float:
        return min(self.reduce_s)

    @property
    def wait_s(self) -> tuple[float, ...]:
        return tuple(r - self.comm_s for r in self.reduce_s)

    @property
    def compute_s(self) -> tuple[float, ...]:
        return tuple(max(0.0, t - r) for t, r in zip(self.step_time_s, self.reduce_s))

    @property
    def tokens_per_s(self) -> float:
        """The whole job's: every card's tokens over the step's time (the slowest card's). With outer steps, every
        box's cards': the boxes take their shares of each global batch side by side and meet every H steps, where the
        faster box waits, so over H steps one box's time is the job's."""
        return (self.job_tokens or sum(self.tokens)) / max(self.step_time_s)

    def card_tokens_per_s(self, rank: int) -> float:
        return self.tokens[rank] / self.step_time_s[rank] if self.step_time_s[rank] else 0.0

    def record(self) -> dict:
        """A JSON line of the job's history."""
        return {**asdict(self), "tokens_per_s": round(self.tokens_per_s, 1), "comm_s": self.comm_s,
                "wait_s": list(self.wait_s), "compute_s": list(self.compute_s)}


_EARLIER_PEAKS: dict[str, int] = {}  # the run's peaks from before a `PeakAbove` reset the counters


def memory_in_use(on_gpu: bool) -> tuple[int, int]:
    """(now, peak) bytes: torch's allocator on a GPU (what the planner's estimate is about), the process's
    resident set on CPU."""
    if on_gpu:
        import torch

        return torch.cuda.memory_allocated(), max(torch.cuda.max_memory_allocated(), _EARLIER_PEAKS.get("max_allocated", 0))
    import psutil

    rss = psutil.Process().memory_info().rss
    return rss, max(rss, _resident_peak(), _EARLIER_PEAKS.get("rss", 0))


def card_memory_peaks() -> dict[str, int]:
    """On a card: the peaks of torch's allocator, allocated (tensors) and reserved (what it took from the card,
    fragmentation included: what another process could not have), since the run began. Empty on CPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"max_allocated": max(torch.cuda.max_memory_allocated(), _EARLIER_PEAKS.get("max_allocated", 0)),
            "max_reserved": max(torch.cuda.max_memory_reserved(), _EARLIER_PEAKS.get("max_reserved", 0))}


class PeakAbove:
    """The most memory a stretch of code held above what the rank held when it began (`bytes`, measured): torch's
    allocator on a card; on CPU the resident set, through Linux's high-water mark, which writing 5 to
    /proc/self/clear_refs resets (`bytes` stays None where that cannot be done). The counters are reset for the
    stretch; the run's own peaks (memory_in_use, card_memory_peaks) keep what came before."""

    def __init__(self, on_gpu: bool):
        self.on_gpu, self.bytes, self._start = on_gpu, None, None

    def __enter__(self) -> PeakAbove:
        if self.on_gpu:
            import torch

            for key, peak in (("max_allocated", torch.cuda.max_memory_allocated()), ("max_reserved", torch.cuda.max_memory_reserved())):
                _EARLIER_PEAKS[key] = max(_EARLIER_PEAKS.get(key, 0), peak)
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        import psutil

        _EARLIER_PEAKS["rss"] = max(_EARLIER_PEAKS.get("rss", 0), _resident_peak())
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return self  # (not Linux, or not allowed: not measured)
        self._start = psutil.Process().memory_info().rss
        return self

    def __exit__(self, *exc) -> None:
        if self._start is None:
            return
        if self.on_gpu:
            import torch

            self.bytes = max(0, torch.cuda.max_memory_allocated() - self._start)
        else:
            self.bytes = max(0, _resident_peak() - self._start)


def _resident_peak() -> int:
    """The process's resident high-water mark (VmHWM), in bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reduce_step(comm, step: int, loss_sum: float, loss_tokens: float, lr: float, tokens: int, step_time_s: float,
                reduce_s: float, memory: tuple[int, int], split: tuple[int, ...], proposal: tuple[int, ...] = (),
                stop: bool = False, job_tokens: int = 0) -> StepStats:
    """One all-reduce of every rank's figures (and the summed token loss), on the rank's device. Rank 0's
    `proposal` (a new split) and `stop` (a request to stop after this step) ride in it: every rank learns them in
    this same collective."""
    import torch

    fields, world = 5, comm.world
    stats = comm.zeros(2 + world + fields * world, torch.float64)
    stats[0] = loss_sum
    if comm.rank == 0 and proposal:
        stats[1: 1 + world] = comm.tensor(proposal, torch.float64)
    if comm.rank == 0 and stop:
        stats[-1] = 1.0
    mine = 1 + world + fields * comm.rank
    stats[mine: mine + fields] = comm.tensor([tokens, step_time_s, reduce_s, *memory], torch.float64)
    summed = comm.sum(stats).tolist()
    per_rank = [summed[1 + world + fields * r: 1 + world + fields * (r + 1)] for r in range(world)]
    tokens_, times, reduces, used, peak = (tuple(column) for column in zip(*per_rank))
    next_split = tuple(int(n) for n in summed[1: 1 + world]) if any(summed[1: 1 + world]) else ()
    return StepStats(step, summed[0] / loss_tokens, lr, tuple(int(t) for t in tokens_), times, reduces,
                     tuple(int(u) for u in used), tuple(int(p) for p in peak), tuple(split), next_split, summed[-1] > 0, job_tokens)


class RankGauges:
    """This rank's Ray metrics; `None` from `for_rank` outside a Ray worker (local test launches, benchmarks)."""

    def __init__(self, tags: dict[str, str], predicted_step_s: float):
        from ray.util.metrics import Gauge

        self.gauges = {name: Gauge(name, description=text, tag_keys=RANK_TAGS) for name, text in RANK_METRICS.items()}
        for gauge in self.gauges.values():
            gauge.set_default_tags(tags)
        self.predicted_step_s = predicted_step_s

    @classmethod
    def for_rank(cls, job_id: str, rank: int, plan: dict) -> RankGauges | None:
        import ray

        if not ray.is_initialized() or not plan.get("ranks"):
            return None
        card = plan["ranks"][rank]
        return cls({"job_id": job_id, "rank": str(rank), "node": card["node"], "card": card["card"], "model": card["model"]},
                   plan.get("est_step_s", 0.0))

    def record(self, stats: StepStats, rank: int) -> None:
        values = {"zeromix_loss": stats.loss, "zeromix_step": stats.step, "zeromix_tokens_per_s": stats.card_tokens_per_s(rank),
                  "zeromix_step_time_s": stats.step_time_s[rank], "zeromix_compute_s": stats.compute_s[rank],
                  "zeromix_wait_s": stats.wait_s[rank], "zeromix_comm_s": stats.comm_s,
                  "zeromix_memory_bytes": stats.memory_bytes[rank], "zeromix_memory_peak_bytes": stats.peak_memory_bytes[rank],
                  # set with the others every step: set only once, at the start, it was missing from what Ray exported
                  # for a job some minutes into its run (tests/test_observability.py), so a dashboard lost the line
                  "zeromix_predicted_step_time_s": self.predicted_step_s, "zeromix_micro_batch": stats.split[rank]}
        for name, value in values.items():
            self.gauges[name].set(value)
