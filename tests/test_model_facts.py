"""Exact parameter counts from config.json alone, for real public architectures (their configs are shipped
as test data), checked against the published counts and against transformers' own model."""


import pytest
import torch

from orchestrator.errors import ZeromixError
from orchestrator.model_facts import facts_from_config
from tests.helpers import CONFIGS, model_config


# Published parameter counts (model cards / safetensors metadata), tied embeddings counted once.
PUBLISHED = {
    "gpt2": 124_439_808,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "llama-3.1-8b": 8_030_261_248,
    "mistral-7b-v0.1": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen3-0.6b": 596_049_920,
    "gemma-2b": 2_506_172_416,
    "gemma-2-2b": 2_614_341_888,
    "phi-2": 2_779_683_840,
    "phi-3-mini-4k-instruct": 3_821_079_552,
}


config = model_config


def meta_model(name: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no weights
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(CONFIGS / name))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_is_exact(name):
    facts = facts_from_config(config(name))
    assert facts.n_params == PUBLISHED[name]
    model = meta_model(name)
    assert facts.n_params == sum({id(p): p.numel() for p in model.parameters()}.values())
    # ZeRO-3 gathers one module's parameters at a time; DeepSpeed's estimator uses the largest
    assert facts.largest_layer_params == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def test_six_families_at_least():
    assert len({facts_from_config(config(n)).model_type for n in PUBLISHED}) >= 6


@pytest.mark.parametrize("name, targets", [("llama-3.2-1b", ["q_proj", "v_proj"]), ("phi-3-mini-4k-instruct", ["qkv_proj", "o_proj"]),
                                           ("gpt2", ["c_attn", "c_proj"]), ("qwen2.5-0.5b", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])])
def test_lora_adapter_size_matches_peft(name, targets):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(meta_model(name), LoraConfig(r=16, target_modules=targets, fan_in_fan_out=name == "gpt2"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert facts_from_config(config(name)).lora_params(16, targets) == trainable


def test_unsupported_family_says_which_are():
    with pytest.raises(ZeromixError, match=r"model_type 'mamba' is not modelled by the planner yet; supported: gemma, gemma2, gpt2, llama"):
        facts_from_config({"model_type": "mamba"})


def test_the_lora_defaults_are_pefts_own():
    """data/lora_targets.csv is PEFT's per-architecture default; if PEFT changes one, or adds one for Phi-3
    (for which it has none and zeromix adapts the fused qkv_proj), this says so."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

    from orchestrator.model_facts import LORA_DEFAULTS, SUPPORTED

    assert set(LORA_DEFAULTS) == set(SUPPORTED)
    for model_type, targets in LORA_DEFAULTS.items():
        assert list(targets) == (peft_defaults.get(model_type) or ["qkv_proj"]), model_type
    assert "phi3" not in peft_defaults


@pytest.mark.parametrize("name", ["phi-3-mini-4k-instruct", "gpt2", "qwen2.5-0.5b"])
def test_the_default_targets_name_real_layers_and_count_what_peft_adapts(name):
    from peft import LoraConfig, get_peft_model

    facts = facts_from_config(config(name))
    targets = facts.default_lora_targets
    model = get_peft_model(meta_model(name), LoraConfig(r=8, target_modules=targets, fan_in_fan_out=name == "gpt2"))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == facts.lora_params(8, targets) > 0
