"""Model facts from `config.json` alone (no weights, no torch): exact parameter counts and the layer shapes
the memory and step-time models need.

Each supported family is described by what one decoder layer holds (its linear layers with their biases,
and its norms) plus the embeddings around the stack; the count is exact, tied embeddings counted once.
The tests check every family against transformers' own model built from the same config.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from orchestrator.errors import InputError, ZeromixError


@dataclass(frozen=True)
class Linear:
    name: str  # the module's name inside a layer, as PEFT's target_modules match it (its last part)
    fan_in: int
    fan_out: int
    bias: bool

    @property
    def params(self) -> int:
        return self.fan_in * self.fan_out + self.fan_out * self.bias


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
    layer_linears: tuple[Linear, ...]  # one decoder layer's linear layers
    largest_layer_params: int  # the most parameters one module holds: what ZeRO-3 gathers at once (DeepSpeed's measure)
    load_bytes: int = 4  # bytes per weight as the checkpoint stores them (config torch_dtype): what loading it costs
    max_positions: int | None = None  # the longest sequence the model takes (max_position_embeddings / n_positions)

    def check_seq_len(self, seq_len: int, source: str, field: str = "seq_len") -> None:
        """Before any card is reserved: a sequence longer than the model's positions fails only inside training."""
        if self.max_positions and seq_len > self.max_positions:
            raise InputError(source, field, seq_len, f"at most {self.max_positions}, this {self.model_type} model's "
                             "max_position_embeddings (a longer context needs RoPE scaling in its config.json)")

    @property
    def default_lora_targets(self) -> list[str]:
        """PEFT's default target modules for this architecture (data/lora_targets.csv says where each is from)."""
        return list(LORA_DEFAULTS[self.model_type])

    @cached_property
    def matmul_params_per_token(self) -> int:
        """Weights every token multiplies through: all layers' linears and the output head (embedding
        lookups cost no FLOPs)."""
        return self.n_layers * sum(l.fan_in * l.fan_out for l in self.layer_linears) + self.vocab * self.hidden

    def lora_params(self, r: int, target_modules: list[str]) -> int:
        """Adapter parameters: r * (fan_in + fan_out) for each targeted linear in every layer."""
        return self.n_layers * sum(r * (l.fan_in + l.fan_out) for l in self.layer_linears if l.name in target_modules)

    def lora_outputs(self, target_modules: list[str]) -> int:
        """Per layer, the outputs of the adapted linears: what the adapters' scale-and-add touches per token."""
        return sum(l.fan_out for l in self.layer_linears if l.name in target_modules)

    def lora_targets(self) -> list[str]:
        return sorted({l.name for l in self.layer_linears})

    @property
    def quantised_linears(self) -> tuple[Linear, ...]:
        """One layer's linears that bitsandbytes replaces with 4-bit ones: every nn.Linear of the decoder stack (not
        GPT-2's Conv1D layers; never the output head, which transformers keeps in the compute dtype)."""
        return () if self.model_type in NOT_QUANTISED else self.layer_linears

    @cached_property
    def quantised_weights(self) -> int:
        """Weights a 4-bit base holds in 4 bits (their biases stay in the compute dtype)."""
        return self.n_layers * sum(l.fan_in * l.fan_out for l in self.quantised_linears)


def read_config(model_dir: str) -> dict:
    path = Path(model_dir) / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    if Path(model_dir).is_absolute():  # a directory, not a Hugging Face id: gone, or never a model
        raise ZeromixError(f"{model_dir}: no config.json found locally (the directory is gone or holds none)")
    from huggingface_hub import try_to_load_from_cache  # a Hugging Face id already in the local cache

    cached = try_to_load_from_cache(model_dir, "config.json")
    if not isinstance(cached, str):
        raise ZeromixError(f"{model_dir}: no config.json found locally (a directory holding one, or a Hugging Face id already in the local cache)")
    return json.loads(Path(cached).read_text())


def _llama_like(c: dict, qkv_bias: bool, o_bias: bool, norms_per_layer: int) -> tuple[list[Linear], int]:
    """Llama, Mistral, Qwen2, Gemma: separate q/k/v/o, gated MLP, RMSNorm (weight only)."""
    h, i, heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    kv, hd = c.get("num_key_value_heads") or heads, c.get("head_dim") or h // heads
    mlp_bias = c.get("mlp_bias", False)
    linears = [Linear("q_proj", h, heads * hd, qkv_bias), Linear("k_proj", h, kv * hd, qkv_bias), Linear("v_proj", h, kv * hd, qkv_bias),
               Linear("o_proj", heads * hd, h, o_bias), Linear("gate_proj", h, i, mlp_bias), Linear("up_proj", h, i, mlp_bias),
               Linear("down_proj", i, h, mlp_bias)]
    return linears, norms_per_layer * h


def _layer(c: dict) -> tuple[list[Linear], int, int, int]:
    """(linears, norm params per layer, final norm params, extra embedding params) for one family."""
    kind = c["model_type"]
    h = c.get("hidden_size") or c.get("n_embd")
    if kind in ("llama", "mistral", "qwen2", "gemma", "gemma2", "qwen3"):
        attn_bias = c.get("attention_bias", False)
        qkv_bias = True if kind == "qwen2" else attn_bias
        o_bias = attn_bias if kind in ("llama", "mistral", "gemma", "gemma2", "qwen3") else False
        linears, norms = _llama_like(c, qkv_bias, o_bias, 4 if kind == "gemma2" else 2)
        if kind == "qwen3":
            norms += 2 * (c.get("head_dim") or h // c["num_attention_heads"])  # q_norm and k_norm over one head
        return linears, norms, h, 0
    if kind == "phi3":
        heads = c["num_attention_heads"]
        kv, hd, i = c.get("num_key_value_heads") or heads, h // heads, c["intermediate_size"]
        return [Linear("qkv_proj", h, (heads + 2 * kv) * hd, False), Linear("o_proj", heads * hd, h, False),
                Linear("gate_up_proj", h, 2 * i, False), Linear("down_proj", i, h, False)], 2 * h, h, 0
    if kind == "phi":  # Phi-1/1.5/2: parallel attention and MLP under one LayerNorm; biases everywhere
        heads = c["num_attention_heads"]
        kv, hd, i = c.get("num_key_value_heads") or heads, h // heads, c["intermediate_size"]
        linears = [Linear("q_proj", h, heads * hd, True), Linear("k_proj", h, kv * hd, True), Linear("v_proj", h, kv * hd, True),
                   Linear("dense", heads * hd, h, True), Linear("fc1", h, i, True), Linear("fc2", i, h, True)]
        norms = 2 * h + (4 * hd if c.get("qk_layernorm") else 0)
        return linears, norms, 2 * h, 0
    if kind == "gpt2":
        inner = c.get("n_inner") or 4 * h
        linears = [Linear("c_attn", h, 3 * h, True), Linear("c_proj", h, h, True), Linear("c_fc", h, inner, True), Linear("c_proj", inner, h, True)]
        return linears, 4 * h, 2 * h, c["n_positions"] * h  # ln_1, ln_2 with biases; ln_f; learned positions
    raise ZeromixError(f"model_type {kind!r} is not modelled by the planner yet; supported: {', '.join(SUPPORTED)}")


SUPPORTED = ("gemma", "gemma2", "gpt2", "llama", "mistral", "phi", "phi3", "qwen2", "qwen3")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
NOT_QUANTISED = {"gpt2"}  # its layers are transformers' Conv1D, which bitsandbytes leaves as they are


def _lora_defaults() -> dict[str, tuple[str, ...]]:
    with open(Path(__file__).parent / "data" / "lora_targets.csv", newline="") as f:
        return {row["model_type"]: tuple(row["target_modules"].split()) for row in csv.DictReader(f)}


LORA_DEFAULTS = _lora_defaults()
TIED_BY_DEFAULT = {"gemma", "gemma2", "gpt2"}  # their configs tie input and output embeddings unless told otherwise


def facts_from_config(config: dict) -> ModelFacts:
    kind = config.get("model_type", "?")
    if kind not in SUPPORTED:
        raise ZeromixError(f"model_type {kind!r} is not modelled by the planner yet; supported: {', '.join(SUPPORTED)}")
    linears, norms, final_norm, positions = _layer(config)
    h = config.get("hidden_size") or config["n_embd"]
    n = config.get("num_hidden_layers") or config["n_layer"]
    v = config["vocab_size"]
    heads = config.get("num_attention_heads") or config["n_head"]
    kv = config.get("num_key_value_heads") or heads
    tied = config.get("tie_word_embeddings", kind in TIED_BY_DEFAULT)
    head_bias = v if kind == "phi" else 0  # Phi-2's lm_head carries a bias
    embeddings = v * h + positions + (0 if tied else v * h + head_bias)
    total = embeddings + n * (sum(l.params for l in linears) + norms) + final_norm
    largest = max(v * h + (0 if tied else head_bias), max(l.params for l in linears))
    intermediate = config.get("intermediate_size") or config.get("n_inner") or 4 * h
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"  # transformers loads a checkpoint in its own dtype
    return ModelFacts(kind, total, n, h, intermediate, v, heads, kv,
                      config.get("head_dim") or h // heads, tied, tuple(linears), largest, DTYPE_BYTES.get(dtype, 4),
                      config.get("max_position_embeddings") or config.get("n_positions"))
