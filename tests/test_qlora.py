"""QLoRA: a 4-bit base (bitsandbytes, its CPU backend here) under DeepSpeed ZeRO-1/2, planned per card.

The spec says what is wrong in one line; the planner's bytes for the 4-bit base are bitsandbytes' own (a quantised
linear tensor by tensor, and whole loaded models of real configs); a card that cannot run 4-bit kernels is left out
saying why; the example 8B job lands on the 1080 Ti + 2080 Ti box where a 16-bit LoRA base does not fit; and three
DeepSpeed ranks with uneven micro-batches train the adapters exactly as one process does, whose adapter loads back
onto the 4-bit base with the same logits.
"""

from __future__ import annotations

import dataclasses
import json

import bitsandbytes as bnb  # the test extra installs it, as the qlora extra does for users
import pytest
import torch
import yaml

from orchestrator.errors import InputError
from orchestrator.inventory import CardFacts, ClusterSnapshot, Software, build_node
from orchestrator.jobspec import load_job
from orchestrator.model_facts import facts_from_config
from orchestrator.planner import NoPlacement, make_plan
from orchestrator.planner.filters import torch_builds
from orchestrator.planner.memory import FourBit, TrainingShape, base_bytes, four_bit_bytes
from tests.conftest import REPO, TINY_LLAMA, cli
from tests.helpers import (FOUR_BIT, HOMELAB, LORA, TINY, TOLERANCE, TOLERANCE_ADAMW, job, max_relative_difference, model_config,
                           pool, reference)
from tests.helpers import spec as planner_spec


EXAMPLE = REPO / "jobs" / "examples" / "llama-8b-qlora.yaml"


# ------------------------------------------------------------------------------------------ the spec
@pytest.mark.parametrize("changes, expected", [
    ({"model": {"init": "scratch"}}, "method='qlora' is not allowed; qlora quantises a pretrained base: set model.init: pretrained"),
    ({"method": "lora", "quant": {"type": "nf4"}}, "quant={'type': 'nf4'} is not allowed; a quant section needs method: qlora"),
    ({"quant": {"type": "int4"}}, "quant.type='int4' is not allowed; input should be 'nf4' or 'fp4'"),
    ({"quant": {"bits": 8}}, "quant.bits=8 is not allowed; input should be 4"),
    ({"deepspeed": {"zero_stage": 3}}, "qlora runs at ZeRO-1 or 2 without parameter offload"),
])
def test_a_bad_qlora_spec_gets_one_line_naming_the_field(tmp_path, demo_data, base_model, changes, expected):
    spec = {"name": "q", "model": {"path": base_model}, "dataset": {"path": str(demo_data["pretrain"]), "text_field": "text"},
            "method": "qlora", "max_steps": 2, "output_dir": str(tmp_path / "out")}
    for key, value in changes.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(InputError) as err:
        load_job(path)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ bytes of the 4-bit base
@pytest.mark.parametrize("fan_in, fan_out", [(64, 32), (640, 96), (2048, 8192), (3000, 7)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_a_quantised_linear_holds_the_bytes_the_planner_counts(fan_in, fan_out, double_quant):
    layer = bnb.nn.Linear4bit(fan_in, fan_out, bias=False, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=double_quant)
    layer.load_state_dict(torch.nn.Linear(fan_in, fan_out, bias=False).state_dict())
    layer = layer.to("cpu")  # bitsandbytes quantises as the weight moves to its device
    assert layer.weight.dtype == torch.uint8
    assert _tensor_bytes(layer) == four_bit_bytes(fan_in * fan_out, double_quant)


def _tensor_bytes(model: torch.nn.Module) -> int:
    """Every tensor a model holds: parameters, buffers, and bitsandbytes' quantisation state beside each 4-bit weight."""
    seen: dict[int, int] = {}

    def add(t):
        seen[id(t)] = t.numel() * t.element_size()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        while state is not None:
            for t in (state.absmax, state.code, getattr(state, "offset", None)):
                if t is not None:
                    add(t)
            state = state.state2
    return sum(seen.values())


# Real configs (their own vocabularies, widths and layer shapes), cut to one decoder layer so a CPU loads them in
# seconds: the planner's count is per layer plus the embeddings, so one layer tests every term.
@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "llama-3.2-1b", "phi-2"])
def test_the_planned_4bit_base_is_what_the_worker_loads(tmp_path, name):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from workers.train import load_four_bit

    config = {**model_config(name), "num_hidden_layers": 1}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.uniform_(-0.05, 0.05)
    model.tie_weights()  # (to_empty gave the tied head its own storage)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    del model
    (tmp_path / "config.json").write_text(json.dumps(config))  # as shipped (its torch_dtype included)

    loaded = load_four_bit(str(tmp_path), FOUR_BIT, "fp32", "cpu")
    facts = facts_from_config(config)
    targets = facts.default_lora_targets
    adapted = get_peft_model(loaded, LoraConfig(r=16, target_modules=targets, task_type="CAUSAL_LM"))
    measured = _tensor_bytes(adapted)
    shape = TrainingShape(facts, facts.lora_params(16, targets), 512, "fp32", False, True, FourBit(True))
    planned = base_bytes(shape) + 4 * shape.trainable  # the base, and the adapters' fp32 weights
    print(f"\n{name}: planned {planned:,} bytes, measured {measured:,} ({planned / measured - 1:+.2%})")
    assert abs(planned - measured) / measured < 0.001, (planned, measured)  # measured: within 256 bytes (rotary buffers)
    quantised = sum(1 for m in adapted.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert quantised == len(facts.quantised_linears)  # every linear of the layer, and not the output head


# ------------------------------------------------------------------------------------------ which cards
def _node(name: str, sw: Software | None, *cards: tuple[str, int, tuple[int, int]], **nvml):
    facts = [CardFacts(i, model, mib, mib, cc, uuid=f"GPU-{name}-{i}", **nvml) for i, (model, mib, cc) in enumerate(cards)]
    return build_node(name, f"10.0.0.{len(name)}", 64, 16, 10.0, facts, simulated=False, software=sw)


def _software(cuda: str, archs: tuple[str, ...], bitsandbytes: str | None = "0.50.2") -> Software:
    return Software("2.13.0", cuda, archs, "2.27.3", "0.19.8", "570.133.07", "12.8", bitsandbytes)


def test_a_card_that_cannot_run_4bit_kernels_is_left_out_saying_why():
    cu126 = next(b.archs for b in torch_builds() if b.name == "cu126")
    maxwell = _node("old", _software("12.6", cu126), ("NVIDIA GeForce GTX 980 Ti", 6144, (5, 2)),  # not in the catalog: NVML's figures
                    cuda_cores=2816, max_sm_clock_mhz=1392, max_mem_clock_mhz=3505, memory_bus_bits=384)
    without = _node("bare", _software("12.6", cu126, bitsandbytes=None), ("NVIDIA GeForce RTX 3090", 24576, (8, 6)))
    # a torch built from source for CUDA 12.8 with sm_61 kernels: torch runs on the 1080 Ti, bitsandbytes' 12.8 library does not
    custom = _node("custom", _software("12.8", ("sm_61", "sm_86")), ("NVIDIA GeForce GTX 1080 Ti", 11264, (6, 1)))
    good = _node("good", _software("12.6", cu126), ("NVIDIA GeForce GTX 1080 Ti", 11264, (6, 1)))
    snapshot = ClusterSnapshot((maxwell, without, custom, good))
    plan = make_plan(planner_spec(method="qlora"), TINY, snapshot, 10)
    assert [r.card.card_id for r in plan.ranks] == ["good/0"] and plan.four_bit is not None
    why = {r.card_id: r.reason for r in plan.rejected}
    assert why["old/0"].startswith("bitsandbytes' 4-bit kernels need compute capability 6.0+ (sm_52 has none)")
    assert why["bare/0"] == "bitsandbytes is not installed on bare; there: pip install 'zeromix[qlora]'"
    assert why["custom/0"].startswith("bitsandbytes' library for CUDA 12.8 has no code for sm_61 (it starts at sm_70)")
    assert "download.pytorch.org/whl/cu126" in why["custom/0"]
    # the rules are QLoRA's own: a LoRA job may use any of these cards
    lora = make_plan(planner_spec(method="lora"), TINY, snapshot, 10)
    assert lora.four_bit is None and not any("bitsandbytes" in r.reason for r in lora.rejected)


# ------------------------------------------------------------------------------------------ the example job
def test_the_8b_example_lands_on_the_pascal_box_where_lora_does_not_fit():
    """Llama 3.1 8B on the 1080 Ti + 2080 Ti box of cluster.yaml: the 1080 Ti makes the group fp32 (Pascal has no
    bf16 and DeepSpeed refuses fp16 there), so the unquantised embeddings and head cost 4 bytes a weight; the
    4-bit base still fits both 11 GB cards at ZeRO-1 or 2, where a 16-bit base fits neither."""
    spec = load_job(EXAMPLE, check_files=False)
    facts = facts_from_config(model_config("llama-3.1-8b"))
    plan = make_plan(spec, facts, HOMELAB, 100)
    assert sorted(r.card.short_name for r in plan.ranks) == ["GeForce GTX 1080 Ti", "GeForce RTX 2080 Ti"]
    assert plan.precision == "fp32" and plan.zero.stage in (1, 2) and "4-bit nf4 base, double-quantised" in plan.settings
    assert all(r.memory.total <= r.capacity_bytes for r in plan.ranks)
    assert all(4.5 < r.memory.weights / 2**30 < 9 for r in plan.ranks)  # the whole 4-bit base (5.3 GiB) on every card
    with pytest.raises(NoPlacement):
        make_plan(spec.model_copy(update={"method": "lora", "quant": None}), facts, HOMELAB, 100)


def test_zeromix_plan_shows_what_lora_would_need_beside_the_qlora_plan(tmp_path):
    data = tmp_path / "instructions.jsonl"
    data.write_text(json.dumps({"prompt": "rev abc", "completion": "cba"}) + "\n")
    done = cli("plan", str(EXAMPLE), "--pool", str(REPO / "cluster.yaml"), "--set", f"dataset.path={data}")
    assert done.returncode == 0, done.stdout + done.stderr
    out = " ".join(done.stdout.split())
    assert "4-bit nf4 base, double-quantised" in out and "every card holds the whole 4-bit base" in out
    assert "LoRA with a 16-bit base on the same cards: does not fit" in out


# ------------------------------------------------------------------------------------------ training, exactly
@pytest.mark.parametrize("optimizer, stage", [("SGD", 1), ("SGD", 2), ("AdamW", 2)])
def test_uneven_qlora_ranks_match_one_process_on_the_4bit_base(ds_runs, tmp_path, demo_data, base_model, optimizer, stage):
    """Three ranks (micro-batches 3, 1 and 2, two accumulation steps) train the adapters on the 4-bit base to the
    weights one process reaches with whole global batches; the per-rank-mean weighting would not."""
    config = job(tmp_path / "run", demo_data, base_model, stage, "qlora", 0.5, optimizer=optimizer)
    config, ranks = ds_runs.run(config)
    initial, trained = ds_runs.initial(config), ds_runs.weights(config)
    exact = reference(config, initial, "tokens")
    tolerance = TOLERANCE if optimizer == "SGD" else TOLERANCE_ADAMW
    assert max_relative_difference(trained, exact) < tolerance
    assert max_relative_difference(trained, initial) > 10 * tolerance
    assert max_relative_difference(reference(config, initial, "per_rank_mean"), exact) > 10 * tolerance
    assert ranks[0]["last_loss"] < ranks[0]["first_loss"]
    assert [r["quantised_layers"] for r in ranks] == [TINY.n_layers * len(TINY.quantised_linears)] * 3  # every rank's base is 4-bit


@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory) -> str:
    """A real config (Qwen2.5-0.5B's: its 151,936-token vocabulary, widths and biases) cut to two decoder layers so
    three CPU ranks train it in seconds, randomly initialised and saved in bf16, with the tiny tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("qwen-base")
    torch.manual_seed(2)
    config = AutoConfig.for_model(**{**model_config("qwen2.5-0.5b"), "num_hidden_layers": 2})
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY_LLAMA).save_pretrained(path)
    return str(path)


def test_a_real_config_trains_on_uneven_qlora_ranks_as_one_process_does(ds_runs, tmp_path, demo_data, qwen_base):
    config = job(tmp_path / "run", demo_data, qwen_base, 2, "qlora", 0.5, optimizer="SGD")
    config, ranks = ds_runs.run(config)
    assert [r["quantised_layers"] for r in ranks] == [2 * 7] * 3  # q, k, v, o, gate, up, down in each of two layers
    initial, trained = ds_runs.initial(config), ds_runs.weights(config)
    exact = reference(config, initial, "tokens")
    assert max_relative_difference(trained, exact) < TOLERANCE  # (that this tolerance tells the weightings apart: above)


def test_the_adapter_loads_back_onto_the_4bit_base_with_the_same_logits(ds_runs, tmp_path, demo_data, base_model):
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

    from workers.train import load_four_bit

    config, _ = ds_runs.run(job(tmp_path / "run", demo_data, base_model, 2, "qlora", 0.5, optimizer="SGD"))
    final = f"{config.output_dir}/final"
    assert not list((tmp_path / "run").glob("**/model.safetensors"))  # only the adapter is saved
    saved = json.loads(open(f"{final}/adapter_config.json").read())
    assert saved["r"] == LORA["r"] and sorted(saved["target_modules"]) == sorted(LORA["target_modules"])

    ids = torch.tensor([[1, 5, 9, 13, 2, 7, 30, 4]])
    reloaded = PeftModel.from_pretrained(load_four_bit(base_model, FOUR_BIT, "fp32", "cpu"), final)
    assert reloaded.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.uint8  # still 4-bit
    by_hand = get_peft_model(load_four_bit(base_model, FOUR_BIT, "fp32", "cpu"), LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
    set_peft_model_state_dict(by_hand, ds_runs.weights(config))
    with torch.no_grad():
        a, b = reloaded(input_ids=ids).logits, by_hand(input_ids=ids).logits
        base = load_four_bit(base_model, FOUR_BIT, "fp32", "cpu")(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-6)
    assert (a - base).abs().max() > 1e-4  # the adapter changed what the 4-bit base says


def test_a_job_config_carries_the_plan_s_4bit_base(tmp_path):
    """What the head writes for the ranks (launch.train_config): the method and the plan's 4-bit base."""
    from orchestrator.launch import train_config

    spec = load_job(EXAMPLE, check_files=False)
    plan = make_plan(spec, facts_from_config(model_config("llama-3.1-8b")), HOMELAB, 100)
    config = train_config(spec, plan, "job-1")
    assert config.method == "qlora" and config.four_bit["type"] == "nf4" and config.four_bit["double_quant"] is True
    assert dataclasses.asdict(plan.four_bit) == config.four_bit
    assert config.plan["four_bit"]["type"] == "nf4"


def test_a_qlora_job_resumes_from_its_checkpoint_on_another_number_of_ranks(ds_runs, tmp_path, demo_data, base_model):
    """Stopped after step 2 on three ranks, placed again on two (a move, or a card lost): it loads the adapters'
    weights and Adam state through DeepSpeed's universal form onto a freshly quantised base and lands where an
    uninterrupted three-rank run does."""
    from orchestrator.ds_config import Optimization, RankTuning, deepspeed_config
    from tests.helpers import GRAD_ACCUM, LR, final_weights
    from workers.local_launch import run_local_ranks

    run_local_ranks(job(tmp_path / "run", demo_data, base_model, 2, "qlora", 0.5, steps=2))
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-2"
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step-2" / "mp_rank_00_model_states.pt", weights_only=False)
    weights = [name for name in saved["module"] if name.endswith(".weight")]  # (beside them, the 4-bit base's small quantisation statistics)
    assert weights and all(".lora_" in name for name in weights)  # the adapters, never the 4-bit base's weights
    three = job(tmp_path / "run", demo_data, base_model, 2, "qlora", 0.5)
    opt = Optimization(LR["AdamW"], "constant", 0, 0.0, three.total_steps)
    two = dataclasses.replace(three, micro_batches=(4, 2), activation_checkpointing=(False, False), ds_configs=tuple(
        deepspeed_config(RankTuning(m, 2, False, False, "fp32"), GRAD_ACCUM, 2, 0.5, opt) for m in (4, 2)))
    results = run_local_ranks(two)
    assert results[0]["resumed_from"] == "step-2" and results[0]["universal"] and results[0]["steps"] == three.total_steps
    uninterrupted = ds_runs.weights(job(tmp_path / "whole", demo_data, base_model, 2, "qlora", 0.5))
    assert max_relative_difference(final_weights(two), uninterrupted) < TOLERANCE_ADAMW


def test_a_qlora_job_is_refused_at_submit_where_the_simulated_nodes_lack_bitsandbytes(monkeypatch):
    """Simulated nodes run their ranks in this machine's Python: without bitsandbytes there, submit refuses the job in
    one line with the command that installs it, before anything is queued."""
    from importlib import metadata

    from orchestrator import client

    real = metadata.version

    def version(package: str) -> str:
        if package == "bitsandbytes":
            raise metadata.PackageNotFoundError(package)
        return real(package)

    monkeypatch.setattr(metadata, "version", version)
    spec = load_job(EXAMPLE, check_files=False)
    with pytest.raises(InputError) as err:
        client._check_simulated_nodes_run_qlora("job.yaml", spec, HOMELAB)
    assert str(err.value).startswith("job.yaml: method='qlora' is not allowed; it needs bitsandbytes") and "pip install 'zeromix[qlora]'" in str(err.value)
    client._check_simulated_nodes_run_qlora("job.yaml", spec.model_copy(update={"method": "lora", "quant": None}), HOMELAB)  # LoRA does not need it
    monkeypatch.setattr(metadata, "version", real)
    client._check_simulated_nodes_run_qlora("job.yaml", spec, HOMELAB)  # installed here: accepted


def test_the_scheduler_places_qlora_jobs_by_its_throughput_table():
    """QLoRA jobs in a trace go through the same queue, throughput table and policy as any other: an 8B QLoRA job
    and an 8B LoRA job arrive together on the homelab and both run to the end."""
    from orchestrator.scheduler import trace
    from orchestrator.scheduler.policies import policy
    from orchestrator.scheduler.simulate import simulate

    jobs = [trace.TraceJob("q", 0.0, "llama-3.1-8b", "qlora", 512, 16, 20, 1, 0), trace.TraceJob("l", 0.0, "llama-3.1-8b", "lora", 512, 16, 20, 1, 0)]
    result = simulate(HOMELAB, jobs, policy("gain"))
    ran = {j.id: j for j in result.jobs}
    assert ran["q"].state == ran["l"].state == "succeeded"
    assert ran["q"].cards and ran["l"].cards


def test_the_result_and_the_report_say_the_base_was_4bit(ds_runs, tmp_path, demo_data, base_model):
    from orchestrator.job_driver import report
    from orchestrator.report import write

    config, ranks = ds_runs.run(job(tmp_path / "run", demo_data, base_model, 2, "qlora", 0.5, optimizer="SGD"))
    three = pool(("box", 64, ["RTX 3090", "RTX 3090", "RTX 3090"]))
    plan = make_plan(planner_spec(method="qlora", global_batch_size=12, gpus={"count": 3}), TINY, three, config.total_steps).summary()
    placements = [{"device": "cpu", "cuda_visible_devices": "", "nvml_name": "", "uuid": "", "pci_bus_id": ""}] * 3
    summary = report(config, plan, placements, ranks)
    assert summary["method"] == "qlora"
    assert summary["base"] == "4-bit nf4, double-quantised: 14 linear layers quantised (bitsandbytes), the rest in fp32"
    assert "base: 4-bit nf4, double-quantised: 14 linear layers" in write(summary, tmp_path / "report.html").read_text()
