"""The job spec: what the user asks for. Loaded from YAML, validated, and checked against the filesystem
before anything is planned or reserved."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from orchestrator import catalog
from orchestrator.errors import InputError
from orchestrator.model_facts import read_config
from orchestrator.schema import StrictModel, load_yaml
from workers.checkpoint import CHECKPOINT_DIR, made_for_another, what_it_trains

FINAL_DIR = "final"  # <output_dir>/final holds the finished model or adapter
ADAPTER_METHODS = ("lora", "qlora")  # a frozen base (16-bit, or 4-bit for qlora) and trained LoRA adapters


class ModelSpec(StrictModel):
    init: Literal["pretrained", "scratch"] = "pretrained"
    # pretrained: a local directory or a Hugging Face id already in the local HF cache.
    # scratch: a directory with config.json (and a tokenizer), trained from random weights.
    path: str
    tokenizer: str | None = Field(None, description="Defaults to the model path.")


class DatasetSpec(StrictModel):
    path: str
    format: Literal["jsonl", "text"] = "jsonl"
    text_field: str | None = None  # language-model loss on the whole text
    prompt_field: str | None = None  # instruction data: loss on the completion only
    completion_field: str | None = None

    @model_validator(mode="after")
    def _fields(self) -> DatasetSpec:
        instruction = self.prompt_field is not None or self.completion_field is not None
        if self.format == "text" and (instruction or self.text_field):
            raise ValueError("format 'text' takes no field names: each line is one sample")
        if self.format == "jsonl":
            if instruction and not (self.prompt_field and self.completion_field):
                raise ValueError("give both prompt_field and completion_field")
            if instruction == bool(self.text_field):
                raise ValueError("jsonl needs either text_field, or prompt_field and completion_field")
        return self


class LoraSpec(StrictModel):
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, min_length=1, description="Default: PEFT's choice for the architecture.")


class QuantSpec(StrictModel):
    """The 4-bit base of a QLoRA job (bitsandbytes' Linear4bit): every linear layer of the decoder stack is
    quantised, its packed values held in uint8; embeddings, the output head and norms stay in the compute dtype."""

    bits: Literal[4] = 4
    type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(True, description="Quantise the block scales too (about 0.37 bits less per weight).")


class OptimizerSpec(StrictModel):
    lr: float = Field(2e-5, gt=0, le=1)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)


class GpuConstraints(StrictModel):
    count: int | None = Field(None, ge=1, le=256)
    min: int = Field(1, ge=1, le=256)
    max: int | None = Field(None, ge=1, le=256)
    min_vram_gb: float | None = Field(None, gt=0)
    min_compute_capability: float | None = Field(None, ge=3.0, le=20.0)
    models: list[str] | None = Field(None, min_length=1, description="Allowed cards, by NVML or catalog name.")

    @model_validator(mode="after")
    def _range(self) -> GpuConstraints:
        if self.count is not None and ("min" in self.model_fields_set or self.max is not None):
            raise ValueError("give either count, or min/max, not both")
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self

    @property
    def bounds(self) -> tuple[int, int | None]:
        return (self.count, self.count) if self.count else (self.min, self.max)


class DeepSpeedSpec(StrictModel):
    # No 0: zeromix weights each rank's gradients by its share of the step's loss tokens inside ZeRO's reduction;
    # DeepSpeed's stage 0 reduces them its own way, so uneven micro-batches would not give the uniform update.
    zero_stage: Literal["auto", 1, 2, 3] = "auto"
    offload: Literal["auto", "none", "optimizer", "optimizer+params"] = "auto"
    activation_checkpointing: Literal["auto", True, False] = "auto"
    gradient_clipping: float = Field(1.0, ge=0, description="Max global grad norm; 0 turns clipping off.")


class SyncSpec(StrictModel):
    """How the cards agree on the weights when a job spans boxes. synchronous: one DeepSpeed world over every card,
    gradients across the boxes' link in every step (exact data parallel). outer: ZeRO inside each box, and every
    inner_steps optimizer steps the boxes exchange their weight deltas over the link and take an outer step (DiLoCo,
    workers/outer_steps.py). auto: outer when the job spans boxes and synchronous collectives across them would take
    more than a quarter of its step (the planner's estimate). Synchronous unless asked: outer steps change the
    maths, and on the demo's task they cost 25-58 points of exact match downstream (README, "Slow links")."""

    mode: Literal["auto", "synchronous", "outer"] = "synchronous"
    inner_steps: int | Literal["auto"] = Field("auto", description="H: optimizer steps between outer steps; auto: the "
                                                                   "fewest that keep the exchange under 5% of the time (10-500)")
    outer_lr: float = Field(1.0, gt=0, le=2)
    outer_momentum: float = Field(0.0, ge=0, lt=1, description="Nesterov momentum of the outer step")
    wire: Literal["fp32", "bf16", "int8"] = Field("fp32", description="what a delta crosses the link as (int8: one scale per tensor)")

    @field_validator("inner_steps")
    @classmethod
    def _inner_steps_in_range(cls, value):
        if value != "auto" and not 1 <= value <= 10_000:
            raise ValueError("give auto or a number of optimizer steps from 1 to 10000")
        return value


class JobSpec(StrictModel):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")
    model: ModelSpec
    dataset: DatasetSpec
    method: Literal["full", "lora", "qlora"] = "full"
    lora: LoraSpec | None = Field(None, validate_default=True)
    seq_len: int = Field(512, ge=8, le=131072)
    global_batch_size: int = Field(8, ge=1, le=65536, description="Samples per optimizer step, over all cards.")
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0, validate_default=True)
    optimizer: OptimizerSpec = OptimizerSpec()
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    quant: QuantSpec | None = Field(None, validate_default=True)  # method qlora
    gpus: GpuConstraints = GpuConstraints()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    output_dir: str
    checkpoint_every: int | None = Field(None, ge=0, description="Optimizer steps between checkpoints; 0 = only at the end; "
                                                                 "unset: about every 10 minutes of training (from the plan's step time)")
    rebalance: bool = Field(True, description="Move samples between cards while training when their measured speeds "
                                              "disagree with the plan's (workers/rebalance.py); false keeps the planned split.")
    keep_last: int = Field(2, ge=1, le=1000, description="Complete checkpoints kept; older ones are deleted after each save.")
    sync: SyncSpec = SyncSpec()
    priority: int = Field(0, ge=-100, le=100)
    seed: int = 0
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        ["tensorboard"], max_length=3, description="Experiment trackers rank 0 writes; [] for none.")

    @field_validator("lora")
    @classmethod
    def _lora_needs_method(cls, value: LoraSpec | None, info: ValidationInfo) -> LoraSpec | None:
        if value is not None and info.data.get("method") not in ADAPTER_METHODS:
            raise ValueError("a lora section needs method: lora or qlora")
        return value

    @field_validator("quant")
    @classmethod
    def _quant_needs_method(cls, value: QuantSpec | None, info: ValidationInfo) -> QuantSpec | None:
        if value is not None and info.data.get("method") != "qlora":
            raise ValueError("a quant section needs method: qlora")
        return value

    @field_validator("method")
    @classmethod
    def _qlora_needs_a_pretrained_base(cls, value: str, info: ValidationInfo) -> str:
        model = info.data.get("model")
        if value == "qlora" and model is not None and model.init == "scratch":
            raise ValueError("qlora quantises a pretrained base: set model.init: pretrained, or use method full to train from scratch")
        return value

    @field_validator("epochs")
    @classmethod
    def _one_length(cls, value: float | None, info: ValidationInfo) -> float | None:
        if (value is None) == (info.data.get("max_steps") is None):
            raise ValueError("give exactly one of max_steps or epochs")
        return value

    @field_validator("deepspeed")
    @classmethod
    def _qlora_at_zero_1_or_2(cls, value: DeepSpeedSpec, info: ValidationInfo) -> DeepSpeedSpec:
        if info.data.get("method") == "qlora" and (value.zero_stage == 3 or value.offload == "optimizer+params"):
            raise ValueError(f"zero_stage {value.zero_stage}, offload {value.offload}: qlora runs at ZeRO-1 or 2 without parameter offload "
                             "(each rank loads the whole 4-bit base, so ZeRO-3 would not lower its peak); use zero_stage auto, 1 or 2")
        return value

    @field_validator("report_to")
    @classmethod
    def _each_tracker_once(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @property
    def lora_config(self) -> LoraSpec:
        return self.lora or LoraSpec()

    @property
    def quant_config(self) -> QuantSpec:
        return self.quant or QuantSpec()

    @property
    def adapters(self) -> bool:
        """LoRA or QLoRA: a frozen base, and adapters that train."""
        return self.method in ADAPTER_METHODS


def load_job(path: str | Path, check_files: bool = True, overrides: list[str] = ()) -> JobSpec:
    """Parse and validate a job spec. With `check_files`, relative paths become absolute (from the current
    directory) and the model, data and output directory are checked, so a bad path fails before planning."""
    source = str(path)
    spec = load_yaml(path, JobSpec, overrides)
    _check_models(source, spec)
    return _check_files(source, spec) if check_files else spec


def _check_models(source: str, spec: JobSpec) -> None:
    for i, name in enumerate(spec.gpus.models or []):
        if not catalog.candidates(name):
            hint = ", ".join(repr(s) for s in catalog.suggest(name)) or "see `zeromix nodes`"
            raise InputError(source, f"gpus.models[{i}]", name, f"not a card in the catalog; did you mean {hint}?")


def _os_path(source: str, field: str, value: str) -> Path:
    """A path from the spec as the OS will take it. One it cannot (a NUL byte, a name too long) is an input error,
    not a traceback."""
    try:
        path = Path(value).expanduser().resolve()
        path.exists()  # raises for what the OS refuses outright
        return path
    except (ValueError, OSError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise InputError(source, field, value, f"it must be a path the system accepts ({why.lower()})") from None


def _check_files(source: str, spec: JobSpec) -> JobSpec:
    model_path = _resolve_model(source, "model.path", spec.model.path, spec.model.init)
    tokenizer = _resolve_model(source, "model.tokenizer", spec.model.tokenizer, "pretrained") if spec.model.tokenizer else None
    data = _os_path(source, "dataset.path", spec.dataset.path)
    if not data.is_file():
        raise InputError(source, "dataset.path", spec.dataset.path, "it must be an existing file (jsonl or text)")
    _check_first_record(source, spec.dataset, data)
    _check_trackers(source, spec.report_to)
    out = _os_path(source, "output_dir", spec.output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(source, "output_dir", spec.output_dir, "it exists and is not a directory")
    if (out / FINAL_DIR).exists():
        raise InputError(source, "output_dir", spec.output_dir, f"it already holds a finished run ({out / FINAL_DIR}); choose a new output_dir or remove that one")
    foreign = made_for_another(out / CHECKPOINT_DIR, what_it_trains(read_config(model_path), spec.method, spec.lora_config.r))
    if foreign:
        raise InputError(source, "output_dir", spec.output_dir, f"its checkpoints ({foreign}) are of another model or method; "
                         "choose a new output_dir or move them away")
    return spec.model_copy(
        update={
            "model": spec.model.model_copy(update={"path": model_path, "tokenizer": tokenizer}),
            "dataset": spec.dataset.model_copy(update={"path": str(data)}),
            "output_dir": str(out),
        }
    )


def check_inputs_still_there(job_id: str, spec: JobSpec) -> None:
    """Just before a queued job is placed: its model, tokenizer and data may have moved since it was submitted
    (hours ago, on a disk that is now unmounted). One line naming the path, instead of a rank's library error."""
    source, gone = f"job {job_id}", "it is gone (moved or deleted since the job was submitted)"
    for field, value in (("model.path", spec.model.path), ("model.tokenizer", spec.model.tokenizer)):
        if value and Path(value).is_absolute() and not Path(value, "config.json" if field == "model.path" else "").exists():
            raise InputError(source, field, value, gone)  # submit stored local paths absolute; else a Hugging Face id
    if not Path(spec.dataset.path).is_file():
        raise InputError(source, "dataset.path", spec.dataset.path, gone)


def _check_trackers(source: str, report_to: list[str]) -> None:
    """W&B and MLflow are optional: one not installed fails here, before any card is reserved."""
    for i, name in enumerate(report_to):
        if importlib.util.find_spec(name) is None:
            raise InputError(source, f"report_to[{i}]", name, f"it is not installed here; pip install 'zeromix[{name}]', or leave it out")


def _resolve_model(source: str, field: str, value: str, init: str) -> str:
    local = _os_path(source, field, value)
    if local.exists():
        if not (local / "config.json").is_file() and field == "model.path":
            raise InputError(source, field, value, "the directory has no config.json")
        return str(local.resolve())
    if init == "scratch":
        raise InputError(source, field, value, "init: scratch needs an existing directory with config.json")
    if value.count("/") == 1 and _in_hf_cache(value):
        return value
    raise InputError(source, field, value, "it must be a local directory or a Hugging Face id already in the local cache (nodes do not download)")


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _check_first_record(source: str, dataset: DatasetSpec, path: Path) -> None:
    with path.open() as f:
        first = f.readline()
    if not first.strip():
        raise InputError(source, "dataset.path", str(path), "the file is empty")
    if dataset.format == "text":
        return
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        raise InputError(source, "dataset.path", str(path), "line 1 is not JSON; use format: text for plain text") from None
    for key in ("text_field", "prompt_field", "completion_field"):
        name = getattr(dataset, key)
        if name is not None and name not in record:
            raise InputError(source, f"dataset.{key}", name, f"line 1 of the data has only the fields {', '.join(sorted(record))}")


def count_samples(dataset_path: str) -> int:
    with open(dataset_path) as f:
        return sum(1 for line in f if line.strip())


def total_steps(spec: JobSpec) -> int:
    """max_steps as given, or the optimizer steps that `epochs` passes over the data take."""
    if spec.max_steps:
        return spec.max_steps
    return max(1, math.ceil(spec.epochs * count_samples(spec.dataset.path) / spec.global_batch_size))
