"""Model facts from `config.json` alone (no weights, no torch): what the memory model needs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import ZeromixError

# Decoder families that share the Llama layout: attention q/k/v/o, gated MLP (gate/up/down), RMSNorm.
LLAMA_LIKE = {"llama": False, "mistral": False, "qwen2": True}  # model_type -> q/k/v carry a bias


@dataclass(frozen=True)
class ModelFacts:
    model_type: str
    n_params: int
    n_layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool
    largest_layer_params: int  # the biggest single weight ZeRO-3 must gather at once

    def lora_params(self, r: int, target_modules: list[str]) -> int:
        """Adapter parameters: r * (fan_in + fan_out) for each targeted projection in every layer."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden, q_out), "k_proj": (self.hidden, kv_out), "v_proj": (self.hidden, kv_out),
            "o_proj": (q_out, self.hidden), "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden),
        }
        return self.n_layers * sum(r * sum(shapes[m]) for m in target_modules if m in shapes)


def read_config(model_dir: str) -> dict:
    path = Path(model_dir) / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    from huggingface_hub import try_to_load_from_cache  # a Hugging Face id already in the local cache

    cached = try_to_load_from_cache(model_dir, "config.json")
    if not isinstance(cached, str):
        raise ZeromixError(f"{model_dir}: no config.json found locally")
    return json.loads(Path(cached).read_text())


def facts_from_config(config: dict) -> ModelFacts:
    model_type = config.get("model_type", "?")
    if model_type not in LLAMA_LIKE:
        raise ZeromixError(f"model_type {model_type!r} is not modelled by the planner yet; supported: {', '.join(sorted(LLAMA_LIKE))}")
    h, i, v, n = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    qkv_bias = LLAMA_LIKE[model_type] or config.get("attention_bias", False)
    o_bias = config.get("attention_bias", False) and model_type == "llama"
    mlp_bias = config.get("mlp_bias", False)
    tied = config.get("tie_word_embeddings", False)

    attention = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    attention += (heads * hd + 2 * kv * hd) * qkv_bias + h * o_bias
    mlp = 3 * h * i + (2 * i + h) * mlp_bias
    layer = attention + mlp + 2 * h  # two RMSNorm weights
    embeddings = v * h * (1 if tied else 2)
    total = embeddings + n * layer + h  # final norm
    return ModelFacts(model_type, total, n, h, i, v, heads, kv, hd, tied, largest_layer_params=max(v * h, h * i))
