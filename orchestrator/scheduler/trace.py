"""Job traces for the simulator: a seeded generator and the CSV format it writes and reads.

The generator follows what public cluster traces show: Poisson arrivals, and job lengths heavy-tailed
(log-normal, as fitted to Microsoft's Philly trace: most jobs short, a few very long). The mix is a
homelab's: LoRA on 0.5B-8B models, full fine-tunes on 0.5B-3B, a few urgent and a few background jobs, and
some pinned to fp32 (an older recipe, or a loss that diverged in half precision).
Models are the configs bundled in orchestrator/data/model_configs (no weights needed to plan).
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import pydantic

from orchestrator.errors import InputError
from orchestrator.jobspec import JobSpec
from orchestrator.schema import from_validation_error

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "data" / "model_configs"

LORA_MODELS = ("qwen2.5-0.5b", "qwen3-0.6b", "llama-3.2-1b", "gemma-2-2b", "phi-3-mini-4k-instruct", "mistral-7b-v0.1", "llama-3.1-8b")
FULL_MODELS = ("qwen2.5-0.5b", "qwen3-0.6b", "llama-3.2-1b", "gemma-2-2b")
PRIORITIES = ((0, 0.8), (10, 0.1), (-10, 0.1))  # value, share
FP32_SHARE = 0.15


@dataclass(frozen=True)
class TraceJob:
    job_id: str
    arrival_s: float
    model: str  # a directory name under orchestrator/data/model_configs
    method: str
    seq_len: int
    global_batch: int
    steps: int
    gpus: int
    priority: int
    precision: str = "auto"

    def spec(self) -> JobSpec:
        """The job spec a user would have written (no files are read: the simulator plans from configs)."""
        return JobSpec.model_validate({  # LoRA adapts PEFT's default modules for the architecture
            "name": self.job_id, "model": {"path": str(MODEL_CONFIGS / self.model)},
            "dataset": {"path": "trace.jsonl", "text_field": "text"}, "method": self.method,
            "seq_len": self.seq_len, "global_batch_size": self.global_batch, "max_steps": self.steps,
            "gpus": {"count": self.gpus}, "priority": self.priority, "precision": self.precision, "output_dir": f"runs/{self.job_id}"})


def generate(n_jobs: int, jobs_per_hour: float, seed: int) -> list[TraceJob]:
    """The Poisson mix: Philly-like lengths, 70% LoRA, a few urgent and background jobs."""
    rng, jobs = random.Random(seed), []
    for i, t in _poisson(rng, n_jobs, jobs_per_hour):
        method = "lora" if rng.random() < 0.7 else "full"
        model, steps = rng.choice(LORA_MODELS if method == "lora" else FULL_MODELS), _philly_steps(rng)
        jobs.append(TraceJob(
            job_id=f"t{i:04d}", arrival_s=round(t, 1), model=model, method=method,
            seq_len=rng.choice((512, 1024, 2048)), global_batch=rng.choice((8, 16, 32)), steps=steps,
            gpus=1 if rng.random() < 0.6 else 2, priority=_priority(rng), precision="fp32" if rng.random() < FP32_SHARE else "auto"))
    return jobs


# ------------------------------------------------------------------------------------------ trace families
# Written apart from `generate`, from what homelab users describe, to judge a policy on workloads it was not
# tuned on. Each takes the load of the shipped five-card homelab; `scale` multiplies the arrival rate (and the
# burst sizes) for a pool `scale` times as large.

def bursts(n_jobs: int, seed: int, scale: float = 1.0) -> list[TraceJob]:
    """Someone sweeps hyper-parameters: every ~3 h a burst of 8-20 small LoRA jobs (0.5-1.5B, 1-4 minutes each on a
    4090 to an hour) within ten minutes, beside a stream of full fine-tunes that run for hours."""
    rng = random.Random(seed)
    jobs, t, burst_at = [], 0.0, 0.0
    while len(jobs) < n_jobs:
        burst_at += rng.expovariate(1 / (3 * 3600 / scale))
        while t < burst_at and len(jobs) < n_jobs:  # the long stream, about one every 4 hours
            t += rng.expovariate(scale / (4 * 3600))
            jobs.append(_job(rng, f"b{len(jobs):04d}", t, "full", rng.choice(FULL_MODELS), rng.randint(2000, 8000), rng.choice((1, 2)), 0))
        for _ in range(min(n_jobs - len(jobs), round(rng.randint(8, 20) * scale))):
            jobs.append(_job(rng, f"b{len(jobs):04d}", burst_at + rng.uniform(0, 600), "lora",
                             rng.choice(("qwen2.5-0.5b", "qwen3-0.6b", "llama-3.2-1b", "qwen2.5-1.5b")), rng.randint(20, 400), 1, 0))
    return sorted(jobs, key=lambda j: j.arrival_s)


def long_then_short(n_jobs: int, seed: int, scale: float = 1.0) -> list[TraceJob]:
    """Head of line: a few long full fine-tunes (many hours) submitted first, then many short jobs one to three
    minutes apart. A policy that lets the long jobs take every card, or keeps cards for them, makes the short
    ones wait for hours."""
    rng = random.Random(seed)
    n_long = max(2, round(n_jobs * 0.06))
    jobs = [_job(rng, f"h{i:04d}", i * 60.0, "full", rng.choice(FULL_MODELS), rng.randint(8000, 20000), rng.choice((1, 2)), 0)
            for i in range(n_long)]
    t = n_long * 60.0
    while len(jobs) < n_jobs:
        t += rng.uniform(60, 180) / scale
        jobs.append(_job(rng, f"h{len(jobs):04d}", t, "lora", rng.choice(LORA_MODELS[:4]), rng.randint(20, 300), 1, 0))
    return jobs


def vram_heavy(n_jobs: int, seed: int, scale: float = 1.0) -> list[TraceJob]:
    """Mostly 7-8B LoRA at long sequences, which only the 24 GB cards take, beside small jobs that fit anywhere."""
    rng, jobs = random.Random(seed), []
    for i, t in _poisson(rng, n_jobs, 4 * scale):
        big = rng.random() < 0.65
        model = rng.choice(("mistral-7b-v0.1", "llama-3.1-8b")) if big else rng.choice(LORA_MODELS[:4])
        jobs.append(_job(rng, f"v{i:04d}", t, "lora", model, _philly_steps(rng), 1, _priority(rng), seq_len=2048 if big else None))
    return jobs


def priority_mix(n_jobs: int, seed: int, scale: float = 1.0) -> list[TraceJob]:
    """A third urgent and short (priority 10), a third ordinary, a third background and long (priority -10)."""
    rng, jobs = random.Random(seed), []
    for i, t in _poisson(rng, n_jobs, 6 * scale):
        kind = rng.randrange(3)
        priority, steps = ((10, rng.randint(20, 200)), (0, _philly_steps(rng)), (-10, rng.randint(1000, 6000)))[kind]
        method = "lora" if rng.random() < 0.7 else "full"
        jobs.append(_job(rng, f"p{i:04d}", t, method, rng.choice(LORA_MODELS[:5] if method == "lora" else FULL_MODELS), steps,
                         1 if rng.random() < 0.6 else 2, priority))
    return jobs


FAMILIES = {
    "poisson-mix": lambda n, seed, scale=1.0: generate(n, 6.0 * scale, seed),
    "bursts": bursts,
    "long-then-short": long_then_short,
    "vram-heavy": vram_heavy,
    "priority-mix": priority_mix,
}


def family(name: str, n_jobs: int, seed: int, scale: float = 1.0) -> list[TraceJob]:
    if name not in FAMILIES:
        raise InputError("command line", "--family", name, f"one of {', '.join(FAMILIES)}")
    return FAMILIES[name](n_jobs, seed, scale)


def _job(rng: random.Random, job_id: str, at: float, method: str, model: str, steps: int, gpus: int, priority: int,
         seq_len: int | None = None) -> TraceJob:
    return TraceJob(job_id=job_id, arrival_s=round(at, 1), model=model, method=method,
                    seq_len=seq_len or rng.choice((512, 1024, 2048)), global_batch=rng.choice((8, 16, 32)), steps=steps,
                    gpus=gpus, priority=priority, precision="fp32" if rng.random() < FP32_SHARE else "auto")


def _poisson(rng: random.Random, n_jobs: int, per_hour: float) -> Iterator[tuple[int, float]]:
    """(index, arrival time in seconds) of n Poisson arrivals; each drawn only when the caller asks for it, so a
    trace's other draws interleave with them as they always did (same seed, same trace)."""
    t = 0.0
    for i in range(n_jobs):
        t += rng.expovariate(per_hour / 3600)
        yield i, t


def _philly_steps(rng: random.Random) -> int:
    return int(min(20000, max(20, rng.lognormvariate(math.log(200), 1.2))))


def _priority(rng: random.Random) -> int:
    return rng.choices([p for p, _ in PRIORITIES], [w for _, w in PRIORITIES])[0]


def write(jobs: list[TraceJob], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, [x.name for x in fields(TraceJob)])
        writer.writeheader()
        writer.writerows(asdict(j) for j in jobs)


def read(path: str | Path) -> list[TraceJob]:
    """Every row checked: a bad one is one line naming the row, the column, the value and what is allowed."""
    source = str(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise InputError(source, "file", source, f"a readable CSV trace ({err.strerror})") from None
    columns = [x.name for x in fields(TraceJob)]
    jobs = []
    for n, row in enumerate(rows, start=2):
        missing = [c for c in columns if not row.get(c)]
        if missing:
            raise InputError(source, f"line {n}: {missing[0]}", None, f"every row needs the columns {', '.join(columns)}")
        try:
            job = TraceJob(row["job_id"], float(row["arrival_s"]), row["model"], row["method"], int(row["seq_len"]),
                           int(row["global_batch"]), int(row["steps"]), int(row["gpus"]), int(row["priority"]), row["precision"])
        except ValueError as err:
            raise InputError(source, f"line {n}", dict(row), f"numbers where numbers belong ({err})") from None
        if not (MODEL_CONFIGS / job.model / "config.json").is_file():
            raise InputError(source, f"line {n}: model", job.model, f"one of {', '.join(sorted(p.name for p in MODEL_CONFIGS.iterdir()))}")
        try:
            job.spec()
        except pydantic.ValidationError as err:
            raise from_validation_error(f"{source} line {n}", JobSpec, err) from None
        jobs.append(job)
    return sorted(jobs, key=lambda j: (j.arrival_s, j.job_id))
