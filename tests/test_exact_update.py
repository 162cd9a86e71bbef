"""Uneven per-card micro-batches give the same update as one process taking each global batch whole.

Three real DeepSpeed ranks on CPU (gloo) run `workers.train.main` with micro-batches 3, 1 and 2 and two
accumulation steps; one process runs the same optimizer on the same global batches, weighting the loss by
token. After 3 optimizer steps the trained weights (the full model, or the LoRA adapter) must agree.

SGD is linear in the gradient, so it shows the weighting exact to 1e-5. AdamW, what jobs use, is checked too,
at a tolerance its normalisation forces (see TOLERANCE_ADAMW).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.ds_config import Optimization, RankTuning, deepspeed_config
from tests.conftest import TINY_LLAMA
from workers.data import GlobalBatchSampler, collate, read_records, tokenize
from workers.local_launch import run_local_ranks
from workers.train import TrainConfig, utilisation

MICRO, GRAD_ACCUM, STEPS, SEQ = (3, 1, 2), 2, 3, 32
LR = {"SGD": 0.5, "AdamW": 1e-3}
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
# Max relative difference per tensor (|difference| / max |weight|), fp32.
TOLERANCE = 1e-5
# With AdamW three ranks measured up to 1.2e-4 (ZeRO-1/2, full) and 5.3e-4 (ZeRO-3, full); LoRA under 1e-5;
# the naive per-rank-mean weighting is off by 7.6e-2. The residual is reduction order: DeepSpeed sums three
# ranks' gradients where the reference sums one batch, and AdamW, dividing each gradient by its running
# magnitude, magnifies last-bit differences of near-zero gradients to ~1e-3 of one step.
TOLERANCE_ADAMW = 1e-3


def job(out, demo_data, base_model, stage: int, method: str, clip: float, steps: int = STEPS, optimizer: str = "AdamW",
        offload: bool | tuple[bool, ...] = False, recompute: tuple[bool, ...] = (False,) * len(MICRO)) -> TrainConfig:
    opt = Optimization(LR[optimizer], "constant", 0, 0.0, max(steps, 1))
    offloads = offload if isinstance(offload, tuple) else (offload,) * len(MICRO)
    ds = [deepspeed_config(RankTuning(m, stage, o, False, "fp32"), GRAD_ACCUM, len(MICRO), clip, opt) for m, o in zip(MICRO, offloads)]
    if optimizer == "SGD":  # DeepSpeed builds any torch.optim class named in the config
        for config in ds:
            config["optimizer"] = {"type": "SGD", "params": {"lr": LR["SGD"], "momentum": 0.0, "weight_decay": 0.0}}
            config["zero_allow_untested_optimizer"] = True
    if method == "lora":  # instruction data: loss on the completion only, so loss tokens differ per sample
        dataset = {"path": str(demo_data["reverse-train"]), "format": "jsonl", "text_field": None, "prompt_field": "prompt", "completion_field": "completion"}
    else:
        dataset = {"path": str(demo_data["pretrain"]), "format": "jsonl", "text_field": "text", "prompt_field": None, "completion_field": None}
    return TrainConfig(
        job_id="exact", model_init="scratch" if method == "full" else "pretrained",
        model_path=str(TINY_LLAMA) if method == "full" else base_model, tokenizer_path=str(TINY_LLAMA),
        dataset=dataset, method=method, lora=LORA, seq_len=SEQ, micro_batches=MICRO, grad_accum=GRAD_ACCUM,
        total_steps=steps, ds_configs=tuple(ds), activation_checkpointing=recompute, output_dir=str(out),
        checkpoint_every=0, seed=0,
    )


def train(config: TrainConfig) -> dict[str, torch.Tensor]:
    run_local_ranks(config)
    name = "adapter_model.safetensors" if config.method == "lora" else "model.safetensors"
    return load_file(f"{config.output_dir}/final/{name}")


def reference(config: TrainConfig, initial: dict, weighting: str) -> dict[str, torch.Tensor]:
    """One process, whole global batches, from the ranks' own initial weights. weighting="tokens": mean loss
    over every loss token of the global batch (what zeromix claims); "per_rank_mean": each rank's own mean,
    averaged (the naive way)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if config.method == "lora":
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(config.model_path), LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
        set_peft_model_state_dict(model, initial)
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA))
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
    for step in range(STEPS):
        optimizer.zero_grad()
        parts = []  # (sum of token losses, loss tokens) per rank
        for rank in range(len(MICRO)):
            total, count = 0.0, 0
            for idx in sampler.rank_micro_batches(step, rank):
                batch = collate([samples[i] for i in idx], tokenizer.pad_token_id)
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                total = total + torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)), batch.labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
                count += batch.loss_tokens
            parts.append((total, count))
        assert len({c for _, c in parts}) > 1, "the case must give ranks different numbers of loss tokens"
        if weighting == "tokens":
            loss = sum(t for t, _ in parts) / sum(c for _, c in parts)
        else:
            loss = sum(t / c for t, c in parts) / len(parts)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(trainable, clip)
        optimizer.step()
    state = get_peft_model_state_dict(model) if config.method == "lora" else model.state_dict()
    return {k: v.detach() for k, v in state.items()}


def max_relative_difference(a: dict, b: dict) -> float:
    common = set(a) & set(b)
    assert len(common) >= 4, (sorted(a)[:4], sorted(b)[:4])
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in common)


CASES = [(1, "full", 0.0), (1, "full", 0.5), (2, "full", 0.0), (2, "full", 0.5), (3, "full", 0.0), (3, "full", 0.5),
         (1, "lora", 0.5), (2, "lora", 0.0), (3, "lora", 0.5)]


@pytest.mark.parametrize("optimizer, stage, method, clip", [("SGD", *case) for case in CASES] + [
    ("AdamW", 2, "full", 0.5), ("AdamW", 3, "full", 0.0), ("AdamW", 3, "lora", 0.5)])
def test_uneven_micro_batches_match_the_full_batch_update(tmp_path, demo_data, base_model, optimizer, stage, method, clip):
    # ZeRO-3 builds the model inside zero.Init, which draws its random init differently from a plain
    # from_config; a 0-step run saves exactly the weights the ranks start from.
    initial = train(job(tmp_path / "init", demo_data, base_model, stage, method, clip, steps=0, optimizer=optimizer))
    config = job(tmp_path / "run", demo_data, base_model, stage, method, clip, optimizer=optimizer)
    trained = train(config)
    exact = reference(config, initial, "tokens")
    tolerance = TOLERANCE if optimizer == "SGD" else TOLERANCE_ADAMW
    assert max_relative_difference(trained, exact) < tolerance
    assert max_relative_difference(trained, initial) > 10 * tolerance  # it did train
    # The tolerance can tell the right weighting from the naive one: averaging each rank's own mean is off.
    assert max_relative_difference(reference(config, initial, "per_rank_mean"), exact) > 10 * tolerance


def test_optimizer_offload_keeps_the_update(tmp_path, demo_data, base_model):
    """Optimizer states on the host (DeepSpeed's CPU Adam) on every rank: the same update as on the card."""
    initial = train(job(tmp_path / "init", demo_data, base_model, 2, "full", 0.5, steps=0, offload=True))
    config = job(tmp_path / "run", demo_data, base_model, 2, "full", 0.5, offload=True)
    assert config.ds_configs[0]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    trained = train(config)
    assert max_relative_difference(trained, reference(config, initial, "tokens")) < TOLERANCE_ADAMW


@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpointing_on_some_cards_only_gives_the_uniform_update(tmp_path, demo_data, base_model, method):
    """The planner lets a card short of memory recompute activations while roomier ones do not (ZeRO-1/2). That
    changes only where time and memory go: ranks 0 and 2 recomputing, rank 1 not, train to the same weights as
    no rank recomputing."""
    config = job(tmp_path / "mixed", demo_data, base_model, 2, method, 0.5, recompute=(True, False, True))
    assert [r["recomputes"] for r in run_local_ranks(config)] == [True, False, True]
    mixed = load_file(f"{config.output_dir}/final/{'adapter_model' if method == 'lora' else 'model'}.safetensors")
    uniform = train(job(tmp_path / "uniform", demo_data, base_model, 2, method, 0.5))
    assert max_relative_difference(mixed, uniform) < TOLERANCE


def test_optimizer_offload_on_one_rank_only_keeps_the_update(tmp_path, demo_data, base_model):
    """ZeRO-2 lets the planner offload the optimizer of the one card short of memory: rank 0 runs DeepSpeed's CPU
    Adam on its partition, ranks 1 and 2 torch's AdamW on theirs. The collectives are the same either way (no
    hang), and the update is the one no rank offloading gives (measured: 4e-7 relative)."""
    mixed = train(job(tmp_path / "mixed", demo_data, base_model, 2, "full", 0.5, offload=(True, False, False)))
    uniform = train(job(tmp_path / "uniform", demo_data, base_model, 2, "full", 0.5))
    assert max_relative_difference(mixed, uniform) < TOLERANCE


def test_a_resumed_job_continues_exactly(tmp_path, demo_data, base_model):
    """Stopped after step 2, restarted on the same output_dir: it resumes from the checkpoint (weights,
    Adam state, schedule, data position) and lands where an uninterrupted run does."""
    initial = train(job(tmp_path / "init", demo_data, base_model, 2, "full", 0.0, steps=0))
    train(job(tmp_path / "run", demo_data, base_model, 2, "full", 0.0, steps=2))
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-2"
    resumed = train(job(tmp_path / "run", demo_data, base_model, 2, "full", 0.0))
    exact = reference(job(tmp_path / "ref", demo_data, base_model, 2, "full", 0.0), initial, "tokens")
    assert max_relative_difference(resumed, exact) < TOLERANCE_ADAMW


def test_straggler_accounting_and_emulation_stay_out_of_real_jobs(tmp_path, demo_data, base_model):
    """Every rank reports busy and wait time; the benchmark-only slowdown makes the slowed rank the one the
    others wait for, and nothing a user submits can switch it on."""
    import dataclasses

    from orchestrator.cluster_config import load_cluster
    from orchestrator.inventory import snapshot_from_config
    from orchestrator.jobspec import JobSpec
    from orchestrator.launch import train_config
    from orchestrator.model_facts import facts_from_config, read_config
    from orchestrator.planner import make_plan
    from tests.conftest import REPO

    config = dataclasses.replace(job(tmp_path, demo_data, base_model, 2, "full", 0.0), emulated_slowdown=(1.0, 1.0, 40.0))
    ranks = run_local_ranks(config)
    first = ranks[0]
    assert len(first["step_times"]) == STEPS and len(first["busy_s"]) == len(first["wait_s"]) == len(MICRO)
    util = utilisation(first["busy_s"], first["wait_s"])
    assert util[2] == pytest.approx(1.0) and max(util[:2]) < 0.8  # ranks 0 and 1 wait for the slowed rank 2
    assert json.loads(config.to_json())["emulated_slowdown"] == [1.0, 1.0, 40.0]
    # A submitted job: no spec field can ask for it, and the launcher's config leaves it off.
    assert "emulated_slowdown" not in JobSpec.model_fields
    spec = JobSpec.model_validate({"name": "j", "model": {"path": "m"}, "dataset": {"path": "d", "text_field": "text"},
                                   "max_steps": 3, "output_dir": "o"})
    plan = make_plan(spec, facts_from_config(read_config(str(TINY_LLAMA))), snapshot_from_config(load_cluster(REPO / "cluster.yaml")), 3)
    assert train_config(spec, plan, "j-1").emulated_slowdown is None
