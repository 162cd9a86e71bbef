"""What several test modules share (the fixtures are in conftest.py): job specs for the planner, the shipped
model configs, the three-rank DeepSpeed runs of the exactness family and their reference, and the memo that
runs each identical DeepSpeed job once per session."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
import yaml

from orchestrator.cluster_config import ClusterConfig, load_cluster
from orchestrator.ds_config import Optimization, RankTuning, deepspeed_config
from orchestrator.inventory import snapshot_from_config
from orchestrator.jobspec import JobSpec
from orchestrator.model_facts import facts_from_config, read_config
from tests.conftest import REPO, TINY_LLAMA, free_port
from workers.checkpoint import what_it_trains
from workers.loss import whole_logits_loss
from workers.train import TrainConfig

CONFIGS = REPO / "orchestrator" / "data" / "model_configs"
HOMELAB = snapshot_from_config(load_cluster(REPO / "cluster.yaml"))
TINY = facts_from_config(read_config(str(TINY_LLAMA)))


def model_config(name: str) -> dict:
    """A shipped real config.json (orchestrator/data/model_configs)."""
    return json.loads((CONFIGS / name / "config.json").read_text())


def spec(**fields) -> JobSpec:
    """A job spec for the planner alone (its paths are never read): the tiny model's shape of job."""
    base = {"name": "j", "model": {"path": "m"}, "dataset": {"path": "d", "text_field": "text"}, "max_steps": 10,
            "output_dir": "o", "global_batch_size": 32, "seq_len": 64}
    return JobSpec.model_validate({**base, **fields})


def scenario(**fields) -> JobSpec:
    """A job spec of the size homelab questions are about: 1024 tokens, 100 steps."""
    return spec(**{"max_steps": 100, "seq_len": 1024, **fields})


def pool(*nodes: tuple[str, float, list[str]], link: str = "1GbE"):
    """A pool of nodes (name, RAM GB, card names), as `zeromix plan --pool` reads it."""
    entries = [{"name": n, "address": f"10.0.0.{i + 1}", "ram_gb": ram, "gpus": [{"model": m} for m in cards]} for i, (n, ram, cards) in enumerate(nodes)]
    return snapshot_from_config(ClusterConfig.model_validate({"head": {"address": "10.0.0.1"}, "network": {"link": link}, "nodes": entries}))


def cluster_file(directory: Path, port: int | None = None, dashboard_port: int | None = None) -> Path:
    """The shipped homelab, on free ports, written into `directory`."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["head"].update(port=port or free_port(), dashboard_port=dashboard_port or free_port())
    path = directory / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def mean_token_loss(model, records: list[dict], dataset: dict, tokenizer) -> float:
    from workers.data import collate, tokenize

    batch = collate(tokenize(records, dataset, tokenizer, 32), tokenizer.pad_token_id)
    with torch.no_grad():
        return whole_logits_loss(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels, "mean").item()


# ------------------------------------------------------------------------------------------ three real DeepSpeed ranks
MICRO, GRAD_ACCUM, STEPS, SEQ = (3, 1, 2), 2, 3, 32
LR = {"SGD": 0.5, "AdamW": 1e-3}
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
FOUR_BIT = {"type": "nf4", "double_quant": True}  # QLoRA's base, as a plan gives it (its `why` the worker does not read)
# Max relative difference per tensor (|difference| / max |weight|), fp32.
TOLERANCE = 1e-5
# With AdamW three ranks measured up to 1.2e-4 (ZeRO-1/2, full) and 5.3e-4 (ZeRO-3, full); LoRA under 1e-5;
# the naive per-rank-mean weighting is off by 7.6e-2. The residual is reduction order: DeepSpeed sums three
# ranks' gradients where the reference sums one batch, and AdamW, dividing each gradient by its running
# magnitude, magnifies last-bit differences of near-zero gradients to ~1e-3 of one step.
TOLERANCE_ADAMW = 1e-3


def job(out, demo_data, base_model, stage: int, method: str, clip: float, steps: int = STEPS, optimizer: str = "AdamW",
        offload: bool | tuple[bool, ...] = False, recompute: tuple[bool, ...] = (False,) * len(MICRO)) -> TrainConfig:
    """Three ranks with micro-batches 3, 1 and 2 and two accumulation steps, fp32, on the demo's data."""
    opt = Optimization(LR[optimizer], "constant", 0, 0.0, max(steps, 1))
    offloads = offload if isinstance(offload, tuple) else (offload,) * len(MICRO)
    ds = [deepspeed_config(RankTuning(m, stage, o, False, "fp32"), GRAD_ACCUM, len(MICRO), clip, opt) for m, o in zip(MICRO, offloads)]
    if optimizer == "SGD":  # DeepSpeed builds any torch.optim class named in the config
        for config in ds:
            config["optimizer"] = {"type": "SGD", "params": {"lr": LR["SGD"], "momentum": 0.0, "weight_decay": 0.0}}
            config["zero_allow_untested_optimizer"] = True
    if method != "full":  # instruction data: loss on the completion only, so loss tokens differ per sample
        dataset = {"path": str(demo_data["reverse-train"]), "format": "jsonl", "text_field": None, "prompt_field": "prompt", "completion_field": "completion"}
    else:
        dataset = {"path": str(demo_data["pretrain"]), "format": "jsonl", "text_field": "text", "prompt_field": None, "completion_field": None}
    model_path = str(TINY_LLAMA) if method == "full" else base_model
    return TrainConfig(
        job_id="exact", model_init="scratch" if method == "full" else "pretrained",
        model_path=model_path, tokenizer_path=str(TINY_LLAMA), trains=what_it_trains(read_config(model_path), method, LORA["r"]),
        dataset=dataset, method=method, lora=LORA, seq_len=SEQ, micro_batches=MICRO, grad_accum=GRAD_ACCUM,
        total_steps=steps, ds_configs=tuple(ds), activation_checkpointing=recompute, output_dir=str(out),
        checkpoint_every=0, seed=0, four_bit=FOUR_BIT if method == "qlora" else {},
    )


def final_weights(config: TrainConfig) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if config.method != "full" else "model.safetensors"
    return load_file(f"{config.output_dir}/final/{name}")


def train(config: TrainConfig) -> dict[str, torch.Tensor]:
    from workers.local_launch import run_local_ranks

    run_local_ranks(config)
    return final_weights(config)


class DeepSpeedRuns:
    """Each distinct three-rank run once per session: a run is identified by everything that decides its
    weights (its config less the output directory), and asked for again it is read back, not trained again.
    The initial weights (a 0-step run) depend only on whether ZeRO-3's zero.Init builds the model and on full
    or LoRA: the optimizer, clipping, offload and the other stages start from the same draw."""

    def __init__(self, root: Path):
        self.root = root
        self.results: dict[str, list[dict]] = {}

    def run(self, config: TrainConfig) -> tuple[TrainConfig, list[dict]]:
        """The config as it ran (its output directory is the memo's) and every rank's result."""
        from workers.local_launch import run_local_ranks

        key = hashlib.sha256(json.dumps({**json.loads(config.to_json()), "output_dir": None}, sort_keys=True).encode()).hexdigest()[:16]
        ran = dataclasses.replace(config, output_dir=str(self.root / key))
        if key not in self.results:
            self.results[key] = run_local_ranks(ran)
        return ran, self.results[key]

    def weights(self, config: TrainConfig) -> dict[str, torch.Tensor]:
        return final_weights(self.run(config)[0])

    def initial(self, config: TrainConfig) -> dict[str, torch.Tensor]:
        """The weights every rank of `config` starts from."""
        stage = config.ds_configs[0]["zero_optimization"]["stage"]
        start = dataclasses.replace(config, total_steps=0, micro_batches=MICRO, activation_checkpointing=(False,) * len(MICRO), ds_configs=tuple(
            deepspeed_config(RankTuning(m, 3 if stage == 3 else 2, False, False, "fp32"), GRAD_ACCUM, len(MICRO), 0.0,
                             Optimization(LR["AdamW"], "constant", 0, 0.0, 1)) for m in MICRO))
        return self.weights(start)


def reference(config: TrainConfig, initial: dict, weighting: str, groups: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
    """One process, whole global batches, from the ranks' own initial weights. weighting="tokens": mean loss
    over every loss token of the global batch (what zeromix claims); "per_rank_mean": each group's own mean
    token loss, averaged (the naive way), the groups being single ranks or `groups` (ranks per group, in order:
    the boxes of outer-step mode)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from workers.data import GlobalBatchSampler, collate, read_records, tokenize
    from workers.train import load_four_bit

    if config.method != "full":
        base = load_four_bit(config.model_path, FOUR_BIT, "fp32", "cpu") if config.method == "qlora" else AutoModelForCausalLM.from_pretrained(config.model_path)
        model = get_peft_model(base, LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
        set_peft_model_state_dict(model, initial)
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.model_path))  # (trained from scratch)
        model.load_state_dict(initial, strict=False)
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    samples = tokenize(read_records(config.dataset), config.dataset, tokenizer, SEQ)
    sampler = GlobalBatchSampler(len(samples), MICRO, GRAD_ACCUM, config.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    settings = config.ds_configs[0]["optimizer"]
    if settings["type"] == "SGD":
        optimizer = torch.optim.SGD(trainable, lr=settings["params"]["lr"])
    else:
        optimizer = torch.optim.AdamW(trainable, lr=settings["params"]["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    clip = config.ds_configs[0]["gradient_clipping"]
    for step in range(config.total_steps):
        optimizer.zero_grad()
        parts = []  # (sum of token losses, loss tokens) per rank
        for rank in range(len(MICRO)):
            total, count = 0.0, 0
            for idx in sampler.rank_micro_batches(step, rank):
                batch = collate([samples[i] for i in idx], tokenizer.pad_token_id)
                total = total + whole_logits_loss(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels)
                count += batch.loss_tokens
            parts.append((total, count))
        if groups:
            bounds = [sum(groups[:g]) for g in range(len(groups) + 1)]
            parts = [(sum(t for t, _ in parts[a:b]), sum(c for _, c in parts[a:b])) for a, b in zip(bounds, bounds[1:])]
        assert len({c for _, c in parts}) > 1, "the case must give ranks different numbers of loss tokens"
        if weighting == "tokens":
            loss = sum(t for t, _ in parts) / sum(c for _, c in parts)
        else:
            loss = sum(t / c for t, c in parts) / len(parts)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(trainable, clip)
        optimizer.step()
    state = get_peft_model_state_dict(model) if config.method != "full" else model.state_dict()
    return {k: v.detach() for k, v in state.items()}


def max_relative_difference(a: dict, b: dict) -> float:
    common = set(a) & set(b)
    assert len(common) >= 4, (sorted(a)[:4], sorted(b)[:4])
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in common)
