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
    rng = random.Random(seed)
    jobs, t = [], 0.0
    for i in range(n_jobs):
        t += rng.expovariate(jobs_per_hour / 3600)
        method = "lora" if rng.random() < 0.7 else "full"
        model = rng.choice(LORA_MODELS if method == "lora" else FULL_MODELS)
        steps = int(min(20000, max(20, rng.lognormvariate(math.log(200), 1.2))))
        jobs.append(TraceJob(
            job_id=f"t{i:04d}", arrival_s=round(t, 1), model=model, method=method,
            seq_len=rng.choice((512, 1024, 2048)), global_batch=rng.choice((8, 16, 32)), steps=steps,
            gpus=1 if rng.random() < 0.6 else 2,
            priority=rng.choices([p for p, _ in PRIORITIES], [w for _, w in PRIORITIES])[0],
            precision="fp32" if rng.random() < FP32_SHARE else "auto"))
    return jobs


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
