"""The plan's model-state memory per card, checked against the DeepSpeed engines the workers really build:
each rank counts the sizes of its partitioned parameter, gradient and optimizer tensors
(workers/memory_report.py) and the two must agree within 5%."""

import json
import shutil

import pytest

from orchestrator.cluster_config import ClusterConfig
from orchestrator.inventory import snapshot_from_config
from orchestrator.jobspec import JobSpec
from orchestrator.launch import train_config
from orchestrator.model_facts import facts_from_config
from orchestrator.planner import make_plan
from tests.conftest import TINY_LLAMA
from workers.local_launch import run_local_ranks

pytestmark = pytest.mark.deepspeed

# A small Llama (3.2 M parameters): large enough that DeepSpeed's alignment padding is noise.
SMALL = {**json.loads((TINY_LLAMA / "config.json").read_text()), "hidden_size": 256, "intermediate_size": 768,
         "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4}
POOL = snapshot_from_config(ClusterConfig.model_validate({"head": {"address": "10.0.0.1"}, "nodes": [
    {"name": "desk", "address": "10.0.0.1", "ram_gb": 64, "gpus": [{"model": "RTX 3090"}, {"model": "RTX 4090"}]}]}))


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("small")
    shutil.copytree(TINY_LLAMA, path, dirs_exist_ok=True)
    (path / "config.json").write_text(json.dumps(SMALL))
    return path


@pytest.mark.parametrize("stage, method", [(2, "full"), (3, "full"), (3, "lora")])
def test_plan_model_states_match_the_engines_tensors(stage, method, small_model, demo_data, tmp_path):
    job = JobSpec.model_validate({
        "name": "mem", "model": {"init": "scratch" if method == "full" else "pretrained", "path": str(small_model)},
        "dataset": {"path": str(demo_data["pretrain"]), "text_field": "text"}, "method": method, "seq_len": 32,
        "global_batch_size": 8, "max_steps": 1, "output_dir": str(tmp_path / "out"), "precision": "bf16",
        "gpus": {"count": 2}, "deepspeed": {"zero_stage": stage, "offload": "none"},
        **({"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}} if method == "lora" else {}),
    })
    if method == "lora":  # LoRA starts from saved weights
        from transformers import AutoConfig, AutoModelForCausalLM

        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(small_model)).save_pretrained(small_model)
    plan = make_plan(job, facts_from_config(SMALL), POOL, 1)
    assert (plan.zero.stage, plan.precision, len(plan.ranks)) == (stage, "bf16", 2)
    results = run_local_ranks(train_config(job, plan, "mem"))
    for rank, result in zip(plan.ranks, results):
        measured = result["model_state_bytes"]
        estimated = {"weights": rank.memory.weights, "gradients": rank.memory.gradients, "optimizer": rank.memory.optimizer}
        total_measured, total_estimated = sum(measured.values()), sum(estimated.values())
        assert abs(total_measured - total_estimated) <= 0.05 * total_measured, (measured, estimated)
        for part in estimated:  # and part by part, within 5% of the total
            assert abs(measured[part] - estimated[part]) <= 0.05 * total_measured, (part, measured, estimated)
