"""The memory model's model-state figures equal DeepSpeed's own estimators wherever both cover a case."""

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from orchestrator.planner.memory import TrainingShape, ZeroSetting, host_bytes, model_states
from tests.helpers import model_config as config
from orchestrator.model_facts import facts_from_config

MODELS = ["llama-3.1-8b", "mistral-7b-v0.1", "qwen2.5-0.5b", "gpt2"]
LAYOUTS = [(1, 1), (2, 1), (4, 1), (2, 2), (4, 3)]  # (cards per node, nodes)


def full(name: str, precision: str = "bf16") -> TrainingShape:
    facts = facts_from_config(config(name))
    return TrainingShape(facts, facts.n_params, 1024, precision, False)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("per_node, nodes", LAYOUTS)
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_matches_deepspeed(name, per_node, nodes, offload):
    shape = full(name)
    world = per_node * nodes
    cpu, gpu = estimate_zero2_model_states_mem_needs(shape.facts.n_params, per_node, nodes, cpu_offload=offload)
    assert abs(sum(model_states(shape, ZeroSetting(2, offload, False), world)) - gpu) <= 2  # each part rounds down once
    assert host_bytes(shape, ZeroSetting(2, offload, False), per_node, world) == cpu


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("per_node, nodes", LAYOUTS)
@pytest.mark.parametrize("offload_optimizer, offload_params", [(False, False), (True, False), (True, True)])
def test_zero3_matches_deepspeed(name, per_node, nodes, offload_optimizer, offload_params):
    shape = full(name)
    world = per_node * nodes
    cpu, gpu, largest = estimate_zero3_model_states_mem_needs(shape.facts.n_params, shape.facts.largest_layer_params, per_node, nodes,
                                                              cpu_offload=offload_optimizer, cpu_offload_params=offload_params)
    weights, gradients, optimizer, gathered = model_states(shape, ZeroSetting(3, offload_optimizer, offload_params), world)
    assert gathered == largest
    assert abs(weights + gradients + optimizer + gathered - gpu) <= 2  # DeepSpeed rounds 18P/W once, we round each part
    assert host_bytes(shape, ZeroSetting(3, offload_optimizer, offload_params), per_node, world) == pytest.approx(cpu, abs=2)


def test_lora_pays_optimizer_state_only_for_the_adapters():
    facts = facts_from_config(config("mistral-7b-v0.1"))
    adapters = facts.lora_params(16, ["q_proj", "v_proj"])
    weights, gradients, optimizer, _ = model_states(TrainingShape(facts, adapters, 1024, "bf16", False), ZeroSetting(2, False, False), 1)
    assert weights == 2 * facts.n_params  # the frozen base in bf16
    assert (gradients, optimizer) == (2 * adapters, 16 * adapters)


def test_fp32_keeps_a_master_partition_too():
    shape = full("gpt2", "fp32")
    p = shape.facts.n_params
    assert model_states(shape, ZeroSetting(2, False, False), 2) == (4 * p, 4 * p // 2, 12 * p // 2, 0)
